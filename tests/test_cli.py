"""The ``payi-guard`` command: check, usage, report and demo dispatch, and exit codes."""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
import redis
from structlog.testing import capture_logs

import payi_guard
from payi_guard import BudgetExceeded, track_context
from payi_guard.cli import build_parser, main
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage

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


EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Output is laid out for the terminal: 80 columns here, whatever runs the tests.

    The tests run in their temporary folder, so paths are short, as a user's are.
    """
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.chdir(tmp_path)


def one_line(text: str) -> str:
    """Messages are wrapped to the terminal: read them as one line."""
    return " ".join(text.split())


@pytest.fixture
def budgets(tmp_path: Path) -> Path:
    path = Path("budgets.yaml")
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
    assert captured.err.startswith(f"error: {bad}:3:")  # one line: a place to jump to
    err = one_line(captured.err)
    assert err.startswith(f"error: {bad}:3: limits.daily.per: unknown period 'dya'")
    assert "did you mean 'day'?" in err


def test_usage_table(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["usage", "acme:alice", "--config", str(budgets), "--storage", "memory://"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["limit", "scope", "used", "max", "remaining", "state", "resets"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"daily", "soft", "user:2"}
    assert rows["daily"].split()[1:6] == ["user", "$0", "$1", "$1", "ok"]
    assert " ok (soft) " in rows["soft"]
    assert rows["user:2"].split()[1:9] == ["user", "0", "req", "30", "req", "30", "req", "ok"]
    stamp = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}Z\Z")
    assert all(stamp.search(line) for line in lines[1:])
    assert all(len(line) <= 80 for line in lines)


def test_usage_json_with_a_named_limit(budgets: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        [
            *("usage", "acme:alice", "-c", str(budgets), "--storage", "memory://"),
            *("--limit-id", "project", "--format", "json"),
        ]
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
    assert main(["usage", "bot", "-c", str(budgets), "--storage", "memory://"]) == 0
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
    assert one_line(capsys.readouterr().err) == f"error: {missing}: no such file"


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
        ["demo", "--users", "3"],  # fewer than the 6 built-in users
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


def test_demo_json_logs_it_cannot_write_is_a_mistake_in_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    for path in (tmp_path / "no" / "such" / "folder.jsonl", tmp_path):
        assert main(["demo", "--json-logs", str(path)]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert one_line(captured.err).startswith("payi-guard demo: error: cannot write the JSON")
    assert [p.name for p in tmp_path.iterdir()] == []


def test_the_demo_removes_its_own_log_file_when_it_is_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from payi_guard.demo import run_demo

    class CtrlC(io.StringIO):
        """Where the demo prints; Ctrl+C comes as its third line is printed."""

        def write(self, text: str) -> int:
            if self.getvalue().count("\n") >= 2:
                raise KeyboardInterrupt
            return super().write(text)

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run_demo(out=CtrlC())
    assert [p.name for p in tmp_path.iterdir()] == []


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


# -- what the commands say about themselves ---------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["--version"])
    assert exc_info.value.code == 0
    assert capsys.readouterr().out == f"payi-guard {payi_guard.__version__}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", payi_guard.__version__)


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_command_and_option_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    commands = _commands()
    assert {"report", "check", "usage", "demo"} <= set(commands)
    for name, parser in commands.items():
        assert parser.description, name
        assert len(parser.description.split()) >= 8, name  # a sentence, not a label
        for action in parser._actions:
            if not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.dest}"
        with pytest.raises(SystemExit):
            main([name, "--help"])
        text = capsys.readouterr().out
        assert parser.description.split()[0] in text
        assert all(len(line) <= 80 for line in text.splitlines()), name
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    for name in commands:
        assert re.search(rf"^\s+{name}\s+\S", listing, re.MULTILINE), name


# -- usage on a store that lives in the app's process --------------------------------------------


def test_usage_of_a_memory_store_is_refused_with_the_reason(
    budgets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["usage", "acme:alice", "-c", str(budgets)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = " ".join(captured.err.split())
    assert err.startswith(f"error: {budgets} keeps its counters in memory://")
    assert "inside each app process" in err
    assert "--storage redis://" in err
    assert "--storage memory://" in err
    assert all(len(line) <= 80 for line in captured.err.splitlines())


def test_usage_of_memory_asked_for_explicitly_says_it_starts_empty(
    budgets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["usage", "acme:alice", "-c", str(budgets), "--storage", "memory://"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("limit ")
    err = " ".join(captured.err.split())
    assert err.startswith("note: memory:// starts empty in this process")


@pytest.fixture
def redis_guard(
    redis_url: str, key_prefix: str, budgets: Path, clock: FakeClock
) -> Iterator[Guard]:
    guard = Guard.from_yaml(budgets, storage=redis_url, key_prefix=key_prefix, clock=clock)
    try:
        yield guard
    finally:
        guard.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_usage_money_is_a_decimal_and_the_table_fits_80_columns(
    redis_guard: Guard,
    redis_url: str,
    key_prefix: str,
    budgets: Path,
    clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user = "acme:" + "a-rather-long-user-name" * 4
    with capture_logs():
        redis_guard.record(user_id=user, model="test-model", cost_usd="0.000000034")
        redis_guard.record(user_id=user, model="test-model", cost_usd="1234567.5")
    argv = ["usage", user, "-c", str(budgets), "--storage", redis_url, "--key-prefix", key_prefix]
    assert main(argv, clock=clock) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert all(len(line) <= 80 for line in lines), captured.out
    daily = next(line for line in lines if line.startswith("daily"))
    assert "$1,234,567.500000034" in daily
    assert "E-" not in captured.out
    assert "E+" not in captured.out
    assert "exceeded" in daily


BLOCKING = """\
version: 1
storage: sqlite:///budgets.db
prices:
  test-model: {input_per_mtok: 1.0, output_per_mtok: 2.0}
