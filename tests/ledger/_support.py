"""Helpers for the ledger tests: one call shape over sync and async ledgers, key
cleanup on the shared Redis, command-counting connections and private redis-server
processes (for the tests that stop a server or need one in a special mode)."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import redis
import redis.asyncio

from payi_guard.clock import FakeClock
from payi_guard.ledger import (
    AsyncLedger,
    Charge,
    CounterState,
    Ledger,
    MemoryLedger,
    ReserveResult,
    Tally,
)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


class LedgerAdapter:
    """Awaitable calls over either a sync or an async ledger."""

    def __init__(
        self,
        kind: str,
        ledger: Ledger | AsyncLedger,
        *,
        memory: MemoryLedger | None = None,
        raw: redis.Redis | None = None,
        make: Callable[..., Ledger | AsyncLedger] | None = None,
    ) -> None:
        self.kind = kind
        self.ledger = ledger
        # By the shape of its methods, not the Ledger protocol: a backend that lacks an
        # operation still runs every other test.
        sync = not inspect.iscoroutinefunction(type(ledger).reserve)
        self._sync: Ledger | None = cast("Ledger", ledger) if sync else None
        self._async: AsyncLedger | None = None if sync else cast("AsyncLedger", ledger)
        self.memory = memory
        self.raw = raw
        self._make = make

    def with_options(self, **options: Any) -> LedgerAdapter:
        """Another ledger of the same kind on the same store, built with ``options``."""
        assert self._make is not None, "this adapter cannot build another ledger"
        return LedgerAdapter(self.kind, self._make(**options), raw=self.raw, make=self._make)

    @property
    def is_redis(self) -> bool:
        return self.raw is not None

    async def reserve(
        self,
        rid: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        if self._sync is not None:
            return self._sync.reserve(rid, charges, now=now, ttl=ttl, tallies=tallies)
        assert self._async is not None
        return await self._async.reserve(rid, charges, now=now, ttl=ttl, tallies=tallies)

    async def commit(
        self,
        rid: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        if self._sync is not None:
            return self._sync.commit(rid, charges, now=now, tallies=tallies)
        assert self._async is not None
        return await self._async.commit(rid, charges, now=now, tallies=tallies)

    async def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        if self._sync is not None:
            return self._sync.read_tallies(keys, now=now)
        assert self._async is not None
        return await self._async.read_tallies(keys, now=now)

    async def release(
        self, rid: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        if self._sync is not None:
            return self._sync.release(rid, keys, now=now)
        assert self._async is not None
        return await self._async.release(rid, keys, now=now)

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        if self._sync is not None:
            return self._sync.read(keys, now=now)
        assert self._async is not None
        return await self._async.read(keys, now=now)

    async def renew(self, rid: str, keys: Sequence[str], *, now: float, ttl: float) -> bool:
        if self._sync is not None:
            return self._sync.renew(rid, keys, now=now, ttl=ttl)
        assert self._async is not None
        return await self._async.renew(rid, keys, now=now, ttl=ttl)

    async def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        if self._sync is not None:
            return self._sync.renew_many(reservations, now=now, ttl=ttl)
        assert self._async is not None
        return await self._async.renew_many(reservations, now=now, ttl=ttl)

    @property
    def short_ttl(self) -> float:
        """A reservation ttl that :meth:`elapse` can pass quickly on this backend's clock."""
        return 0.3 if self.raw is not None else 30.0

    async def elapse(self, clock: FakeClock, seconds: float) -> None:
        """Let ``seconds`` pass on the store's clock: the fake clock for memory, the
        server's own clock (waited for, never guessed) for Redis."""
        if self.raw is not None:
            raw = self.raw
            start = store_time(raw)
            deadline = time.monotonic() + 60 + seconds
            while store_time(raw) < start + seconds:
                assert time.monotonic() < deadline, "the store's clock did not move"
                time.sleep(0.02)
        clock.advance(seconds)

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        if self._sync is not None:
            return self._sync.scan(match, now=now, limit=limit)
        assert self._async is not None
        return await self._async.scan(match, now=now, limit=limit)

    async def close(self) -> None:
        if self._sync is not None:
            self._sync.close()
        else:
            assert self._async is not None
            await self._async.aclose()


