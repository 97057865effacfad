"""The in-process ledger: one dict of counters behind one lock.

:class:`MemoryLedger` is the ``memory://`` storage: exact for a single process, with
microsecond operations. :class:`AsyncMemoryLedger` exposes the *same* store to async
code (a Guard charges sync and async calls to one set of counters); its operations are
too short to be worth a thread hop, so they run inline on the event loop (all but
``scan``, which visits every counter and runs in a worker thread).

Per counter the store keeps ``settled``, ``pending``, ``refused`` (what the last call it
refused needed, until a reserve on it fits), its ``expires_at`` and, only while
reservations are open, a dict ``id -> (amount, deadline)`` with a min-heap of deadlines.
Expired reservations are purged lazily when their counter is touched (a heap pop each);
closed reservations leave stale heap entries that are skipped on pop, and the heap is
rebuilt once stale entries outnumber live ones, so it stays proportional to what is
open. Expired counters are swept incrementally: counters are filed in buckets by
``expires_at`` (every counter of a calendar window shares one), and each reserve or commit
drops at most ``sweep_batch`` counters whose time has passed, so no single call pays
for a whole window's worth of users and memory stays bounded. A counter whose
``expires_at`` has passed reads as zero even before it is swept, as Redis would.

Closed ids (committed or released) are remembered per id, with the keys they were closed
on, for ``closed_ttl`` seconds (:class:`~payi_guard.ledger._memory_closed.ClosedIds`);
they are swept the same incremental way. The store's clock is the ``now`` passed in: one
process, one clock.
"""

from __future__ import annotations

import heapq
import math
import threading
from collections.abc import Sequence

from payi_guard.ledger._adjust import (
    MAX_UNITS,
    adjusted,
    check_adjust,
    check_journal_read,
    out_of_range,
)
from payi_guard.ledger._checks import (
    check_closed_ttl,
    check_id,
    check_keys,
    check_now,
    check_operation,
    check_renewals,
    check_scan,
    check_ttl,
)
from payi_guard.ledger._glob import glob_regex, literal_prefix
from payi_guard.ledger._memory_async import AsyncMemoryLedger
from payi_guard.ledger._memory_closed import ClosedIds
from payi_guard.ledger._memory_counter import _Counter
from payi_guard.ledger._memory_journal import JournalStore
from payi_guard.ledger._tally import TallyStore, immutable_tallies
from payi_guard.ledger.base import (
    DEFAULT_CLOSED_TTL,
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
    make_counter_state,
    make_reserve_result,
)

__all__ = ["AsyncMemoryLedger", "MemoryLedger"]

_ZERO = CounterState(0, 0)


