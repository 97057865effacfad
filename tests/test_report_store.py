"""``payi-guard report --from-store``: the log report's columns from the store's analytics,
equal to the report of the same calls' logs (SQLite and real Redis)."""

from __future__ import annotations

import io
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog

from payi_guard import BudgetExceeded, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.log import configure_json
from payi_guard.pricing import TokenUsage
from payi_guard.report.command import report_main

BUDGETS = """\
version: 1
storage: {storage}
prices:
  m-small: {{input_per_mtok: 1.0, output_per_mtok: 2.0}}
  m-large: {{input_per_mtok: 5.0, output_per_mtok: 15.0}}
limits:
  daily: {{max: 0.50, per: day}}
default: [daily]
anonymous: {{strategy: shared, limits: [{{max: 0.10, per: day}}]}}
"""

CALLS = [
    ("acme:alice", "m-small", 10_000, 1_000, "chat"),
    ("acme:alice", "m-large", 2_000, 500, "search"),
    ("acme:bob", "m-large", 20_000, 4_000, None),
    ("carol", "m-small", 50_000, 5_000, "chat"),
    (None, "m-small", 3_000, 300, None),  # an anonymous caller: the shared bucket
]


def seed(path: Path, storage: str, clock: FakeClock, log: Path, prefix: str) -> Path:
    """Make the calls of :data:`CALLS` over two days (and one refusal), logging JSON."""
    config = path / "budgets.yaml"
    config.write_text(BUDGETS.format(storage=storage), encoding="utf-8")
    guard = Guard.from_yaml(config, clock=clock, key_prefix=prefix)
    try:
        with log.open("w", encoding="utf-8") as stream:
            configure_json(stream)
            for index, (user, model, tokens_in, tokens_out, case) in enumerate(CALLS):
                if index == 2:
                    clock.advance(86_400)
                request = CallRequest(model=model, provider="openai", max_output_tokens=tokens_out)
                with track_context(user_id=user, use_case_name=case):
                    guard.begin(request).settle(TokenUsage(tokens_in, tokens_out))
            big = CallRequest(model="m-large", provider="openai", max_output_tokens=100_000)
            with track_context(user_id="carol"), pytest.raises(BudgetExceeded):
                guard.begin(big)
    finally:
        structlog.reset_defaults()
        guard.close()
    return config


def run(*args: str, clock: FakeClock) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = report_main(list(args), stdout=out, stderr=err, clock=clock)
    return status, out.getvalue(), err.getvalue()


def rows(text: str) -> dict[str, dict[str, Any]]:
    return {row["key"]: row for row in json.loads(text)}


@pytest.fixture(params=["sqlite", "redis"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    return f"sqlite:///{tmp_path / 'ledger.db'}"


def test_the_store_report_equals_the_log_report(
    tmp_path: Path, storage: str, clock: FakeClock, key_prefix: str
) -> None:
    log = tmp_path / "calls.jsonl"
    config = seed(tmp_path, storage, clock, log, key_prefix)
    common = ("--format", "json")
    status, from_logs, _ = run(str(log), *common, clock=clock)
    assert status == 0
    store_args = ("--from-store", "--config", str(config), "--key-prefix", key_prefix)
    status, from_store, err = run(*store_args, *common, clock=clock)
    assert status == 0, err
    logged, stored = rows(from_logs), rows(from_store)
    assert set(stored) == {"acme:alice", "acme:bob", "carol", "anonymous"}
    for user, row in stored.items():
        for column in ("calls", "input_tokens", "output_tokens", "blocked"):
            assert row[column] == logged[user][column], (user, column)
        assert Decimal(str(row["cost_usd"])) == Decimal(str(logged[user]["cost_usd"]))
    assert stored["carol"]["blocked"] == 1
    # What the store keeps no record of is left empty, never shown as a 0.
    unknown = ("warned", "overruns", "errors", "adjustments", "adjusted_usd")
    assert {row[c] for row in stored.values() for c in unknown} == {None}
    percentiles = ("p50_usd", "p90_usd", "p99_usd", "percentiles_exact")
    assert {row[c] for row in stored.values() for c in percentiles} == {None}
    # By model and by org, the same spend.
    _, by_model, _ = run(*store_args, "--by", "model", *common, clock=clock)
    _, logged_model, _ = run(str(log), "--by", "model", *common, clock=clock)
    assert {k: (r["calls"], r["cost_usd"]) for k, r in rows(by_model).items()} == {
        k: (r["calls"], r["cost_usd"]) for k, r in rows(logged_model).items()
    }
    _, by_org, _ = run(*store_args, "--by", "org", *common, clock=clock)
    assert rows(by_org)["acme"]["calls"] == 3
    # Only today: the first day's calls fall out.
    _, today, _ = run(*store_args, "--days", "1", *common, clock=clock)
    assert set(rows(today)) == {"acme:bob", "carol", "anonymous"}
    # The log report's columns (CSV has every one), and a table that fits.
    status, table, _ = run(*store_args, "--format", "csv", clock=clock)
    assert status == 0
    _, log_table, _ = run(str(log), "--format", "csv", clock=clock)
    assert table.splitlines()[0] == log_table.splitlines()[0]
    status, table, _ = run(*store_args, clock=clock)
    assert status == 0
    assert max(len(line) for line in table.splitlines()) <= 80
    # Columns the store has no figures for are left out, so the token counts fit; the
    # footer says where the figures come from (no log lines were read).
    header = table.splitlines()[0].split()
    assert header == ["user_id", "calls", "in_tokens", "out_tokens", "cost_usd", "share", "blocked"]
    footer = " ".join(table.split("\n", len(stored) + 3)[-1].split())
    assert "from the store's analytics, the last 30 days" in footer
    assert "lines read" not in table


def test_clear_errors(tmp_path: Path, clock: FakeClock, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run("--from-store", clock=clock)
    assert (status, "needs --config FILE" in err) == (2, True)
    status, _, err = run("--from-store", "--config", str(tmp_path / "missing.yaml"), clock=clock)
    assert status == 2
    assert "missing.yaml" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nlimits: [oops\n", encoding="utf-8")
    status, _, err = run("--from-store", "--config", str(bad), clock=clock)
    assert status == 2
    assert "bad.yaml" in err
    memory = tmp_path / "memory.yaml"
    memory.write_text("version: 1\nstorage: memory://\n", encoding="utf-8")
    status, _, err = run("--from-store", "--config", str(memory), clock=clock)
    assert status == 2
    assert "memory://" in err
    down = ("--storage", "redis://:hunter2@127.0.0.1:1/0")
    status, _, err = run("--from-store", "--config", str(memory), *down, clock=clock)
    assert status == 1
    assert "cannot read the store redis://:***@127.0.0.1:1/0" in err
    assert "hunter2" not in err  # a password never reaches the terminal
    status, _, err = run("--days", "3", str(tmp_path / "x.log"), clock=clock)
    assert status == 2
    assert "--from-store" in err
    status, _, err = run(clock=clock)
    assert status == 2
    assert "--from-store" in err + capsys.readouterr().err
