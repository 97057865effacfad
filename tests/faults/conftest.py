"""Fixtures of the fault suite: private redis-server processes and proxies, always stopped."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
import redis
from ledger._support import RedisServer, delete_prefix, free_port

from faults._support import Proxy


@pytest.fixture
def raw_redis(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A plain client on the shared Redis; deletes the test's keys afterwards."""
    client = redis.Redis.from_url(redis_url)
    yield client
    delete_prefix(client, key_prefix)
    client.close()


def _started(server: RedisServer) -> Iterator[RedisServer]:
    try:
        server.start()
        yield server
    finally:
        server.kill()
        shutil.rmtree(server.workdir, ignore_errors=True)


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A private redis-server without persistence, on a free port, killed afterwards."""
    yield from _started(RedisServer(free_port(), extra=["--enable-debug-command", "yes"]))


@pytest.fixture
def aof_server() -> Iterator[RedisServer]:
    """A private redis-server with AOF synced on every write (``appendfsync always``)."""
    yield from _started(RedisServer(free_port(), appendonly=True, appendfsync="always"))


@pytest.fixture
def make_proxy() -> Iterator[Callable[..., Proxy]]:
    """Build :class:`Proxy` objects that are closed after the test."""
    proxies: list[Proxy] = []

    def make(upstream_port: int, *, reply_delay: float = 0.0) -> Proxy:
        proxy = Proxy(upstream_port, reply_delay=reply_delay)
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()
