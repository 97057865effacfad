"""The journals of the in-process ledger: bounded lists of adjustments, dropped once expired."""

from __future__ import annotations

import heapq

from payi_guard.ledger.base import JournalEntry

__all__ = ["JournalStore"]


class JournalStore:
    """Journals in a dict, each with its expiry; expired ones are dropped as others are written.

    Not thread-safe: the memory ledger calls it under its own lock.
    """

    def __init__(self) -> None:
        # journal -> (entries, oldest first; expires_at), and a heap to drop expired ones.
        self._journals: dict[str, tuple[list[JournalEntry], float]] = {}
        self._times: list[tuple[float, str]] = []

    def append(
        self, journal: str, entries: list[JournalEntry], keep: int, until: float, now: float
    ) -> None:
        """Append ``entries``, keep the ``keep`` newest; the journal lives at least ``until``."""
        times = self._times
        while times and times[0][0] <= now:
            _, name = heapq.heappop(times)
            held = self._journals.get(name)
            if held is not None and held[1] <= now:
                del self._journals[name]
        held = self._journals.get(journal)
        kept = [] if held is None else held[0]
        kept.extend(entries)
        del kept[:-keep]
        expires_at = until if held is None else max(held[1], until)
        self._journals[journal] = (kept, expires_at)
        heapq.heappush(times, (expires_at, journal))

    def newest(self, journal: str, now: float, limit: int) -> tuple[JournalEntry, ...]:
        """The ``limit`` newest entries of ``journal``, newest first (none once expired)."""
        held = self._journals.get(journal)
        if held is None or held[1] <= now:
            return ()
        return tuple(reversed(held[0][-limit:]))
