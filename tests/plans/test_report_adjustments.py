"""``payi-guard report`` shows operators' adjustments apart from what calls cost."""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from payi_guard import Guard, track_context
from payi_guard.cli import main
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest
from payi_guard.log import configure_json
from payi_guard.pricing import TokenUsage


def line(event: str, **fields: Any) -> str:
    return json.dumps({"event": event, "timestamp": "2026-11-27T12:00:00Z", **fields})


def call(user: str, cost: str) -> str:
    return line(
        "genai_call",
        user_id=user,
        model="m",
        input_tokens=1,
        output_tokens=1,
        cost_usd=cost,
        outcome="ok",
    ).replace(f'"cost_usd": "{cost}"', f'"cost_usd": {cost}')


def adjusted(user: str, limit: str, unit: str, amount: str, action: str | None) -> str:
    fields: dict[str, Any] = {"user_id": user, "limit": limit, "unit": unit, "amount": amount}
    if action is not None:
        fields["adjustment_id"] = action
    text = line("budget_adjusted", **fields)
    return (
        text if amount == "oops" else text.replace(f'"amount": "{amount}"', f'"amount": {amount}')
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["report", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def log(tmp_path: Path) -> Path:
    path = tmp_path / "app.jsonl"
    path.write_text(
        "\n".join(
            [
                call("acme:alice", "0.30"),
                call("bob", "0.10"),
                adjusted("acme:alice", "daily", "usd", "-0.25", "A"),
                # One reset of every limit: three lines, one action; its money counted once.
                adjusted("acme:alice", "daily", "usd", "-0.05", "B"),
                adjusted("acme:alice", "monthly", "usd", "-0.05", "B"),
                adjusted("acme:alice", "rpm", "requests", "-1", "B"),
                adjusted("acme:alice", "rpm", "requests", "2", "C"),  # no money
                adjusted("bob", "daily", "usd", "1.5", None),
                adjusted("bob", "daily", "usd", "oops", None),  # unusable: skipped
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def test_spend_and_adjustments_are_apart(
    log: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = run(capsys, str(log), "--format", "json")
    assert code == 0
    rows = {row["user_id"]: row for row in json.loads(out, parse_float=Decimal)}
    alice, bob = rows["acme:alice"], rows["bob"]
    assert (alice["cost_usd"], alice["adjustments"], alice["adjusted_usd"]) == (
        Decimal("0.30"),
        3,
        Decimal("-0.30"),
    )
    assert (bob["cost_usd"], bob["adjustments"], bob["adjusted_usd"]) == (
        Decimal("0.10"),
        1,
        Decimal("1.5"),
    )
    monkeypatch.setenv("COLUMNS", "80")
    code, table, _ = run(capsys, str(log))
    lines = table.splitlines()
    assert lines[0].split()[-1] == "adjusted"  # kept when the terminal is narrow
    assert lines[1].split()[0] == "acme:alice"
    assert lines[1].endswith("-$0.300000 (3)")
    assert lines[2].endswith("+$1.500000 (1)")
    flowing = " ".join(table.split())
    assert "4 adjustments by operators (+$1.200000, apart from the total)" in flowing
    assert "1 skipped" in flowing
    assert max(len(text) for text in lines) <= 80
    code, csv_out, _ = run(capsys, str(log), "--format", "csv")
    header = csv_out.splitlines()[0].split(",")
    assert header[-2:] == ["adjustments", "adjusted_usd"]


def test_filters_apply_to_adjustments(log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run(capsys, str(log), "--format", "json", "--user", "bob")
    assert [row["user_id"] for row in json.loads(out)] == ["bob"]
    _, out, _ = run(capsys, str(log), "--format", "json", "--by", "org")
    orgs = {row["org_id"]: row for row in json.loads(out, parse_float=Decimal)}
    assert orgs["acme"]["adjusted_usd"] == Decimal("-0.30")


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    """The app's structlog events, as JSON lines in a file, for one test."""
    path = tmp_path / "guard.jsonl"
    saved = structlog.get_config()
    with path.open("w", encoding="utf-8") as stream:
        configure_json(stream)
        try:
            yield path
        finally:
            structlog.configure(**saved)


def test_the_report_reconciles_with_the_ledger(
    json_log: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    prices = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
    guard = Guard({"prices": prices, "default": [{"max": 1, "per": "day"}]}, clock=clock)
    for tokens in (1000, 2500, 700):
        with track_context(user_id="acme:alice"):
            request = CallRequest(model="test-model", input_tokens=tokens)
            guard.begin(request).settle(TokenUsage(tokens, 0))
    guard.adjust("acme:alice", "user:0", "-0.002", "refund", by="ops")
    guard.adjust("acme:alice", "user:0", "0.0005")
    guard.reset("acme:alice", reason="incident")
    with track_context(user_id="acme:alice"):
        guard.begin(CallRequest(model="test-model", input_tokens=300)).settle(TokenUsage(300, 0))
    _, out, _ = run(capsys, str(json_log), "--format", "json")
    (row,) = json.loads(out, parse_float=Decimal)
    assert row["cost_usd"] == Decimal("0.0045")
    assert row["adjustments"] == 3
    used = guard.usage("acme:alice")[0].used
    assert used == Decimal("0.0003")
    # Every nano-dollar of the counter is explained: calls plus operators' adjustments.
    assert row["cost_usd"] + row["adjusted_usd"] == used


def test_a_log_without_adjustments_has_no_adjusted_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "plain.jsonl"
    path.write_text(call("bob", "0.10") + "\n", encoding="utf-8")
    _, out, _ = run(capsys, str(path), "--width", "200")
    assert "adjusted" not in out.splitlines()[0]
    assert "adjustments" not in out


def test_an_adjustment_no_exact_sum_can_hold_is_skipped_not_a_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long = "1." + "1" * 120  # more digits than the report's exact sums keep
    lines = [
        call("bob", "0.10"),
        adjusted("bob", "daily", "usd", "0.5", "a1"),
        adjusted("bob", "daily", "usd", long, "a2"),
        adjusted("carol", "daily", "usd", "1e8", "a3"),  # fits alone...
        adjusted("carol", "daily", "usd", "-1e-95", "a4"),  # ...not with this one
    ]
    path = tmp_path / "odd.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = run(capsys, str(path), "--format", "json")
    assert code == 0
    assert "5 lines read: 2 skipped" in " ".join(err.split())
    rows = {row["user_id"]: row for row in json.loads(out, parse_float=Decimal)}
    assert rows["bob"]["adjusted_usd"] == Decimal("0.5")
    assert rows["carol"]["adjusted_usd"] == Decimal("1e8")