def store_time(client: redis.Redis) -> float:
    """The store's own clock (``TIME``), in epoch seconds."""
    seconds, micros = client.time()
    return float(seconds) + micros / 1_000_000


def delete_prefix(client: redis.Redis, prefix: str) -> int:
    """Delete the keys under ``prefix`` (SCAN, never FLUSHDB: Redis is shared)."""
    deleted = 0
    batch: list[Any] = []
    for key in client.scan_iter(match=f"{prefix}*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_HANDED_OUT: set[int] = set()
"""Ports :func:`free_port` gave out in this process: never given twice, since the
process remembers each store it saw by address (a new server on an old port would be
taken for that store, restarted without its data)."""


def free_port() -> int:
    """A free port, never given before in this process, whose cluster bus port
    (port + 10000) is free and valid too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port in _HANDED_OUT:
            continue
        if port + 10000 < 65536 and _port_is_free(port + 10000):
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port pair found")


def own_marker() -> str:
    """A store-marker key of its own, for a test that expects its store to be new.

    A process remembers the marker of each store by its address: a test whose server
    got the port of an earlier test's server would otherwise see a reset, not a new store.
    """
    return f"pgtest:marker:{uuid.uuid4().hex}"


def redis_server_binary() -> str:
    """The redis-server executable; skips the test without one (fails under CI)."""
    path = shutil.which("redis-server")
    if path is None:
        if IN_CI:
            pytest.fail("CI=true needs the redis-server executable")
        pytest.skip("redis-server is not installed")
    return path


@dataclass
class RedisServer:
    """A private redis-server process that a test may stop, freeze and restart.

    ``appendonly`` turns on AOF persistence (``appendfsync`` says how often it is
    synced); a restart on the same ``workdir`` then reloads what the AOF holds.
    """

    port: int
    extra: list[str] = field(default_factory=list)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="pg-redis-")))
    process: subprocess.Popen[bytes] | None = None
    appendonly: bool = False
    appendfsync: str = "everysec"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *, sentinel: bool = False, timeout: float = 10.0) -> None:
        command = [redis_server_binary()]
        if sentinel:
            command += [str(self.workdir / "sentinel.conf"), "--sentinel"]
        persistence = ["--appendonly", "no"]
        if self.appendonly:
            persistence = ["--appendonly", "yes", "--appendfsync", self.appendfsync]
        command += [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
            "--daemonize", "no", "--dir", str(self.workdir), *self.extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.workdir
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client = redis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
                client.ping()
                client.close()
                return
            except redis.BusyLoadingError:
                time.sleep(0.02)  # replaying its AOF
            except redis.RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.02)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open, nothing is answered."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a frozen server (SIGCONT): it then serves what was queued meanwhile."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()  # SIGKILL works on a stopped process too
            self.process.wait(timeout=10)
        self.process = None

    def restart(self) -> None:
        """SIGKILL the server and start it again on the same port and directory."""
        self.kill()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)


def _count(connection: object) -> None:
    # The ledger's factory subclasses the class it is given: count on the class that
    # holds the counter, not on the subclass.
    for cls in type(connection).__mro__:
        if "sent" in vars(cls):
            cls.sent += 1  # type: ignore[attr-defined]
            return


class CountingConnection(redis.Connection):
    """A redis-py connection that counts the requests it sends (one per round trip)."""

    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _count(self)
        parent: Any = super()
        parent.send_packed_command(command, check_health)


class AsyncCountingConnection(redis.asyncio.Connection):
    """The asyncio twin of :class:`CountingConnection`."""

    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        _count(self)
        parent: Any = super()
        await parent.send_packed_command(command, check_health)


def counting_classes() -> tuple[type[CountingConnection], type[AsyncCountingConnection]]:
    """Fresh subclasses, so each test counts only its own requests."""
    sync_cls = type("Counting", (CountingConnection,), {"sent": 0})
    async_cls = type("AsyncCounting", (AsyncCountingConnection,), {"sent": 0})
    return sync_cls, async_cls
