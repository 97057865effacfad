"""The engine under the SQLite ledger: schema, connections, one transaction per operation.

:mod:`payi_guard.ledger.sqlite` holds the public classes and documents the semantics;
this module is the part that talks to SQLite. Every operation is a function of one open
connection, run either in a write transaction (``BEGIN IMMEDIATE``) by
:meth:`Store.write` or in a read transaction by :meth:`Store.read`.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``application_id`` =
:data:`APPLICATION_ID`)::

    counters(key PRIMARY KEY, settled, pending, expires_at)      -- one row per counter
    holds(key, rid, amount, deadline, open, PRIMARY KEY (key, rid))
        -- open = 1: reservation ``rid`` holds ``amount`` on ``key`` until ``deadline``;
        -- open = 0: a tombstone (``rid`` was settled on ``key``), kept until ``deadline``
    index counters(expires_at)   -- pruning of past windows
    index holds(key, deadline)   -- purging of expired reservations

``pending`` is the sum of the open holds of a counter, kept in the row (as Redis keeps
field ``p``) so that a reserve reads one row per key; holds whose deadline has passed
are subtracted on the fly and deleted by the next write that touches their counter.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from payi_guard.exceptions import StorageError
from payi_guard.ledger._glob import glob_regex, literal_prefix
from payi_guard.ledger.base import Charge, CounterState, ReserveResult

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "Settings", "Store"]

T = TypeVar("T")

SCHEMA_VERSION = 1
"""``PRAGMA user_version`` of the layout this module writes."""

APPLICATION_ID = 0x70677264
"""``PRAGMA application_id`` of a payi_guard ledger file ("pgrd")."""

_SCHEMA = (
    """CREATE TABLE counters (
        key TEXT PRIMARY KEY NOT NULL,
        settled INTEGER NOT NULL,
        pending INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX counters_by_expiry ON counters (expires_at)",
    """CREATE TABLE holds (
        key TEXT NOT NULL,
        rid TEXT NOT NULL,
        amount INTEGER NOT NULL,
        deadline REAL NOT NULL,
        open INTEGER NOT NULL,
        PRIMARY KEY (key, rid)
    ) WITHOUT ROWID""",
    "CREATE INDEX holds_by_deadline ON holds (key, deadline)",
)

# One row per key: the totals, what expired holds still count in ``pending`` (NULL when
# no hold or tombstone of the key has expired, so the purge can be skipped), and the
# state of reservation ?2 on the key if it has not expired (open 1, tombstone 0, NULL).
_STATE = """
SELECT c.settled, c.pending, c.expires_at,
       (SELECT sum(x.amount * x.open) FROM holds AS x WHERE x.key = ?1 AND x.deadline <= ?3),
       h.open, h.amount
FROM counters AS c
LEFT JOIN holds AS h ON h.key = ?1 AND h.rid = ?2 AND h.deadline > ?3
WHERE c.key = ?1
"""
_READ = """
SELECT c.settled,
       c.pending - coalesce((SELECT sum(x.amount * x.open) FROM holds AS x
                             WHERE x.key = ?1 AND x.deadline <= ?2), 0)
FROM counters AS c WHERE c.key = ?1 AND c.expires_at > ?2
"""
_PURGE = "DELETE FROM holds WHERE key = ?1 AND deadline <= ?2"
_DROP_HOLDS = "DELETE FROM holds WHERE key = ?1"
_DROP_HOLD = "DELETE FROM holds WHERE key = ?1 AND rid = ?2"
_PUT_COUNTER = """
INSERT INTO counters (key, settled, pending, expires_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (key) DO UPDATE SET
    settled = excluded.settled, pending = excluded.pending, expires_at = excluded.expires_at
"""
_SET_COUNTER = "UPDATE counters SET settled = ?2, pending = ?3, expires_at = ?4 WHERE key = ?1"
_PUT_HOLD = """
INSERT INTO holds (key, rid, amount, deadline, open) VALUES (?1, ?2, ?3, ?4, ?5)
ON CONFLICT (key, rid) DO UPDATE SET
    amount = excluded.amount, deadline = excluded.deadline, open = excluded.open
"""
_RENEW = """
UPDATE holds SET deadline = max(deadline, ?4)
WHERE key = ?1 AND rid = ?2 AND open = 1 AND deadline > ?3
  AND EXISTS (SELECT 1 FROM counters WHERE key = ?1 AND expires_at > ?3)
"""
_DUE = "SELECT key FROM counters WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
_DROP_COUNTER = "DELETE FROM counters WHERE key = ?1"

