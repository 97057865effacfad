"""The Redis ledgers' pools: the short way to a free connection, and when it is not taken.

Real Redis servers: the shared one, and one of the test's own for connections the server
closes.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from ledger._support import RedisServer, free_port
from payi_guard.clock import FakeClock
from payi_guard.ledger import Charge, CounterState, open_async_ledger, open_ledger

EXPIRES = 1_795_780_800.0 + 3 * 86_400


def _pool(ledger: Any) -> Any:
    (binding,) = ledger._bindings.values()
    return binding.client.connection_pool


class _CountingCondition(asyncio.Condition):
    """An asyncio condition that counts how often it is entered."""

    entered = 0

    async def __aenter__(self) -> None:
        self.entered += 1
        await super().__aenter__()


def own_address(redis_url: str, key_prefix: str) -> str:
    """``redis_url`` as only this test names it: ledgers of one address share one client
    (and its pool), so a ledger another test left open would share the pool counted."""
    return f"{redis_url}?client_name={key_prefix}"


async def _warmed(
    redis_url: str, key_prefix: str, clock: FakeClock
) -> tuple[Any, list[Charge], Any, _CountingCondition]:
    """A factory ledger after one reserve (its connection made, then free), its charges,
    its pool, and the counting condition that pool now has."""
    ledger = open_async_ledger(own_address(redis_url, key_prefix))
    charges = [Charge(f"{key_prefix}:{{u:a}}:usd", 10, 1_000, EXPIRES)]
    assert (await ledger.reserve("warm", charges, now=clock.now(), ttl=60)).ok
    pool = _pool(ledger)
    condition = pool._condition = _CountingCondition()
    return ledger, charges, pool, condition


async def test_a_call_takes_a_free_connection_without_the_pools_condition(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    ledger, charges, pool, condition = await _warmed(redis_url, key_prefix, clock)
    for i in range(5):
        assert (await ledger.reserve(f"r{i}", charges, now=clock.now(), ttl=60)).ok
        await ledger.commit(f"r{i}", charges, now=clock.now())
    assert condition.entered == 0
    assert len(pool._available_connections) == 1
    assert not pool._in_use_connections
    assert not pool._pg_short
    await ledger.aclose()


async def test_callers_waiting_for_the_one_connection_are_each_served_in_turn(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    # One connection, free, then 100 callers: the first takes it the short way, the
    # others wait on the pool's condition; each release must wake one of them. The wait
    # is bounded by the URI's socket timeout, far beyond what 100 round trips take.
    ledger = open_async_ledger(f"{redis_url}?max_connections=1&socket_timeout=30")
    key = f"{key_prefix}:{{u:a}}:usd"

    async def reserve(i: int) -> bool:
        charge = [Charge(key, 10, None, EXPIRES)]
        return (await ledger.reserve(f"r{i}", charge, now=clock.now(), ttl=60)).ok

    assert await reserve(0)  # the connection is made, then free
    assert all(await asyncio.gather(*(reserve(i) for i in range(1, 101))))
    assert await ledger.read([key], now=clock.now()) == (CounterState(0, 1_010),)
    pool = _pool(ledger)
    assert len(pool._available_connections) == 1
    assert not pool._in_use_connections
    assert not pool._pg_short
    assert not pool._condition._waiters
    # And the short way again once nobody waits.
    pool._condition = condition = _CountingCondition()
    assert await reserve(101)
    assert condition.entered == 0
    await ledger.aclose()


@pytest.fixture
def own_server() -> Iterator[tuple[RedisServer, redis.Redis]]:
    """A ``redis-server`` of the test's own (its clients may be closed) and a client of it."""
    server = RedisServer(free_port())
    server.start()
    raw = server.client()
    try:
        yield server, raw
    finally:
        raw.close()
        server.kill()


def test_a_connection_the_server_closed_is_made_again_on_the_short_way(
    clock: FakeClock, own_server: tuple[RedisServer, redis.Redis]
) -> None:
    server, raw = own_server
    charges = [Charge("t:{u:a}:usd", 10, None, EXPIRES)]

    async def run() -> None:
        ledger = open_async_ledger(server.url)
        assert (await ledger.reserve("r1", charges, now=clock.now(), ttl=60)).ok
        pool = _pool(ledger)
        (before,) = pool._available_connections
        # The server closes every client connection but this test's own.
        assert raw.client_kill_filter(_type="normal", skipme=True) >= 1
        await asyncio.sleep(0)
        condition = pool._condition = _CountingCondition()
        result = await ledger.reserve("r2", charges, now=clock.now(), ttl=60)
        assert result.states == (CounterState(0, 20),)
        assert condition.entered == 0
        (after,) = pool._available_connections
        assert after is before  # the same connection object, connected again
        await ledger.aclose()

    asyncio.run(run())


