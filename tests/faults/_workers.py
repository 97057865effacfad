"""Workers of the fault suite: a careful client's call loop, for threads, asyncio tasks and
spawned processes (this module is imported by the children).

The client does what the engine must do with the ledger: a reserve that failed or whose
outcome is unknown is released (until the release gets through), and a commit is retried
until it gets through; both are idempotent per id, so nothing is held or counted twice.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from faults._stall import unstalled
from payi_guard.exceptions import StorageError
from payi_guard.ledger import (
    AsyncLedger,
    Charge,
    Ledger,
    StorageEvent,
    StorageOutcomeUnknown,
    open_async_ledger,
    open_ledger,
)

EXPIRES = time.time() + 3 * 86_400
GIVE_UP = 60.0
"""Seconds a careful client keeps retrying before it fails the test (a generous bound)."""


@dataclass
class Tally:
    """What one worker did."""

    committed: int = 0
    granted: int = 0
    refused: int = 0
    failed_reserves: int = 0
    unknown: int = 0
    retried_commits: int = 0
    waits: list[float] = field(default_factory=list)

    def add(self, other: Tally) -> None:
        self.committed += other.committed
        self.granted += other.granted
        self.refused += other.refused
        self.failed_reserves += other.failed_reserves
        self.unknown += other.unknown
        self.retried_commits += other.retried_commits
        self.waits += other.waits

    def summary(self) -> tuple[int, int, int, int, int, int, float]:
        return (
            self.committed,
            self.granted,
            self.refused,
            self.failed_reserves,
            self.unknown,
            self.retried_commits,
            max(self.waits, default=0.0),
        )


def _timed(tally: Tally, started: float) -> None:
    # The wait on the store, less the time this process was kept from running meanwhile.
    tally.waits.append(unstalled(started, time.monotonic()))


def careful_call(
    ledger: Ledger, keys: list[str], limit: int, rng: random.Random, tally: Tally, ttl: float
) -> None:
    """One call: reserve an upper bound, spend at most that, commit; never give up silently."""
    estimate = rng.randint(1_000, 60_000)
    rid = uuid.uuid4().hex
    charges = [Charge(keys[0], estimate, limit, EXPIRES)]
    charges += [Charge(key, estimate, None, EXPIRES) for key in keys[1:]]
    started = time.monotonic()
    try:
        result = ledger.reserve(rid, charges, now=time.time(), ttl=ttl)
    except StorageError as exc:
        _timed(tally, started)
        tally.failed_reserves += 1
        tally.unknown += isinstance(exc, StorageOutcomeUnknown)
        _retry(lambda: ledger.release(rid, keys, now=time.time()), tally)
        return
    _timed(tally, started)
    if not result.ok:
        tally.refused += 1
        return
    tally.granted += 1
    actual = rng.randint(0, estimate)
    spent = [Charge(key, actual, None, EXPIRES) for key in keys]
    _retry(lambda: ledger.commit(rid, spent, now=time.time()), tally, commit=True)
    tally.committed += actual


def _retry(operation: Callable[[], object], tally: Tally, *, commit: bool = False) -> None:
    give_up = time.monotonic() + GIVE_UP
    first = True
    while True:
        started = time.monotonic()
        try:
            operation()
            _timed(tally, started)
            return
        except StorageError as exc:
            _timed(tally, started)
            tally.unknown += isinstance(exc, StorageOutcomeUnknown)
            if commit and first:
                tally.retried_commits += 1
            first = False
            if time.monotonic() > give_up:
                raise
            time.sleep(0.05)


async def careful_call_async(
    ledger: AsyncLedger,
    keys: list[str],
    limit: int,
    rng: random.Random,
    tally: Tally,
    ttl: float,
) -> None:
    """The asyncio twin of :func:`careful_call`."""
    estimate = rng.randint(1_000, 60_000)
    rid = uuid.uuid4().hex
    charges = [Charge(keys[0], estimate, limit, EXPIRES)]
    charges += [Charge(key, estimate, None, EXPIRES) for key in keys[1:]]
    started = time.monotonic()
    try:
        result = await ledger.reserve(rid, charges, now=time.time(), ttl=ttl)
    except StorageError as exc:
        _timed(tally, started)
        tally.failed_reserves += 1
        tally.unknown += isinstance(exc, StorageOutcomeUnknown)
        await _aretry(lambda: ledger.release(rid, keys, now=time.time()), tally)
        return
    _timed(tally, started)
    if not result.ok:
        tally.refused += 1
        return
    tally.granted += 1
    actual = rng.randint(0, estimate)
    spent = [Charge(key, actual, None, EXPIRES) for key in keys]
    await _aretry(lambda: ledger.commit(rid, spent, now=time.time()), tally, commit=True)
    tally.committed += actual


async def _aretry(operation: Callable[[], Any], tally: Tally, *, commit: bool = False) -> None:
    give_up = time.monotonic() + GIVE_UP
    first = True
    while True:
        started = time.monotonic()
        try:
            await operation()
            _timed(tally, started)
            return
        except StorageError as exc:
            _timed(tally, started)
            tally.unknown += isinstance(exc, StorageOutcomeUnknown)
            if commit and first:
                tally.retried_commits += 1
            first = False
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(0.05)


def run_threads(
    ledger: Ledger,
    keys: list[str],
    limit: int,
    threads: int,
    stop: Callable[[], bool],
    seed: int,
    ttl: float,
) -> Tally:
    """``threads`` threads making careful calls until ``stop()``; their tallies summed."""
    tallies = [Tally() for _ in range(threads)]
    errors: list[BaseException] = []

    def run(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        try:
            while not stop():
                careful_call(ledger, keys, limit, rng, tallies[index], ttl)
                time.sleep(0.002)
        except BaseException as exc:  # reported to the caller, which fails the test
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total


async def run_tasks(
    ledger: AsyncLedger,
    keys: list[str],
    limit: int,
    tasks: int,
    stop: Callable[[], bool],
    seed: int,
    ttl: float,
) -> Tally:
    """The asyncio twin of :func:`run_threads`."""
    tallies = [Tally() for _ in range(tasks)]

    async def run(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        while not stop():
            await careful_call_async(ledger, keys, limit, rng, tallies[index], ttl)
            await asyncio.sleep(0.005)

    await asyncio.gather(*(run(i) for i in range(tasks)))
    total = Tally()
    for tally in tallies:
        total.add(tally)
    return total


def worker_process(
    url: str,
    keys: list[str],
    limit: int,
    threads: int,
    seed: int,
    ttl: float,
    started: Event,
    stop: Event,
    out: Queue[Any],
) -> None:
    """A process of careful threads; reports its tally and the store events it saw."""
    events: list[StorageEvent] = []
    try:
        ledger = open_ledger(url, on_event=events.append)
        ledger.read(keys, now=time.time())  # connected: it has seen the store's marker
        started.set()
        tally = run_threads(ledger, keys, limit, threads, stop.is_set, seed, ttl)
        ledger.close()
        out.put(("ok", tally.summary(), [(e.kind, e.previous is not None) for e in events]))
    except BaseException as exc:
        out.put(("error", repr(exc), []))


def holder_process(
    url: str,
    keys: list[str],
    limit: int,
    amount: int,
    ttl: float,
    name: str,
    ready: Event,
    finish: Event,
    out: Queue[Any],
) -> None:
    """A long call: reserve, keep the reservation alive (renew every ttl/4), and commit
    only once ``finish`` is set; the test may kill the process meanwhile."""
    ledger = open_ledger(url)
    charges = [Charge(keys[0], amount, limit, EXPIRES)]
    charges += [Charge(key, amount, None, EXPIRES) for key in keys[1:]]
    if not ledger.reserve(name, charges, now=time.time(), ttl=ttl).ok:
        out.put((name, "refused"))
        return
    ready.set()
    while not finish.wait(ttl / 4):
        if not ledger.renew(name, keys, now=time.time(), ttl=ttl):
            out.put((name, "lost"))
            return
    spent = [Charge(key, amount // 2, None, EXPIRES) for key in keys]
    ledger.commit(name, spent, now=time.time())
    out.put((name, amount // 2))


def async_worker(
    url: str, keys: list[str], limit: int, tasks: int, stop: Callable[[], bool], seed: int
) -> Tally:
    """Run :func:`run_tasks` in a fresh event loop (from a thread of the test)."""

    async def main() -> Tally:
        ledger = open_async_ledger(url)
        try:
            return await run_tasks(ledger, keys, limit, tasks, stop, seed, ttl=30.0)
        finally:
            await ledger.aclose()

    return asyncio.run(main())
