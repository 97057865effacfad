"""Fixtures of the plans-and-operator suite: the same guard on memory, SQLite and Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

STORES = ["memory", "sqlite", "redis"]


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path) -> Iterator[str]:
    """A storage URI: in-process memory, an SQLite file, or the shared Redis.

    Redis keys live under the test's own ``key_prefix`` and are deleted afterwards.
    """
    kind: str = request.param
    if kind == "memory":
        yield "memory://"
        return
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'budgets.db'}"
        return
    url: str = request.getfixturevalue("redis_url")
    yield url
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path) -> Iterator[str]:
    """A store two guards (two processes, as far as they know) share: SQLite or Redis."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared.db'}"
        return
    url: str = request.getfixturevalue("redis_url")
    yield url
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
