"""Bursts: hundreds of concurrent calls on a healthy store never fail, and no call waits
on a slow or frozen store longer than twice its socket timeout."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import redis
from ledger._support import RedisServer, delete_prefix

from faults._stall import unstalled
from faults._support import wait_until
from payi_guard.exceptions import StorageError
from payi_guard.ledger import Charge, CounterState, open_async_ledger, open_ledger
from payi_guard.ledger.factory import DEFAULT_TIMEOUT

EXPIRES = time.time() + 3 * 86_400
ALLOWANCE = 1.0
"""Seconds a loaded machine may add to a wait on top of what the timeouts allow (hundreds
of requests timing out at once are hundreds of exceptions for one event loop)."""
BOUND = 2 * DEFAULT_TIMEOUT + ALLOWANCE
HEALTHY: dict[str, Any] = {
    "socket_timeout": 10.0,
    "socket_connect_timeout": 10.0,
    "timeout": DEFAULT_TIMEOUT,
}
"""Options of the burst tests' ledgers: a reply may take 10 s, which a store that works
does not reach even on a starved machine, so only a failure caused by the concurrency
itself (no free connection within the default pool wait, a refused connection, a reply
read by the wrong caller) can fail them; the waits on a slow store are bounded below."""


def busy(seconds: float) -> None:
    """Hold the CPU (and the GIL) as the engine's own work around a call does."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.fixture
def cleanup(redis_url: str, key_prefix: str) -> Callable[[], None]:
    def run() -> None:
        client = redis.Redis.from_url(redis_url)
        delete_prefix(client, key_prefix)
        client.close()

    return run


async def test_200_async_tasks_on_a_healthy_store_never_fail(
    redis_url: str, key_prefix: str, cleanup: Callable[[], None]
) -> None:
    ledger = open_async_ledger(redis_url, **HEALTHY)
    keys = [f"{key_prefix}:{{u:{i}}}:usd" for i in range(20)]
    errors: Counter[str] = Counter()
    committed = Counter[str]()

    async def one(task: int) -> None:
        key = keys[task % len(keys)]
        for _ in range(5):
            rid = uuid.uuid4().hex
            try:
                await ledger.reserve(rid, [Charge(key, 9, None, EXPIRES)], now=time.time(), ttl=60)
                busy(0.002)  # the engine's work before the call and after it
                await asyncio.sleep(0.01)  # the call itself
                await ledger.commit(rid, [Charge(key, 7, None, EXPIRES)], now=time.time())
                committed[key] += 7
            except StorageError as exc:
                errors[str(exc)[:80]] += 1

    try:
        await asyncio.gather(*(one(task) for task in range(200)))
        assert not errors, errors
        states = await ledger.read(keys, now=time.time())
        assert states == tuple(CounterState(committed[key], 0) for key in keys)
    finally:
        await ledger.aclose()
        cleanup()


