"""A reservation lives as long as its call: the renewal of live calls' reservations.

Every reservation the ledger holds for a call under way is registered here until the
call settles or releases it. One daemon thread per guard renews them all with one
``renew_many`` every third of ``reservation_ttl``, so a stream that outlives the ttl keeps
its budget; deadlines are set by the store's clock, so hosts whose clocks disagree agree
on them. ``reservation_ttl`` then only frees the reservations of processes that died (and
of reservations their caller dropped without settling them: they are held weakly).

The thread serves sync and async callers alike (it uses the sync ledger, never an event
loop), runs only while calls are live (it ends after a whole interval with none) and
stops with the guard. A reservation the store no longer holds (it expired, or the store
lost its data) is logged as ``reservation_lost`` and dropped: its call goes on without
one.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from payi_guard import log as events

if TYPE_CHECKING:
    from payi_guard.clock import Clock
    from payi_guard.engine.storage import Storage

__all__ = ["Renewer"]

RENEW_BATCH = 500
"""Reservations renewed per ``renew_many`` call."""

MIN_INTERVAL = 0.05
"""The shortest pause between two renewals, whatever the ttl."""

_Entry = tuple["weakref.ref[object]", tuple[str, ...], str]
"""The owner of a live reservation (held weakly), its keys, and the user charged."""

_RENEWERS: weakref.WeakSet[Renewer] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child has no renewal thread, and its parent's calls are not its own.
    for renewer in list(_RENEWERS):
        renewer._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Renewer:
    """Renews the reservations of live calls every ``ttl() / 3`` seconds.

    Args:
        storage: the storage (its sync ledger renews).
        clock: the time source (``now`` of each renewal).
        ttl: returns the reservation ttl in effect (the config's ``reservation_ttl``).
    """

    def __init__(self, storage: Storage, clock: Clock, ttl: Callable[[], float]) -> None:
        self._storage = storage
        self._clock = clock
        self._ttl = ttl
        # Registering and discarding take the condition's lock directly (no Python-level
        # ``Condition.__enter__``/``__exit__``): they run on every call and never wait.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live: dict[str, _Entry] = {}
        self._thread: threading.Thread | None = None
        self._closing = False
        self._log = events.get_logger()
        _RENEWERS.add(self)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._live = {}
        self._thread = None
        self._closing = False

    def __len__(self) -> int:
        return len(self._live)

    @property
    def running(self) -> bool:
        """Whether the renewal thread runs (only while calls are live, and one interval after)."""
        return self._thread is not None

    def add(self, reservation_id: str, keys: Sequence[str], owner: object, user_id: str) -> None:
        """Keep a reservation alive while ``owner`` (its call) lives and until :meth:`discard`."""
        with self._lock:
            self._live[reservation_id] = (weakref.ref(owner), tuple(keys), user_id)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._run, name="payi-guard-renew", daemon=True
                )
                self._thread.start()

    def discard(self, reservation_id: str) -> None:
        """Stop renewing a reservation (its call ended)."""
        with self._lock:
            self._live.pop(reservation_id, None)

    def close(self) -> None:
        """Stop the thread; live reservations are no longer renewed (they expire)."""
        with self._cond:
            thread = self._thread
            self._closing = True
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(2 * self._storage.timeout + 5.0)

    def _wait(self) -> float | None:
        """Wait one interval; the ttl to renew with, or ``None`` when the thread must end."""
        ttl = self._ttl()
        with self._cond:
            if not self._closing:
                self._cond.wait(max(ttl / 3, MIN_INTERVAL))
            if self._closing or not self._live:
                self._thread = None
                return None
        return ttl

    def _run(self) -> None:
        while True:
            ttl = self._wait()
            if ttl is None:
                return
            self.renew(ttl)

    def _snapshot(self) -> list[tuple[str, Sequence[str]]]:
        batch: list[tuple[str, Sequence[str]]] = []
        with self._cond:
            for rid, (owner, keys, _) in list(self._live.items()):
                if owner() is None:  # dropped unsettled: it expires after its ttl
                    del self._live[rid]
                else:
                    batch.append((rid, keys))
        return batch

    def renew(self, ttl: float) -> None:
        """Renew every live reservation now (what the thread does each interval)."""
        batch = self._snapshot()
        for start in range(0, len(batch), RENEW_BATCH):
            chunk = batch[start : start + RENEW_BATCH]
            try:
                flags = self._storage.ledger.renew_many(chunk, now=self._clock.now(), ttl=ttl)
            except Exception as exc:  # the next interval tries again
                self._log.error(
                    events.STORAGE_ERROR,
                    op="renew",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    reservations=len(chunk),
                    storage=self._storage.shown,
                )
                return
            for (rid, _), alive in zip(chunk, flags, strict=True):
                if not alive:
                    self._lost(rid)

    def _lost(self, reservation_id: str) -> None:
        with self._cond:
            entry = self._live.pop(reservation_id, None)
        if entry is None:  # settled meanwhile: its commit closed it
            return
        self._log.warning(
            events.RESERVATION_LOST,
            user_id=entry[2],
            reservation_id=reservation_id,
            storage=self._storage.shown,
            detail="the store no longer holds this call's reservation (it expired, or the "
            "store lost its data): the call goes on unreserved and is charged when it ends",
        )
