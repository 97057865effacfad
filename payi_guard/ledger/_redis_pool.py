"""The asyncio ledger's connection pool: redis-py's blocking pool, with a short way in.

redis-py's asyncio ``BlockingConnectionPool`` takes every connection under its
condition and inside a timeout scope, gives it back under its condition and a lock,
records metrics both ways and announces every release to its event listeners: about a
sixth of the client's work for a guarded call on a factory-made client. Most of it is for the cases
that need it: no connection free, connections being re-authenticated or moved by the
server, metrics being collected.

:func:`lean_pool_class` keeps that path for those cases and adds a short one for the
usual case, where it changes nothing: a free connection, nobody waiting for one, no
maintenance under way, no streaming credential provider (whose re-authentication is
what a release announces) and redis-py's metrics off. Then a connection is taken from
the free ones and checked as redis-py checks it (``ensure_connection``), and given back
to them; nothing else. Under asyncio's single thread these steps cannot interleave, so
the pool's lists stay as its own code keeps them. A connection taken the short way is
given back the short way (under the condition, to wake a caller that started waiting
meanwhile; under the pool's lock, if maintenance began meanwhile), so redis-py's counts
of used and idle connections stay balanced.
"""

from __future__ import annotations

import importlib
import weakref
from collections.abc import Callable
from typing import Any


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
        this: Any = self
        return (
            self._pg_able
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
        if not self._pg_able or not this._available_connections:
            return await parent.get_connection()
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


def lean_pool_class(base: type[Any]) -> type[Any]:
    """``base`` (``redis.asyncio.BlockingConnectionPool``) with the short way for a free connection.

    Its instances take ``base``'s own path for every connection when they lack what the
    short way reads (another redis-py version).
    """
    if issubclass(base, _ShortWayMixin):
        return base
    return type(f"Ledger{base.__name__}", (_ShortWayMixin, base), {"__module__": __name__})
