"""The store marker: how a process sees that the Redis store it uses is new or lost its data.

Each new connection (a restart always drops connections) runs one small script that
reads the marker key, creating it when missing; the :class:`StoreWatch` of the store
compares it with what this process saw before and records a
:class:`~payi_guard.ledger.StorageEvent` when the store is new or lost its data. It costs
one round trip per new connection, nothing per operation.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Hashable
from typing import Any

from payi_guard.ledger.base import StorageEvent

__all__ = ["DEFAULT_MARKER_KEY", "StoreWatch", "server_label", "store_watch"]

DEFAULT_MARKER_KEY = "payi_guard:store-marker"
"""The key whose value identifies one life of the store's data."""

_MARKER_SCRIPT = (
    "local v = redis.call('GET', KEYS[1]) "
    "if v then return {0, v} end "
    "redis.call('SET', KEYS[1], ARGV[1]) "
    "return {1, ARGV[1]}"
)


def server_label(connection: Any) -> str:
    """How errors and storage events name the server of ``connection``."""
    path = getattr(connection, "path", None)
    if path:
        return str(path)
    return f"{getattr(connection, 'host', '?')}:{getattr(connection, 'port', '?')}"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class StoreWatch:
    """What one process knows about one store's marker, and the events it saw.

    Every ledger on the store subscribes its ``on_event`` callback; each callback gets
    each event once, at the end of the first operation (of any ledger using it) after
    the event was seen. The sync and async ledgers of one Guard, given the same
    callback, therefore report a reset once.

    Args:
        key: the marker key.
    """

    def __init__(self, key: str) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._known: str | None = None
        self._events: list[StorageEvent] = []
        self._subscribers: dict[Callable[[StorageEvent], object], list[int]] = {}

    @property
    def seq(self) -> int:
        """How many events were recorded (changes whenever one is)."""
        return len(self._events)

    def request(self) -> tuple[Any, ...]:
        """The command a new connection runs: read the marker, creating it when missing."""
        return ("EVAL", _MARKER_SCRIPT, 1, self.key, f"{uuid.uuid4().hex}")

    def observe(self, server: str, reply: Any) -> None:
        """Record what a new connection found (the reply of :meth:`request`)."""
        if not isinstance(reply, (list, tuple)) or len(reply) != 2:
            return
        created, marker = int(reply[0]) == 1, _text(reply[1])
        with self._lock:
            previous = self._known
            if previous == marker:
                # Connections opened together: one that only read the marker may be
                # observed before the one that created it, which still reports the store new.
                if created and not any(event.marker == marker for event in self._events):
                    self._events.append(StorageEvent("new", server, marker))
                return
            self._known = marker
            if previous is not None:
                self._events.append(StorageEvent("reset", server, marker, previous))
            elif created:
                self._events.append(StorageEvent("new", server, marker))

    def check(self, connection: Any) -> None:
        """Run the marker check on a freshly connected sync connection."""
        connection.send_command(*self.request())
        self.observe(server_label(connection), connection.read_response())

    async def acheck(self, connection: Any) -> None:
        """Async :meth:`check`."""
        await connection.send_command(*self.request())
        self.observe(server_label(connection), await connection.read_response())

    def subscribe(self, callback: Callable[[StorageEvent], object]) -> None:
        """Deliver the events recorded from now on to ``callback`` (counted per caller)."""
        with self._lock:
            entry = self._subscribers.setdefault(callback, [len(self._events), 0])
            entry[1] += 1

    def unsubscribe(self, callback: Callable[[StorageEvent], object]) -> None:
        """Undo one :meth:`subscribe`."""
        with self._lock:
            entry = self._subscribers.get(callback)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._subscribers[callback]

    def deliver(self, callback: Callable[[StorageEvent], object]) -> None:
        """Call ``callback`` with the events it has not had yet (outside any lock)."""
        with self._lock:
            entry = self._subscribers.get(callback)
            if entry is None or entry[0] >= len(self._events):
                return
            fresh = self._events[entry[0] :]
            entry[0] = len(self._events)
        for event in fresh:
            try:
                callback(event)
            except Exception as exc:  # the operation itself succeeded: never undo it
                from payi_guard.log import get_logger

                get_logger().error(
                    "storage_event_callback_failed",
                    kind=event.kind,
                    error=str(exc),
                    error_type=type(exc).__name__,
                )


_WATCHES: dict[Hashable, StoreWatch] = {}
_WATCHES_LOCK = threading.Lock()


def store_watch(store: Hashable, key: str) -> StoreWatch:
    """The process-wide :class:`StoreWatch` of one store (``store`` names it)."""
    with _WATCHES_LOCK:
        watch = _WATCHES.get((store, key))
        if watch is None:
            watch = _WATCHES[(store, key)] = StoreWatch(key)
        return watch
