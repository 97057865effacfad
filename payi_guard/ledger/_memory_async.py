"""The async face of the in-process ledger (:mod:`payi_guard.ledger.memory`)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING

from payi_guard.ledger._checks import check_now, check_scan
from payi_guard.ledger.base import (
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
)

if TYPE_CHECKING:
    from payi_guard.ledger.memory import MemoryLedger

__all__ = ["AsyncMemoryLedger"]


class AsyncMemoryLedger:
    """The async face of a :class:`MemoryLedger`, sharing its counters.

    Operations take microseconds under a lock that is never held across an ``await``,
    so they run inline on the event loop; ``scan`` alone runs in a worker thread.

    Args:
        ledger: the store to share; a new :class:`MemoryLedger` if omitted.
    """

    def __init__(self, ledger: MemoryLedger | None = None) -> None:
        if ledger is None:
            from payi_guard.ledger.memory import MemoryLedger

            ledger = MemoryLedger()
        self._ledger = ledger

    @property
    def ledger(self) -> MemoryLedger:
        """The shared synchronous store."""
        return self._ledger

    def __repr__(self) -> str:
        return f"AsyncMemoryLedger({self._ledger!r})"

    async def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Async :meth:`MemoryLedger.reserve` (same arguments, result and errors)."""
        return self._ledger.reserve(reservation_id, charges, now=now, ttl=ttl, tallies=tallies)

    async def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Async :meth:`MemoryLedger.commit` (same arguments, result and errors)."""
        return self._ledger.commit(reservation_id, charges, now=now, tallies=tallies)

    async def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Async :meth:`MemoryLedger.read_tallies` (same arguments, result and errors)."""
        return self._ledger.read_tallies(keys, now=now)

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`MemoryLedger.release` (same arguments, result and errors)."""
        return self._ledger.release(reservation_id, keys, now=now)

    async def renew(
        self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float
    ) -> bool:
        """Async :meth:`MemoryLedger.renew` (same arguments, result and errors)."""
        return self._ledger.renew(reservation_id, keys, now=now, ttl=ttl)

    async def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """Async :meth:`MemoryLedger.renew_many` (same arguments, result and errors)."""
        return self._ledger.renew_many(reservations, now=now, ttl=ttl)

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`MemoryLedger.read` (same arguments, result and errors)."""
        return self._ledger.read(keys, now=now)

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Async :meth:`MemoryLedger.scan` (same arguments, result and errors).

        Unlike the other operations it runs in a worker thread: matching every key of a
        large store is too long to run on the event loop.
        """
        check_scan(match, limit)
        check_now(now)
        return await asyncio.to_thread(self._ledger.scan, match, now=now, limit=limit)

    async def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`MemoryLedger.adjust` (same arguments, result and errors)."""
        return self._ledger.adjust(
            adjustments, now=now, journal=journal, keep=keep, journal_expires_at=journal_expires_at
        )

    async def read_journal(
        self, journal: str, *, now: float, limit: int
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`MemoryLedger.read_journal` (same arguments, result and errors)."""
        return self._ledger.read_journal(journal, now=now, limit=limit)

    async def aclose(self) -> None:
        """Nothing to release (the shared store stays usable)."""
