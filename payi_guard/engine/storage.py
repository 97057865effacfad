"""The guard's storage: its sync and async ledgers, opened on first use, never before.

Both ledgers are opened with one ``on_event`` callback (:meth:`Storage.store_event`, the
same bound method for both, so a store event is reported once however many ledgers saw
it): a store that lost its data is logged as ``storage_reset`` and makes the guard forget
what it cached about the counters (``on_reset``); a store this process found without its
marker is logged as ``storage_marker_created``. A callback given in the storage options
is called after that.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from payi_guard import log as events
from payi_guard.config import redact_uri
from payi_guard.ledger.base import DEFAULT_CLOSED_TTL, AsyncLedger, Ledger, StorageEvent
from payi_guard.ledger.factory import DEFAULT_TIMEOUT, open_async_ledger, open_ledger

if TYPE_CHECKING:
    from payi_guard.ledger.memory import MemoryLedger

__all__ = ["Storage"]

_TIMEOUT_OPTIONS = ("socket_timeout", "timeout")
"""Where a URI or the options say how long one wait on the store may last (Redis, SQLite)."""


def _seconds(value: object) -> float | None:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


class Storage:
    """The ledgers of one storage URI; nothing is connected until one is used.

    Args:
        uri: the storage URI.
        options: extra keyword arguments for the storage client (an ``on_event``
            callable among them is called with each store event, after the guard's own
            handling).
        on_reset: called when the store turns out to have lost its data.

    Attributes:
        uri: the storage URI.
    """

    def __init__(
        self,
        uri: str,
        options: Mapping[str, Any] | None = None,
        *,
        on_reset: Callable[[], object] | None = None,
    ) -> None:
        self.uri = uri
        self._options = dict(options or {})
        self._app_on_event: Callable[[StorageEvent], object] | None = self._options.pop(
            "on_event", None
        )
        self._on_reset = on_reset
        self._lock = threading.RLock()
        self._ledger: Ledger | None = None
        self._async_ledger: AsyncLedger | None = None
        self._log = events.get_logger()

    @property
    def shown(self) -> str:
        """The URI with its credentials masked, for logs and ``repr``."""
        return redact_uri(self.uri)

    @property
    def timeout(self) -> float:
        """Seconds one wait on the store may last: the socket (or SQLite lock) timeout."""
        for name in _TIMEOUT_OPTIONS:
            seconds = _seconds(self._options.get(name))
            if seconds is not None:
                return seconds
        query = dict(parse_qsl(self.uri.partition("?")[2]))
        for name in _TIMEOUT_OPTIONS:
            seconds = _seconds(query.get(name))
            if seconds is not None:
                return seconds
        return DEFAULT_TIMEOUT

    @property
    def closed_ttl(self) -> float:
        """Seconds the store remembers a committed or released reservation id."""
        seconds = _seconds(self._options.get("closed_ttl"))
        return DEFAULT_CLOSED_TTL if seconds is None else seconds

    @property
    def in_process(self) -> bool:
        """Whether the store lives in this process (``memory://``).

        Its ledgers share one set of counters and do their work inline, never waiting on
        a socket or a thread.
        """
        return self.uri.startswith("memory")

    @functools.cached_property  # kept once opened: a plain attribute read per call
    def ledger(self) -> Ledger:
        """The synchronous ledger (opened on first use)."""
        ledger = self._ledger
        if ledger is None:
            with self._lock:
                if self._ledger is None:
                    self._ledger = open_ledger(self.uri, on_event=self.store_event, **self._options)
                ledger = self._ledger
        return ledger

    @functools.cached_property  # kept once opened: a plain attribute read per call
    def async_ledger(self) -> AsyncLedger:
        """The async ledger (opened on first use; shares counters with :attr:`ledger`)."""
        ledger = self._async_ledger
        if ledger is None:
            with self._lock:
                if self._async_ledger is None:
                    shared: MemoryLedger | None = None
                    if self.in_process:
                        shared = self.ledger  # type: ignore[assignment]
                    self._async_ledger = open_async_ledger(
                        self.uri, shared=shared, on_event=self.store_event, **self._options
                    )
                ledger = self._async_ledger
        return ledger

    def store_event(self, event: StorageEvent) -> None:
        """Log what the ledger noticed about the store; on a reset, forget cached counters.

        Called by the ledgers at the end of the first operation after the event (so at
        the first call after a restart), in whichever thread or task ran it: it never
        blocks.
        """
        if event.kind == "reset":
            self._log.warning(
                events.STORAGE_RESET,
                server=event.server,
                previous=event.previous,
                marker=event.marker,
                storage=self.shown,
                detail="the store lost its data (a restart without persistence, a flush): "
                "every budget counter and open reservation in it is gone",
            )
            if self._on_reset is not None:
                self._on_reset()
        else:
            self._log.info(
                events.STORAGE_MARKER_CREATED,
                server=event.server,
                marker=event.marker,
                storage=self.shown,
            )
        if self._app_on_event is not None:
            self._app_on_event(event)

    def close(self) -> None:
        """Close the sync ledger, if it was opened."""
        if self._ledger is not None:
            self._ledger.close()

    async def aclose(self) -> None:
        """Close the async ledger, if it was opened."""
        if self._async_ledger is not None:
            await self._async_ledger.aclose()