class MemoryLedger:
    """An in-process :class:`~payi_guard.ledger.Ledger`, safe to share between threads.

    Every operation is O(1) per charge (plus a heap operation on the charge's own open
    reservations) under a single lock. Time is whatever ``now`` the caller passes:
    reservations expire at ``now + ttl``, counters at their ``expires_at`` and closed
    ids at ``now + closed_ttl``.

    Args:
        sweep_batch: the most expired counters one reserve or commit drops (bounds the latency
            an operation can pay for cleanup; the rest go on the next operations).
        closed_ttl: seconds a committed or released id is remembered.

    Raises:
        ValueError: if ``sweep_batch`` is not a positive int or ``closed_ttl`` not a
            positive number.
    """

    def __init__(self, *, sweep_batch: int = 256, closed_ttl: float = DEFAULT_CLOSED_TTL) -> None:
        if isinstance(sweep_batch, bool) or not isinstance(sweep_batch, int) or sweep_batch < 1:
            raise ValueError(f"sweep_batch must be a positive int, got {sweep_batch!r}")
        check_closed_ttl(closed_ttl)
        self._sweep_batch = sweep_batch
        self._closed = ClosedIds(float(closed_ttl))
        self._lock = threading.Lock()
        self._counters: dict[str, _Counter] = {}
        # expires_at -> keys filed under it, and a heap of those expires_at values.
        self._buckets: dict[float, list[str]] = {}
        self._bucket_times: list[float] = []
        self._journals = JournalStore()
        self._tallies = TallyStore()
        # The last tuple of tallies a reserve checked (a plan's refusal tallies are one
        # tuple per owner and day, passed again call after call).
        self._checked_tallies: Sequence[Tally] = ()

    def __len__(self) -> int:
        """The number of counters stored (expired ones count until they are swept)."""
        return len(self._counters)

    def __repr__(self) -> str:
        return f"MemoryLedger(counters={len(self._counters)})"

    # -- internals (call with the lock held) ---------------------------------------------

    def _file(self, key: str, expires_at: float) -> None:
        bucket = self._buckets.get(expires_at)
        if bucket is None:
            bucket = self._buckets[expires_at] = []
            heapq.heappush(self._bucket_times, expires_at)
        bucket.append(key)

    def _new_counter(self, key: str, expires_at: float) -> _Counter:
        counter = _Counter(expires_at)
        self._counters[key] = counter
        self._file(key, expires_at)
        return counter

    def _sweep(self, now: float, budget: int) -> int:
        dropped = 0
        times = self._bucket_times
        counters = self._counters
        while times and times[0] <= now and dropped < budget:
            when = times[0]
            bucket = self._buckets[when]
            while bucket and dropped < budget:
                key = bucket.pop()
                counter = counters.get(key)
                # The key may have been re-created or extended since it was filed here.
                if counter is not None and counter.expires_at <= now:
                    del counters[key]
                    dropped += 1
            if not bucket:
                del self._buckets[when]
                heapq.heappop(times)
        return dropped

    def _housekeeping(self, now: float) -> None:
        if self._bucket_times and self._bucket_times[0] <= now:
            self._sweep(now, self._sweep_batch)
        if self._closed.due(now):
            self._closed.sweep(now, self._sweep_batch)
        if self._tallies.due(now):
            self._tallies.sweep(now, self._sweep_batch)

    def _live(self, key: str, now: float) -> _Counter | None:
        counter = self._counters.get(key)
        if counter is None or counter.expires_at <= now:
            return None
        counter.purge(now)
        return counter

    def _place(self, charge: Charge, counter: _Counter | None) -> _Counter:
        """The live counter of a charge being reserved (made if missing).

        It lives at least until the charge's ``expires_at``.
        """
        if counter is None:
            return self._new_counter(charge.key, charge.expires_at)
        if charge.expires_at > counter.expires_at:
            counter.expires_at = charge.expires_at
            self._file(charge.key, charge.expires_at)
        return counter

    # -- the Ledger protocol ---------------------------------------------------------------

    def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Reserve every charge or none.

        Each charge with a ``max`` must satisfy ``settled + pending + amount <= max``
        (an id already open on a counter is replaced, so its old amount does not count).
        The reservation expires at ``now + ttl``. An id already committed or released
        on any of the keys reserves nothing (the result says ``closed``). A refusal
        records on the counter that refused what the charge needed (``refused``, made
        to live as a reserve would make it); a reserve that fits clears it.

        Args:
            reservation_id: a fresh id naming this reservation.
            charges: one per counter (each key at most once).
            now: the current time, epoch seconds.
            ttl: seconds the reservation holds budget if it is never committed.
            tallies: added in the same step when the reserve refuses.

        Returns:
            The outcome; when refused, no total changed.

        Raises:
            ValueError: on an empty id, a negative or non-int amount, a repeated key,
                a non-finite time or a ttl that is not positive.
        """
        checked = tallies is self._checked_tallies
        check_operation(reservation_id, charges, () if checked else tallies, now, ttl)
        if not checked and immutable_tallies(tallies):
            self._checked_tallies = tallies  # the same tuple again needs no new check
        with self._lock:
            self._housekeeping(now)
            closed = self._closed.keys(reservation_id, now)
            if closed and any(c.key in closed for c in charges):
                lives = [self._live(charge.key, now) for charge in charges]
                current = tuple(_ZERO if c is None else c.state() for c in lives)
                return ReserveResult(False, None, current, closed=True)
            counters = self._counters
            found: list[_Counter | None] = []
            refused: int | None = None
            for index, charge in enumerate(charges):
                counter = counters.get(charge.key)
                if counter is not None:
                    if counter.expires_at <= now:
                        counter = None
                    elif counter.deadlines is not None:
                        counter.purge(now)
                found.append(counter)
                if refused is None and charge.max is not None:
                    used = 0
                    if counter is not None:
                        used = counter.settled + counter.pending
                        if counter.open is not None:
                            used -= counter.held(reservation_id)
                    if used + charge.amount > charge.max:
                        refused = index
            if refused is not None:
                # The counter that refused remembers what the call needed (so readers see
                # a limit that refuses calls), living as long as a reserve makes it live.
                charge = charges[refused]
                refusing = self._place(charge, found[refused])
                refusing.refused = charge.amount
                found[refused] = refusing
                self._tallies.add(tallies, now)
                states = tuple(_ZERO if c is None else c.state() for c in found)
                return ReserveResult(False, refused, states)
            deadline = now + ttl
            out: list[CounterState] = []
            for charge, counter in zip(charges, found, strict=True):
                if counter is None:
                    counter = self._new_counter(charge.key, charge.expires_at)
                elif charge.expires_at > counter.expires_at:
                    counter.expires_at = charge.expires_at
                    self._file(charge.key, charge.expires_at)
                counter.hold(reservation_id, charge.amount, deadline)
                counter.refused = 0
                out.append(make_counter_state(counter.settled, counter.pending, 0))
            return make_reserve_result(True, None, tuple(out), False)

    def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Close the reservation where it is open and add each actual amount to ``settled``.

        A reservation that expired or was never made (a manual record) is simply added.
        The id is then closed on each key: committing or releasing it again there
        changes nothing (a retried commit counts once).

        Args:
            reservation_id: the id given to :meth:`reserve` (or any id for a record).
            charges: the actual amounts, on the keys that were reserved (``max`` ignored).
            now: the current time, epoch seconds.
            tallies: added in the same step when this commit closes the id somewhere.

        Returns:
            The state of each counter after the commit.

        Raises:
            ValueError: on an empty id, a negative or non-int amount or a repeated key.
        """
        check_operation(reservation_id, charges, tallies, now, None)
        with self._lock:
            self._housekeeping(now)
            closed = self._closed.keys(reservation_id, now)
            counters = self._counters
            closing: list[str] = []
            out: list[CounterState] = []
            for charge in charges:
                key = charge.key
                if closed and key in closed:
                    live = self._live(key, now)
                    out.append(_ZERO if live is None else live.state())
                    continue
                closing.append(key)
                counter = counters.get(key)
                if counter is not None and counter.expires_at <= now:
                    counter = None
                if charge.amount == 0:
                    # Nothing to add: close the reservation without creating a counter.
                    if counter is None:
                        out.append(_ZERO)
                        continue
                    if counter.deadlines is not None:
                        counter.purge(now)
                elif counter is None:
                    counter = self._new_counter(key, charge.expires_at)
                else:
                    if counter.deadlines is not None:
                        counter.purge(now)
                    if charge.expires_at > counter.expires_at:
                        counter.expires_at = charge.expires_at
                        self._file(key, charge.expires_at)
                if counter.open is not None:
                    counter.close(reservation_id)
                counter.settled += charge.amount
                out.append(make_counter_state(counter.settled, counter.pending, counter.refused))
            if closing:
                self._closed.close(reservation_id, closed, closing, now)
                if tallies:
                    self._tallies.add(tallies, now)
            return tuple(out)

    def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Return the fields of each tally (a missing or expired one is empty).

        Raises:
            ValueError: on an empty or repeated key, or a non-finite time.
        """
        check_keys(keys)
        check_now(now)
        with self._lock:
            return self._tallies.read(keys, now)

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything (a commit of zero).

        The id is closed on each key, even where it was never reserved, so a reserve
        of it arriving later holds nothing.

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the release.

        Raises:
            ValueError: on an empty id or key, or a repeated key.
        """
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        with self._lock:
            self._housekeeping(now)
            closed = self._closed.keys(reservation_id, now)
            closing: list[str] = []
            out: list[CounterState] = []
            for key in keys:
                counter = self._live(key, now)
                if not (closed and key in closed):
                    closing.append(key)
                    if counter is not None:
                        counter.close(reservation_id)
                out.append(_ZERO if counter is None else counter.state())
            if closing:
                self._closed.close(reservation_id, closed, closing, now)
            return tuple(out)

    def renew(self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float) -> bool:
        """Push an open reservation's deadline to ``now + ttl`` (never earlier).

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.
            ttl: seconds from ``now`` the reservation holds budget from now on.

        Returns:
            True when the reservation was still open on every key (its deadline not
            reached, neither committed nor released); keys where it was not are left alone.

        Raises:
            ValueError: on an empty id or key, a repeated key or a ttl that is not positive.
        """
        return self.renew_many([(reservation_id, keys)], now=now, ttl=ttl)[0]

    def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """:meth:`renew` each ``(reservation_id, keys)`` pair, under one lock.

        Returns:
            One flag per pair, in order: True when that reservation was still open.

        Raises:
            ValueError: on a malformed pair, an id given twice, or an invalid time or ttl.
        """
        check_renewals(reservations)
        check_now(now)
        check_ttl(ttl)
        deadline = now + ttl
        out: list[bool] = []
        with self._lock:
            for rid, keys in reservations:
                alive = True
                for key in keys:
                    counter = self._live(key, now)
                    if counter is None or not counter.renew(rid, deadline):
                        alive = False
                out.append(alive)
        return tuple(out)

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing or expired counters are zero).

        Args:
            keys: the counters to read.
            now: the current time, epoch seconds.

        Returns:
            One state per key, in order.

        Raises:
            ValueError: on an empty key or a repeated key.
        """
        check_keys(keys)
        check_now(now)
        with self._lock:
            out: list[CounterState] = []
            for key in keys:
                counter = self._live(key, now)
                out.append(_ZERO if counter is None else counter.state())
            return tuple(out)

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        r"""Return the keys of the live counters that match a Redis glob pattern.

        The keys are copied under the lock and matched outside it, so a scan of many
        counters never holds up reserves and commits (it sees the store as it was when
        it started, which is what the contract allows).

        Args:
            match: a Redis glob (``pg:{u:*``; ``*``, ``?``, ``[...]``, ``\`` escapes).
            now: the current time, epoch seconds: counters whose ``expires_at`` has
                passed are not listed.
            limit: the most keys returned (which ones is unspecified), or ``None``.

        Returns:
            The matching keys, each once, in no particular order.

        Raises:
            ValueError: on an empty pattern, a ``limit`` that is not a positive int or a
                non-finite time.
        """
        check_scan(match, limit)
        check_now(now)
        regex = glob_regex(match)
        prefix = literal_prefix(match)
        with self._lock:
            snapshot = [(key, c.expires_at) for key, c in self._counters.items()]
            snapshot += [(key, math.inf) for key in self._tallies.live_keys(now)]
        found: list[str] = []
        for key, expires_at in snapshot:
            if not key.startswith(prefix) or expires_at <= now:
                continue
            if regex.fullmatch(key) is not None:
                found.append(key)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Apply every adjustment or none and journal each one (one step under the lock).

        See :meth:`payi_guard.ledger.Ledger.adjust`.

        Args:
            adjustments: the changes, one per counter.
            now: the current time, epoch seconds (also the entries' time).
            journal: the journal's key (same hash tag as the counters).
            keep: how many newest entries the journal keeps.
            journal_expires_at: the journal lives at least until then.

        Returns:
            One journal entry per adjustment, in order.

        Raises:
            ValueError: on invalid input, or a counter that would go out of range
                (nothing is changed then).
        """
        check_adjust(adjustments, now, journal, keep, journal_expires_at)
        with self._lock:
            found = [self._live(item.key, now) for item in adjustments]
            changes: list[tuple[int, int]] = []
            for index, (item, counter) in enumerate(zip(adjustments, found, strict=True)):
                new, added = adjusted(0 if counter is None else counter.settled, item.amount)
                if abs(new) > MAX_UNITS:
                    raise out_of_range(index, new)
                changes.append((new, added))
            entries: list[JournalEntry] = []
            for item, counter, (new, added) in zip(adjustments, found, changes, strict=True):
                if counter is None and new != 0:
                    counter = self._new_counter(item.key, item.expires_at)
                elif counter is not None and added and item.expires_at > counter.expires_at:
                    counter.expires_at = item.expires_at
                    self._file(item.key, item.expires_at)
                pending = 0
                if counter is not None:
                    counter.settled = new
                    pending = counter.pending
                entries.append(JournalEntry(now, item.key, added, new, pending, item.note))
            self._journals.append(journal, entries, keep, journal_expires_at, now)
            return tuple(entries)

    def read_journal(self, journal: str, *, now: float, limit: int) -> tuple[JournalEntry, ...]:
        """Return the ``limit`` newest entries of ``journal``, newest first.

        Args:
            journal: the journal's key.
            now: the current time, epoch seconds (an expired journal is empty).
            limit: the most entries returned.

        Raises:
            ValueError: on invalid input.
        """
        check_journal_read(journal, now, limit)
        with self._lock:
            return self._journals.newest(journal, now, limit)

    def sweep(self, now: float) -> int:
        """Drop every counter (and tally) whose ``expires_at`` is ``<= now``, at once.

        Operations already sweep incrementally; this is for callers that want memory
        back immediately (and for tests).

        Args:
            now: the current time, epoch seconds.

        Returns:
            The number of counters dropped.
        """
        check_now(now)
        with self._lock:
            self._tallies.sweep(now, len(self._tallies) + 1)
            return self._sweep(now, len(self._counters) + 1)

    def close(self) -> None:
        """Nothing to release: the counters stay readable (other users may share them)."""
