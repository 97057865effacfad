"""Several processes, threads and asyncio tasks on one private store while it is frozen,
restarted (with and without persistence) or while workers are killed: no counter above
its max, the ledger equal to what the workers committed, nothing pending at the end."""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from ledger._support import RedisServer

from faults._support import scripts_run, store_time, wait_store_time, wait_until
from faults._workers import Tally, async_worker, holder_process, worker_process
from payi_guard.ledger import CounterState, open_ledger
from payi_guard.ledger.factory import DEFAULT_TIMEOUT

USER = "w:{u:acme:alice}:usd"
ORG = "w:{o:acme}:usd"
KEYS = [USER, ORG]
LIMIT = 8_000_000
BOUND = 2 * DEFAULT_TIMEOUT + 1.0
"""The longest one ledger call may take: twice the socket timeout, and a generous
allowance for a loaded machine."""

SPAWN = multiprocessing.get_context("spawn")


class Fleet:
    """Worker processes plus asyncio tasks (in a thread of this process) on one store."""

    def __init__(
        self, url: str, *, processes: int, threads: int, tasks: int, limit: int = LIMIT
    ) -> None:
        self.url = url
        self.limit = limit
        self.stop = SPAWN.Event()
        self.out: Any = SPAWN.Queue()
        self.started = [SPAWN.Event() for _ in range(processes)]
        self.children = [
            SPAWN.Process(
                target=worker_process,
                args=(url, KEYS, limit, threads, seed, 30.0, started, self.stop, self.out),
            )
            for seed, started in enumerate(self.started)
        ]
        self.tasks = tasks
        self.async_tally: list[Tally] = []
        self.async_errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run_tasks)

    def _run_tasks(self) -> None:
        try:
            self.async_tally.append(
                async_worker(self.url, KEYS, self.limit, self.tasks, self.stop.is_set, seed=99)
            )
        except BaseException as exc:  # reported by finish()
            self.async_errors.append(exc)

    def start(self) -> None:
        """Start every worker; return once each process has connected to the store."""
        for child in self.children:
            child.start()
        self.thread.start()
        for started in self.started:
            assert started.wait(timeout=60), "a worker process never connected"

    def finish(self) -> tuple[Tally, list[list[tuple[str, bool]]]]:
        """Stop every worker; their summed tally and each process's store events."""
        self.stop.set()
        reports = [self.out.get(timeout=120) for _ in self.children]
        for child in self.children:
            child.join(timeout=30)
        self.thread.join(timeout=120)
        assert not self.async_errors, self.async_errors
        assert all(kind == "ok" for kind, _, _ in reports), reports
        total = Tally()
        for _, summary, _ in reports:
            committed, granted, refused, failed, unknown, retried, wait = summary
            total.add(Tally(committed, granted, refused, failed, unknown, retried, [wait]))
        for tally in self.async_tally:
            total.add(tally)
        return total, [events for _, _, events in reports]

    def kill(self) -> None:
        self.stop.set()
        for child in self.children:
            if child.is_alive():
                child.kill()
            child.join(timeout=30)


@pytest.fixture
def fleet_factory() -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(url: str, **options: int) -> Fleet:
        fleet = Fleet(url, **options)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.kill()


def totals(raw: redis.Redis) -> tuple[CounterState, CounterState]:
    ledger = open_ledger(f"redis://127.0.0.1:{raw.connection_pool.connection_kwargs['port']}/0")
    try:
        user, org = ledger.read(KEYS, now=time.time())
    finally:
        ledger.close()
    return user, org


def progress(raw: redis.Redis, at_least: int) -> Callable[[], bool]:
    return lambda: int(raw.hget(USER, "s") or 0) >= at_least


@pytest.mark.slow
def test_a_freeze_mid_run_leaves_every_counter_exact(
    server: RedisServer, fleet_factory: Callable[..., Fleet]
) -> None:
    raw = server.client()
    # A limit the workers reach only after the freezes, so commits are in flight then.
    limit = 50 * LIMIT
    fleet = fleet_factory(server.url, processes=2, threads=3, tasks=60, limit=limit)
    fleet.start()
    wait_until(progress(raw, 1), timeout=60, what="the workers to start")
    for _ in range(2):
        server.pause()  # every call in flight now times out; their outcome is unknown
        time.sleep(1.0)
        server.resume()
        time.sleep(0.5)
    tally, _ = fleet.finish()

    user, org = totals(raw)
    assert tally.unknown > 0  # the freezes were felt
    assert tally.granted > 0
    # Exact: nothing lost, nothing twice (`refused` is whatever the last refusal noted).
    assert (user.settled, user.pending) == (org.settled, org.pending) == (tally.committed, 0)
    assert user.settled <= limit
    assert max(tally.waits) <= BOUND, max(tally.waits)


