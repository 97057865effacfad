"""The ledger contract: atomic reserve, settle and release over integer counters.

A ledger knows nothing about users, limits or money: it holds integer counters under
opaque keys (each key already names its owner, unit and calendar window) and applies
all-or-nothing reservations to several counters at once.

Every counter has two parts:

* ``settled``: the sum of settled amounts (never decreases);
* ``pending``: the sum of open reservations, each of which expires at its own deadline
  (a reservation whose process died gives its budget back after the ttl).

``reserve`` checks, for every charge with a ``max``, that
``settled + pending + amount <= max``; if any fails nothing at all is changed (expired
reservations may be purged, which changes no visible total). ``commit`` removes the
reservation (if it is still open) and adds the actual amount to ``settled`` of the very
keys that were reserved, so a settle after the window rolled over lands in the old
window and never makes a counter of the new window negative. ``release`` is a commit of
zero. A commit of an id that is not open (expired, or never reserved: a manual
``record``) just adds the amounts.

``scan`` lists the keys of the live counters that match a Redis glob pattern, so that
callers can discover whose counters exist (the users page does). It is weakly
consistent, like Redis ``SCAN``: a counter that exists for the whole scan is listed
exactly once, one created or dropped meanwhile may or may not be; the order is
unspecified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = [
    "AsyncLedger",
    "Charge",
    "CounterState",
    "Ledger",
    "ReserveResult",
]


@dataclass(frozen=True, slots=True)
class Charge:
    """An amount against one counter.

    Attributes:
        key: the full storage key (owner, unit, window; carries a ``{...}`` hash tag).
        amount: units to reserve or commit (>= 0).
        max: the enforced maximum for ``reserve``, or ``None`` for a counter that is
            tracked but never refuses. Ignored by ``commit``.
        expires_at: epoch seconds after which the counter may be deleted (its window's
            end plus a grace period).
    """

    key: str
    amount: int
    max: int | None
    expires_at: float


@dataclass(frozen=True, slots=True)
class CounterState:
    """The totals of one counter at the moment an operation ran."""

    settled: int
    pending: int

    @property
    def used(self) -> int:
        """``settled + pending``: what a new reservation is checked against."""
        return self.settled + self.pending


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of :meth:`Ledger.reserve`.

    Attributes:
        ok: True if every charge was reserved; False if none was.
        refused: the index (into the charges) of the first charge that did not fit,
            or ``None`` when ``ok``.
        states: the state of every counter after the operation (after the reservation
            when ``ok``; unchanged totals when refused).
    """

    ok: bool
    refused: int | None
    states: tuple[CounterState, ...]


@runtime_checkable
class Ledger(Protocol):
    """Synchronous ledger. Implementations are safe to share between threads."""

    def reserve(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float, ttl: float
    ) -> ReserveResult:
        """Reserve every charge or none (one atomic step; one round trip for Redis)."""
        ...

    def commit(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float
    ) -> tuple[CounterState, ...]:
        """Close the reservation (if open) and add the actual amounts (one atomic step)."""
        ...

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything."""
        ...

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing counters are zero)."""
        ...

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Return the keys of the live counters matching the glob ``match`` (at most ``limit``)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class AsyncLedger(Protocol):
    """The async twin of :class:`Ledger`; never blocks the event loop."""

    async def reserve(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float, ttl: float
    ) -> ReserveResult:
        """Async :meth:`Ledger.reserve`."""
        ...

    async def commit(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.commit`."""
        ...

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.release`."""
        ...

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.read`."""
        ...

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Async :meth:`Ledger.scan`."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
