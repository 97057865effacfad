"""The Redis ledgers' connection pools: redis-py's blocking pools, with a short way in.

redis-py's asyncio ``BlockingConnectionPool`` takes every connection under its
condition and inside a timeout scope, gives it back under its condition and a lock,
records metrics both ways and announces every release to its event listeners: about a
sixth of the client's work for a guarded call on a factory-made client. The sync one
goes through a deprecation wrapper, a blocking queue wait, four metric records and a
wait-time record per connection. Most of that is for the cases that need it: no
connection free, connections being re-authenticated or moved by the server, metrics
being collected.

:func:`lean_pool_class` (asyncio) and :func:`lean_sync_pool_class` keep that path for
those cases and add a short one for the usual case, where it changes nothing: a free
connection, nobody waiting for one (asyncio), no maintenance under way, no streaming
credential provider (whose re-authentication is what a release announces) and
redis-py's metrics off. Then a connection is taken from the free ones and checked as
redis-py checks it, and given back to them; nothing else.

* asyncio: under the event loop's single thread these steps cannot interleave, so the
  pool's lists stay as its own code keeps them. A connection taken the short way is
  given back the short way: under the condition, to wake a caller that started waiting
  meanwhile; under the pool's lock, if maintenance began meanwhile.
* sync: the free connections are a thread-safe queue, taken from without waiting (a
  caller that finds none, or a slot with no connection made yet, takes redis-py's path,
  which waits and makes connections). The process id is checked first, as redis-py
  does, so a forked child never uses its parent's sockets.

Either way a connection taken the short way is given back the short way, so redis-py's
counts of used and idle connections stay balanced.
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import weakref
from collections.abc import Callable
from typing import Any

from redis import exceptions as redis_errors


def _observability() -> Callable[[], Any] | None:
    """redis-py's ``get_observability_instance`` (redis-py 8 and later), else ``None``."""
    try:
        module = importlib.import_module("redis.observability.providers")
    except ImportError:
        return None
    getter: Callable[[], Any] | None = getattr(module, "get_observability_instance", None)
    return getter


_OBSERVABILITY = _observability()


def _metrics_on() -> bool:
    """Whether redis-py's own OpenTelemetry metrics may be on (never without them)."""
    if _OBSERVABILITY is None:
        return False
    try:
        return _OBSERVABILITY().get_provider_manager() is not None
    except Exception:  # an observability module that changed: take redis-py's path
        return True


