"""``payi-guard report``: exact totals, filters, grouping, formats, inputs and bounded memory."""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.cli import add_report_parser, run_report
from payi_guard.cli import report_main as main
from payi_guard.clock import FakeClock
from payi_guard.log import configure_json, get_logger
from payi_guard.report import (
    EXACT_SAMPLES,
    MAX_LINE_BYTES,
    PAIRING_WINDOW,
    PERCENTILE_RELATIVE_ERROR,
    CostDistribution,
    ReportBuilder,
    ReportFilter,
    parse_time_bound,
)

DATA = Path(__file__).parent / "data" / "report"
SAMPLE = DATA / "sample.log"
CSV_HEADER = [
    "calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "share_pct",
    "p50_usd",
    "p90_usd",
    "p99_usd",
    "percentiles_exact",
    "blocked",
    "warned",
    "overruns",
    "errors",
    "adjustments",
    "adjusted_usd",
]


@pytest.fixture(autouse=True)
def _terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tables are as wide as the terminal: 80 columns here, whatever runs the tests."""
    monkeypatch.setenv("COLUMNS", "80")


class Result:
    """Exit status and both output streams of one in-process run."""

    def __init__(self, code: int, out: str, err: str) -> None:
        self.code = code
        self.out = out
        # The summary on stderr is wrapped to the terminal: read it as one line.
        self.raw_err = err
        self.err = err.replace("\n  ", " ")

    def rows(self) -> list[dict[str, Any]]:
        """The JSON rows, numbers parsed as Decimal (exact)."""
        assert self.code == 0, self.err
        rows = json.loads(self.out, parse_float=Decimal)
        assert isinstance(rows, list)
        return rows

    def by_key(self) -> dict[Any, dict[str, Any]]:
        return {row["key"]: row for row in self.rows()}


def report(
    *argv: str | Path,
    stdin: bytes | None = None,
    clock: FakeClock | None = None,
) -> Result:
    out, err = io.StringIO(), io.StringIO()
    code = main(
        [str(a) for a in argv],
        stdin=io.BytesIO(stdin) if stdin is not None else None,
        stdout=out,
        stderr=err,
        clock=clock,
    )
    return Result(code, out.getvalue(), err.getvalue())


def call(cost: str = "0.001", **fields: Any) -> str:
    """A genai_call line whose cost is written as the exact number token ``cost``."""
    body = {"event": "genai_call", "user_id": "acme:alice", "org_id": "acme", "outcome": "ok"}
    body.update(fields)
    return json.dumps(body)[:-1] + f', "cost_usd": {cost}}}'


def event(name: str, **fields: Any) -> str:
    return json.dumps({"event": name, **fields})


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------ exact totals


def test_totals_are_exact_on_a_generated_log_with_noise(tmp_path: Path) -> None:
    rng = random.Random(20261127)
    users = [f"org{o}:user{u}" for o in range(8) for u in range(25)] + ["solo", "42"]
    expected: dict[str, Decimal] = defaultdict(Decimal)
    calls: dict[str, int] = defaultdict(int)
    skipped = other = 0
    lines: list[str] = []
    for _ in range(6000):
        user = rng.choice(users)
        nano = rng.choice([0, rng.randrange(1, 1000), rng.randrange(10**9), rng.randrange(10**12)])
        cost = Decimal(nano).scaleb(-9)
        # The same value written the ways JSON encoders write numbers.
        token = rng.choice([f"{cost:f}", f"{cost:e}", f"{cost:E}", str(cost)])
        if nano % 1_000_000_000 == 0:
            token = rng.choice([token, str(nano // 1_000_000_000)])
        fields: dict[str, Any] = {"user_id": int(user) if user == "42" else user}
        fields["input_tokens"] = rng.randrange(10_000)
        line = call(token, **fields)
        if rng.random() < 0.3:
            # Keys in another order, cost first.
            obj = json.loads(line)
            del obj["cost_usd"]
            line = f'{{"cost_usd": {token}, ' + json.dumps(obj)[1:]
        if rng.random() < 0.05:
            line = "2026-11-27 12:00:00,123 payi_guard INFO " + line
        lines.append(line)
        expected[user] += cost
        calls[user] += 1
        noise = rng.randrange(12)
        if noise == 0:
            lines.append("Traceback (most recent call last):")
            skipped += 1
        elif noise == 1:
            lines.append(call("0.5")[: rng.randrange(1, 60)])  # truncated JSON
            skipped += 1
        elif noise == 2:
            lines.append(rng.choice(["[1, 2, 3]", '"genai_call"', "42", "null", "{}]"]))
            skipped += 1
        elif noise == 3:
            lines.append(event(rng.choice(["request_started", "storage_error", "login"]), a=1))
            other += 1
        elif noise == 4:
            bad = rng.choice(['"abc"', "-0.5", "true", "NaN", "Infinity", "[1]", "1e12"])
            lines.append(call(bad))
            skipped += 1
        elif noise == 5:
            lines.append("")  # blank: neither read as an event nor counted as skipped
        elif noise == 6:
            lines.append('{"message": "no event key"}')
            other += 1
    path = write(tmp_path / "app.log", lines)

    result = report(path, "--format", "json")
    rows = result.by_key()
    assert set(rows) == set(expected)
    for user, total in expected.items():
        assert rows[user]["cost_usd"] == total, user
        assert rows[user]["user_id"] == user
        assert rows[user]["calls"] == calls[user]
    grand = sum(expected.values(), Decimal(0))
    assert sum((row["cost_usd"] for row in rows.values()), Decimal(0)) == grand
    assert f"{len(lines):,} lines read: {skipped:,} skipped, {other:,} other events" in result.err

    table = report(path, "--width", "200")
    footer = table.out.splitlines()[-1]
    whole, _, fraction = f"{grand:,f}".partition(".")
    assert f"total ${whole}.{fraction.rstrip('0').ljust(6, '0')} over 6,000 calls" in footer
    assert f"{skipped:,} skipped" in footer


def test_float_sums_would_be_wrong_but_the_report_is_exact(tmp_path: Path) -> None:
    path = write(tmp_path / "a.log", [call("0.1"), call("0.2"), call("1e-9"), call("3.3e-07")])
    row = report(path, "--format", "json").rows()[0]
    assert row["cost_usd"] == Decimal("0.300000331")
    assert '"cost_usd": 0.300000331,' in report(path, "--format", "json").out


def test_lines_written_by_payi_guard_structlog_setup_are_read(tmp_path: Path) -> None:
    saved = structlog.get_config()
    path = tmp_path / "structlog.log"
    rng = random.Random(7)
    expected = Decimal(0)
    try:
        with path.open("w", encoding="utf-8") as stream:
            configure_json(stream)
            log = get_logger()
            for i in range(200):
                cost = rng.randrange(10**8) / 1e9
                # What the line says is what counts: the repr of the float logged.
                expected += Decimal(repr(cost))
                log.info(
                    "genai_call",
                    user_id=f"acme:u{i % 3}",
                    org_id="acme",
                    model="gpt-4o-mini",
                    cost_usd=cost,
                    outcome="ok",
                    input_tokens=1,
                    output_tokens=2,
                )
            log.warning("budget_warning", user_id="acme:u0", limit="daily", used=0.8, max=1.0)
    finally:
        structlog.reset_defaults()
        structlog.configure(**saved)
    result = report(path, "--format", "json", "--since", "1h", clock=FakeClock(time.time()))
    rows = result.by_key()
    assert sum((row["cost_usd"] for row in rows.values()), Decimal(0)) == expected
    assert sum(row["calls"] for row in rows.values()) == 200
    assert rows["acme:u0"]["warned"] == 1
    assert "0 filtered out" in result.err


# ------------------------------------------------------------------ hand-checked sample


def test_hand_checked_sample_log() -> None:
    rows = report(SAMPLE, "--format", "json").rows()
    assert [row["user_id"] for row in rows] == ["acme:alice", "acme:bob", "solo"]
    alice, bob, solo = rows
    assert alice == {
        "user_id": "acme:alice",
        "key": "acme:alice",
        "calls": 2,
        "input_tokens": 420,
        "output_tokens": 140,
        "cost_usd": Decimal("0.000147"),
        "share_pct": Decimal("59.0361"),
        "p50_usd": Decimal("0.000042"),
        "p90_usd": Decimal("0.000105"),
        "p99_usd": Decimal("0.000105"),
        "percentiles_exact": True,
        "blocked": 0,
        "warned": 0,
        "overruns": 0,
        "errors": 0,
        "adjustments": 0,
        "adjusted_usd": 0,
    }
    # The refused call and the budget_exceeded of request r4 are one refusal.
    assert (bob["calls"], bob["blocked"], bob["warned"], bob["cost_usd"]) == (
        1,
        1,
        1,
        Decimal("0.00009"),
    )
    # A budget_exceeded without request_id (refused at the gate) counts on its own.
    assert (solo["calls"], solo["errors"], solo["overruns"], solo["blocked"]) == (1, 1, 1, 1)

    table = report(SAMPLE, "--width", "200")
    assert table.code == 0
    lines = table.out.splitlines()
    assert lines[0].split() == [
        "user_id",
        "calls",
        "in_tokens",
        "out_tokens",
        "cost_usd",
        "share",
        "p50",
        "p90",
        "p99",
        "blocked",
        "warned",
        "overruns",
        "errors",
    ]
    assert lines[1].split() == [
        *("acme:alice", "2", "420", "140", "$0.000147", "59.0%"),
        *("$0.000042", "$0.000105", "$0.000105", "0", "0", "0", "0"),
    ]
    assert set(lines[4]) == {"-", " "}
    assert lines[5].startswith("TOTAL ")
    assert "$0.000249" in lines[5]
    assert lines[6] == (
        "total $0.000249 over 4 calls, 3 users; "
        "18 lines read: 8 skipped, 1 other event, 0 filtered out"
    )
    # Columns are aligned: every row is as wide as the header.
    assert len({len(line) for line in lines[:3]}) == 1
    assert table.err == ""


# ----------------------------------------------------------------------------- filters


def test_since_and_until_accept_dates_datetimes_offsets_and_epochs(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("1", user_id="a", timestamp="2026-11-26T23:59:59.999999Z"),
            call("2", user_id="b", timestamp="2026-11-27T00:00:00Z"),
            call("4", user_id="c", timestamp="2026-11-27T10:00:00.123+02:00"),  # 08:00Z
            call("8", user_id="d", timestamp="2026-11-27 09:30:00"),  # naive: UTC
            call("16", user_id="e", timestamp=1_795_780_800),  # epoch: 2026-11-27T12:00Z
            call("32", user_id="f", timestamp="2026-11-28T00:00:00.000000Z"),
            call("64", user_id="g"),  # no timestamp
            call("128", user_id="h", timestamp="not a time"),
        ],
    )
    everything = report(path, "--format", "json")
    assert len(everything.rows()) == 8

    day = report(path, "--format", "json", "--since", "2026-11-27", "--until", "2026-11-28")
    assert sorted(day.by_key()) == ["b", "c", "d", "e"]
    assert "4 filtered out (2 without a timestamp)" in day.err

    morning = report(
        path, "--format", "json", "--since", "2026-11-27T08:00Z", "--until", "2026-11-27T09:30"
    )
    assert sorted(morning.by_key()) == ["c"]

    only_until = report(path, "--format", "json", "--until", "2026-11-27T00:00:00+00:00")
    assert sorted(only_until.by_key()) == ["a"]


def test_relative_since_counts_back_from_the_injected_clock(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("1", user_id="old", timestamp="2026-11-20T11:59:59Z"),
            call("1", user_id="yesterday", timestamp="2026-11-26T13:00:00Z"),
            call("1", user_id="recent", timestamp="2026-11-27T11:30:00Z"),
        ],
    )
    clock = FakeClock(1_795_780_800.0)  # 2026-11-27T12:00:00Z
    assert sorted(report(path, "--format", "json", "--since", "1h", clock=clock).by_key()) == [
        "recent"
    ]
    assert sorted(report(path, "--format", "json", "--since", "24h", clock=clock).by_key()) == [
        "recent",
        "yesterday",
    ]
    assert sorted(report(path, "--format", "json", "--until", "7d", clock=clock).by_key()) == [
        "old"
    ]
    clock.advance(86_400)
    assert report(path, "--format", "json", "--since", "1h", clock=clock).rows() == []
    # An age reaching back before year 1 covers every line (4,000 years; no overflow).
    every = report(path, "--format", "json", "--since", "200000w", clock=clock)
    assert (every.code, sorted(every.by_key())) == (0, ["old", "recent", "yesterday"])
    assert report(path, "--format", "json", "--until", "200000w", clock=clock).rows() == []


def test_user_org_and_model_filters(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("1", user_id="acme:alice", org_id="acme", model="gpt-4o-mini"),
            call("2", user_id="acme:bob", org_id="acme", model="gpt-4o"),
            call("4", user_id="globex:carol", org_id="globex", model="claude-3-5-haiku"),
            call("8", user_id="initech:dave", org_id=None, model="gpt-4o"),  # org from the id
            call("16", user_id="solo", org_id=None, model="gpt-4o"),
            event("budget_warning", user_id="acme:bob", limit="daily"),
        ],
    )

    def keys(*options: str) -> list[str]:
        return sorted(report(path, "--format", "json", *options).by_key())

    assert keys("--user", "acme:alice") == ["acme:alice"]
    assert keys("--user", "acme:*") == ["acme:alice", "acme:bob"]
    assert keys("--user", "acme:alice", "--user", "solo") == ["acme:alice", "solo"]
    assert keys("--user", "acme") == []  # exact means exact
    assert keys("--org", "initech") == ["initech:dave"]
    assert keys("--org", "acme", "--org", "glob*") == ["acme:alice", "acme:bob", "globex:carol"]
    assert keys("--model", "gpt-4o") == ["acme:bob", "initech:dave", "solo"]
    assert keys("--model", "gpt-*", "--user", "acme:*") == ["acme:alice", "acme:bob"]
    assert keys("--model", "claude*") == ["globex:carol"]
    # A budget event names no model: --model leaves it out, --user keeps it.
    warned = report(path, "--format", "json", "--user", "acme:bob").by_key()["acme:bob"]
    assert warned["warned"] == 1
    by_model = report(path, "--format", "json", "--model", "gpt-4o").by_key()
    assert by_model["acme:bob"]["warned"] == 0


# ------------------------------------------------------------------- grouping and order


def test_by_each_value_names_the_key_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("0.5", user_id="acme:alice", org_id="acme", model="m1", use_case_name="chat"),
            call("0.25", user_id="acme:bob", org_id="acme", model="m2", use_case_name="chat"),
            call("0.125", user_id="solo", org_id=None, model="m1", use_case_name="summarize"),
            call("0.0625", user_id="globex:x", org_id=None, model="m2"),  # org from the id
        ],
    )
    cases: dict[str, tuple[str, dict[str | None, str]]] = {
        "user": (
            "user_id",
            {"acme:alice": "0.5", "acme:bob": "0.25", "solo": "0.125", "globex:x": "0.0625"},
        ),
        "org": ("org_id", {"acme": "0.75", "globex": "0.0625", None: "0.125"}),
        "model": ("model", {"m1": "0.625", "m2": "0.3125"}),
        "use_case": ("use_case_name", {"chat": "0.75", "summarize": "0.125", None: "0.0625"}),
    }
    for by, (key_field, costs) in cases.items():
        rows = report(path, "--format", "json", "--by", by).rows()
        for row in rows:
            assert row[key_field] == row["key"]
            assert "user_id" not in row or key_field == "user_id"
        got = {row["key"]: row["cost_usd"] for row in rows}
        assert got == {k: Decimal(v) for k, v in costs.items()}, by
        header = report(path, "--by", by, "--width", "200").out.splitlines()[0]
        assert header.split()[0] == key_field
        csv_header = report(path, "--format", "csv", "--by", by).out.splitlines()[0]
        assert csv_header.split(",")[0] == key_field
    table = report(path, "--by", "org", "--width", "200").out
    assert "(none)" in table
    assert "3 orgs" in table


def test_sort_and_top(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [call("0.9", user_id="big")]
        + [call("0.1", user_id="busy")] * 5
        + [call("0.5", user_id="b-tie"), call("0.5", user_id="a-tie")]
        + [call("0.2", user_id="c")] * 3,
    )
    by_cost = [r["key"] for r in report(path, "--format", "json").rows()]
    assert by_cost == ["big", "c", "a-tie", "b-tie", "busy"]  # 0.5 = 0.5 = 0.5: by key
    by_calls = [r["key"] for r in report(path, "--format", "json", "--sort", "calls").rows()]
    assert by_calls == ["busy", "c", "a-tie", "b-tie", "big"]
    top = report(path, "--format", "json", "--top", "2")
    assert [r["key"] for r in top.rows()] == ["big", "c"]
    # Totals and shares still cover every group.
    assert "total $3.000000 over 11 calls" in top.err
    assert "showing top 2 of 5 users" in top.err
    assert top.rows()[0]["share_pct"] == Decimal("30.0000")


def test_percentiles_are_nearest_rank(tmp_path: Path) -> None:
    costs = [f"0.{i:02d}" for i in (7, 1, 10, 3, 5, 9, 2, 8, 4, 6)]
    path = write(tmp_path / "a.log", [call(c, user_id="u") for c in costs])
    row = report(path, "--format", "json").rows()[0]
    # n = 10: ranks ceil(5) = 5, ceil(9) = 9, ceil(9.9) = 10.
    assert (row["p50_usd"], row["p90_usd"], row["p99_usd"]) == (
        Decimal("0.05"),
        Decimal("0.09"),
        Decimal("0.1"),
    )
    three = write(tmp_path / "b.log", [call(c, user_id="u") for c in ("0.003", "0.001", "0.002")])
    row = report(three, "--format", "json").rows()[0]
    assert (row["p50_usd"], row["p90_usd"], row["p99_usd"]) == (
        Decimal("0.002"),
        Decimal("0.003"),
        Decimal("0.003"),
    )
    # Refused calls are not calls: they do not pull the percentiles to zero.
    refused = write(
        tmp_path / "c.log",
        [call("0.004", user_id="u"), call("0", user_id="u", outcome="refused")],
    )
    row = report(refused, "--format", "json").rows()[0]
    assert (row["calls"], row["blocked"], row["p50_usd"]) == (1, 1, Decimal("0.004"))


def test_a_group_past_the_exact_limit_switches_to_the_histogram(tmp_path: Path) -> None:
    rng = random.Random(3)
    nanos = [rng.randrange(1, 10**8) for _ in range(EXACT_SAMPLES + 1)]
    path = write(
        tmp_path / "a.log",
        [call(f"{Decimal(n).scaleb(-9):f}", user_id="heavy") for n in nanos]
        + [call("0.001", user_id="light")],
    )
    rows = report(path, "--format", "json").by_key()
    heavy = rows["heavy"]
    assert heavy["percentiles_exact"] is False
    assert rows["light"]["percentiles_exact"] is True
    ordered = sorted(nanos)
    for p in (50, 90, 99):
        exact = Decimal(ordered[-(-p * len(nanos) // 100) - 1]).scaleb(-9)
        got = heavy[f"p{p}_usd"]
        assert abs(got - exact) <= exact * Decimal(PERCENTILE_RELATIVE_ERROR), p
    assert heavy["cost_usd"] == sum((Decimal(n) for n in nanos), Decimal(0)).scaleb(-9)
    table = report(path, "--width", "200").out
    assert "~$" in table
    assert "percentile from a histogram" in table
    # With no percentile column shown, there is nothing for the note to explain.
    narrow = report(path, "--width", "60").out
    assert " p50 " not in narrow
    assert "percentile from a histogram" not in narrow


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=10**15), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=100),
)
def test_histogram_percentiles_stay_within_the_documented_error(values: list[int], p: int) -> None:
    histogram = CostDistribution(exact_limit=0)
    exact = CostDistribution()
    for value in values:
        histogram.add(value)
        exact.add(value)
    assert not histogram.exact
    assert exact.exact
    (want,) = exact.percentiles([p])
    (got,) = histogram.percentiles([p])
    assert want == sorted(values)[-(-p * len(values) // 100) - 1]
    assert want is not None
    assert got is not None
    assert abs(got - want) <= want * PERCENTILE_RELATIVE_ERROR
    assert min(values) <= got <= max(values)


def test_cost_distribution_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="between 0 and 2"):
        CostDistribution().add(-1)
    with pytest.raises(ValueError, match="percentile"):
        CostDistribution().percentiles([0])
    assert CostDistribution().percentiles([50, 99]) == [None, None]


# -------------------------------------------------------------------------- budget events


def test_blocked_counts_each_refusal_once(tmp_path: Path) -> None:
    refused = {"outcome": "refused", "user_id": "u"}
    path = write(
        tmp_path / "a.log",
        [
            # r1: the event, then its refused call -> 1
            event("budget_exceeded", user_id="u", request_id="r1"),
            call("0", request_id="r1", **refused),
            # r2: the call first, then the event -> 1
            call("0", request_id="r2", **refused),
            event("budget_exceeded", user_id="u", request_id="r2"),
            # r3: two refused calls in one request, two events -> 2
            call("0", request_id="r3", **refused),
            event("budget_exceeded", user_id="u", request_id="r3"),
            event("budget_exceeded", user_id="u", request_id="r3"),
            call("0", request_id="r3", **refused),
            # r4: an event alone (refused at the web gate) -> 1
            event("budget_exceeded", user_id="u", request_id="r4"),
            # no request id: each counts -> 2
            event("budget_exceeded", user_id="u"),
            call("0", **refused),
            # same request id, another user: not a pair -> 2
            call("0", request_id="r5", **refused),
            event("budget_exceeded", user_id="other", request_id="r5"),
            event("budget_warning", user_id="u"),
            event("budget_warning", user_id="u"),
            event("budget_overrun", user_id="u"),
            call("0.01", user_id="u", outcome="error"),
        ],
    )
    rows = report(path, "--format", "json").by_key()
    assert rows["u"]["blocked"] == 1 + 1 + 2 + 1 + 2 + 1
    assert rows["other"]["blocked"] == 1
    assert (rows["u"]["warned"], rows["u"]["overruns"], rows["u"]["errors"]) == (2, 1, 1)
    assert rows["u"]["calls"] == 1
    assert rows["other"]["calls"] == 0
    assert rows["other"]["p50_usd"] is None
    # With --by model, a pair is counted once, in the refused call's model.
    mixed = write(
        tmp_path / "b.log",
        [
            call("0", request_id="q", model="gpt-4o", **refused),
            event("budget_exceeded", user_id="u", request_id="q"),
            event("budget_exceeded", user_id="u", request_id="lonely"),
        ],
    )
    models = report(mixed, "--format", "json", "--by", "model").by_key()
    assert models["gpt-4o"]["blocked"] == 1
    assert models[None]["blocked"] == 1
    assert models[None]["model"] is None


def test_an_unpaired_budget_exceeded_still_counts_after_the_pairing_window(
    tmp_path: Path,
) -> None:
    refused = {"outcome": "refused", "user_id": "u"}
    lines = [event("budget_exceeded", user_id="u", request_id="early")]
    lines += [call("0", request_id=f"r{i}", **refused) for i in range(PAIRING_WINDOW + 5)]
    lines += [event("budget_exceeded", user_id="u", request_id=f"r{PAIRING_WINDOW + 4}")]
    rows = report(write(tmp_path / "a.log", lines), "--format", "json").by_key()
    # The early event never found its call, the last one did.
    assert rows["u"]["blocked"] == PAIRING_WINDOW + 5 + 1


# ------------------------------------------------------------------------------ formats


def test_csv_shape(tmp_path: Path) -> None:
    result = report(SAMPLE, "--format", "csv")
    assert result.code == 0
    rows = list(csv.DictReader(io.StringIO(result.out)))
    assert list(rows[0]) == ["user_id", *CSV_HEADER]
    assert [r["user_id"] for r in rows] == ["acme:alice", "acme:bob", "solo"]
    assert sum(Decimal(r["cost_usd"]) for r in rows) == Decimal("0.000249")
    assert rows[0]["cost_usd"] == "0.000147"
    assert rows[0]["percentiles_exact"] == "true"
    # The summary goes to stderr, so stdout is only the header and the rows.
    assert len(result.out.splitlines()) == 4
    assert "total $0.000249 over 4 calls" in result.err
    # A key with a comma and a quote survives the round trip.
    odd = write(tmp_path / "a.log", [call("1", user_id="x", model='gpt,"4"')])
    parsed = list(csv.DictReader(io.StringIO(report(odd, "--format", "csv", "--by", "model").out)))
    assert parsed[0]["model"] == 'gpt,"4"'


def test_json_shape(tmp_path: Path) -> None:
    result = report(SAMPLE, "--format", "json")
    plain = json.loads(result.out)
    assert isinstance(plain, list)
    for row in plain:
        assert isinstance(row, dict)
        assert {"user_id", "key", "calls", "cost_usd", *CSV_HEADER} <= set(row)
        assert isinstance(row["cost_usd"], (int, float))  # a number, not a string
        assert isinstance(row["calls"], int)
    exact = json.loads(result.out, parse_float=Decimal)
    assert sum(row["cost_usd"] for row in exact) == Decimal("0.000249")
    assert "total $0.000249" in result.err
    empty = report(write(tmp_path / "e.log", ["nothing here"]), "--format", "json")
    assert empty.rows() == []
    assert "1 skipped" in empty.err


def test_table_money_is_exact_and_trimmed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("0.0042", user_id="a"),
            call("0.000000123", user_id="b"),
            call("1234.5", user_id="c"),
            call("1e-9", user_id="d"),
        ],
    )
    out = report(path, "--width", "200").out
    assert "$0.004200 " in out
    assert "$0.000000123 " in out
    assert "$1,234.500000 " in out
    assert "$0.000000001 " in out
    assert "$1,234.504200124" in out.splitlines()[-1]
    # a, b and d spent next to nothing, but not nothing: not shown as 0.0%.
    assert all("<0.1%" in line for line in out.splitlines()[2:5])


def test_a_cost_finer_than_a_nano_dollar_is_skipped_and_spoils_no_later_line(
    tmp_path: Path,
) -> None:
    # 1e-200 first: summed exactly with the next cost it needs about 200 digits, and the
    # sum of every later line would have been refused (each counted as skipped).
    lines = [call("1e-200", user_id="mallory"), call("1e-12", user_id="mallory")]
    lines += [call("0.001", user_id=f"u{i % 3}") for i in range(30)]
    result = report(write(tmp_path / "a.log", lines), "--format", "json")
    assert result.code == 0, result.err
    rows = result.by_key()
    assert sorted(rows) == ["u0", "u1", "u2"]
    assert sum(row["calls"] for row in rows.values()) == 30
    assert "total $0.030000 over 30 calls" in result.err
    assert "2 skipped" in result.err


# -------------------------------------------------------------------- hostile input


def test_lines_with_unusable_values_are_skipped_counted_and_said(tmp_path: Path) -> None:
    lines = [
        call("0.001", user_id="alice", input_tokens=10, output_tokens=5),
        # Each of these would abort, or be read as something it is not: skipped.
        call("0.002", user_id="huge", output_tokens=1e28),
        call("0.002", user_id="negative", input_tokens=-1),
        call("0.002", user_id="text", output_tokens="12"),
        call("0.002", user_id="fraction", output_tokens=1.5),
        call("0.002", user_id="boolean", input_tokens=True),
        call("0.002", user_id="over", input_tokens=10**16),
        call('"\u0661"', user_id="arabic"),  # "١" is not $1
        call('"\uff11.5"', user_id="fullwidth"),  # "１.5" is not $1.5
        call('"1e400"', user_id="exponent"),
        call('"0.25"', user_id="string"),  # a numeric string is fine
        call("0.5", user_id="bob", output_tokens=2.0),  # 2.0 is a whole count
    ]
    path = write(tmp_path / "a.log", lines)
    result = report(path, "--format", "json")
    assert result.code == 0, result.err
    rows = result.by_key()
    assert sorted(rows) == ["alice", "bob", "string"]
    assert rows["alice"]["output_tokens"] == 5
    assert rows["bob"]["output_tokens"] == 2
    assert rows["string"]["cost_usd"] == Decimal("0.25")
    assert "12 lines read: 9 skipped" in result.err
    assert all(len(line) <= 80 for line in result.raw_err.splitlines())
    table = report(path, "--width", "200")
    assert table.code == 0
    assert "9 skipped" in table.out.splitlines()[-1]


def test_unicode_digits_are_not_numbers() -> None:
    for text in ("\u0661h", "\u0662\u0660\u0662\u0666-11-27", "7\u0664d"):
        with pytest.raises(ValueError, match="is not a time"):
            parse_time_bound(text)
    builder = ReportBuilder(filters=ReportFilter(since=parse_time_bound("2026-11-27")))  # type: ignore[arg-type]
    builder.feed(
        [call("1", user_id="a", timestamp="\u0662\u0660\u0662\u0667-01-01T00:00Z").encode()]
    )
    report_ = builder.build()
    assert report_.rows == ()
    assert report_.undated == 1


HOSTILE_IDS = [
    "bob\x1b[31m\nFAKE-ROW 999 $1,000,000",
    "\u202eevil",  # right-to-left override
    "carol\r\x00\x7f\x85\u2028end",
    "back\\slash",
]


def test_user_text_cannot_forge_rows_in_a_table_or_csv(tmp_path: Path) -> None:
    path = write(
        tmp_path / "a.log",
        [
            call("0.001", user_id=uid, model=f"m-{i}\x1b]0;title\x07")
            for i, uid in enumerate(HOSTILE_IDS)
        ]
        + [call("0.001", user_id='=HYPERLINK("http://x")'), call("0.001", user_id="plain")],
    )
    table = report(path, "--width", "200")
    assert table.code == 0
    for line in table.out.splitlines():
        assert line.isprintable(), repr(line)
    # header, 6 rows, rule, totals, summary: no row was forged by a newline
    assert len(table.out.splitlines()) == 10
    assert "bob\\x1b[31m\\nFAKE-ROW 999 $1,000,000" in table.out
    assert "\\u202eevil" in table.out
    assert "carol\\r\\x00\\x7f\\x85\\u2028end" in table.out
    assert "back\\\\slash" in table.out

    by_model = report(path, "--width", "200", "--by", "model")
    assert all(line.isprintable() for line in by_model.out.splitlines())
    assert "m-0\\x1b]0;title\\x07" in by_model.out

    csv_out = report(path, "--format", "csv")
    assert csv_out.code == 0
    assert all(line.isprintable() for line in csv_out.out.splitlines())
    assert len(csv_out.out.splitlines()) == 7  # header and 6 rows, one physical line each
    cells = {row["user_id"] for row in csv.DictReader(io.StringIO(csv_out.out))}
    assert "bob\\x1b[31m\\nFAKE-ROW 999 $1,000,000" in cells
    assert '\'=HYPERLINK("http://x")' in cells  # a spreadsheet shows it, never runs it
    assert "plain" in cells

    # JSON keeps the exact values, escaped by JSON itself (ASCII only on the wire).
    json_out = report(path, "--format", "json")
    assert json_out.out.isascii()
    assert "\x7f" not in json_out.out
    assert set(HOSTILE_IDS) <= set(json_out.by_key())


def _visible(line: str) -> int:
    import unicodedata

    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in line
    )


def test_the_table_fits_80_columns_and_uses_a_wider_terminal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = SAMPLE.read_text(encoding="utf-8").splitlines()
    lines += [
        call(
            "1234567.123456789", user_id="acme:" + "a-very-long-user-name" * 3, input_tokens=10**9
        ),
        call("0.000000001", user_id="\u6771\u4eac\u306e\u30e6\u30fc\u30b6\u30fc" * 4),
    ]
    path = write(tmp_path / "a.log", lines)
    monkeypatch.setenv("COLUMNS", "80")
    narrow = report(path)
    assert narrow.code == 0
    out = narrow.out.splitlines()
    assert max(_visible(line) for line in out) <= 80, narrow.out
    header = out[0].split()
    assert header[:3] == ["user_id", "calls", "cost_usd"]
    assert "share" in header
    assert "blocked" in header
    assert "$1,234,567.123456789" in narrow.out  # money stays exact, never 1.2E+6
    assert "p50" not in header
    assert "left out to fit 80 columns: p50, p90" in narrow.out
    assert "--format csv" in narrow.out
    assert "…" in narrow.out  # the long ids are shortened, not wrapped

    monkeypatch.setenv("COLUMNS", "200")
    wide = report(path)
    assert wide.out.splitlines()[0].split() == [
        *("user_id", "calls", "in_tokens", "out_tokens", "cost_usd", "share"),
        *("p50", "p90", "p99", "blocked", "warned", "overruns", "errors"),
    ]
    assert "left out" not in wide.out
    # --width wins over the terminal.
    assert max(_visible(line) for line in report(path, "--width", "60").out.splitlines()) <= 60


# ------------------------------------------------------------------------------- inputs


def test_stdin_plain_and_gzip() -> None:
    data = SAMPLE.read_bytes()
    plain = report("-", "--format", "json", stdin=data)
    assert sum(r["cost_usd"] for r in plain.rows()) == Decimal("0.000249")
    zipped = report("-", "--format", "json", stdin=gzip.compress(data))
    assert zipped.rows() == plain.rows()


def test_stdin_through_a_real_pipe() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "payi_guard.report", "-", "--format", "csv"],
        input=SAMPLE.read_bytes(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines()[1].startswith("acme:alice,2,420,140,0.000147,")


def test_gzip_files_are_read_whatever_their_name(tmp_path: Path) -> None:
    named = tmp_path / "app.log.gz"
    named.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    unnamed = tmp_path / "rotated.1"
    unnamed.write_bytes(gzip.compress(SAMPLE.read_bytes()))
    result = report(named, unnamed, SAMPLE, "--format", "json")
    rows = result.by_key()
    assert rows["acme:alice"]["calls"] == 6
    assert sum(r["cost_usd"] for r in rows.values()) == Decimal("0.000747")
    assert "54 lines read: 24 skipped" in result.err


def test_a_missing_file_exits_2_with_a_message_and_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.log"
    result = report(SAMPLE, missing)
    assert result.code == 2
    assert result.out == ""
    assert f"cannot read {str(missing)!r}: No such file or directory" in result.err

    proc = subprocess.run(
        [sys.executable, "-m", "payi_guard.report", str(missing)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "cannot read" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_unreadable_inputs_exit_2(tmp_path: Path) -> None:
    directory = report(tmp_path)
    assert directory.code == 2
    assert "cannot read" in directory.err
    truncated = tmp_path / "cut.gz"
    truncated.write_bytes(gzip.compress(SAMPLE.read_bytes() * 50)[:40])  # no whole line
    cut = report(truncated)
    assert cut.code == 2
    assert "cannot read" in cut.err
    assert cut.out == ""
    corrupt = tmp_path / "bad.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(range(256)))
    assert report(corrupt).code == 2


def test_a_compressed_log_cut_part_way_is_reported_up_to_the_cut(tmp_path: Path) -> None:
    # A log rotated while it was written: the lines before the cut are reported, and
    # the error says the report stops there (exit status 1).
    lines = [call("0.001", user_id=f"u{i % 3}") for i in range(5000)]
    whole = gzip.compress(("\n".join(lines) + "\n").encode())
    cut = tmp_path / "app.log.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    result = report(cut, "--format", "json")
    assert result.code == 1
    rows = json.loads(result.out)
    read = sum(row["calls"] for row in rows)
    assert 0 < read < 5000
    said = " ".join(result.err.split())
    assert "its compressed data is cut short or corrupt" in said
    assert f"the report covers the {read:,} lines read before it" in said


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--top", "0"], "--top"),
        (["--top", "many"], "--top"),
        (["--width", "0"], "'0' is not a whole number of columns"),
        (["--width", "10"], "10: a report needs at least 40 columns"),
        (["--since", "yesterday"], "is not a time"),
        (["--since", "99999999999999w"], "is too long an age for a date"),
        (["--until", "2026-13-45"], "is not a time"),
        (["--by", "team"], "invalid choice"),
        (["--sort", "name"], "invalid choice"),
        (["--format", "xml"], "invalid choice"),
        (["--since", "2026-11-28", "--until", "2026-11-27"], "--since must be before --until"),
    ],
)
def test_bad_arguments_exit_2(
    options: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    result = report(SAMPLE, *options)
    assert result.code == 2
    assert message in result.err + capsys.readouterr().err
    assert result.out == ""


def test_no_log_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert report().code == 2
    assert "LOG" in capsys.readouterr().err


def test_overlong_lines_are_skipped_and_reading_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    with path.open("w", encoding="utf-8") as stream:
        stream.write(call("0.5", user_id="a") + "\n")
        stream.write(call("0.25", user_id="b", blob="x" * (MAX_LINE_BYTES * 2 + 7)) + "\n")
        stream.write(call("0.125", user_id="c") + "\n")
    result = report(path, "--format", "json")
    assert sorted(result.by_key()) == ["a", "c"]
    assert "3 lines read: 1 skipped" in result.err


def test_parse_time_bound() -> None:
    assert parse_time_bound("90m").total_seconds() == 5400  # type: ignore[union-attr]
    assert parse_time_bound("2w").total_seconds() == 14 * 86400  # type: ignore[union-attr]
    assert parse_time_bound("2026-11-27").isoformat() == "2026-11-27T00:00:00+00:00"  # type: ignore[union-attr]
    assert (
        parse_time_bound("2026-11-27T12:00:00.1234567Z").isoformat()  # type: ignore[union-attr]
        == "2026-11-27T12:00:00.123456+00:00"
    )
    assert (
        parse_time_bound("2026-11-27T12:00+0530").isoformat()  # type: ignore[union-attr]
        == "2026-11-27T12:00:00+05:30"
    )
    for bad in ("", "7 days", "-1h", "2026-11-27T25:00"):
        with pytest.raises(ValueError, match="is not a time"):
            parse_time_bound(bad)


def test_builder_api_and_validation() -> None:
    builder = ReportBuilder("org", ReportFilter(users=("acme:*",)))
    builder.feed(SAMPLE.read_bytes().splitlines())
    built = builder.build(top=1)
    assert [(r.key, r.cost_usd) for r in built.rows] == [("acme", Decimal("0.000237"))]
    assert built.totals.blocked == 1
    assert built.filtered_out == 3  # solo's call, overrun and budget_exceeded
    with pytest.raises(ValueError, match="by must be"):
        ReportBuilder("team")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="top"):
        ReportBuilder().build(top=0)
    with pytest.raises(ValueError, match="aware"):
        ReportFilter(since=parse_time_bound("2026-11-27").replace(tzinfo=None))  # type: ignore[union-attr]


def test_mounts_as_a_sub_command_of_a_cli(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="payi-guard")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["report", str(SAMPLE), "--format", "json", "--by", "org"])
    assert args.func is run_report
    out, err = io.StringIO(), io.StringIO()
    assert args.func(args, stdout=out, stderr=err) == 0
    assert {row["org_id"] for row in json.loads(out.getvalue())} == {"acme", None}


# ----------------------------------------------------------------------- bounded memory


def _generate(path: Path, lines: int, users: int, heavy_every: int) -> int:
    """Write a structlog-shaped log without holding it; returns its size in bytes."""
    template = (
        '{"event": "genai_call", "timestamp": "2026-11-27T12:%02d:%02d.123456Z", '
        '"level": "info", "logger": "payi_guard", "user_id": "org%d:user%d", '
        '"org_id": "org%d", "account_name": null, "use_case_name": "summarize", '
        '"limit_ids": [], "model": "gpt-4o-mini", "provider": "openai", '
        '"input_tokens": %d, "output_tokens": %d, "cost_usd": 0.%09d, '
        '"reserved_usd": 0.0012, "latency_ms": 812.4, "stream": false, '
        '"outcome": "ok", "request_id": "%032x"}\n'
    )
    rng = random.Random(lines)
    with path.open("w", encoding="utf-8") as stream:
        chunk: list[str] = []
        for i in range(lines):
            # A few heavy users pass EXACT_SAMPLES and exercise the histogram.
            user = i % users if i < users or i % heavy_every else i % 3
            org = user % 50
            chunk.append(
                template
                % (
                    i // 60 % 60,
                    i % 60,
                    org,
                    user,
                    org,
                    rng.randrange(5000),
                    rng.randrange(1000),
                    rng.randrange(10**7),
                    rng.getrandbits(128),
                )
            )
            if i % 997 == 0:
                chunk.append("INFO:     127.0.0.1:50412 - POST /chat HTTP/1.1 200 OK\n")
            if len(chunk) >= 5000:
                stream.write("".join(chunk))
                chunk.clear()
        stream.write("".join(chunk))
    return path.stat().st_size


# ``python -m payi_guard.report`` plus one last line on stderr: the process's peak RSS.
# VmHWM belongs to the memory of the program after exec; getrusage's ru_maxrss (even
# wait4's, for one child) also counts the parent's memory at fork/exec time, which is
# pytest's own size, not the report's.
_MEASURED_MAIN = """
import runpy, sys
sys.argv = ["payi_guard.report", *sys.argv[1:]]
try:
    runpy.run_module("payi_guard.report", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status", encoding="ascii") as status:
        peak = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak_kib={peak}\\n")
"""


def _run_measured(log: Path, out: Path) -> tuple[int, int, float]:
    """Run the report in a child; return (exit status, peak RSS in bytes, seconds)."""
    started = time.perf_counter()
    with out.open("wb") as stdout:
        proc = subprocess.run(
            [sys.executable, "-c", _MEASURED_MAIN, str(log), "--format", "json"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
            timeout=110,
        )
    elapsed = time.perf_counter() - started
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("peak_kib="), proc.stderr
    return proc.returncode, int(last.removeprefix("peak_kib=")) * 1024, elapsed


@pytest.fixture
def big_log(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    lines = 450_000
    path = tmp_path / "big.log"
    size = _generate(path, lines, users=2000, heavy_every=10)
    yield path, lines, size
    path.unlink()


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_memory_stays_bounded_on_a_large_log(
    tmp_path: Path, big_log: tuple[Path, int, int], capsys: pytest.CaptureFixture[str]
) -> None:
    path, lines, size = big_log
    small = tmp_path / "small.log"
    _generate(small, 20_000, users=2000, heavy_every=10)

    code, small_rss, _ = _run_measured(small, tmp_path / "small.json")
    assert code == 0
    code, rss, seconds = _run_measured(path, tmp_path / "big.json")
    assert code == 0

    rows = json.loads((tmp_path / "big.json").read_text(), parse_float=Decimal)
    assert sum(row["calls"] for row in rows) == lines
    assert len(rows) == 2000
    assert any(not row["percentiles_exact"] for row in rows)
    with capsys.disabled():
        print(
            f"\nreport on {size / 1e6:.0f} MB ({lines:,} lines): peak RSS "
            f"{rss / 1e6:.1f} MB (20,000-line log: {small_rss / 1e6:.1f} MB), "
            f"{seconds:.1f} s, {lines / seconds:,.0f} lines/s"
        )
    # Keeping the lines would need more than the file's size; the report needs a small,
    # fixed amount over what 2,000 groups take, whatever the number of lines.
    assert size > 200e6
    assert rss < 100e6
    assert rss - small_rss < 25e6
