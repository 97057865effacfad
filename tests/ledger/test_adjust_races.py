"""An operator's adjustments racing reserves, across threads and processes.

What "above max" means once an operator adds spend on purpose: an adjustment may take a
counter past its max (it then refuses every reserve); a reserve racing it is never
admitted past max. Reserves check ``settled + pending + amount <= max`` and adjustments
change ``settled`` in one atomic step each, so every reserve is judged on a state that
includes every adjustment before it.
"""

from __future__ import annotations

import itertools
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import redis

from ledger._adjust_workers import Outcome, race, race_process
from payi_guard.clock import FakeClock
from payi_guard.ledger import CounterState, MemoryLedger, open_ledger

LIMIT = 4_000


def _check(outcomes: list[Outcome], final: CounterState, journaled: int) -> None:
    adjusts = [o for o in outcomes if o[0] == "adjust"]
    granted = [o for o in outcomes if o[0] == "reserve" and o[1]]
    refused = [o for o in outcomes if o[0] == "reserve" and not o[1]]
    # No lost update: the counter holds every adjustment and every admitted reserve.
    assert (final.settled, final.pending) == (
        sum(o[4] for o in adjusts),
        sum(o[4] for o in granted),
    )
    # What the last refusal needed, unless a reserve fitted after it.
    assert final.refused in {0, *(o[4] for o in refused)}
    assert journaled == len(adjusts)
    # A reserve is admitted only within max, on a state that includes it ...
    assert all(settled + pending <= LIMIT for _, _, settled, pending, _ in granted)
    # ... and refused only when it did not fit.
    assert all(s + p + amount > LIMIT for _, _, s, p, amount in refused)
    # Both parts only grew, so the states the operations saw form one chain: none saw a
    # torn or stale counter.
    states = sorted((settled, pending) for _, _, settled, pending, _ in outcomes)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(states))
    # The race was real: adjustments took the counter past max, and reserves were refused.
    assert refused
    assert max(s + p for _, _, s, p, _ in adjusts) > LIMIT


def _run_processes(uri: str, key: str, journal: str, now: float) -> list[Outcome]:
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    processes = [
        ctx.Process(target=race_process, args=(uri, key, journal, LIMIT, now, 4, 60, seed, out))
        for seed in range(3)
    ]
    for process in processes:
        process.start()
    reports = [out.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert all(kind == "ok" for kind, _ in reports), reports
    return [outcome for _, found in reports for outcome in found]


def test_adjustments_race_reserves_across_processes_on_redis(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    key = f"{key_prefix}:{{u:alice}}:usd:day:1"
    journal = f"{key_prefix}:{{u:alice}}:adjustments"
    outcomes = _run_processes(redis_url, key, journal, clock.now())
    ledger = open_ledger(redis_url)
    (final,) = ledger.read([key], now=clock.now())
    journaled = len(ledger.read_journal(journal, now=clock.now(), limit=1000))
    ledger.close()
    _check(outcomes, final, journaled)


def test_adjustments_race_reserves_across_processes_on_sqlite(
    tmp_path: Path, clock: FakeClock
) -> None:
    uri = f"sqlite:///{tmp_path / 'race.db'}"
    key, journal = "pg:{u:alice}:usd:day:1", "pg:{u:alice}:adjustments"
    outcomes = _run_processes(uri, key, journal, clock.now())
    ledger = open_ledger(uri)
    (final,) = ledger.read([key], now=clock.now())
    journaled = len(ledger.read_journal(journal, now=clock.now(), limit=1000))
    ledger.close()
    _check(outcomes, final, journaled)


def test_adjustments_race_reserves_across_threads_in_memory(clock: FakeClock) -> None:
    ledger = MemoryLedger()
    key, journal = "pg:{u:alice}:usd:day:1", "pg:{u:alice}:adjustments"
    outcomes: list[Outcome] = []
    barrier = threading.Barrier(12)

    def run(seed: int) -> None:
        barrier.wait()
        outcomes.extend(race(ledger, key, journal, LIMIT, clock.now(), 60, seed))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    (final,) = ledger.read([key], now=clock.now())
    _check(outcomes, final, len(ledger.read_journal(journal, now=clock.now(), limit=1000)))
