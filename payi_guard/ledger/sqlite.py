"""The SQLite ledger: exact across the worker processes of one host, durable, stdlib only.

``storage: sqlite:///budgets.db`` keeps the counters in one SQLite file that every
worker process of the host opens (``gunicorn -w 4``, ``uvicorn --workers 4``): a limit
holds across them exactly, and spend survives restarts. :class:`SqliteLedger` is the
sync ledger, :class:`AsyncSqliteLedger` its async twin; both have exactly the semantics
of the memory and Redis ledgers (see :mod:`payi_guard.ledger.base`), checked by the
same contract suite.

URIs (the path is percent-decoded; options are query parameters)::

    sqlite:///budgets.db             relative: to the budgets file's folder (base_dir)
    sqlite:////var/lib/app/budgets.db absolute
    sqlite:///budgets.db?timeout=1&synchronous=full

How it works:

* the file is in WAL mode (readers never wait for writers); every reserve, commit,
  release and renewal (``renew_many``: any number of reservations) is one short
  ``BEGIN IMMEDIATE`` write transaction, so the check-and-add of a reserve is atomic
  across processes; ``read`` and ``scan`` run in a read transaction and never take
  the write lock;
* the threads of one process queue on an in-process lock before asking SQLite for the
  file's write lock, and a transaction waits at most ``timeout`` (default 0.25 s, the
  Redis socket timeout) for the other processes; a call waits ``lock_timeout`` (default
  1 s, like the wait for a pooled Redis connection) in all, its turn and the file
  together; past either a call fails with :class:`~payi_guard.StorageError` and
  ``on_storage_error`` decides;
* connections are pooled, and a connection is used by one thread at a time;
  :class:`AsyncSqliteLedger` runs every operation in a small dedicated thread pool,
  so the event loop never waits on the file;
* a process killed at any point (``kill -9`` mid-transaction included) loses nothing
  that was committed: SQLite rolls the unfinished transaction back and its lock goes
  with the process. Its open reservations give their budget back after their ttl. With
  ``synchronous=normal`` (the default) a power cut may lose the last transactions
  before it; ``synchronous=full`` syncs every commit to disk (slower);
* a committed or released reservation id is closed on each of its keys for
  ``closed_ttl`` seconds (600 by default), whether the key has a counter or not: a
  retried commit counts once, and a reserve that arrives after its release holds
  nothing. Expired ones are deleted with the past windows, at least as many as were
  closed meanwhile, so they take the room of the last ``closed_ttl`` seconds' calls;
* counters past their ``expires_at`` read as zero and are deleted by later writes, a
  bounded batch at a time (``prune_batch`` counters every ``prune_every`` writes), so
  the file stays the size of the live windows; SQLite reuses the freed pages.

Time: reservation deadlines and closed ids are measured on the ``now`` passed in, the
clock of the host the file lives on (every process using the file shares it).

The layout and the SQL of each operation are in :mod:`payi_guard.ledger._sqlite_sql`,
each operation as one transaction in :mod:`payi_guard.ledger._sqlite_ops`, connections
and transactions in :mod:`payi_guard.ledger._sqlite_store`. The file must be
on a local file system (WAL needs memory shared between the processes; network file
systems do not provide it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from payi_guard.exceptions import ConfigError
from payi_guard.ledger._adjust import check_adjust, check_journal_read
from payi_guard.ledger._checks import (
    check_charges,
    check_id,
    check_keys,
    check_now,
    check_scan,
    check_ttl,
)
from payi_guard.ledger._sqlite_async import AsyncSqliteLedger, check_renew
from payi_guard.ledger._sqlite_ops import Operations, database_file, make_settings
from payi_guard.ledger._sqlite_uri import parse_sqlite_uri, resolve_sqlite_uri
from payi_guard.ledger._tally import check_tallies
from payi_guard.ledger.base import (
    DEFAULT_CLOSED_TTL,
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
)
from payi_guard.ledger.factory import DEFAULT_POOL_TIMEOUT, DEFAULT_TIMEOUT

__all__ = [
    "AsyncSqliteLedger",
    "SqliteLedger",
    "missing_sqlite_file",
    "open_async_sqlite_ledger",
    "open_sqlite_ledger",
    "parse_sqlite_uri",
    "resolve_sqlite_uri",
]

T = TypeVar("T")


_SYNC_OPTIONS = (
    "timeout", "lock_timeout", "synchronous", "closed_ttl", "prune_every", "prune_batch",
)  # fmt: skip
_ASYNC_OPTIONS = (*_SYNC_OPTIONS, "workers")


# -- sync ------------------------------------------------------------------------------------


class SqliteLedger:
    """A :class:`~payi_guard.ledger.Ledger` in an SQLite file, shared by processes.

    Safe to share between threads. Build one from a URI with
    :func:`payi_guard.ledger.factory.open_ledger` (``sqlite:///budgets.db``). The file is
    created (with its schema) if it does not exist; its folder must exist.

    Args:
        path: the database file.
        timeout: seconds a transaction may wait for the other processes' writes.
        lock_timeout: seconds a call may wait for the other writers of this process.
        synchronous: ``"normal"`` (durable across process crashes) or ``"full"``
            (across power loss too; every commit waits for the disk).
        closed_ttl: seconds a committed or released reservation id is remembered on
            each of its keys (a commit or release of it again there changes nothing, a
            reserve of it reserves nothing), as in the other ledgers.
        prune_every: every this many write transactions (per process), delete up to
            ``prune_batch`` counters past their expiry.
        prune_batch: see ``prune_every``.

    Raises:
        ConfigError: an option has a wrong value.
        ValueError: ``path`` is empty, ``closed_ttl`` is not a positive number or a
            pruning setting is not a positive int.
        StorageError: the file cannot be opened, is not a payi_guard ledger, or was
            written by another layout.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        lock_timeout: float = DEFAULT_POOL_TIMEOUT,
        synchronous: str = "normal",
        closed_ttl: float = DEFAULT_CLOSED_TTL,
        prune_every: int = 8,
        prune_batch: int = 64,
    ) -> None:
        settings = make_settings(
            timeout, lock_timeout, synchronous, closed_ttl, prune_every, prune_batch
        )
        self._ops = Operations(database_file(path), settings)
        self._ops.store.setup()

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self._ops.store.path)

    def __repr__(self) -> str:
        return f"SqliteLedger({self._ops.store.path!r})"

    def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Reserve every charge or none, in one write transaction.

        Args:
            reservation_id: a fresh id naming this reservation (reserving an id that is
                open on a counter replaces its amount there).
            charges: one per counter (each key at most once).
            now: the current time, epoch seconds.
            ttl: seconds the reservation holds budget if it is never committed.
            tallies: added in the same transaction when the reserve refuses.

        Returns:
            The outcome; when refused, no total changed (the counter that refused
            records what it needed, as :class:`~payi_guard.ledger.MemoryLedger` does).

        Raises:
            ValueError: on invalid input (see :class:`~payi_guard.ledger.MemoryLedger`).
            StorageError: the file could not be locked in time or SQLite failed.
        """
        started = time.monotonic()
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_ttl(ttl)
        check_tallies(tallies)
        return self._ops.reserve(reservation_id, charges, now, ttl, started, tallies)

    def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Close the reservation where it is open and add the actual amounts (one transaction).

        Args:
            reservation_id: the id given to :meth:`reserve` (or any id for a record).
            charges: the actual amounts, on the keys that were reserved (``max`` ignored).
            now: the current time, epoch seconds.
            tallies: added in the same transaction when it closes the id somewhere.

        Returns:
            The state of each counter after the commit.

        Raises:
            ValueError: on invalid input.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        started = time.monotonic()
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_tallies(tallies)
        return self._ops.commit(reservation_id, charges, now, started, tallies)

    def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Return the fields of each tally (a missing or expired one is empty).

        Raises:
            ValueError: on invalid input.
            StorageError: SQLite failed.
        """
        check_keys(keys)
        check_now(now)
        return self._ops.read_tallies(keys, now)

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything (a commit of zero).

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the release.

        Raises:
            ValueError: on invalid input.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        started = time.monotonic()
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        return self._ops.release(reservation_id, keys, now, started)

    def renew(self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float) -> bool:
        """Keep an open reservation for ``ttl`` more seconds (a long stream calls this).

        The deadline becomes ``now + ttl`` on each key where the reservation is still
        open (it is never shortened); a reservation that expired is not revived, since
        its budget may already be reserved by someone else.

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.
            ttl: seconds from ``now``.

        Returns:
            True if the reservation was open on every key.

        Raises:
            ValueError: on invalid input.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        return self.renew_many([(reservation_id, keys)], now=now, ttl=ttl)[0]

    def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """:meth:`renew` each ``(reservation_id, keys)`` pair, in one write transaction.

        Returns:
            One flag per pair, in order: True when that reservation was still open on
            every one of its keys.

        Raises:
            ValueError: on a malformed pair, an id given twice, or an invalid time or ttl.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        started = time.monotonic()
        check_renew(reservations, now, ttl)
        return self._ops.renew_many(reservations, now, ttl, started)

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing or expired counters are zero).

        Args:
            keys: the counters to read (one consistent snapshot).
            now: the current time, epoch seconds.

        Returns:
            One state per key, in order.

        Raises:
            ValueError: on invalid input.
            StorageError: SQLite failed.
        """
        check_keys(keys)
        check_now(now)
        return self._ops.read(keys, now)

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        r"""Return the keys of the live counters that match a Redis glob pattern.

        One read transaction over the keys that start with the pattern's literal
        prefix (an index range), matched with Redis' glob rules.

        Args:
            match: a Redis glob (``pg:{u:*``; ``*``, ``?``, ``[...]``, ``\`` escapes).
            now: the current time, epoch seconds: expired counters are not listed.
            limit: the most keys returned, or ``None``.

        Returns:
            The matching keys, each once, in no particular order.

        Raises:
            ValueError: on an empty pattern, a ``limit`` that is not a positive int or a
                non-finite time.
            StorageError: SQLite failed.
        """
        check_scan(match, limit)
        check_now(now)
        return self._ops.scan(match, now, limit)

    def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Apply every adjustment or none and journal them, in one write transaction.

        See :meth:`payi_guard.ledger.Ledger.adjust`.

        Raises:
            ValueError: on invalid input or a counter that would go out of range.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        started = time.monotonic()
        check_adjust(adjustments, now, journal, keep, journal_expires_at)
        return self._ops.adjust(adjustments, now, journal, keep, journal_expires_at, started)

    def read_journal(self, journal: str, *, now: float, limit: int) -> tuple[JournalEntry, ...]:
        """Return the ``limit`` newest entries of ``journal``, newest first.

        Raises:
            ValueError: on invalid input.
            StorageError: SQLite failed.
        """
        check_journal_read(journal, now, limit)
        return self._ops.read_journal(journal, now, limit)

    def prune(self, now: float) -> int:
        """Delete every counter past its expiry now (writes also do it a batch at a time).

        Args:
            now: the current time, epoch seconds.

        Returns:
            The number of counters deleted.

        Raises:
            ValueError: on a non-finite time.
            StorageError: the file could not be locked in time or SQLite failed.
        """
        check_now(now)
        return self._ops.store.prune_all(now)

    def close(self) -> None:
        """Close the pooled connections (the ledger reopens them if used again)."""
        self._ops.store.close()


def missing_sqlite_file(uri: str) -> Path | None:
    """The file a ``sqlite://`` URI names, when there is none (an app creates it).

    A command that only reads or changes what an app spent checks this first: opening
    the ledger would create an empty file at a mistyped path, and every answer would
    then be about nobody.

    Args:
        uri: a storage URI (an absolute ``sqlite:////...`` one, as a Guard holds it).

    Returns:
        The path when ``uri`` is a ``sqlite://`` URI whose file does not exist; ``None``
        for one that exists and for any other URI.
    """
    if not uri.startswith("sqlite:"):
        return None
    path, _ = parse_sqlite_uri(uri)
    return None if path.exists() else path


def open_sqlite_ledger(
    uri: str, *, base_dir: str | os.PathLike[str] | None = None, **options: Any
) -> SqliteLedger:
    """Open a :class:`SqliteLedger` from a ``sqlite://`` URI.

    Used by :func:`payi_guard.ledger.factory.open_ledger`.

    Args:
        uri: ``sqlite:///relative.db`` or ``sqlite:////absolute.db`` (with options).
        base_dir: the folder a relative path is relative to (default: the current one).
        **options: :class:`SqliteLedger` arguments; they override the URI's options.

    Raises:
        ConfigError: the URI or an option is wrong.
        StorageError: the file cannot be opened.
    """
    path, query = parse_sqlite_uri(uri, base_dir=base_dir)
    return SqliteLedger(path, **{**query, **_known(options, _SYNC_OPTIONS)})


def open_async_sqlite_ledger(
    uri: str, *, base_dir: str | os.PathLike[str] | None = None, **options: Any
) -> AsyncSqliteLedger:
    """Open an :class:`AsyncSqliteLedger` from a ``sqlite://`` URI (nothing is opened yet).

    Args:
        uri: as for :func:`open_sqlite_ledger`.
        base_dir: as for :func:`open_sqlite_ledger`.
        **options: :class:`AsyncSqliteLedger` arguments; they override the URI's options.

    Raises:
        ConfigError: the URI or an option is wrong.
    """
    path, query = parse_sqlite_uri(uri, base_dir=base_dir)
    return AsyncSqliteLedger(path, **{**query, **_known(options, _ASYNC_OPTIONS)})


def _known(options: Mapping[str, Any], accepted: tuple[str, ...]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"sqlite:// storage does not accept the option(s) {', '.join(unknown)} "
            f"(accepted: {', '.join(accepted)})"
        )
    return dict(options)