limits:
  daily: {max: 0.000434, per: day}
default: [daily]
"""


TIERED = """\
version: 1
storage: memory://
prices:
  test-model: {input_per_mtok: 1.0, output_per_mtok: 2.0}
limits:
  free_daily: {max: 1.00, per: day}
  pro_daily: {max: 10.00, per: day}
tiers:
  pro: [pro_daily]
default: [free_daily]
"""


def test_usage_reads_a_user_with_the_limits_of_their_tier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # As the app does when it assigns tiers at run time (tier_of, set_user): the limits
    # shown are those that refuse the user's calls.
    path = tmp_path / "tiered.yaml"
    path.write_text(TIERED, encoding="utf-8")
    (tmp_path / "billing_tiers.py").write_text(
        "def tier_of(user_id):\n    return 'pro' if user_id == 'vip1' else None\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["usage", "vip1", "-c", str(path), "--storage", "memory://", "--format", "json"]

    def limits(*extra: str) -> list[str]:
        assert main([*argv, *extra]) == 0
        return [limit["name"] for limit in json.loads(capsys.readouterr().out)]

    assert limits() == ["free_daily"]
    assert limits("--tier", "pro") == ["pro_daily"]
    assert limits("--tier-of", "billing_tiers:tier_of") == ["pro_daily"]
    assert main([*argv, "--tier", "pro", "--tier-of", "billing_tiers:tier_of"]) == 2
    assert "give --tier or --tier-of, not both" in capsys.readouterr().err
    assert main([*argv, "--tier-of", "billing_tiers"]) == 2
    assert "MODULE:FUNCTION" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_usage_says_exceeded_when_the_limit_refuses_the_users_calls(
    request: pytest.FixtureRequest,
    store: str,
    key_prefix: str,
    clock: FakeClock,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = Path("blocking.yaml")
    path.write_text(BLOCKING, encoding="utf-8")
    argv = ["usage", "alice", "-c", str(path), "--key-prefix", key_prefix]
    redis_url = None
    if store == "redis":
        redis_url = request.getfixturevalue("redis_url")
        argv += ["--storage", redis_url]
    guard = Guard.from_yaml(path, storage=redis_url, key_prefix=key_prefix, clock=clock)
    try:
        with capture_logs():
            for _ in range(10):  # $0.00004 each, $0.00007 reserved
                with track_context(user_id="alice"):
                    reservation = guard.begin(CallRequest(model="test-model", input_tokens=30,
                                                          max_output_tokens=20))  # fmt: skip
                    reservation.settle(TokenUsage(30, 5))
            with track_context(user_id="alice"), pytest.raises(BudgetExceeded):
                guard.begin(CallRequest(model="test-model", input_tokens=30, max_output_tokens=20))
        # Another process, later: the table and the JSON say what the app's 429 says.
        assert main(argv, clock=clock) == 0
        daily = next(line for line in capsys.readouterr().out.splitlines() if "daily" in line)
        assert daily.split()[1:6] == ["user", "$0.0004", "$0.000434", "$0.000034", "exceeded"]
        assert main([*argv, "--format", "json"], clock=clock) == 0
        (shown,) = json.loads(capsys.readouterr().out)
        assert (shown["remaining"], shown["state"]) == ("0.000034", "exceeded")
    finally:
        guard.close()
        if redis_url is not None:
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


# -- check: what a valid file may still get wrong ---------------------------------------------


def test_check_warns_that_memory_is_per_process(
    budgets: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(budgets)]) == 0
    captured = capsys.readouterr()
    err = " ".join(captured.err.split())
    assert err.startswith(f"warning: {budgets}: storage memory:// is per process")
    assert "gunicorn -w 4" in err
    assert "redis://" in err
    assert all(len(line) <= 80 for line in captured.out.splitlines() + captured.err.splitlines())
    shared = budgets.with_name("shared.yaml")
    shared.write_text(BUDGETS.replace("memory://", "redis://127.0.0.1:6379/0"), encoding="utf-8")
    assert main(["check", str(shared)]) == 0
    assert capsys.readouterr().err == ""


TINY = """\
version: 1
storage: redis://127.0.0.1:6379/0
limits:
  daily: {max: 1.00, per: day}
  crumbs: {max: 0.00005, per: day}
  soft: {max: 0.00001, per: day, type: allow}
