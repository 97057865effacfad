"""The ledger's operator operations, ``adjust`` and ``read_journal``, on every backend."""

from __future__ import annotations

import asyncio
import inspect
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from ledger._support import LedgerAdapter
from payi_guard.clock import FakeClock
from payi_guard.ledger import (
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    SqliteLedger,
)
from payi_guard.ledger._sqlite_sql import APPLICATION_ID, SCHEMA, SCHEMA_VERSION

DAY = 86_400
WINDOW = 1_795_737_600
MAX_UNITS = 2**53 - 1


async def adjust(
    backend: LedgerAdapter,
    adjustments: Sequence[Adjustment],
    *,
    now: float,
    journal: str,
    keep: int = 50,
    journal_expires_at: float | None = None,
) -> tuple[JournalEntry, ...]:
    until = now + 90 * DAY if journal_expires_at is None else journal_expires_at
    ledger: Any = backend.ledger  # sync or async: the answer is awaited when it must be
    result = ledger.adjust(
        adjustments, now=now, journal=journal, keep=keep, journal_expires_at=until
    )
    entries: tuple[JournalEntry, ...] = await result if inspect.isawaitable(result) else result
    return entries


async def read_journal(
    backend: LedgerAdapter, journal: str, *, now: float, limit: int = 50
) -> tuple[JournalEntry, ...]:
    ledger: Any = backend.ledger
    result = ledger.read_journal(journal, now=now, limit=limit)
    entries: tuple[JournalEntry, ...] = await result if inspect.isawaitable(result) else result
    return entries


def key(prefix: str, owner: str, unit: str = "usd", per: str = "day") -> str:
    return f"{prefix}:{{u:{owner}}}:{unit}:{per}:{WINDOW}"


def journal_of(prefix: str, owner: str) -> str:
    return f"{prefix}:{{u:{owner}}}:adjustments"


@pytest.fixture
def k1(key_prefix: str) -> str:
    return key(key_prefix, "alice")


@pytest.fixture
def k2(key_prefix: str) -> str:
    return key(key_prefix, "alice", "requests")


@pytest.fixture
def j1(key_prefix: str) -> str:
    return journal_of(key_prefix, "alice")


def expiry(clock: FakeClock) -> float:
    return clock.now() + 2 * DAY


async def test_an_adjustment_adds_to_settled_and_is_journaled(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 300, None, exp)], now=now)
    entries = await adjust(backend, [Adjustment(k1, 500, exp, "more")], now=now, journal=j1)
    assert entries == (JournalEntry(now, k1, 500, 800, 0, "more"),)
    assert await backend.read([k1], now=now) == (CounterState(800, 0),)
    assert await read_journal(backend, j1, now=now) == entries


async def test_a_negative_adjustment_gives_budget_back_even_below_zero(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 300, None, exp)], now=now)
    (entry,) = await adjust(backend, [Adjustment(k1, -500, exp)], now=now, journal=j1)
    assert (entry.amount, entry.settled) == (-500, -200)
    # A credit: the user can now reserve the whole max and 200 more.
    fits = await backend.reserve("r1", [Charge(k1, 1200, 1000, exp)], now=now, ttl=60)
    assert fits.ok
    assert fits.states == (CounterState(-200, 1200),)
    refused = await backend.reserve("r2", [Charge(k1, 1, 1000, exp)], now=now, ttl=60)
    assert not refused.ok


async def test_a_reset_zeroes_settled_and_leaves_open_reservations(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 700, None, exp), Charge(k2, 3, None, exp)], now=now)
    await backend.reserve("r1", [Charge(k1, 200, 1000, exp)], now=now, ttl=60)
    entries = await adjust(
        backend, [Adjustment(k1, None, exp), Adjustment(k2, None, exp)], now=now, journal=j1
    )
    assert [(e.amount, e.settled, e.pending) for e in entries] == [(-700, 0, 200), (-3, 0, 0)]
    assert await backend.read([k1, k2], now=now) == (CounterState(0, 200), CounterState(0, 0))
    # The call in flight still settles into the reset window.
    assert await backend.commit("r1", [Charge(k1, 150, None, exp)], now=now) == (
        CounterState(150, 0),
    )
    # Newest first; the entries of one call in reverse order of the call.
    assert [e.key for e in await read_journal(backend, j1, now=now)] == [k2, k1]