@pytest.mark.slow
def test_a_restart_without_persistence_is_reported_once_by_every_process(
    server: RedisServer, fleet_factory: Callable[..., Fleet]
) -> None:
    raw = server.client()
    fleet = fleet_factory(server.url, processes=2, threads=2, tasks=20)
    fleet.start()
    wait_until(progress(raw, 1), timeout=60, what="the workers to start")
    server.restart()  # SIGKILL and back empty: every budget is reset
    raw = server.client()
    wait_until(lambda: scripts_run(raw) > 50, timeout=60, what="the workers to resume")
    tally, events = fleet.finish()

    # The first process to connect created the marker; after the restart each process
    # noticed the loss once, at its first operation on the new server.
    assert sum(kind == "new" for per in events for kind, _ in per) <= 1
    for per in events:
        assert [(kind, previous) for kind, previous in per if kind == "reset"] == [("reset", True)]
    user, org = totals(raw)
    assert user.pending == org.pending == 0
    assert user.settled == org.settled <= tally.committed  # what was lost was lost
    assert user.settled <= LIMIT


@pytest.mark.slow
def test_a_restart_with_persistence_loses_nothing(
    aof_server: RedisServer, fleet_factory: Callable[..., Fleet]
) -> None:
    raw = aof_server.client()
    fleet = fleet_factory(aof_server.url, processes=2, threads=2, tasks=20)
    fleet.start()
    wait_until(progress(raw, 1), timeout=60, what="the workers to start")
    aof_server.restart()  # SIGKILL: with appendfsync always, every reply was on disk
    raw = aof_server.client()
    wait_until(lambda: scripts_run(raw) > 50, timeout=60, what="the workers to resume")
    tally, events = fleet.finish()

    assert [kind for per in events for kind, _ in per] in ([], ["new"])
    user, org = totals(raw)
    assert (user.settled, user.pending) == (org.settled, org.pending) == (tally.committed, 0)
    assert user.settled <= LIMIT


@pytest.mark.slow
def test_killed_workers_hold_nothing_after_their_ttl_and_live_calls_keep_theirs(
    server: RedisServer,
) -> None:
    raw = server.client()
    ttl = 2.0
    names = ("dies-1", "dies-2", "lives")
    ready = {name: SPAWN.Event() for name in names}
    # One event each: a process killed while it waits on an event leaves that event
    # unusable (setting it would wait for the dead sleeper).
    finish = {name: SPAWN.Event() for name in names}
    out: Any = SPAWN.Queue()
    share = LIMIT // 4
    holders = {
        name: SPAWN.Process(
            target=holder_process,
            args=(server.url, KEYS, LIMIT, share, ttl, name, ready[name], finish[name], out),
        )
        for name in names
    }
    try:
        for holder in holders.values():
            holder.start()
        for name, event in ready.items():
            assert event.wait(timeout=60), f"{name} never reserved"
        # Long calls: well past their ttl on the store's clock, renewals keep them.
        wait_store_time(raw, store_time(raw) + 1.2 * ttl)
        assert totals(raw)[0] == CounterState(0, 3 * share)
        ledger = open_ledger(server.url)
        assert not ledger.reserve("greedy", [_charge(2 * share)], now=time.time(), ttl=60).ok

        for name in ("dies-1", "dies-2"):
            holders[name].kill()
            holders[name].join(timeout=30)
            assert holders[name].exitcode == -signal.SIGKILL
        # Nobody renews the dead ones: the store's clock frees them within a ttl.
        wait_until(
            lambda: totals(raw)[0] == CounterState(0, share, refused=2 * share),  # greedy's
            what="the dead to expire",
        )
        assert ledger.reserve("fits", [_charge(2 * share)], now=time.time(), ttl=60).ok
        ledger.release("fits", [USER], now=time.time())

        finish["lives"].set()
        assert out.get(timeout=60) == ("lives", share // 2)
        holders["lives"].join(timeout=30)
        assert totals(raw) == (CounterState(share // 2, 0), CounterState(share // 2, 0))
        ledger.close()
    finally:
        for holder in holders.values():
            if holder.is_alive():
                holder.kill()
            holder.join(timeout=30)


def _charge(amount: int) -> Any:
    from payi_guard.ledger import Charge

    return Charge(USER, amount, LIMIT, time.time() + 86_400)