default: [daily, {tokens: 150, per: hour}, {requests: 1, per: minute}]
orgs:
  acme: [crumbs]
anonymous: {strategy: shared, limits: [{max: 0.00002, per: day}]}
"""


def test_check_warns_when_a_limit_cannot_admit_a_reference_call(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = Path("tiny.yaml")
    path.write_text(TINY, encoding="utf-8")
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"{path}: ok")
    warnings = [" ".join(w.split()) for w in re.split(r"\n(?=warning: )", captured.err.strip())]
    assert len(warnings) == 3, captured.err
    crumbs, tokens, anonymous = warnings
    assert crumbs.startswith(f"warning: {path}:5: limit 'crumbs' (max $0.00005 per day)")
    assert "cannot admit one reference call" in crumbs
    # 100 input tokens at $0.15 and 100 output tokens at $0.60 per million: $0.000075.
    assert "reserves $0.000075 (gpt-4o-mini, 100 input and 100 output tokens)" in crumbs
    assert tokens.startswith(f"warning: {path}:7: limit 'user:1' (max 150 tokens per hour)")
    assert "200 tokens" in tokens
    assert anonymous.startswith(f"warning: {path}:10: limit 'anonymous:0' (max $0.00002 per day)")
    # Soft limits never refuse, the request limit admits one call, daily admits many.
    assert "soft" not in captured.err
    assert "user:2" not in captured.err
    assert all(len(line) <= 80 for line in captured.err.splitlines())

    # --strict turns warnings into a failure (for CI); another reference model.
    assert main(["check", "--strict", str(path)]) == 1
    capsys.readouterr()
    assert main(["check", str(path), "--model", "gpt-4o", "--max-tokens", "10"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "(gpt-4o, 100 input and 10 output tokens)" in err
    assert main(["check", str(path), "--model", "no-such-model"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no price is known for the reference model 'no-such-model'" in err


def test_the_example_budgets_admit_a_reference_call(capsys: pytest.CaptureFixture[str]) -> None:
    path = EXAMPLES.resolve() / "budgets.yaml"
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert "reference call" not in captured.err
    assert "per process" not in captured.err  # the examples share one SQLite file


def test_adjust_takes_a_negative_amount_in_any_number_form() -> None:
    parser = build_parser()
    for amount in ("-1e-9", "-0.25", "-3", "-.5", "-2E+3"):
        args = parser.parse_args(["adjust", "bob", amount, "--limit", "daily", "-c", "b.yaml"])
        assert args.amount == amount