def test_80_threads_on_a_healthy_store_never_fail(
    redis_url: str, key_prefix: str, cleanup: Callable[[], None]
) -> None:
    ledger = open_ledger(redis_url, **HEALTHY)
    keys = [f"{key_prefix}:{{u:{i}}}:usd" for i in range(20)]
    errors: Counter[str] = Counter()
    committed: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Barrier(80)

    def run(thread: int) -> None:
        key = keys[thread % len(keys)]
        start.wait()
        for _ in range(10):
            rid = uuid.uuid4().hex
            try:
                ledger.reserve(rid, [Charge(key, 9, None, EXPIRES)], now=time.time(), ttl=60)
                busy(0.001)
                ledger.commit(rid, [Charge(key, 7, None, EXPIRES)], now=time.time())
                with lock:
                    committed[key] += 7
            except StorageError as exc:
                with lock:
                    errors[str(exc)[:80]] += 1

    threads = [threading.Thread(target=run, args=(i,)) for i in range(80)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        states = ledger.read(keys, now=time.time())
        assert states == tuple(CounterState(committed[key], 0) for key in keys)
    finally:
        ledger.close()
        cleanup()


class Chaos:
    """Freeze and thaw a server in a loop (SIGSTOP 1 s, then 0.2 s of service)."""

    def __init__(self, server: RedisServer, cycles: int) -> None:
        self.server = server
        self.cycles = cycles
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            for _ in range(self.cycles):
                self.server.pause()
                time.sleep(1.0)
                self.server.resume()
                time.sleep(0.2)
        finally:
            self.server.resume()
            self.done.set()

    def __enter__(self) -> Chaos:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(timeout=30)
        self.server.resume()


def _check_waits(waits: list[float], failures: Counter[tuple[str, str]]) -> None:
    assert waits
    assert max(waits) <= BOUND, (max(waits), BOUND, failures)
    # Only storage errors escape the ledger, and none of them is a wait for a pooled
    # connection: a call waits on the store, never on the calls ahead of it.
    assert all(kind.startswith("Storage") for kind, _ in failures), failures
    assert not [why for _, why in failures if "No connection available" in why], failures


def test_threads_wait_at_most_twice_the_timeout_on_a_frozen_store(server: RedisServer) -> None:
    ledger = open_ledger(server.url)
    key = "f:{u:slow}:usd"
    waits: list[float] = []
    failures: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()
    ledger.read([key], now=time.time())

    def run(chaos: Chaos) -> None:
        while not chaos.done.is_set():
            rid = uuid.uuid4().hex
            for name in ("reserve", "commit"):
                charge = [Charge(key, 1, None, EXPIRES)]
                started = time.monotonic()
                try:
                    if name == "reserve":
                        ledger.reserve(rid, charge, now=time.time(), ttl=60)
                    else:
                        ledger.commit(rid, charge, now=time.time())
                except Exception as exc:
                    with lock:
                        failures[type(exc).__name__, str(exc)[:80]] += 1
                took = unstalled(started, time.monotonic())
                with lock:
                    waits.append(took)

    try:
        with Chaos(server, cycles=3) as chaos:
            threads = [threading.Thread(target=run, args=(chaos,)) for _ in range(80)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
        assert failures  # the freezes were felt
        _check_waits(waits, failures)
        wait_until(lambda: ledger.read([key], now=time.time()), what="the thawed store")
    finally:
        ledger.close()


async def test_async_tasks_wait_at_most_twice_the_timeout_on_a_frozen_store(
    server: RedisServer,
) -> None:
    ledger = open_async_ledger(server.url)
    key = "f:{u:slow}:usd"
    waits: list[float] = []
    failures: Counter[tuple[str, str]] = Counter()
    await ledger.read([key], now=time.time())

    async def run(chaos: Chaos) -> None:
        while not chaos.done.is_set():
            rid = uuid.uuid4().hex
            for name in ("reserve", "commit"):
                started = time.monotonic()
                try:
                    if name == "reserve":
                        await ledger.reserve(
                            rid, [Charge(key, 1, None, EXPIRES)], now=time.time(), ttl=60
                        )
                    else:
                        await ledger.commit(rid, [Charge(key, 1, None, EXPIRES)], now=time.time())
                except Exception as exc:
                    failures[type(exc).__name__, str(exc)[:80]] += 1
                waits.append(unstalled(started, time.monotonic()))
            await asyncio.sleep(0.005)

    try:
        with Chaos(server, cycles=3) as chaos:
            await asyncio.gather(*(run(chaos) for _ in range(200)))
        assert failures
        _check_waits(waits, failures)
    finally:
        await ledger.aclose()


async def test_a_busy_event_loop_is_not_taken_for_a_slow_store(
    redis_url: str, key_prefix: str, cleanup: Callable[[], None]
) -> None:
    key = f"{key_prefix}:{{u:busy}}:usd"

    async def hog() -> None:
        # Runs while the call waits on the store (connecting, then for its reply) and
        # holds the event loop longer than the whole time budget: what the store sent
        # meanwhile sits unread.
        await asyncio.sleep(0)
        busy(3 * DEFAULT_TIMEOUT)

    try:
        for held in range(2):
            # A new client each time: the connection is made while the loop is held.
            ledger = open_async_ledger(redis_url)
            try:
                states, _ = await asyncio.gather(ledger.read([key], now=time.time()), hog())
                assert states == (CounterState(0, held),)
                charge = [Charge(key, 1, 10, EXPIRES)]
                reserve = ledger.reserve(uuid.uuid4().hex, charge, now=time.time(), ttl=60)
                reserved, _ = await asyncio.gather(reserve, hog())
                assert reserved.ok
            finally:
                await ledger.aclose()
    finally:
        cleanup()
