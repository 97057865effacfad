"""The ledger contract: atomic reserve, settle and release over integer counters.

A ledger knows nothing about users, limits or money: it holds integer counters under
opaque keys (each key already names its owner, unit and calendar window) and applies
all-or-nothing reservations to several counters at once.

Every counter has two parts:

* ``settled``: the sum of settled amounts (only an operator's ``adjust`` lowers it);
* ``pending``: the sum of open reservations, each of which expires at its own deadline
  (a reservation whose process died gives its budget back after the ttl).

``reserve`` checks, for every charge with a ``max``, that
``settled + pending + amount <= max``; if any fails no total is changed (expired
reservations may be purged, which changes no visible total), and the counter of the
first charge that did not fit records what it needed as its ``refused`` amount, in the
same atomic step (the counter is made if missing, with the expiry a reserve would give
it), so that anyone reading it can tell that the limit refuses calls; a reserve that
fits on a counter clears it. ``commit`` removes the
reservation (if it is still open) and adds the actual amount to ``settled`` of the very
keys that were reserved, so a settle after the window rolled over lands in the old
window and never makes a counter of the new window negative. ``release`` is a commit of
zero. A commit of an id that is not open (expired, or never reserved: a manual
``record``) just adds the amounts.

Reservation ids are closed once: a commit or a release *closes* the id on each of its
keys, and the counter remembers that for ``closed_ttl`` seconds (600 by default). While
it does, a second commit or release of the id changes nothing (so a commit whose reply
was lost can be retried and counts once), and a reserve of the id reserves nothing and
answers ``closed`` (a reserve that reached the store after the caller gave up and
released it holds no budget). A reservation that merely expired is not closed: its late
commit still adds its amount.

Time: the ``now`` passed to every operation places counters in their windows and sets
their expiry (``expires_at - now`` from now on); it is the caller's clock. Reservation
deadlines (``ttl``, :meth:`Ledger.renew`) and closed ids are measured on the *store's*
clock: the server's for Redis (so hosts whose clocks disagree agree on every deadline),
the ``now`` passed in for the in-process memory store (one process, one clock).

``renew`` pushes the deadline of reservations that are still open to ``ttl`` seconds from
the store's now (never earlier than it was), so a call that outlives ``ttl`` keeps its
budget while its process lives; ``renew_many`` does it for many reservations in one
step (one round trip on one Redis server).

``adjust`` is the operator's change: it adds an amount (negative gives budget back) to
``settled`` of some counters, or sets it to zero (a reset), leaving open reservations
alone, and appends what it did to a bounded *journal* in the same atomic step;
``read_journal`` returns the newest entries. These are the only operations that lower
``settled``, which may then be below zero (a credit for the rest of the window).

``scan`` lists the keys of the live counters that match a Redis glob pattern, so that
callers can discover whose counters exist (the users page does). It is weakly
consistent, like Redis ``SCAN``: a counter that exists for the whole scan is listed
exactly once, one created or dropped meanwhile may or may not be; the order is
unspecified.

Tallies (usage analytics): :meth:`Ledger.commit` and :meth:`Ledger.reserve` take
optional :class:`Tally` items, hashes of integer fields kept apart from the counters
(their keys never name a counter). A commit adds its tallies in its own atomic step,
only when it closes the reservation on at least one of its keys (a retried commit, or
one of an id already closed, adds nothing); a reserve adds its tallies only when it
refuses. ``read_tallies`` returns their fields; ``scan`` lists their keys too. A tally
lives until its ``expires_at`` (every write may push it later), then it is gone.
In Redis Cluster mode a tally is written with the charges of its own hash slot (none
there: it is not written).

Failures: input errors raise :class:`ValueError` (:class:`CapacityExceeded` for an
amount or a max above :data:`MAX_UNITS`); a store that fails raises
:class:`~payi_guard.StorageError`, and :class:`StorageOutcomeUnknown` (a subclass) when
the request was sent and may have been applied (retry the same operation with the
same id: it is applied at most once). A plain :class:`~payi_guard.StorageError` means
nothing was applied. A store that lost its data is reported through the ``on_event``
callback as a :class:`StorageEvent`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, Protocol, runtime_checkable

from payi_guard._frozen import frozen_maker
from payi_guard.exceptions import PayiGuardError, StorageError

__all__ = [
    "DEFAULT_CLOSED_TTL",
    "MAX_UNITS",
    "Adjustment",
    "AsyncLedger",
    "CapacityExceeded",
    "Charge",
    "CounterState",
    "JournalEntry",
    "Ledger",
    "ReserveResult",
    "StorageEvent",
    "StorageOutcomeUnknown",
    "Tally",
]

MAX_UNITS = 2**53 - 1
"""The largest amount or max a counter accepts (exact in a double, hence in Lua)."""

DEFAULT_CLOSED_TTL = 600.0
"""Seconds a counter remembers a committed or released reservation id."""


class StorageOutcomeUnknown(StorageError):
    """A request reached the store (or may have) and no answer came back in time.

    Raised instead of a plain :class:`~payi_guard.StorageError` when the request was
    sent and the reply was lost: a read timeout, a connection closed by the server in
    the middle of a request. The operation may have been applied, now or later (a
    frozen server applies what it had queued once it thaws). Retrying the same commit
    or release with the same reservation id is safe (it is applied once); a reserve
    whose outcome is unknown is undone by releasing its id, which also keeps a late
    arrival of that reserve from holding budget.
    """


class CapacityExceeded(PayiGuardError, ValueError):
    """An amount or a max is above :data:`MAX_UNITS`, what a counter can hold.

    Not a storage failure: the call cannot be counted at all, so the engine refuses it.

    Attributes:
        index: the index of the offending charge.
        field: ``"amount"`` or ``"max"``.
        value: the offending value.
        capacity: :data:`MAX_UNITS`.
    """

    def __init__(self, index: int, field: str, value: int) -> None:
        super().__init__(f"charge {index}: {field} {value} is above the maximum {MAX_UNITS}")
        self.index = index
        self.field = field
        self.value = value
        self.capacity = MAX_UNITS


@dataclass(frozen=True, slots=True)
class StorageEvent:
    """Something the ledger noticed about the store itself (never about a counter).

    Attributes:
        kind: ``"reset"``: the store's marker key is gone or was replaced since this
            process last saw it, so the store lost its data (a restart without
            persistence, a flush, a failover to an empty replica); ``"new"``: the
            first contact of this process found no marker, so the store is new, or
            lost its data before this process first connected (it cannot tell which).
        server: where it was seen (``host:port`` or a socket path; never credentials).
        marker: the marker now in place.
        previous: the marker seen before (``"reset"`` only).
    """

    kind: Literal["new", "reset"]
    server: str
    marker: str
    previous: str | None = None


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


make_charge: Final = frozen_maker(Charge)
"""``Charge(...)``, every field given in order, without ``__init__``'s cost."""