_ZERO = CounterState(0, 0)
_SETUP_TIMEOUT = 5.0
"""Seconds the one-time schema setup may wait for other processes opening the file."""
_MAX_IDLE = 32
"""Idle connections a store keeps for reuse (each holds three file descriptors)."""
_FIRST_DELAY = 0.0001
_MAX_DELAY = 0.001
"""Backoff while another process holds the file (SQLite's own busy handler would first
sleep 1 ms, then 2, 5, 10, ... ms: far longer than the ~100 µs a transaction holds it)."""


class Settings:
    """The tunables of a :class:`Store` (validated by the public classes)."""

    __slots__ = (
        "idempotent",
        "lock_timeout",
        "prune_batch",
        "prune_every",
        "synchronous",
        "timeout",
        "tombstone_ttl",
    )

    def __init__(
        self,
        *,
        timeout: float,
        lock_timeout: float,
        synchronous: str,
        idempotent: bool,
        tombstone_ttl: float,
        prune_every: int,
        prune_batch: int,
    ) -> None:
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.synchronous = synchronous
        self.idempotent = idempotent
        self.tombstone_ttl = tombstone_ttl
        self.prune_every = prune_every
        self.prune_batch = prune_batch


# -- process-wide state: one writer lock per file, reset in a forked child -------------------

_registry_lock = threading.Lock()
_writer_locks: dict[str, threading.Lock] = {}
_fork_generation = 0
# Connections inherited through fork() are never used nor closed in the child (SQLite
# forbids carrying a connection across fork); they are kept here so that garbage
# collection does not close them either.
_abandoned: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    global _registry_lock, _fork_generation
    _registry_lock = threading.Lock()
    _writer_locks.clear()
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _writer_lock(path: str) -> threading.Lock:
    """The lock the writers of this process take before ``BEGIN IMMEDIATE`` on ``path``.

    The threads of one process queue on it (woken in turn, no polling) instead of in
    SQLite's busy handler, which polls with sleeps of up to 100 ms; only one thread per
    process then competes for the file's write lock with the other processes.
    """
    with _registry_lock:
        lock = _writer_locks.get(path)
        if lock is None:
            lock = _writer_locks[path] = threading.Lock()
        return lock


# -- operations (each runs inside one transaction) ------------------------------------------

_Row = tuple[int, int, float, "int | None", "int | None", "int | None"]
"""settled, pending, expires_at, expired (see ``_STATE``), hold open, hold amount."""


def _state(conn: sqlite3.Connection, key: str, rid: str, now: float) -> tuple[_Row | None, bool]:
    """The row of ``key`` (or None) and whether it is live (not past its expiry)."""
    row: _Row | None = conn.execute(_STATE, (key, rid, now)).fetchone()
    return row, row is not None and row[2] > now


def _held(row: _Row) -> int:
    """What the reservation of the ``_STATE`` query holds on the row's counter."""
    return (row[5] or 0) if row[4] == 1 else 0


