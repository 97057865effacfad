"""The SQLite ledger's operations, each one transaction, as both twins run them.

:class:`Operations` turns each ledger operation (reserve, commit, release, renew, read,
adjust, ...) into one statement function of :mod:`payi_guard.ledger._sqlite_sql` run in
one transaction of a :class:`~payi_guard.ledger._sqlite_store.Store`; the sync
:class:`~payi_guard.ledger.SQLiteLedger` calls it directly, the asyncio one in a worker
thread. :func:`make_settings` validates the options both take.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from payi_guard.ledger import _sqlite_sql as sql
from payi_guard.ledger._checks import check_closed_ttl
from payi_guard.ledger._sqlite_store import Settings, Store
from payi_guard.ledger._sqlite_tally import read_tallies
from payi_guard.ledger._sqlite_uri import check_options
from payi_guard.ledger.base import (
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
)

__all__ = ["Operations", "database_file", "make_settings"]


def make_settings(
    timeout: float,
    lock_timeout: float,
    synchronous: str,
    closed_ttl: float,
    prune_every: int,
    prune_batch: int,
) -> Settings:
    """Validate the ledger options into :class:`Settings`.

    Raises:
        ConfigError: a timeout or ``synchronous`` is wrong.
        ValueError: ``closed_ttl`` is not a positive number of seconds, or a pruning
            setting not a positive int (as for the other ledgers).
    """
    checked = check_options(
        {"timeout": timeout, "lock_timeout": lock_timeout, "synchronous": synchronous}
    )
    check_closed_ttl(closed_ttl)
    for name, value in (("prune_every", prune_every), ("prune_batch", prune_batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    return Settings(
        timeout=checked["timeout"],
        lock_timeout=checked["lock_timeout"],
        synchronous=checked["synchronous"],
        closed_ttl=float(closed_ttl),
        prune_every=prune_every,
        prune_batch=prune_batch,
    )


def database_file(path: str | os.PathLike[str]) -> str:
    """The absolute path of the database file (refuses ``""`` and ``":memory:"``)."""
    text = os.fspath(path)
    if not isinstance(text, str) or not text or text == ":memory:":
        raise ValueError("path must name a database file")
    return os.path.abspath(text)


class Operations:
    """The ledger operations on a store, each one transaction (run by either twin)."""

    def __init__(self, path: str, settings: Settings) -> None:
        self.store = Store(path, settings)

    def reserve(
        self,
        rid: str,
        charges: Sequence[Charge],
        now: float,
        ttl: float,
        started: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        if not charges:
            return ReserveResult(True, None, ())
        deadline = now + ttl
        return self.store.write(
            "reserve",
            started,
            now,
            lambda c: sql.reserve(c, rid, charges, now, deadline, tallies),
        )

    def commit(
        self,
        rid: str,
        charges: Sequence[Charge],
        now: float,
        started: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        if not charges:
            return ()
        until = now + self.store.settings.closed_ttl
        return self.store.write(
            "commit",
            started,
            now,
            lambda c: sql.settle(c, rid, charges, now, until, tallies),
            closes=1,
        )

    def read_tallies(self, keys: Sequence[str], now: float) -> tuple[dict[str, int], ...]:
        if not keys:
            return ()
        return self.store.read("read_tallies", lambda c: read_tallies(c, keys, now))

    def release(
        self, rid: str, keys: Sequence[str], now: float, started: float
    ) -> tuple[CounterState, ...]:
        if not keys:
            return ()
        # A release is a commit of zero, which neither creates nor extends a counter.
        charges = [Charge(key, 0, None, 0.0) for key in keys]
        until = now + self.store.settings.closed_ttl
        return self.store.write(
            "release",
            started,
            now,
            lambda c: sql.settle(c, rid, charges, now, until),
            closes=1,
        )

    def renew_many(
        self,
        reservations: Sequence[tuple[str, Sequence[str]]],
        now: float,
        ttl: float,
        started: float,
    ) -> tuple[bool, ...]:
        if not any(keys for _, keys in reservations):
            return (True,) * len(reservations)
        deadline = now + ttl
        return self.store.write(
            "renew", started, now, lambda c: sql.renew_many(c, reservations, now, deadline)
        )

    def read(self, keys: Sequence[str], now: float) -> tuple[CounterState, ...]:
        if not keys:
            return ()
        return self.store.read("read", lambda c: sql.read(c, keys, now))

    def scan(self, match: str, now: float, limit: int | None) -> list[str]:
        return self.store.read("scan", lambda c: sql.scan(c, match, now, limit))

    def adjust(
        self,
        adjustments: Sequence[Adjustment],
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
        started: float,
    ) -> tuple[JournalEntry, ...]:
        return self.store.write(
            "adjust",
            started,
            now,
            lambda c: sql.adjust(c, adjustments, now, journal, keep, journal_expires_at),
        )

    def read_journal(self, journal: str, now: float, limit: int) -> tuple[JournalEntry, ...]:
        return self.store.read("read_journal", lambda c: sql.read_journal(c, journal, now, limit))
