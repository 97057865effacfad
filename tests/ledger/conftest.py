"""Fixtures of the ledger suite: every backend behind one call shape."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

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
            yield LedgerAdapter(kind, memory, memory=memory, make=MemoryLedger)
        else:

            def make_async(**options: Any) -> AsyncMemoryLedger:
                return AsyncMemoryLedger(MemoryLedger(**options))

            yield LedgerAdapter(kind, AsyncMemoryLedger(memory), memory=memory, make=make_async)
        return
    if kind.startswith("sqlite"):
        path: Path = request.getfixturevalue("tmp_path") / "ledger.db"
        cls = SqliteLedger if kind == "sqlite-sync" else AsyncSqliteLedger

        def make_sqlite(**options: Any) -> SqliteLedger | AsyncSqliteLedger:
            # The contract is about what the ledger does, not how fast: a loaded machine
            # may keep a writer waiting longer than the production defaults allow.
            waits = {"timeout": 5.0, "lock_timeout": 10.0}
            return cls(path, **(waits | options))

        adapter = LedgerAdapter(kind, make_sqlite(), make=make_sqlite)
        yield adapter
        await adapter.close()
        return
    redis_url: str = request.getfixturevalue("redis_url")
    raw: redis.Redis = request.getfixturevalue("raw_redis")
    opener = open_ledger if kind == "redis-sync" else open_async_ledger
    make = functools.partial(opener, redis_url)
    adapter = LedgerAdapter(kind, make(), raw=raw, make=make)
    yield adapter
    await adapter.close()