def reserve(
    conn: sqlite3.Connection, rid: str, charges: Sequence[Charge], now: float, deadline: float
) -> tuple[ReserveResult, bool]:
    """Reserve every charge or none; the flag says whether to commit the transaction."""
    found = [_state(conn, charge.key, rid, now) for charge in charges]
    states: list[CounterState] = []
    refused: int | None = None
    for index, (charge, (row, live)) in enumerate(zip(charges, found, strict=True)):
        used = 0
        if row is None or not live:  # missing, or past its expiry: counts as zero
            states.append(_ZERO)
        else:
            state = CounterState(row[0], row[1] - (row[3] or 0))
            states.append(state)
            # An id already open here is replaced: its old amount does not count.
            used = state.used - _held(row)
        if refused is None and charge.max is not None and used + charge.amount > charge.max:
            refused = index
    if refused is not None:
        return ReserveResult(False, refused, tuple(states)), False
    out: list[CounterState] = []
    for charge, (row, live), state in zip(charges, found, states, strict=True):
        key = charge.key
        if row is None or not live:
            if row is not None:  # a past window's row: start afresh
                conn.execute(_DROP_HOLDS, (key,))
            conn.execute(_PUT_COUNTER, (key, 0, charge.amount, charge.expires_at))
            new = CounterState(0, charge.amount)
        else:
            if row[3] is not None:
                conn.execute(_PURGE, (key, now))
            new = CounterState(state.settled, state.pending - _held(row) + charge.amount)
            expires_at = max(row[2], charge.expires_at)
            conn.execute(_SET_COUNTER, (key, new.settled, new.pending, expires_at))
        conn.execute(_PUT_HOLD, (key, rid, charge.amount, deadline, 1))
        out.append(new)
    return ReserveResult(True, None, tuple(out)), True


def settle(
    conn: sqlite3.Connection,
    rid: str,
    charges: Sequence[Charge],
    now: float,
    tombstone_until: float | None,
) -> tuple[tuple[CounterState, ...], bool]:
    """Close ``rid`` where it is open and add the amounts (a release adds zeros).

    With ``tombstone_until`` (idempotent mode) each counter keeps a tombstone of ``rid``
    until then, and a counter that already has one is left alone.
    """
    out: list[CounterState] = []
    wrote = False
    for charge in charges:
        key, amount = charge.key, charge.amount
        row, live = _state(conn, key, rid, now)
        if row is None or not live:
            if amount == 0:  # nothing to add: create nothing
                out.append(_ZERO)
                continue
            if row is not None:  # a past window's row: start afresh
                conn.execute(_DROP_HOLDS, (key,))
            conn.execute(_PUT_COUNTER, (key, amount, 0, charge.expires_at))
            if tombstone_until is not None:
                conn.execute(_PUT_HOLD, (key, rid, 0, tombstone_until, 0))
            out.append(CounterState(amount, 0))
            wrote = True
            continue
        settled, pending = row[0], row[1] - (row[3] or 0)
        if tombstone_until is not None and row[4] == 0:  # settled here before: a retry
            out.append(CounterState(settled, pending))
            continue
        if row[3] is not None:
            conn.execute(_PURGE, (key, now))
        pending -= _held(row)
        if tombstone_until is not None:
            conn.execute(_PUT_HOLD, (key, rid, 0, tombstone_until, 0))
        elif row[4] is not None:
            conn.execute(_DROP_HOLD, (key, rid))
        settled += amount
        # Only an actual charge extends a counter's life (as in the memory ledger).
        expires_at = max(row[2], charge.expires_at) if amount else row[2]
        conn.execute(_SET_COUNTER, (key, settled, pending, expires_at))
        out.append(CounterState(settled, pending))
        wrote = True
    return tuple(out), wrote


def renew(
    conn: sqlite3.Connection, rid: str, keys: Sequence[str], now: float, deadline: float
) -> tuple[bool, bool]:
    """Push the deadline of ``rid`` on ``keys`` to ``deadline``; True if open on them all."""
    renewed = sum(conn.execute(_RENEW, (key, rid, now, deadline)).rowcount for key in keys)
    return renewed == len(keys), renewed > 0


