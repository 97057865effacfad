"""Fixtures of the ledger suite: every backend behind one call shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from ledger._support import LedgerAdapter, delete_prefix
from payi_guard.ledger import (
    AsyncMemoryLedger,
    MemoryLedger,
    open_async_ledger,
    open_ledger,
)

BACKENDS = ["memory-sync", "memory-async", "redis-sync", "redis-async"]


@pytest.fixture
def raw_redis(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A plain client on the shared Redis; deletes the test's keys afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    delete_prefix(client, key_prefix)
    client.close()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, key_prefix: str) -> AsyncIterator[LedgerAdapter]:
    """The ledger under test, as an adapter with awaitable calls."""
    kind: str = request.param
    if kind.startswith("memory"):
        memory = MemoryLedger()
        if kind == "memory-sync":
            yield LedgerAdapter(kind, memory, memory=memory)
        else:
            yield LedgerAdapter(kind, AsyncMemoryLedger(memory), memory=memory)
        return
    redis_url: str = request.getfixturevalue("redis_url")
    raw: redis.Redis = request.getfixturevalue("raw_redis")
    if kind == "redis-sync":
        adapter = LedgerAdapter(kind, open_ledger(redis_url), raw=raw)
    else:
        adapter = LedgerAdapter(kind, open_async_ledger(redis_url), raw=raw)
    yield adapter
    await adapter.close()
