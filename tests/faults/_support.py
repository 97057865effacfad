"""Helpers of the fault suite: waits on conditions, the store's clock, a TCP proxy that
holds requests or slows replies, and the one import of the fake provider."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from ledger._support import store_time

# The fake provider's import path is kept in this one place.
from payi_guard.clock import SystemClock
from payi_guard.testing import FakeProvider

__all__ = [
    "FakeProvider",
    "MiddayClock",
    "Proxy",
    "async_wait_until",
    "scripts_run",
    "store_time",
    "wait_store_time",
    "wait_until",
]


class MiddayClock(SystemClock):
    """The real clock, moved to 12:00 UTC of the day it was made; it runs in real time.

    A fault test compares the ledger's window with every call it logged: on the real
    clock, a test running across midnight UTC (or a month's end) would settle part of its
    calls into the next window. This clock starts each test at midday, so no test
    shorter than 12 hours sees a window change, whatever the date and hour. Reservation
    deadlines on Redis follow the store's own clock; on memory and SQLite they follow
    this one, which still moves second for second.
    """

    def __init__(self) -> None:
        start = time.time()
        self._shift = start // 86_400 * 86_400 + 43_200 - start

    def now(self) -> float:
        """The real time, moved to the midday of the day the clock was made."""
        return time.time() + self._shift

    def __repr__(self) -> str:
        return f"MiddayClock(shift={self._shift:+.0f}s)"


def wait_until(
    condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "the condition"
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` s.

    The bound is generous on purpose: it only limits how long a broken run hangs.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def async_wait_until(
    condition: Callable[[], Any], *, timeout: float = 30.0, what: str = "the condition"
) -> Any:
    """:func:`wait_until` for a test on an event loop: it polls without blocking the loop,
    so the loop's own tasks (a settle under way) go on meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


def scripts_run(client: redis.Redis) -> int:
    """How many ledger scripts the server has run so far."""
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0)) + int(
        stats.get("cmdstat_eval", {}).get("calls", 0)
    )


def wait_store_time(client: redis.Redis, target: float, *, timeout: float = 60.0) -> None:
    """Wait until the store's clock reads at least ``target``."""
    wait_until(lambda: store_time(client) >= target, timeout=timeout, what="the store's clock")


class Proxy:
    """A TCP proxy in front of a server, for faults a real network shows.

    :meth:`hold` keeps every request that arrives from then on inside the proxy (a
    request delayed in the network, or a server that is slow to read it) until
    :meth:`open`; requests are forwarded even when their client has given up and
    closed its socket meanwhile, as the kernel would deliver them. ``reply_delay``
    delays each reply by that many seconds (a slow store).
    """

    def __init__(self, upstream_port: int, *, reply_delay: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.reply_delay = reply_delay
        self._gate = threading.Event()
        self._gate.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(1024)
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold(self) -> None:
        """Keep new requests in the proxy until :meth:`open`."""
        self._gate.clear()

    def open(self) -> None:
        """Forward the held requests, and every later one at once."""
        self._gate.set()

    def close(self) -> None:
        """Stop forwarding and close every socket (held requests are dropped)."""
        self._closed.set()
        self._gate.set()
        with self._lock:
            sockets = [self._listener, *self._sockets]
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
            with contextlib.suppress(OSError):
                sock.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._sockets += [client, upstream]
            self._spawn(self._requests, client, upstream)
            self._spawn(self._replies, upstream, client)

    def _requests(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            while True:
                data = client.recv(65536)
                if not data:
                    break
                self._gate.wait()
                if self._closed.is_set():
                    return
                upstream.sendall(data)
            upstream.shutdown(socket.SHUT_WR)  # the server still runs what it got
        except OSError:
            pass

    def _replies(self, upstream: socket.socket, client: socket.socket) -> None:
        try:
            while True:
                data = upstream.recv(65536)
                if not data:
                    break
                if self.reply_delay:
                    time.sleep(self.reply_delay)
                # A client that gave up loses the reply, as on a real network.
                with contextlib.suppress(OSError):
                    client.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
