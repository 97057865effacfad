"""One counter of the in-process ledger: totals, expiry and its open reservations."""

from __future__ import annotations

import heapq

from payi_guard.ledger.base import CounterState

__all__ = ["_Counter"]


class _Counter:
    """One counter: totals, expiry, and the reservations open on it."""

    __slots__ = ("deadlines", "expires_at", "open", "pending", "refused", "settled")

    def __init__(self, expires_at: float) -> None:
        self.settled = 0
        self.pending = 0
        self.refused = 0
        self.expires_at = expires_at
        self.open: dict[str, tuple[int, float]] | None = None
        self.deadlines: list[tuple[float, str]] | None = None

    def state(self) -> CounterState:
        return CounterState(self.settled, self.pending, self.refused)

    def purge(self, now: float) -> None:
        """Drop the reservations whose deadline is ``<= now``."""
        deadlines = self.deadlines
        if not deadlines or deadlines[0][0] > now:
            return
        open_ = self.open
        if open_ is None:  # unreachable: both are set and cleared together
            self.deadlines = None
            return
        while deadlines and deadlines[0][0] <= now:
            deadline, rid = heapq.heappop(deadlines)
            entry = open_.get(rid)
            # A stale heap entry (closed, or replaced by a later reserve) is skipped.
            if entry is not None and entry[1] == deadline:
                del open_[rid]
                self.pending -= entry[0]
        if not open_:
            self.open = self.deadlines = None

    def held(self, rid: str) -> int:
        """The amount reservation ``rid`` holds on this counter (0 if not open)."""
        if self.open is None:
            return 0
        entry = self.open.get(rid)
        return 0 if entry is None else entry[0]

    def hold(self, rid: str, amount: int, deadline: float) -> None:
        """Open (or replace) reservation ``rid``."""
        if self.open is None or self.deadlines is None:
            self.open = {}
            self.deadlines = []
        previous = self.open.get(rid)
        if previous is not None:
            self.pending -= previous[0]
        self.open[rid] = (amount, deadline)
        self.pending += amount
        heapq.heappush(self.deadlines, (deadline, rid))

    def renew(self, rid: str, deadline: float) -> bool:
        """Push ``rid``'s deadline to ``deadline`` (never earlier); False if it is not open."""
        open_ = self.open
        entry = None if open_ is None else open_.get(rid)
        if open_ is None or entry is None or self.deadlines is None:
            return False
        amount, current = entry
        if deadline > current:
            open_[rid] = (amount, deadline)
            heapq.heappush(self.deadlines, (deadline, rid))
        return True

    def close(self, rid: str) -> None:
        """Close reservation ``rid`` if it is open."""
        open_ = self.open
        if open_ is None:
            return
        entry = open_.pop(rid, None)
        if entry is None:
            return
        self.pending -= entry[0]
        if not open_:
            self.open = self.deadlines = None
        elif self.deadlines is not None and len(self.deadlines) > 2 * len(open_) + 16:
            self.deadlines = [(deadline, key) for key, (_, deadline) in open_.items()]
            heapq.heapify(self.deadlines)
