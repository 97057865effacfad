"""The ``payi-guard`` command: check, usage, report and demo dispatch, and exit codes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from payi_guard.cli import main

SAMPLE = Path(__file__).parent / "data" / "report" / "sample.log"

BUDGETS = """\
version: 1
storage: memory://
prices:
  test-model: {input_per_mtok: 1.0, output_per_mtok: 2.0}
limits:
  daily: {max: 1.00, per: day}
  soft: {max: 5.00, per: week, type: allow}
  project: {max: 50, per: month}
default: [daily, soft, {requests: 30, per: minute}]
users:
  bot: []
"""


@pytest.fixture
def budgets(tmp_path: Path) -> Path:
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS, encoding="utf-8")
    return path


def test_check_a_good_file(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(budgets)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{budgets}: ok (3 named limits, 0 tiers, 1 user, 0 orgs,")
    assert "fingerprint " in out


def test_check_a_bad_file_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlimits:\n  daily: {max: 1.00, per: dya}\n", encoding="utf-8")
    assert main(["check", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {bad}:3: limits.daily.per: unknown period 'dya'")
    assert "did you mean 'day'?" in captured.err


def test_usage_table(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "acme:alice", "--config", str(budgets)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "limit",
        "scope",
        "unit",
        "used",
        "max",
        "remaining",
        "state",
        "resets_at",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"daily", "soft", "user:2"}
    assert rows["daily"].split()[1:7] == ["user", "usd", "0", "1", "1", "ok"]
    assert " ok (soft) " in rows["soft"]
    assert rows["user:2"].split()[1:7] == ["user", "requests", "0", "30", "30", "ok"]
    stamp = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}Z\Z")
    assert all(stamp.search(line) for line in lines[1:])


def test_usage_json_with_a_named_limit(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["usage", "acme:alice", "-c", str(budgets), "--limit-id", "project", "--format", "json"]
    )
    assert code == 0
    usages = json.loads(capsys.readouterr().out)
    by_name = {u["name"]: u for u in usages}
    assert set(by_name) == {"daily", "soft", "user:2", "project"}
    assert by_name["daily"]["unit"] == "usd"
    assert Decimal(by_name["daily"]["remaining"]) == 1
    assert by_name["soft"]["type"] == "allow"
    assert by_name["project"]["max"] == "50"


def test_usage_of_a_tracked_only_user(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "bot", "-c", str(budgets)]) == 0
    assert capsys.readouterr().out == "bot: no limits apply (tracked only)\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["usage", "bad id"], "error: invalid user id: it contains whitespace"),
        (["usage", "alice", "--limit-id", "nope"], "limit_ids names 'nope'"),
    ],
)
def test_usage_errors_of_the_request_exit_2(
    budgets: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    assert main([*argv, "-c", str(budgets)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert message in captured.err


def test_usage_of_a_missing_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.yaml"
    assert main(["usage", "alice", "-c", str(missing)]) == 2
    assert capsys.readouterr().err == f"error: {missing}: no such file\n"


def test_usage_with_unreachable_storage_exits_1(
    budgets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1 refuses the connection at once: no server is involved.
    code = main(["usage", "alice", "-c", str(budgets), "--storage", "redis://127.0.0.1:1/0"])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ")


def test_report_is_dispatched(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(SAMPLE), "--format", "json", "--by", "org"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out, parse_float=Decimal)
    assert {row["org_id"] for row in rows} == {"acme", None}
    assert sum(row["cost_usd"] for row in rows) == Decimal("0.000249")
    assert captured.err.startswith("payi-guard report: total $0.000249 over 4 calls")


def test_report_of_a_missing_log_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.log"
    assert main(["report", str(missing)]) == 2
    assert "cannot read" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["usage", "alice"],  # --config is required
        ["demo", "--users", "many"],
        ["report"],
        ["report", str(SAMPLE), "--top", "0"],
        ["nope"],
    ],
)
def test_bad_arguments_exit_2_with_usage(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(argv)
    assert exc_info.value.code == 2
    assert "usage: payi-guard" in capsys.readouterr().err


def test_python_dash_m_lists_every_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "payi_guard", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    for command in ("report", "check", "usage", "demo"):
        assert re.search(rf"^\s+{command}\s", done.stdout, re.MULTILINE), done.stdout
