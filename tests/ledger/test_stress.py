"""Concurrency: a hard limit holds exactly under contention, and a killed process's
reservation gives its budget back after the ttl."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from typing import Any

import redis

from ledger._support import store_time
from ledger._workers import hammer, hammer_process, hold_reservation
from payi_guard.clock import FakeClock
from payi_guard.ledger import Charge, CounterState, MemoryLedger, open_ledger
from payi_guard.ledger.redis import INDEX_SUFFIX

LIMIT = 5_000_000_000  # $5 in nano-USD


def wait_store_time(client: redis.Redis, target: float) -> None:
    """Wait until the store's own clock reads at least ``target`` (bounded)."""
    deadline = time.monotonic() + 60
    while store_time(client) < target:
        assert time.monotonic() < deadline, "the store's clock did not move"
        time.sleep(0.02)


def _check(settled: CounterState, org: CounterState, sums: list[int]) -> None:
    total, granted, refused, overshoot = sums
    assert overshoot == 0
    assert settled.pending == 0
    assert settled.settled == total  # the ledger equals what the workers spent
    assert org.settled == total
    assert settled.settled <= LIMIT
    assert refused > 0  # the limit was actually contested
    assert granted > 20


def test_redis_limit_holds_across_processes_and_threads(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    user_key = f"{key_prefix}:{{u:acme:alice}}:usd:day:1"
    org_key = f"{key_prefix}:{{o:acme}}:usd:day:1"
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    processes = [
        ctx.Process(
            target=hammer_process,
            args=(redis_url, user_key, org_key, LIMIT, clock.now(), 8, 150, seed, out),
        )
        for seed in range(4)
    ]
    for process in processes:
        process.start()
    reports = [out.get(timeout=90) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert all(kind == "ok" for kind, _ in reports), reports
    sums = [sum(column) for column in zip(*(r for _, r in reports), strict=True)]
    ledger = open_ledger(redis_url)
    user, org = ledger.read([user_key, org_key], now=clock.now())
    ledger.close()
    _check(user, org, sums)


def test_memory_limit_holds_across_threads(clock: FakeClock) -> None:
    ledger = MemoryLedger()
    user_key, org_key = "pg:{u:acme:alice}:usd:day:1", "pg:{o:acme}:usd:day:1"
    results: list[tuple[int, int, int, int]] = []
    barrier = threading.Barrier(32)

    def run(seed: int) -> None:
        barrier.wait()
        results.append(hammer(ledger, user_key, org_key, LIMIT, clock.now(), 400, seed))

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 32
    sums = [sum(column) for column in zip(*results, strict=True)]
    user, org = ledger.read([user_key, org_key], now=clock.now())
    _check(user, org, sums)


def test_killed_process_budget_comes_back_after_ttl(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    key = f"{key_prefix}:{{u:acme:bob}}:usd:day:1"
    ttl = 2.0
    start = clock.now()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(
        target=hold_reservation, args=(redis_url, key, 4_000_000_000, LIMIT, start, ttl, ready)
    )
    child.start()
    try:
        assert ready.wait(timeout=60), "the child never reserved"
    finally:
        child.kill()
        child.join(timeout=30)
    assert child.exitcode == -signal.SIGKILL

    # The deadline is on the store's clock: wait for it there, never on this host's.
    deadline = raw_redis.zscore(key + INDEX_SUFFIX, "r:doomed")
    assert deadline is not None
    ledger = open_ledger(redis_url)
    charge = [Charge(key, 2_000_000_000, LIMIT, start + 86_400)]
    wait_store_time(raw_redis, deadline)
    result = ledger.reserve("after-crash", charge, now=clock.now(), ttl=60)
    assert result.ok
    assert result.states == (CounterState(0, 2_000_000_000),)
    # The dead reservation is gone from storage too, not only from the totals.
    assert not raw_redis.hexists(key, "r:doomed")
    ledger.close()


def test_a_live_reservation_holds_until_its_store_deadline(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    key = f"{key_prefix}:{{u:acme:carol}}:usd:day:1"
    ledger = open_ledger(redis_url)
    charge = [Charge(key, 4_000_000_000, LIMIT, clock.now() + 86_400)]
    assert ledger.reserve("held", charge, now=clock.now(), ttl=3600).ok
    # A caller whose clock is a day ahead frees nothing: the store's clock decides.
    assert not ledger.reserve("other", charge, now=clock.now() + 86_000, ttl=60).ok
    assert ledger.read([key], now=clock.now() + 86_000) == (
        CounterState(0, 4_000_000_000, refused=4_000_000_000),
    )
    ledger.close()