async def test_an_adjustment_may_push_a_counter_past_max_which_then_refuses(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    (entry,) = await adjust(backend, [Adjustment(k1, 1500, exp)], now=now, journal=j1)
    assert entry.settled == 1500  # above a max of 1000: the operator meant it
    refused = await backend.reserve("r1", [Charge(k1, 1, 1000, exp)], now=now, ttl=60)
    assert not refused.ok
    assert refused.states == (CounterState(1500, 0, refused=1),)
    # Given back below max: the next call fits, and the refusal is cleared.
    await adjust(backend, [Adjustment(k1, -600, exp)], now=now, journal=j1)
    assert await backend.read([k1], now=now) == (CounterState(900, 0, refused=1),)
    assert (await backend.reserve("r2", [Charge(k1, 1, 1000, exp)], now=now, ttl=60)).ok
    assert await backend.read([k1], now=now) == (CounterState(900, 1),)


async def test_zero_and_resets_of_missing_counters_create_nothing(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, k1: str, k2: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    entries = await adjust(
        backend, [Adjustment(k1, 0, exp), Adjustment(k2, None, exp)], now=now, journal=j1
    )
    assert [(e.amount, e.settled) for e in entries] == [(0, 0), (0, 0)]
    assert await backend.scan(f"{key_prefix}:*", now=now) == []
    assert len(await read_journal(backend, j1, now=now)) == 2  # the operator's act is kept


async def test_out_of_range_refuses_the_whole_call(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await adjust(backend, [Adjustment(k2, MAX_UNITS, exp)], now=now, journal=j1)
    with pytest.raises(ValueError, match="adjustment 1: the counter would hold"):
        await adjust(backend, [Adjustment(k1, 5, exp), Adjustment(k2, 1, exp)], now=now, journal=j1)
    assert await backend.read([k1, k2], now=now) == (CounterState(0, 0), CounterState(MAX_UNITS, 0))
    assert len(await read_journal(backend, j1, now=now)) == 1
    (low,) = await adjust(backend, [Adjustment(k1, -MAX_UNITS, exp)], now=now, journal=j1)
    assert low.settled == -MAX_UNITS
    with pytest.raises(ValueError, match="adjustment 0"):
        await adjust(backend, [Adjustment(k1, -1, exp)], now=now, journal=j1)


async def test_a_journal_keeps_its_newest_entries(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    for step in range(6):
        await adjust(backend, [Adjustment(k1, 1, exp, f"n{step}")], now=now, journal=j1, keep=4)
    notes = [e.note for e in await read_journal(backend, j1, now=now)]
    assert notes == ["n5", "n4", "n3", "n2"]
    assert [e.note for e in await read_journal(backend, j1, now=now, limit=2)] == ["n5", "n4"]
    assert await read_journal(backend, journal_of(j1.split(":")[0], "bob"), now=now) == ()


async def test_notes_are_kept_verbatim(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    note = '{"reason": "tab\\there", "by": "ops"}\tand a raw tab, ünïcode, "quotes"'
    await adjust(backend, [Adjustment(k1, 1, expiry(clock), note)], now=clock.now(), journal=j1)
    (entry,) = await read_journal(backend, j1, now=clock.now())
    assert entry.note == note


async def test_adjust_refuses_malformed_calls(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    other = key(key_prefix, "bob")
    cases: list[tuple[list[Adjustment], str, int, str]] = [
        ([], j1, 5, "at least one"),
        ([Adjustment(other, 1, exp)], j1, 5, "same"),
        ([Adjustment(k1, 1, exp), Adjustment(k1, 2, exp)], j1, 5, "only once"),
        ([Adjustment(k1, 1.5, exp)], j1, 5, "amount"),  # type: ignore[arg-type]
        ([Adjustment(k1, True, exp)], j1, 5, "amount"),
        ([Adjustment(k1, MAX_UNITS + 1, exp)], j1, 5, "amount"),
        ([Adjustment(k1, 1, float("nan"))], j1, 5, "expires_at"),
        ([Adjustment(k1, 1, 10**400)], j1, 5, "expires_at"),
        ([Adjustment(k1, 1, exp, "x" * 5000)], j1, 5, "note"),
        ([Adjustment(k1, 1, exp)], "no-tag", 5, "hash tag"),
        ([Adjustment(k1, 1, exp)], j1, 0, "keep"),
        ([Adjustment(k1, 1, exp)], k1, 5, "journal cannot"),
    ]
    for adjustments, journal, keep, message in cases:
        with pytest.raises(ValueError, match=message):
            await adjust(backend, adjustments, now=now, journal=journal, keep=keep)
    assert await backend.read([k1], now=now) == (CounterState(0, 0),)
    with pytest.raises(ValueError, match="limit"):
        await read_journal(backend, j1, now=now, limit=0)


async def test_a_journal_expires(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await adjust(
        backend, [Adjustment(k1, 1, exp)], now=now, journal=j1, journal_expires_at=now + 60
    )
    if backend.raw is not None:  # Redis expires it by its own clock, relative to now
        ttl = backend.raw.pttl(j1)
        assert 55_000 < ttl <= 60_000
        return
    assert len(await read_journal(backend, j1, now=now + 59)) == 1
    assert await read_journal(backend, j1, now=now + 60) == ()


async def test_a_later_write_extends_a_journal_never_shortens_it(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await adjust(
        backend, [Adjustment(k1, 1, exp)], now=now, journal=j1, journal_expires_at=now + 600
    )
    await adjust(
        backend, [Adjustment(k1, 1, exp)], now=now, journal=j1, journal_expires_at=now + 60
    )
    if backend.raw is not None:
        assert backend.raw.pttl(j1) > 500_000
        return
    assert len(await read_journal(backend, j1, now=now + 300)) == 2


async def test_an_adjustment_creates_a_counter_that_expires_with_its_window(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now = clock.now()
    await adjust(backend, [Adjustment(k1, 5, now + 100)], now=now, journal=j1)
    if backend.raw is not None:
        assert 0 < backend.raw.pttl(k1) <= 100_000
        return
    assert await backend.read([k1], now=now + 99) == (CounterState(5, 0),)
    assert await backend.read([k1], now=now + 100) == (CounterState(0, 0),)


async def test_concurrent_adjustments_lose_no_update(
    backend: LedgerAdapter, clock: FakeClock, k1: str, j1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    amounts = [7 if n % 3 else -5 for n in range(60)]

    async def one(amount: int) -> None:
        ledger = backend.ledger
        if not inspect.iscoroutinefunction(ledger.adjust):
            await asyncio.to_thread(
                ledger.adjust,
                [Adjustment(k1, amount, exp)],
                now=now,
                journal=j1,
                keep=1000,
                journal_expires_at=now + DAY,
            )
        else:
            await adjust(backend, [Adjustment(k1, amount, exp)], now=now, journal=j1, keep=1000)

    await asyncio.gather(*(one(amount) for amount in amounts))
    assert await backend.read([k1], now=now) == (CounterState(sum(amounts), 0),)
    journal = await read_journal(backend, j1, now=now, limit=1000)
    assert len(journal) == len(amounts)
    # In journal order, each adjustment started from where the one before it ended: the
    # journal is written in the same atomic step, so it is the order they were applied in.
    chain = [0]
    for entry in reversed(journal):
        assert entry.settled - entry.amount == chain[-1]
        chain.append(entry.settled)
    assert chain[-1] == sum(amounts)


# -- SQLite layout ----------------------------------------------------------------------------


def test_a_layout_1_file_gains_the_journal_and_keeps_its_counters(
    tmp_path: Path, clock: FakeClock
) -> None:
    db = tmp_path / "old.db"
    now, exp = clock.now(), expiry(clock)
    k = key("pg", "alice")
    conn = sqlite3.connect(db)  # a file the first layout wrote
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in SCHEMA:
        conn.execute(statement)
    conn.execute("INSERT INTO counters VALUES (?, 250, 0, ?)", (k, exp))
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()
    second = SqliteLedger(db)
    assert second.read([k], now=now) == (CounterState(250, 0),)
    second.adjust(
        [Adjustment(k, None, exp)],
        now=now,
        journal=journal_of("pg", "alice"),
        keep=5,
        journal_expires_at=now + DAY,
    )
    assert second.read([k], now=now) == (CounterState(0, 0),)
    second.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()


def test_pruning_drops_expired_journals(tmp_path: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(tmp_path / "b.db")
    now = clock.now()
    k, j = key("pg", "alice"), journal_of("pg", "alice")
    ledger.adjust(
        [Adjustment(k, 1, now + 10)], now=now, journal=j, keep=5, journal_expires_at=now + 20
    )
    ledger.prune(now + 30)
    conn = sqlite3.connect(tmp_path / "b.db")
    assert conn.execute("SELECT count(*) FROM journal").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM counters").fetchone() == (0,)
    conn.close()
    ledger.close()