@dataclass(frozen=True, slots=True)
class Tally:
    """Integer fields added to one analytics hash (see the module's *Tallies*).

    Attributes:
        key: the hash's key (with a ``{...}`` hash tag, never a counter's key).
        fields: ``(field, increment)`` pairs; each field at most once.
        expires_at: epoch seconds after which the hash may be deleted.
    """

    key: str
    fields: tuple[tuple[str, int], ...]
    expires_at: float


make_tally: Final = frozen_maker(Tally)
"""``Tally(...)``, every field given in order, without ``__init__``'s cost."""


@dataclass(frozen=True, slots=True)
class CounterState:
    """The totals of one counter at the moment an operation ran.

    Attributes:
        settled: the sum of settled amounts.
        pending: the sum of open reservations.
        refused: what the last refused reserve needed on this counter, when this
            counter refused it (0 when none did, or a reserve on it fitted since).
    """

    settled: int
    pending: int
    refused: int = 0

    @property
    def used(self) -> int:
        """``settled + pending``: what a new reservation is checked against."""
        return self.settled + self.pending


make_counter_state: Final = frozen_maker(CounterState)
"""``CounterState(...)``, every field given in order, without ``__init__``'s cost."""


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The outcome of :meth:`Ledger.reserve`.

    Attributes:
        ok: True if every charge was reserved; False if none was.
        refused: the index (into the charges) of the first charge that did not fit,
            or ``None`` when ``ok`` or ``closed``.
        states: the state of every counter after the operation (after the reservation
            when ``ok``; unchanged totals when refused, the refused counter's
            ``refused`` being the amount it needed).
        closed: True when nothing was reserved because the id was already committed
            or released (``ok`` is False and ``refused`` is None): a reserve that
            arrived after its caller gave up on it, or an id used twice.
    """

    ok: bool
    refused: int | None
    states: tuple[CounterState, ...]
    closed: bool = False


make_reserve_result: Final = frozen_maker(ReserveResult)
"""``ReserveResult(...)``, every field given in order, without ``__init__``'s cost."""


