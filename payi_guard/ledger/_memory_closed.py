"""The memory ledger's closed reservation ids: what each was committed or released on."""

from __future__ import annotations

import collections
from collections.abc import Sequence

__all__ = ["ClosedIds"]


class ClosedIds:
    """Reservation ids closed (committed or released), with their keys, for ``ttl`` seconds.

    A retried commit or release of an id finds it closed on those keys and changes
    nothing there. Ids are forgotten oldest first, a few at a time (:meth:`sweep`), as
    the ledger's counters are; an entry superseded by a later close of the same id is
    skipped. About 300 bytes per call.

    Not thread-safe: the memory ledger calls it under its own lock.

    Args:
        ttl: seconds an id is remembered after it was (last) closed.
    """

    __slots__ = ("_closed", "_times", "ttl")

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._closed: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._times: collections.deque[tuple[float, str]] = collections.deque()

    def __len__(self) -> int:
        """The ids remembered (forgotten ones count until they are swept)."""
        return len(self._closed)

    def remembered(self) -> tuple[list[str], int]:
        """The ids remembered, and the entries waiting to be swept (for tests)."""
        return list(self._closed), len(self._times)

    def keys(self, reservation_id: str, now: float) -> tuple[str, ...]:
        """The keys ``reservation_id`` is closed on (none once it is forgotten)."""
        entry = self._closed.get(reservation_id)
        return () if entry is None or entry[0] <= now else entry[1]

    def close(
        self, reservation_id: str, already: tuple[str, ...], keys: Sequence[str], now: float
    ) -> None:
        """Remember ``reservation_id`` as closed on ``keys`` (besides ``already``) from now."""
        until = now + self.ttl
        self._closed[reservation_id] = (until, already + tuple(keys))
        self._times.append((until, reservation_id))

    def due(self, now: float) -> bool:
        """Whether some id may be forgotten."""
        return bool(self._times) and self._times[0][0] <= now

    def sweep(self, now: float, budget: int) -> None:
        """Forget up to ``budget`` ids whose time has passed, oldest first."""
        times, closed = self._times, self._closed
        while times and times[0][0] <= now and budget > 0:
            until, rid = times.popleft()
            entry = closed.get(rid)
            if entry is not None and entry[0] == until:
                del closed[rid]
            budget -= 1
