"""The asyncio Redis ledger's pool: the short way to a free connection, and when it is not taken.

Real Redis servers: the shared one, and one of the test's own for connections the server
closes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from ledger._support import RedisServer, free_port
from payi_guard.clock import FakeClock
from payi_guard.ledger import Charge, CounterState, open_async_ledger

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


async def _warmed(
    redis_url: str, key_prefix: str, clock: FakeClock
) -> tuple[Any, list[Charge], Any, _CountingCondition]:
    """A factory ledger after one reserve (its connection made, then free), its charges,
    its pool, and the counting condition that pool now has."""
    ledger = open_async_ledger(redis_url)
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


def test_a_connection_the_server_closed_is_made_again_on_the_short_way(
    clock: FakeClock,
) -> None:
    server = RedisServer(free_port())
    server.start()
    raw = server.client()
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

    try:
        asyncio.run(run())
    finally:
        raw.close()
        server.kill()


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