class _ShortWayMixin:
    """What :func:`lean_pool_class` adds to redis-py's asyncio blocking pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        this: Any = self
        self._pg_short: set[Any] = set()
        self._pg_able = (
            isinstance(getattr(this, "_available_connections", None), list)
            and isinstance(getattr(this, "_in_use_connections", None), (set, weakref.WeakSet))
            and hasattr(getattr(this, "_condition", None), "_waiters")
            and this.connection_kwargs.get("credential_provider") is None
        )

    def _pg_may_skip(self) -> bool:
        """Whether the short way may be taken: a free connection, nobody waiting for one."""
        this: Any = self
        return (
            self._pg_able
            and bool(this._available_connections)
            and not this._condition._waiters
            and not getattr(this, "_in_maintenance", False)
            and not _metrics_on()
        )

    async def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """A connection, taken the short way when one is free and nobody waits."""
        this: Any = self
        parent: Any = super()
        if command_name is not None or keys or options:  # redis-py's deprecated form
            return await parent.get_connection(command_name, *keys, **options)
        if not self._pg_may_skip():
            return await parent.get_connection()
        connection = this._available_connections.pop()
        this._in_use_connections.add(connection)
        self._pg_short.add(connection)
        try:
            await this.ensure_connection(connection)
        except BaseException:
            await self.release(connection)
            raise
        return connection

    async def release(self, connection: Any) -> None:
        """Give ``connection`` back the way it was taken."""
        if connection not in self._pg_short:
            parent: Any = super()
            await parent.release(connection)
            return
        self._pg_short.discard(connection)
        condition = getattr(self, "_condition")  # noqa: B009 (typed Any)
        if condition._waiters:
            async with condition:
                await self._pg_put_back(connection)
                condition.notify()
            return
        await self._pg_put_back(connection)

    async def _pg_put_back(self, connection: Any) -> None:
        # Under the pool's lock while the server moves connections (as redis-py's own
        # release is), so its maintenance never sees the lists change under it.
        this: Any = self
        if connection.should_reconnect():
            await connection.disconnect()
        if getattr(this, "_in_maintenance", False):
            async with this._lock:
                this._in_use_connections.remove(connection)
                this._available_connections.append(connection)
            return
        this._in_use_connections.remove(connection)
        this._available_connections.append(connection)


def _with_short_way(mixin: type[Any], base: type[Any]) -> type[Any]:
    """``base`` with ``mixin`` before it (``base`` itself if it has it already).

    Its instances take ``base``'s own path for every connection when they lack what the
    short way reads (another redis-py version).
    """
    if issubclass(base, mixin):
        return base
    made = _MADE.get((mixin, base))
    if made is None:
        made = type(f"Ledger{base.__name__}", (mixin, base), {"__module__": __name__})
        _MADE[(mixin, base)] = made
    return made


_MADE: dict[tuple[type[Any], type[Any]], type[Any]] = {}
"""The classes :func:`_with_short_way` made, one per mixin and redis-py pool class."""


def lean_pool_class(base: type[Any]) -> type[Any]:
    """``base`` (``redis.asyncio.BlockingConnectionPool``) with the short way in."""
    return _with_short_way(_ShortWayMixin, base)


class _SyncShortWayMixin:
    """What :func:`lean_sync_pool_class` adds to redis-py's sync blocking pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        this: Any = self
        self._pg_short: set[Any] = set()
        self._pg_able = (
            isinstance(getattr(this, "pool", None), queue.Queue)
            and callable(getattr(this, "_checkpid", None))
            and callable(getattr(this, "owns_connection", None))
            and callable(getattr(this, "maint_notifications_enabled", None))
            and getattr(this, "cache", None) is None
            and this.connection_kwargs.get("credential_provider") is None
        )

    def get_connection(self, command_name: Any = None, *keys: Any, **options: Any) -> Any:
        """A connection, taken the short way when one is free."""
        this: Any = self
        parent: Any = super()
        if command_name is not None or keys or options:  # redis-py's deprecated form
            return parent.get_connection(command_name, *keys, **options)
        if not self._pg_able or getattr(this, "_in_maintenance", False) or _metrics_on():
            return parent.get_connection()
        this._checkpid()
        free = this.pool
        try:
            connection = free.get_nowait()
        except queue.Empty:
            return parent.get_connection()
        if connection is None:  # a slot whose connection is not made yet
            free.put_nowait(None)
            return parent.get_connection()
        self._pg_short.add(connection)
        try:
            self._pg_check(connection)
        except BaseException:
            self.release(connection)
            raise
        return connection

    def _pg_check(self, connection: Any) -> None:
        # redis-py's check of a pooled connection: one with something to read before it
        # sent anything was given back unread or closed by the server; make it again.
        connection.connect()
        try:
            if self._pg_unready(connection):
                raise redis_errors.ConnectionError("Connection has data")
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            connection.disconnect()
            connection.connect()
            if self._pg_unready(connection):
                raise redis_errors.ConnectionError("Connection not ready") from None

    def _pg_unready(self, connection: Any) -> bool:
        # Something to read (server push notifications aside) before anything was sent.
        this: Any = self
        return bool(connection.can_read()) and not this.maint_notifications_enabled()

    def release(self, connection: Any) -> None:
        """Give ``connection`` back the way it was taken."""
        if connection not in self._pg_short:
            parent: Any = super()
            parent.release(connection)
            return
        self._pg_short.discard(connection)
        this: Any = self
        this._checkpid()
        if not this.owns_connection(connection):  # made before a fork: not this pool's
            connection.disconnect()
            with contextlib.suppress(queue.Full):
                this.pool.put_nowait(None)
            return
        if connection.should_reconnect():
            connection.disconnect()
        # Under the pool's lock while the server moves connections, as redis-py does.
        held = this._lock if getattr(this, "_in_maintenance", False) else contextlib.nullcontext()
        with held, contextlib.suppress(queue.Full):
            this.pool.put_nowait(connection)


def lean_sync_pool_class(base: type[Any]) -> type[Any]:
    """``base`` (``redis.BlockingConnectionPool``) with the short way in."""
    return _with_short_way(_SyncShortWayMixin, base)