def read(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> tuple[CounterState, ...]:
    """The state of each counter (missing or past its expiry: zero)."""
    out: list[CounterState] = []
    for key in keys:
        row = conn.execute(_READ, (key, now)).fetchone()
        out.append(_ZERO if row is None else CounterState(row[0], row[1]))
    return tuple(out)


def _upper_bound(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (or None)."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded: skip them
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


def scan(conn: sqlite3.Connection, match: str, now: float, limit: int | None) -> list[str]:
    """The live counters whose key matches the Redis glob ``match``."""
    regex = glob_regex(match)
    prefix = literal_prefix(match)
    upper = _upper_bound(prefix)
    if upper is None:
        cursor = conn.execute(
            "SELECT key FROM counters WHERE key >= ?1 AND expires_at > ?2", (prefix, now)
        )
    else:
        cursor = conn.execute(
            "SELECT key FROM counters WHERE key >= ?1 AND key < ?2 AND expires_at > ?3",
            (prefix, upper, now),
        )
    found: list[str] = []
    for (key,) in cursor:
        if regex.fullmatch(key) is not None:
            found.append(key)
            if limit is not None and len(found) >= limit:
                break
    cursor.close()
    return found


def prune(conn: sqlite3.Connection, now: float, batch: int) -> int:
    """Delete up to ``batch`` counters past their expiry, with their holds."""
    due = conn.execute(_DUE, (now, batch)).fetchall()
    if due:
        conn.executemany(_DROP_HOLDS, due)
        conn.executemany(_DROP_COUNTER, due)
    return len(due)


# -- connections and transactions -----------------------------------------------------------


def _is_busy(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return name.startswith("SQLITE_BUSY") or "locked" in str(exc)


class Store:
    """Connections to one database file and the transactions run on them.

    Connections are pooled: a thread takes one for the length of one transaction (an
    sqlite3 connection is never used by two threads at once), so a thread-per-request
    server does not keep a connection for every thread it ever ran.

    Args:
        path: the database file (absolute).
        settings: timeouts and tunables.
    """

    def __init__(self, path: str, settings: Settings) -> None:
        self.path = path
        self.settings = settings
        self._pool_lock = threading.Lock()
        self._idle: list[sqlite3.Connection] = []
        # A connection goes back to the pool only if it was taken in the same epoch:
        # close() and fork() start a new one.
        self._epoch = (_fork_generation, 0)
        self._writer = _writer_lock(path)
        self._ready = False
        self._writes = 0

    # -- connections -------------------------------------------------------------------------

    def _connect(self, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=timeout,  # 0 but for the setup: busy waits are retried by _busy_retry
            isolation_level=None,  # transactions are explicit: BEGIN IMMEDIATE ... COMMIT
            check_same_thread=False,  # pooled: one thread at a time, not always the same
            cached_statements=64,
        )
        try:
            conn.execute(f"PRAGMA synchronous = {self.settings.synchronous}")
            conn.execute("PRAGMA journal_size_limit = 8388608")
        except BaseException:
            conn.close()
            raise
        return conn

    def setup(self) -> None:
        """Create the schema if the file is new; check it is a ledger of this layout.

        Raises:
            StorageError: the file cannot be opened or is not a payi_guard ledger.
        """
        if self._ready:
            return
        try:
            conn = self._connect(max(_SETUP_TIMEOUT, self.settings.timeout))
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        try:
            # An existing ledger is only read here (a writer holding the file must not
            # delay opening it); a new file gets WAL mode and the schema.
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"SQLite ledger {self.path}: cannot use WAL mode (journal mode {mode!r}); "
                    "the file must be on a local file system"
                )
            if self._layout(conn) < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                if self._layout(conn) < SCHEMA_VERSION:  # nobody made it meanwhile
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error("open", exc) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
        self._ready = True

    def _layout(self, conn: sqlite3.Connection) -> int:
        """The file's layout version (0: an empty file); refuse foreign or newer files."""
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise StorageError(f"{self.path} is an SQLite file but not a payi_guard ledger")
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"SQLite ledger {self.path} has layout {version}, newer than this "
                f"payi_guard's ({SCHEMA_VERSION}): upgrade payi_guard"
            )
        return version

    def _take(self, op: str) -> tuple[sqlite3.Connection, tuple[int, int]]:
        with self._pool_lock:
            if self._epoch[0] != _fork_generation:
                # A forked child: the parent's connections must not be touched.
                _abandoned.extend(self._idle)
                self._idle = []
                self._writer = _writer_lock(self.path)
                self._epoch = (_fork_generation, 0)
            epoch = self._epoch
            if self._idle:
                return self._idle.pop(), epoch
        try:
            return self._connect(0.0), epoch
        except sqlite3.Error as exc:
            raise self._error(op, exc) from exc

    def _give(self, conn: sqlite3.Connection, epoch: tuple[int, int]) -> None:
        with self._pool_lock:
            if epoch == self._epoch and len(self._idle) < _MAX_IDLE:
                self._idle.append(conn)
                return
        if epoch[0] == _fork_generation:
            conn.close()

    def close(self) -> None:
        """Close the idle connections; those in use are closed when given back."""
        with self._pool_lock:
            idle, self._idle = self._idle, []
            self._epoch = (self._epoch[0], self._epoch[1] + 1)
        if self._epoch[0] == _fork_generation:
            for conn in idle:
                conn.close()

    # -- transactions ------------------------------------------------------------------------

    def _error(self, op: str, exc: BaseException) -> StorageError:
        if isinstance(exc, sqlite3.Error) and _is_busy(exc):
            return StorageError(
                f"SQLite ledger {op} failed: {self.path} stayed locked by another process "
                f"for more than {self.settings.timeout:g} s"
            )
        return StorageError(f"SQLite ledger {op} failed: {type(exc).__name__}: {exc}")

    def write(
        self,
        op: str,
        started: float,
        now: float,
        work: Callable[[sqlite3.Connection], tuple[T, bool]],
    ) -> T:
        """Run ``work`` in one write transaction; commit if it says so, else roll back.

        Args:
            op: the operation's name, for error messages.
            started: ``time.monotonic()`` when the call began (queueing counts).
            now: the caller's time, for pruning past windows.
            work: returns the result and whether anything is to be committed.

        Raises:
            StorageError: the file could not be locked in time or SQLite failed.
        """
        self.setup()
        conn, epoch = self._take(op)
        healthy = True
        try:
            writer = self._writer
            wait = self.settings.lock_timeout - (time.monotonic() - started)
            if not writer.acquire(True, max(wait, 0.0)):
                raise StorageError(
                    f"SQLite ledger {op} failed: waited more than "
                    f"{self.settings.lock_timeout:g} s for this process's other writers"
                )
            try:
                self._busy_retry(lambda: conn.execute("BEGIN IMMEDIATE"))
                try:
                    pruned = 0
                    self._writes += 1
                    if self._writes % self.settings.prune_every == 0:
                        pruned = prune(conn, now, self.settings.prune_batch)
                    result, keep = work(conn)
                    conn.execute("COMMIT" if keep or pruned else "ROLLBACK")
                    return result
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            finally:
                writer.release()
        except (sqlite3.Error, OverflowError) as exc:
            healthy = False
            raise self._error(op, exc) from exc
        finally:
            if healthy:
                self._give(conn, epoch)
            else:
                conn.close()

    def read(self, op: str, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in one read transaction (a consistent snapshot, no write lock).

        Raises:
            StorageError: SQLite failed.
        """
        self.setup()
        conn, epoch = self._take(op)
        healthy = True

        def snapshot() -> T:
            conn.execute("BEGIN")
            try:
                return work(conn)
            finally:
                conn.execute("COMMIT")

        try:
            return self._busy_retry(snapshot)
        except sqlite3.Error as exc:
            healthy = False
            raise self._error(op, exc) from exc
        finally:
            if healthy:
                self._give(conn, epoch)
            else:
                conn.close()

    def _busy_retry(self, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` until the file is not locked by another process, up to ``timeout``.

        Raises:
            sqlite3.OperationalError: still locked after ``timeout`` seconds.
        """
        deadline = 0.0
        delay = _FIRST_DELAY
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                now = time.monotonic()
                if not deadline:
                    deadline = now + self.settings.timeout
                elif now >= deadline:
                    raise
            # Jitter, so that waiting processes do not retry in step.
            pause = delay * (0.5 + random.random())  # noqa: S311 - not for security
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            delay = min(2 * delay, _MAX_DELAY)

    # -- helpers for the public classes --------------------------------------------------------

    def tombstone_until(self, now: float) -> float | None:
        """When a tombstone written at ``now`` expires, or None when commits add plainly."""
        return now + self.settings.tombstone_ttl if self.settings.idempotent else None

    def prune_all(self, now: float) -> int:
        """Delete every counter past its expiry, batch by batch (one transaction each)."""

        def batch(conn: sqlite3.Connection) -> tuple[int, bool]:
            dropped = prune(conn, now, 1000)
            return dropped, dropped > 0

        total = 0
        while True:
            dropped = self.write("prune", time.monotonic(), now, batch)
            total += dropped
            if dropped < 1000:
                return total
