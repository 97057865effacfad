"""Connections and transactions of the SQLite ledger.

:class:`Store` owns the connections to one file and runs each operation of
:mod:`payi_guard.ledger._sqlite_sql` in one transaction: a write transaction
(``BEGIN IMMEDIATE``) after taking this process's writer lock, or a read transaction.
It creates the schema of a new file, waits for other processes with a fine-grained
backoff bounded by ``timeout``, and keeps forked children away from their parent's
connections and locks.
"""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from payi_guard.exceptions import StorageError
from payi_guard.ledger._sqlite_sql import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, forget, prune
from payi_guard.ledger._sqlite_tally import prune_tallies

__all__ = ["Settings", "Store"]

T = TypeVar("T")

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
        "closed_ttl",
        "lock_timeout",
        "prune_batch",
        "prune_every",
        "synchronous",
        "timeout",
    )

    def __init__(
        self,
        *,
        timeout: float,
        lock_timeout: float,
        synchronous: str,
        closed_ttl: float,
        prune_every: int,
        prune_batch: int,
    ) -> None:
        self.timeout = timeout
        self.lock_timeout = lock_timeout
        self.synchronous = synchronous
        self.closed_ttl = closed_ttl
        self.prune_every = prune_every
        self.prune_batch = prune_batch


# -- process-wide state: one writer lock per file, reset in a forked child -------------------

_registry_lock = threading.Lock()
_writer_locks: dict[str, threading.Lock] = {}
_opening_locks: dict[str, threading.Lock] = {}
_fork_generation = 0
# Connections inherited through fork() are never used nor closed in the child (SQLite
# forbids carrying a connection across fork); they are kept here so that garbage
# collection does not close them either.
_abandoned: list[sqlite3.Connection] = []


def _after_fork_in_child() -> None:
    global _registry_lock, _fork_generation
    _registry_lock = threading.Lock()
    _writer_locks.clear()
    _opening_locks.clear()
    _fork_generation += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _process_lock(locks: dict[str, threading.Lock], path: str) -> threading.Lock:
    """The lock of ``path`` in ``locks``, one per file in this process (made on first use)."""
    with _registry_lock:
        lock = locks.get(path)
        if lock is None:
            lock = locks[path] = threading.Lock()
        return lock


def _opening_lock(path: str) -> threading.Lock:
    """The lock the threads of this process take to open ``path`` (schema and checks)."""
    return _process_lock(_opening_locks, path)


