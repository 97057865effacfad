"""Connections of the Redis ledgers: deadlines, unknown outcomes, the store marker, pools.

redis-py does the protocol work; the connection classes made here add three things to
whichever connection class a pool uses (TCP, TLS, Unix socket, Sentinel-managed, or a
caller's own):

* **a time budget per ledger operation.** :func:`budget` opens one (a context
  variable, so per thread and per asyncio task): opening a connection (the handshake,
  the marker check) may wait one socket timeout for the store's replies in total, and
  the requests another one from the moment the first is sent; so no operation waits on
  the store for much more than twice its socket timeout, and time the process spends on
  itself (a busy event loop, threads waiting for the GIL) never eats a wait's time. On
  asyncio, timeouts are judged by :class:`_Verdict`, which a busy event loop cannot fake.
* **requests whose outcome is unknown.** An error while reading the reply of a
  request sent on a connection that was ready (a read timeout, a connection closed by
  the server) is tagged as *sent* (:func:`was_sent`); an error before that (refused
  connection, connect or handshake timeout, no free connection, a failed write) is
  not, so the ledger can tell "may have been applied" from "was not applied".
* **the store marker.** Each new connection (a restart always drops connections)
  runs one small script that reads the marker key, creating it when missing; the
  :class:`StoreWatch` of the store compares it with what this process saw before and
  records a :class:`~payi_guard.ledger.StorageEvent` when the store is new or lost
  its data. It costs one round trip per new connection, nothing per operation.

Retries stay off, so a factory-made ledger sends its scripts, packed by hiredis, on a
connection of the pool itself (:mod:`~payi_guard.ledger._redis_scripts`:
``execute_command`` with retries off, without its layers); redis-py checks pooled
connections before use
(an asyncio one with something to read before it sent anything, closed by the server
while the loop was not looking, is made again rather than used).

Clients are shared: one per storage URI and options per process (sync), and per event
loop (async), whichever ledger or Guard asks, counted so the last ledger to close
closes it.

This module holds the time budget and the connection classes;
:mod:`~payi_guard.ledger._redis_marker` the store marker and
:mod:`~payi_guard.ledger._redis_clients` the shared clients (both re-exported here).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

from payi_guard.ledger._redis_clients import shared_async_client, shared_sync_client
from payi_guard.ledger._redis_marker import (
    DEFAULT_MARKER_KEY,
    StoreWatch,
    server_label,
    store_watch,
)

__all__ = [
    "DEFAULT_MARKER_KEY",
    "StoreWatch",
    "async_connection_class",
    "budget",
    "shared_async_client",
    "shared_sync_client",
    "store_watch",
    "sync_connection_class",
    "transport_errors",
    "was_sent",
]

_SENT = "payi_guard_sent"

FLOOR = 0.25
"""The least share of its timeout a request gets, however little of its phase is left."""


class _Budget:
    """The two phases of one ledger operation, each allowed one socket timeout.

    Opening a connection (the handshake and the marker check) may spend ``seconds``
    waiting for the store's replies in total; the requests themselves must be answered
    within ``seconds`` of the first one being sent. Time the process spends on itself
    (a busy event loop, threads waiting for the GIL) is counted in neither: only waits
    for the store are. A wait for a free pooled connection has its own bound (the pool's
    ``timeout``, the socket timeout by default) and happens only past 1000 connections.
    """

    __slots__ = ("seconds", "sent_at", "spent")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spent = 0.0
        self.sent_at: float | None = None

    def left(self, sending: bool) -> float:
        """What is left of the phase a wait belongs to."""
        if sending:
            if self.sent_at is None:
                self.sent_at = time.monotonic()
            return self.sent_at + self.seconds - time.monotonic()
        return self.seconds - self.spent


_BUDGET: ContextVar[_Budget | None] = ContextVar("payi_guard_ledger_budget", default=None)


class budget:  # lower case: it reads as a function, ``with budget(seconds):``
    """Bound the waits on the store inside the block (see :class:`_Budget`).

    Opening a connection and the requests each get ``seconds`` of waiting for the
    store: an operation waits on it about twice its socket timeout at most. A class
    rather than a generator-based context manager: it is entered twice per guarded call.
    """

    __slots__ = ("_seconds", "_token")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._token: Token[_Budget | None] | None = None

    def __enter__(self) -> None:
        if self._seconds is not None:
            self._token = _BUDGET.set(_Budget(self._seconds))

    def __exit__(self, *exc_info: object) -> None:
        token = self._token
        if token is not None:
            self._token = None
            _BUDGET.reset(token)


def _in_budget() -> bool:
    return _BUDGET.get() is not None


def _limit(configured: float | None, *, sending: bool) -> float | None:
    """How long one wait may last: its own timeout, cut to what is left of its phase.

    Never below :data:`FLOOR` of its timeout, so a phase spent by this process itself
    leaves a request some time: past its phase, each further round trip (reconnecting,
    reloading a script after a restart) may take up to a quarter of its timeout.
    """
    state = _BUDGET.get()
    if state is None or configured is None:
        return configured
    left = max(state.left(sending), 0.0)
    return max(min(configured, left), configured * FLOOR)


def _spent_connecting(started: float) -> None:
    """Count a wait of the connection phase (one reply of the handshake) against it."""
    state = _BUDGET.get()
    if state is not None:
        state.spent += time.monotonic() - started


def was_sent(exc: BaseException) -> bool:
    """True when ``exc`` was raised after its request reached the wire."""
    return bool(getattr(exc, _SENT, False))


def _mark_sent(exc: BaseException) -> None:
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _SENT, True)


# -- connection classes ---------------------------------------------------------------------


def transport_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.ConnectionError, redis.TimeoutError, OSError)


class _SyncMixin:
    """Deadlines, sent-tagging and the marker check for a sync redis-py connection."""

    _pg_watch: StoreWatch | None = None
    _pg_ready = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pg_ready = False
        self._pg_errors = transport_errors()
        parent: Any = self
        parent.register_connect_callback(self._pg_connected)

    def connect(self, *args: Any, **kwargs: Any) -> Any:
        parent: Any = super()
        this: Any = self
        if not _in_budget() or getattr(self, "_sock", None) is not None:
            return parent.connect(*args, **kwargs)
        saved = this.socket_connect_timeout
        this.socket_connect_timeout = _limit(saved, sending=False)
        try:
            return parent.connect(*args, **kwargs)
        finally:
            this.socket_connect_timeout = saved

    def _pg_connected(self, connection: Any) -> None:
        try:
            if self._pg_watch is not None:
                self._pg_watch.check(self)
        except BaseException:
            # A half-read reply must never be taken for the next command's.
            this: Any = self
            this.disconnect()
            raise
        self._pg_ready = True

    def disconnect(self, *args: Any, **kwargs: Any) -> Any:
        self._pg_ready = False
        parent: Any = super()
        return parent.disconnect(*args, **kwargs)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        parent: Any = super()
        ready = self._pg_ready
        sock: Any = getattr(self, "_sock", None)
        saved: Any = None
        capped = False
        if _in_budget() and sock is not None:
            saved = sock.gettimeout()
            limit = _limit(saved, sending=ready)
            if limit is not None and limit != saved:
                sock.settimeout(limit)
                capped = True
        started = time.monotonic()
        try:
            return parent.read_response(*args, **kwargs)
        except self._pg_errors as exc:
            if ready:
                _mark_sent(exc)
            raise
        finally:
            if not ready:
                _spent_connecting(started)
            # Restore the socket's own timeout unless the connection was dropped.
            current: Any = getattr(self, "_sock", None)
            if capped and current is not None and current is sock:
                with contextlib.suppress(OSError):
                    current.settimeout(saved)


class _Verdict:
    """A timeout that a busy event loop cannot fake.

    When the time is up, the verdict first lets the event loop run ``hops`` more
    passes, so that what had already arrived (a reply, a connected socket) is processed;
    then, while the awaited socket has unread bytes (``readable``), it waits further
    passes, since the store did answer. Only a step still not done after that is
    cancelled. A store that answered in time is never taken for a slow one because the
    loop itself was busy (hundreds of tasks, the CPU shared with other processes).
    """

    def __init__(self, limit: float, hops: int, readable: Callable[[], bool] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.hops = hops
        self.readable = readable
        self.extra = 64
        self.done = False
        self.expired = False
        self.handle = self.loop.call_later(limit, self._hop, hops)

    def _hop(self, left: int) -> None:
        if self.done or self.task is None:
            return
        if left > 0:
            self.loop.call_soon(self._hop, left - 1)
            return
        # Bytes waiting in the socket: the store answered, the loop has yet to read them.
        # Bounded, should the loop have stopped reading that socket for good.
        if self.readable is not None and self.extra > 0 and self.readable():
            self.extra -= 1
            self.loop.call_soon(self._hop, 0)
            return
        self.expired = True
        self.task.cancel()

    def close(self) -> None:
        self.done = True
        self.handle.cancel()

    def timed_out(self) -> bool:
        """After a ``CancelledError``: True when this verdict caused it (and only it)."""
        if not self.expired or self.task is None:
            return False
        uncancel = getattr(self.task, "uncancel", None)
        return uncancel is None or uncancel() == 0


class _AsyncMixin:
    """The asyncio twin of :class:`_SyncMixin`, whose timeouts are verdicts (:class:`_Verdict`)."""

    _pg_watch: StoreWatch | None = None
    _pg_ready = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pg_ready = False
        self._pg_errors = transport_errors()
        parent: Any = self
        parent.register_connect_callback(self._pg_connected)

    async def _connect(self) -> Any:
        # The socket connect only (the handshake's replies go through read_response).
        parent: Any = super()
        this: Any = self
        saved = this.socket_connect_timeout
        limit = _limit(saved, sending=False)
        if limit is None:
            return await parent._connect()
        this.socket_connect_timeout = None
        verdict = _Verdict(limit, hops=5)
        try:
            return await parent._connect()
        except asyncio.CancelledError:
            if verdict.timed_out():
                raise asyncio.TimeoutError from None
            raise
        finally:
            verdict.close()
            this.socket_connect_timeout = saved

    def _pg_readable(self) -> bool:
        """True when the socket holds bytes the event loop has not read yet."""
        writer = getattr(self, "_writer", None)
        sock = None if writer is None else writer.transport.get_extra_info("socket")
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock.fileno()], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)

    async def _pg_connected(self, connection: Any) -> None:
        try:
            if self._pg_watch is not None:
                await self._pg_watch.acheck(self)
        except BaseException:
            this: Any = self
            await this.disconnect()
            raise
        self._pg_ready = True

    async def disconnect(self, *args: Any, **kwargs: Any) -> Any:
        self._pg_ready = False
        parent: Any = super()
        return await parent.disconnect(*args, **kwargs)

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> Any:
        import redis

        parent: Any = super()
        this: Any = self
        if self._pg_ready and self._pg_readable():
            # A pooled connection with something to read before it sent anything: the
            # server closed it (a restart) while the event loop was not looking. Never
            # send on it: a request would be lost with an unknown outcome.
            await this.disconnect()
            await this.connect()
        ready = self._pg_ready
        saved = this.socket_timeout
        limit = _limit(saved, sending=ready)
        verdict = None
        if (
            limit is not None
            and limit != math.inf
            and getattr(this, "is_connected", False)
            and not getattr(this, "health_check_interval", 0)
        ):
            # Not asyncio.wait_for (redis-py's: a task, a timer and a loop pass per
            # command): on an open connection with no health check to read first, the
            # write waits only on a full buffer, bounded as the reply is, by a verdict.
            verdict = _Verdict(limit, hops=1)
            this.socket_timeout = None
        try:
            return await parent.send_packed_command(*args, **kwargs)
        except asyncio.CancelledError:
            if verdict is None or not verdict.timed_out():
                raise
            # redis-py dropped the connection on its way out.
            error = redis.TimeoutError(f"Timeout writing to {server_label(self)}")
            if ready:
                _mark_sent(error)  # the bytes may have gone out before the drop
            raise error from None
        except redis.TimeoutError as exc:
            # The bytes sit in the transport's buffer and may still go out.
            if ready:
                _mark_sent(exc)
            raise
        finally:
            if verdict is not None:
                verdict.close()
                this.socket_timeout = saved

    async def read_response(
        self, disable_decoding: bool = False, timeout: float | None = None, **kwargs: Any
    ) -> Any:
        import redis

        parent: Any = super()
        this: Any = self
        ready = self._pg_ready
        limit = _limit(timeout if timeout is not None else this.socket_timeout, sending=ready)
        verdict = None
        saved = this.socket_timeout
        if limit is not None and limit != math.inf:
            # redis-py must not time out on its own: the verdict does.
            verdict = _Verdict(limit, hops=1, readable=self._pg_readable)
            this.socket_timeout = None
            timeout = None
        started = time.monotonic()
        try:
            return await parent.read_response(disable_decoding, timeout, **kwargs)
        except asyncio.CancelledError:
            if verdict is None or not verdict.timed_out():
                raise
            error = redis.TimeoutError(f"Timeout reading from {server_label(self)}")
            if ready:
                _mark_sent(error)
            raise error from None
        except self._pg_errors as exc:
            if ready:
                _mark_sent(exc)
            raise
        finally:
            if not ready:
                _spent_connecting(started)
            if verdict is not None:
                verdict.close()
                this.socket_timeout = saved


def sync_connection_class(base: type[Any], watch: StoreWatch | None) -> type[Any]:
    """``base`` (a redis-py connection class) with deadlines, tagging and the marker check."""
    if issubclass(base, _SyncMixin) and base._pg_watch is watch:
        return base
    return type(f"Ledger{base.__name__}", (_SyncMixin, base), {"_pg_watch": watch})


def async_connection_class(base: type[Any], watch: StoreWatch | None) -> type[Any]:
    """The asyncio twin of :func:`sync_connection_class`."""
    if issubclass(base, _AsyncMixin) and base._pg_watch is watch:
        return base
    return type(f"Ledger{base.__name__}", (_AsyncMixin, base), {"_pg_watch": watch})