async def test_while_the_server_moves_connections_the_pool_takes_redis_pys_path(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    ledger, charges, pool, condition = await _warmed(redis_url, key_prefix, clock)
    pool.set_in_maintenance(True)  # what redis-py's maintenance handler calls
    assert (await ledger.reserve("moving", charges, now=clock.now(), ttl=60)).ok
    assert condition.entered == 2  # taken and given back under the condition
    pool.set_in_maintenance(False)
    assert (await ledger.reserve("moved", charges, now=clock.now(), ttl=60)).ok
    assert condition.entered == 2
    await ledger.aclose()


# -- the sync pool -----------------------------------------------------------------------------


class _CountingQueue(queue.LifoQueue[Any]):
    """The pool's queue of free connections, counting the takes that may wait."""

    waits = 0

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block:
            self.waits += 1
        return super().get(block, timeout)


def _sync_pool(ledger: Any) -> Any:
    return ledger._client.connection_pool


def _counting_queue(pool: Any) -> _CountingQueue:
    """Give ``pool`` a counting queue holding what its own held."""
    counted = _CountingQueue(pool.pool.maxsize)
    for item in pool.pool.queue:
        counted.put_nowait(item)
    pool.pool = counted
    return counted


def test_a_sync_call_takes_a_free_connection_without_waiting_on_the_queue(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    ledger = open_ledger(own_address(redis_url, key_prefix))
    charges = [Charge(f"{key_prefix}:{{u:a}}:usd", 10, 1_000, EXPIRES)]
    assert ledger.reserve("warm", charges, now=clock.now(), ttl=60).ok
    pool = _sync_pool(ledger)
    free = _counting_queue(pool)
    for i in range(5):
        assert ledger.reserve(f"r{i}", charges, now=clock.now(), ttl=60).ok
        ledger.commit(f"r{i}", charges, now=clock.now())
    assert free.waits == 0
    assert not pool._pg_short
    assert sum(item is not None for item in free.queue) == 1
    ledger.close()


def test_threads_sharing_two_connections_are_each_served(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    # 16 threads, 2 connections: most takes find none free and wait on redis-py's path;
    # every connection taken the short way must come back for them. The wait is bounded
    # by the URI's socket timeout, far beyond what the calls take.
    ledger = open_ledger(f"{redis_url}?max_connections=2&socket_timeout=30")
    key = f"{key_prefix}:{{u:a}}:usd"
    assert ledger.reserve("warm", [Charge(key, 0, None, EXPIRES)], now=clock.now(), ttl=60).ok
    start = threading.Barrier(16)
    failures: list[BaseException] = []

    def work(t: int) -> None:
        start.wait()
        try:
            for i in range(50):
                charge = [Charge(key, 1, 800, EXPIRES)]
                assert ledger.reserve(f"t{t}-{i}", charge, now=clock.now(), ttl=60).ok
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert ledger.read([key], now=clock.now()) == (CounterState(0, 800),)
    pool = _sync_pool(ledger)
    assert not pool._pg_short
    assert sum(item is not None for item in pool.pool.queue) == 2
    ledger.close()


def test_a_sync_connection_the_server_closed_is_made_again_on_the_short_way(
    clock: FakeClock, own_server: tuple[RedisServer, redis.Redis]
) -> None:
    server, raw = own_server
    charges = [Charge("t:{u:a}:usd", 10, None, EXPIRES)]
    ledger = open_ledger(server.url)
    try:
        assert ledger.reserve("r1", charges, now=clock.now(), ttl=60).ok
        pool = _sync_pool(ledger)
        free = _counting_queue(pool)
        # The server closes every client connection but this test's own.
        assert raw.client_kill_filter(_type="normal", skipme=True) >= 1
        result = ledger.reserve("r2", charges, now=clock.now(), ttl=60)
        assert result.states == (CounterState(0, 20),)
        assert free.waits == 0
        assert sum(item is not None for item in free.queue) == 1
    finally:
        ledger.close()


_FORKED = """
import os, sys
from payi_guard.ledger import Charge, CounterState, open_ledger

url, key, now = sys.argv[1], sys.argv[2], float(sys.argv[3])
ledger = open_ledger(url)
charges = [Charge(key, 10, None, now + 86_400)]
assert ledger.reserve("parent-1", charges, now=now, ttl=60).ok
pool = ledger._client.connection_pool
(parents,) = [item for item in pool.pool.queue if item is not None]
pid = os.fork()
if pid == 0:  # the child: never the parent's socket
    code = 1
    try:
        ok = ledger.reserve("child", charges, now=now, ttl=60).ok
        mine = [item for item in pool.pool.queue if item is not None]
        code = 0 if ok and mine and mine[0] is not parents else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert ledger.reserve("parent-2", charges, now=now, ttl=60).ok
assert ledger.read([key], now=now) == (CounterState(0, 30),)
ledger.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_connection_on_the_short_way(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    # In a process of its own: forking this one, whose other threads may hold locks,
    # could leave the child waiting on them.
    key = f"{key_prefix}:{{u:a}}:usd"
    command = [sys.executable, "-c", _FORKED, redis_url, key, str(clock.now())]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