def _writer_lock(path: str) -> threading.Lock:
    """The lock the writers of this process take before ``BEGIN IMMEDIATE`` on ``path``.

    The threads of one process queue on it (each woken when the previous one is done)
    rather than all polling the file: only one thread per process competes for the
    file's write lock with the other processes.
    """
    return _process_lock(_writer_locks, path)


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
        # Closed ids this process wrote since it last forgot expired ones: it forgets at
        # least as many on its next pruning turn, so the closed table cannot outgrow
        # the ids closed within closed_ttl, whatever the size of the calls.
        self._closes = 0

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
            # The first statement reads the schema, which can find the file busy (a
            # process that died mid-write leaves the WAL index to be rebuilt).
            self._busy_retry(
                lambda: conn.execute(f"PRAGMA synchronous = {self.settings.synchronous}")
            )
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
        # The threads of this process open the file one at a time (the first one does
        # the work, the others find it done): only one of them competes with the other
        # processes for the lock a new file's schema needs. Writers of a ledger already
        # open do not hold this lock, so opening never waits for them.
        lock = _opening_lock(self.path)
        if not lock.acquire(True, max(_SETUP_TIMEOUT, self.settings.lock_timeout)):
            raise StorageError(
                f"SQLite ledger open failed: {self.path} is being opened by another thread "
                "of this process that has not finished"
            )
        try:
            if not self._ready:
                self._open()
        finally:
            lock.release()

    def _open(self) -> None:
        setup = max(_SETUP_TIMEOUT, self.settings.lock_timeout)
        try:
            conn = self._connect(setup)
        except sqlite3.Error as exc:
            raise self._error("open", exc, setup) from exc
        try:
            # An existing ledger is only read here (a writer holding the file must not
            # delay opening it); a new file gets WAL mode and the schema.
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                # New file opened by several processes: SQLite may not wait, so retry.
                mode = self._busy_retry(
                    lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone()[0], setup
                )
            if str(mode).lower() != "wal":
                raise StorageError(
                    f"SQLite ledger {self.path}: cannot use WAL mode (journal mode {mode!r}); "
                    "the file must be on a local file system"
                )
            if self._layout(conn) < SCHEMA_VERSION:
                conn.execute("BEGIN IMMEDIATE")
                layout = self._layout(conn)  # another process may have moved it meanwhile
                for statements in MIGRATIONS[layout:]:
                    for statement in statements:
                        conn.execute(statement)
                if layout < SCHEMA_VERSION:
                    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise self._error("open", exc, setup) from exc
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
        self._ready = True

    def _layout(self, conn: sqlite3.Connection) -> int:
        """The layout version (0: empty), read in one snapshot; refuse foreign or newer files."""
        app_id, version, tables = conn.execute(
            "SELECT a.application_id, v.user_version, (SELECT count(*) FROM sqlite_master)"
            " FROM pragma_application_id() AS a, pragma_user_version() AS v"
        ).fetchone()
        if app_id != APPLICATION_ID and (app_id != 0 or tables):
            raise StorageError(f"{self.path} is an SQLite file but not a payi_guard ledger")
        if int(version) > SCHEMA_VERSION:
            raise StorageError(
                f"SQLite ledger {self.path} has layout {version}, newer than this "
                f"payi_guard's ({SCHEMA_VERSION}): upgrade payi_guard"
            )
        return int(version)

    def _after_fork(self) -> None:
        """In a forked child, drop the parent's connections and lock (pool lock held)."""
        if self._epoch[0] != _fork_generation:
            _abandoned.extend(self._idle)
            self._idle = []
            self._writer = _writer_lock(self.path)
            self._epoch = (_fork_generation, 0)

    def _take(self, op: str) -> tuple[sqlite3.Connection, tuple[int, int]]:
        with self._pool_lock:
            self._after_fork()
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
            self._after_fork()
            idle, self._idle = self._idle, []
            self._epoch = (self._epoch[0], self._epoch[1] + 1)
        for conn in idle:
            conn.close()

    # -- transactions ------------------------------------------------------------------------

    def _error(self, op: str, exc: BaseException, waited: float | None = None) -> StorageError:
        if isinstance(exc, sqlite3.Error) and _is_busy(exc):
            seconds = self.settings.timeout if waited is None else waited
            return StorageError(
                f"SQLite ledger {op} failed: {self.path} stayed locked by another process "
                f"for more than {seconds:g} s"
            )
        return StorageError(f"SQLite ledger {op} failed: {type(exc).__name__}: {exc}")

    def write(
        self,
        op: str,
        started: float,
        now: float,
        work: Callable[[sqlite3.Connection], tuple[T, bool]],
        *,
        closes: int = 0,
    ) -> T:
        """Run ``work`` in one write transaction; commit if it says so, else roll back.

        Every ``prune_every`` writes it also deletes up to ``prune_batch`` counters past
        their expiry, and expired closed ids: ``prune_batch`` more than this process
        closed since its previous turn.

        Args:
            op: the operation's name, for error messages.
            started: ``time.monotonic()`` when the call began (queueing counts).
            now: the caller's time, for pruning past windows.
            work: returns the result and whether anything is to be committed.
            closes: how many closed ids ``work`` may write.

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
                # Queueing counts: the call waits lock_timeout in all, the file timeout
                # at most (it still tries once, which a file no one holds lets through).
                left = self.settings.lock_timeout - (time.monotonic() - started)
                busy = min(self.settings.timeout, max(left, 0.0))
                self._busy_retry(lambda: conn.execute("BEGIN IMMEDIATE"), busy)
                try:
                    pruned = 0
                    self._writes += 1
                    self._closes += closes
                    if self._writes % self.settings.prune_every == 0:
                        batch = self.settings.prune_batch
                        pruned = prune(conn, now, batch)
                        pruned += forget(conn, now, batch + self._closes)
                        pruned += prune_tallies(conn, now, batch)
                        self._closes = 0
                    result, keep = work(conn)
                    conn.execute("COMMIT" if keep or pruned else "ROLLBACK")
                    return result
                finally:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
            finally:
                writer.release()
        except (sqlite3.Error, OverflowError) as exc:
            # A connection that merely waited too long is fine; any other failure
            # may have left it in a bad state.
            healthy = isinstance(exc, sqlite3.Error) and _is_busy(exc)
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
            healthy = _is_busy(exc)
            raise self._error(op, exc) from exc
        finally:
            if healthy:
                self._give(conn, epoch)
            else:
                conn.close()

    def _busy_retry(self, attempt: Callable[[], T], timeout: float | None = None) -> T:
        """Run ``attempt`` until the file is not locked by another process, up to ``timeout``.

        ``timeout`` is the ``timeout`` setting when omitted.

        Raises:
            sqlite3.OperationalError: still locked after ``timeout`` seconds.
        """
        wait = self.settings.timeout if timeout is None else timeout
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
                    deadline = now + wait
                elif now >= deadline:
                    raise
            # Jitter, so that waiting processes do not retry in step.
            pause = delay * (0.5 + random.random())  # noqa: S311 - not for security
            time.sleep(min(pause, max(deadline - time.monotonic(), 0.0)))
            delay = min(2 * delay, _MAX_DELAY)

    # -- helpers for the public classes --------------------------------------------------------

    def prune_all(self, now: float) -> int:
        """Delete every counter, closed id and tally past its time.

        Batch by batch, one transaction each; returns the number of counters deleted.
        """

        def batch(conn: sqlite3.Connection) -> tuple[tuple[int, int], bool]:
            dropped, forgotten = prune(conn, now, 1000), forget(conn, now, 1000)
            forgotten = max(forgotten, prune_tallies(conn, now, 1000))
            return (dropped, forgotten), dropped + forgotten > 0

        total = 0
        while True:
            dropped, forgotten = self.write("prune", time.monotonic(), now, batch)
            total += dropped
            if dropped < 1000 and forgotten < 1000:
                return total
