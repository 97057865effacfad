"""The async SQLite ledger: :class:`AsyncSqliteLedger`, a thread pool of its own.

Its operations are those of :mod:`payi_guard.ledger.sqlite` (the same store code),
run in worker threads so that the event loop never waits on the file.
"""

from __future__ import annotations

import asyncio
import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from payi_guard.exceptions import StorageError
from payi_guard.ledger._adjust import check_adjust, check_journal_read
from payi_guard.ledger._checks import (
    check_charges,
    check_id,
    check_keys,
    check_now,
    check_renewals,
    check_scan,
    check_ttl,
)
from payi_guard.ledger._sqlite_ops import Operations, database_file, make_settings
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

__all__ = ["AsyncSqliteLedger", "check_renew"]

T = TypeVar("T")


def check_renew(reservations: Sequence[tuple[str, Sequence[str]]], now: float, ttl: float) -> None:
    check_renewals(reservations)
    check_now(now)
    check_ttl(ttl)


# -- async -----------------------------------------------------------------------------------


class AsyncSqliteLedger:
    """An :class:`~payi_guard.ledger.AsyncLedger` in an SQLite file; never blocks the loop.

    Every operation runs in a dedicated pool of ``workers`` threads (made on first use,
    shut down by :meth:`aclose`, made again if the ledger is used afterwards), so the
    event loop never waits on the file, and the pool bounds how many threads this ledger
    uses however many calls are in flight. It works from any event loop. The file is
    opened (and created) by the first operation, in the pool.

    A call cancelled while it waits still runs to its end in the pool (a transaction is
    never cut in half); a reservation made that way is freed by its ttl.

    Args:
        path: the database file.
        workers: threads in the pool.
        **options: as for :class:`SqliteLedger` (``timeout``, ``lock_timeout``,
            ``synchronous``, ``closed_ttl``, ``prune_every``, ``prune_batch``).

    Raises:
        ConfigError: an option has a wrong value.
        ValueError: ``path`` is empty or ``workers`` is not a positive int.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        workers: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
        lock_timeout: float = DEFAULT_POOL_TIMEOUT,
        synchronous: str = "normal",
        closed_ttl: float = DEFAULT_CLOSED_TTL,
        prune_every: int = 8,
        prune_batch: int = 64,
    ) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        settings = make_settings(
            timeout, lock_timeout, synchronous, closed_ttl, prune_every, prune_batch
        )
        self._ops = Operations(database_file(path), settings)
        self._workers = workers
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    @property
    def path(self) -> Path:
        """The database file."""
        return Path(self._ops.store.path)

    def __repr__(self) -> str:
        return f"AsyncSqliteLedger({self._ops.store.path!r}, workers={self._workers})"

    def _pool(self) -> ThreadPoolExecutor:
        executor = self._executor
        if executor is None:
            with self._lock:
                executor = self._executor
                if executor is None:
                    executor = self._executor = ThreadPoolExecutor(
                        self._workers, thread_name_prefix="payi-guard-sqlite"
                    )
        return executor

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool(), functools.partial(call, *args))
        except RuntimeError as exc:  # the pool was shut down by a concurrent aclose()
            raise StorageError(f"SQLite ledger is closing: {exc}") from exc
        return await future

    async def reserve(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Async :meth:`SqliteLedger.reserve` (same arguments, result and errors)."""
        started = time.monotonic()
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_ttl(ttl)
        check_tallies(tallies)
        return await self._run(
            self._ops.reserve, reservation_id, charges, now, ttl, started, tallies
        )

    async def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Async :meth:`SqliteLedger.commit` (same arguments, result and errors)."""
        started = time.monotonic()
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_tallies(tallies)
        return await self._run(self._ops.commit, reservation_id, charges, now, started, tallies)

    async def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Async :meth:`SqliteLedger.read_tallies` (same arguments, result and errors)."""
        check_keys(keys)
        check_now(now)
        return await self._run(self._ops.read_tallies, keys, now)

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`SqliteLedger.release` (same arguments, result and errors)."""
        started = time.monotonic()
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        return await self._run(self._ops.release, reservation_id, keys, now, started)

    async def renew(
        self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float
    ) -> bool:
        """Async :meth:`SqliteLedger.renew` (same arguments, result and errors)."""
        return (await self.renew_many([(reservation_id, keys)], now=now, ttl=ttl))[0]

    async def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """Async :meth:`SqliteLedger.renew_many` (same arguments, result and errors)."""
        started = time.monotonic()
        check_renew(reservations, now, ttl)
        return await self._run(self._ops.renew_many, reservations, now, ttl, started)

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`SqliteLedger.read` (same arguments, result and errors)."""
        check_keys(keys)
        check_now(now)
        return await self._run(self._ops.read, keys, now)

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Async :meth:`SqliteLedger.scan` (same arguments, result and errors)."""
        check_scan(match, limit)
        check_now(now)
        return await self._run(self._ops.scan, match, now, limit)

    async def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`SqliteLedger.adjust` (same arguments, result and errors)."""
        started = time.monotonic()
        check_adjust(adjustments, now, journal, keep, journal_expires_at)
        return await self._run(
            self._ops.adjust, adjustments, now, journal, keep, journal_expires_at, started
        )

    async def read_journal(
        self, journal: str, *, now: float, limit: int
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`SqliteLedger.read_journal` (same arguments, result and errors)."""
        check_journal_read(journal, now, limit)
        return await self._run(self._ops.read_journal, journal, now, limit)

    async def prune(self, now: float) -> int:
        """Async :meth:`SqliteLedger.prune` (same arguments, result and errors)."""
        check_now(now)
        return await self._run(self._ops.store.prune_all, now)

    async def aclose(self) -> None:
        """Wait for the running operations, stop the thread pool and close connections."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True)
        self._ops.store.close()
