"""Fixtures of the ledger suite: every backend behind one call shape."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from ledger._support import LedgerAdapter, delete_prefix
from payi_guard.ledger import (
    AsyncMemoryLedger,
    AsyncSqliteLedger,
    MemoryLedger,
    SqliteLedger,
    open_async_ledger,
    open_ledger,
)

BACKENDS = [
    "memory-sync", "memory-async", "sqlite-sync", "sqlite-async", "redis-sync", "redis-async",
]  # fmt: skip


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
    if kind.startswith("sqlite"):
        path: Path = request.getfixturevalue("tmp_path") / "ledger.db"
        sqlite = SqliteLedger(path) if kind == "sqlite-sync" else AsyncSqliteLedger(path)
        adapter = LedgerAdapter(kind, sqlite)
        yield adapter
        await adapter.close()
        return
    redis_url: str = request.getfixturevalue("redis_url")
    raw: redis.Redis = request.getfixturevalue("raw_redis")
    if kind == "redis-sync":
        adapter = LedgerAdapter(kind, open_ledger(redis_url), raw=raw)
    else:
        adapter = LedgerAdapter(kind, open_async_ledger(redis_url), raw=raw)
    yield adapter
    await adapter.close()
