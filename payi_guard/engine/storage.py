"""The guard's storage: its sync and async ledgers, opened on first use, never before."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from payi_guard.config import redact_uri
from payi_guard.ledger.base import AsyncLedger, Ledger
from payi_guard.ledger.factory import open_async_ledger, open_ledger

if TYPE_CHECKING:
    from payi_guard.ledger.memory import MemoryLedger

__all__ = ["Storage"]


class Storage:
    """The ledgers of one storage URI; nothing is connected until one is used.

    Args:
        uri: the storage URI.
        options: extra keyword arguments for the storage client.

    Attributes:
        uri: the storage URI.
    """

    def __init__(self, uri: str, options: Mapping[str, Any] | None = None) -> None:
        self.uri = uri
        self._options = dict(options or {})
        self._lock = threading.RLock()
        self._ledger: Ledger | None = None
        self._async_ledger: AsyncLedger | None = None

    @property
    def shown(self) -> str:
        """The URI with its credentials masked, for logs and ``repr``."""
        return redact_uri(self.uri)

    @property
    def ledger(self) -> Ledger:
        """The synchronous ledger (opened on first use)."""
        ledger = self._ledger
        if ledger is None:
            with self._lock:
                if self._ledger is None:
                    self._ledger = open_ledger(self.uri, **self._options)
                ledger = self._ledger
        return ledger

    @property
    def async_ledger(self) -> AsyncLedger:
        """The async ledger (opened on first use; shares counters with :attr:`ledger`)."""
        ledger = self._async_ledger
        if ledger is None:
            with self._lock:
                if self._async_ledger is None:
                    shared: MemoryLedger | None = None
                    if self.uri.startswith("memory"):
                        shared = self.ledger  # type: ignore[assignment]
                    self._async_ledger = open_async_ledger(self.uri, shared=shared, **self._options)
                ledger = self._async_ledger
        return ledger

    def close(self) -> None:
        """Close the sync ledger, if it was opened."""
        if self._ledger is not None:
            self._ledger.close()

    async def aclose(self) -> None:
        """Close the async ledger, if it was opened."""
        if self._async_ledger is not None:
            await self._async_ledger.aclose()