@dataclass(frozen=True, slots=True)
class Adjustment:
    """An operator's change to one counter (see :meth:`Ledger.adjust`).

    Attributes:
        key: the counter's key.
        amount: units added to ``settled`` (negative takes some off), or ``None`` to
            set ``settled`` to zero (a reset). Open reservations are left alone.
        expires_at: as for a :class:`Charge`: when the counter may be deleted (used when
            the adjustment creates it).
        note: opaque text kept with the journal entry (at most 4096 characters).
    """

    key: str
    amount: int | None
    expires_at: float
    note: str = ""


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One adjustment as a journal keeps it.

    Attributes:
        at: the ``now`` of the :meth:`Ledger.adjust` call, epoch seconds.
        key: the counter adjusted.
        amount: what was added to ``settled`` (a reset: minus what it held).
        settled: ``settled`` of the counter right after the adjustment.
        pending: ``pending`` of the counter at that moment.
        note: the adjustment's note.
    """

    at: float
    key: str
    amount: int
    settled: int
    pending: int
    note: str

    @property
    def state(self) -> CounterState:
        """The counter's state right after the adjustment."""
        return CounterState(self.settled, self.pending)


@runtime_checkable
class Ledger(Protocol):
    """Synchronous ledger. Implementations are safe to share between threads."""

    def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Reserve every charge or none (one atomic step; one round trip for Redis).

        ``tallies`` are added only when the reserve refuses, in the same step.
        """
        ...

    def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Close the reservation (if open) and add the actual amounts (one atomic step).

        ``tallies`` are added in the same step when it closes the id on some key.
        """
        ...

    def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Return the fields of each tally (a missing or expired one is empty)."""
        ...

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything."""
        ...

    def renew(self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float) -> bool:
        """Push an open reservation's deadline to ``ttl`` s from the store's now.

        Returns True when it was still open on every key (it never shortens a deadline).
        """
        ...

    def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """:meth:`renew` for many ``(reservation_id, keys)`` pairs in one step."""
        ...

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing counters are zero)."""
        ...

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Return the keys of the live counters matching the glob ``match`` (at most ``limit``)."""
        ...

    def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Apply every adjustment or none, journal each one, in one atomic step.

        A counter the adjustment would take outside ``[-MAX_UNITS, MAX_UNITS]`` refuses
        the whole call (``ValueError``). An amount of zero, or a reset of a counter that
        does not exist, creates nothing (and is journaled all the same). ``journal``
        keeps its ``keep`` newest entries and lives at least until
        ``journal_expires_at``. Every key and the journal carry the same ``{hash tag}``
        (one owner: one Redis Cluster slot).
        """
        ...

    def read_journal(self, journal: str, *, now: float, limit: int) -> tuple[JournalEntry, ...]:
        """Return the ``limit`` newest entries of ``journal``, newest first."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


@runtime_checkable
class AsyncLedger(Protocol):
    """The async twin of :class:`Ledger`; never blocks the event loop."""

    async def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Async :meth:`Ledger.reserve`."""
        ...

    async def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.commit`."""
        ...

    async def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Async :meth:`Ledger.read_tallies`."""
        ...

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.release`."""
        ...

    async def renew(
        self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float
    ) -> bool:
        """Async :meth:`Ledger.renew`."""
        ...

    async def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """Async :meth:`Ledger.renew_many`."""
        ...

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`Ledger.read`."""
        ...

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Async :meth:`Ledger.scan`."""
        ...

    async def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`Ledger.adjust`."""
        ...

    async def read_journal(
        self, journal: str, *, now: float, limit: int
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`Ledger.read_journal`."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
