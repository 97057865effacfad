"""Clock skew between hosts: reservation deadlines follow the store's clock, so a host
whose clock runs ahead frees nothing early and one running behind holds nothing late."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis
from ledger._support import LedgerAdapter

from faults._support import wait_store_time
from payi_guard.ledger import Charge, CounterState, open_async_ledger, open_ledger
from payi_guard.ledger.redis import INDEX_SUFFIX

EXPIRES = time.time() + 3 * 86_400
SKEW = 15.0
TTL = 10.0


@pytest.fixture(params=["sync", "async"])
async def hosts(
    request: pytest.FixtureRequest, redis_url: str
) -> AsyncIterator[tuple[LedgerAdapter, ...]]:
    """Two ledgers on one store, as two hosts would have."""
    kind: str = request.param
    if kind == "sync":
        pair = (
            LedgerAdapter(kind, open_ledger(redis_url)),
            LedgerAdapter(kind, open_ledger(redis_url)),
        )
    else:
        pair = (
            LedgerAdapter(kind, open_async_ledger(redis_url)),
            LedgerAdapter(kind, open_async_ledger(redis_url)),
        )
    yield pair
    for ledger in pair:
        await ledger.close()


async def test_a_host_15_s_ahead_does_not_free_a_live_reservation(
    hosts: tuple[LedgerAdapter, LedgerAdapter], raw_redis: redis.Redis, key_prefix: str
) -> None:
    first, ahead = hosts
    key = f"{key_prefix}:{{u:alice}}:usd"
    now = time.time()
    assert (await first.reserve("r1", [Charge(key, 600, 1000, EXPIRES)], now=now, ttl=TTL)).ok
    # The second host's clock says the first reservation's ttl is long over.
    result = await ahead.reserve("r2", [Charge(key, 600, 1000, EXPIRES)], now=now + SKEW, ttl=TTL)
    assert not result.ok
    assert result.states == (CounterState(0, 600, refused=600),)
    assert await ahead.read([key], now=now + SKEW) == result.states
    assert raw_redis.hget(key, "r:r1") == b"600"


async def test_a_host_15_s_behind_holds_nothing_past_the_ttl(
    hosts: tuple[LedgerAdapter, LedgerAdapter], raw_redis: redis.Redis, key_prefix: str
) -> None:
    behind, other = hosts
    key = f"{key_prefix}:{{u:bob}}:usd"
    now = time.time()
    assert (await behind.reserve("r1", [Charge(key, 600, 1000, EXPIRES)], now=now - SKEW, ttl=1)).ok
    # Its own clock says the reservation is 14 s from its end; the store's says 1 s: wait
    # for the deadline the store set, on the store's clock.
    deadline = raw_redis.zscore(key + INDEX_SUFFIX, "r:r1")
    assert deadline is not None
    wait_store_time(raw_redis, deadline)
    assert await behind.read([key], now=now - SKEW) == (CounterState(0, 0),)
    assert await other.read([key], now=now) == (CounterState(0, 0),)
    assert (await other.reserve("r2", [Charge(key, 1000, 1000, EXPIRES)], now=now, ttl=TTL)).ok
