"""What only the SQLite ledger has: URIs and paths, the file itself, locking and timeouts,
pruning, durability across reopening, closed ids, renew, fork safety.

The ledger semantics shared with memory and Redis are in ``test_contract.py``; many
processes on one file are in ``test_sqlite_stress.py``.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from ledger.test_state_machine import _run
from payi_guard.clock import FakeClock
from payi_guard.exceptions import ConfigError, StorageError
from payi_guard.ledger import (
    AsyncSqliteLedger,
    Charge,
    CounterState,
    Ledger,
    SqliteLedger,
    open_async_ledger,
    open_ledger,
)
from payi_guard.ledger._sqlite_sql import APPLICATION_ID, MIGRATIONS
from payi_guard.ledger.factory import resolve_storage_uri
from payi_guard.ledger.sqlite import parse_sqlite_uri, resolve_sqlite_uri

K1 = "pg:{u:alice}:usd:day:1795737600"
K2 = "pg:{o:acme}:usd:month:1793491200"
BOUND = 30.0  # seconds: the generous bound of every "until" wait below


def exp(clock: FakeClock) -> float:
    return clock.now() + 2 * 86_400


def rows(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Query the file directly, as another process would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def count(path: Path, table: str) -> int:
    return int(rows(path, f"SELECT count(*) FROM {table}")[0][0])


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "budgets.db"


@pytest.fixture
def ledger(db: Path) -> Iterator[SqliteLedger]:
    opened = SqliteLedger(db)
    yield opened
    opened.close()


# -- URIs and paths ----------------------------------------------------------------------------


def test_a_relative_path_resolves_against_the_base_dir(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    path, options = parse_sqlite_uri("sqlite:///budgets.db", base_dir=folder)
    assert path == folder / "budgets.db"
    assert options == {}
    nested, _ = parse_sqlite_uri("sqlite:///data/../state/b%20c.db", base_dir=folder)
    assert nested == folder / "state" / "b c.db"
    ledger = open_ledger("sqlite:///budgets.db", base_dir=folder)
    assert ledger.path == folder / "budgets.db"  # type: ignore[attr-defined]
    ledger.close()
    assert (folder / "budgets.db").is_file()


def test_a_relative_path_without_base_dir_is_relative_to_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_sqlite_uri("sqlite:///x.db")[0] == tmp_path / "x.db"


def test_four_slashes_give_an_absolute_path(tmp_path: Path) -> None:
    target = tmp_path / "abs" / "ledger.db"
    target.parent.mkdir()
    uri = f"sqlite:///{target}"  # target starts with "/": four slashes in all
    assert uri.startswith("sqlite:////")
    assert parse_sqlite_uri(uri, base_dir="/elsewhere")[0] == target
    ledger = open_ledger(uri, base_dir="/elsewhere")
    assert ledger.path == target  # type: ignore[attr-defined]
    ledger.close()


def test_resolve_storage_uri_pins_a_relative_sqlite_path(tmp_path: Path) -> None:
    resolved = resolve_storage_uri("SQLite:///b.db?timeout=2", base_dir=tmp_path)
    assert resolved == f"sqlite:///{(tmp_path / 'b.db').as_posix()}?timeout=2"
    assert parse_sqlite_uri(resolved, base_dir="/elsewhere") == (
        tmp_path / "b.db",
        {"timeout": 2.0},
    )
    assert resolve_sqlite_uri(resolved, base_dir="/elsewhere") == resolved
    spaced = resolve_storage_uri("sqlite:///a%20b.db", base_dir=tmp_path)
    assert parse_sqlite_uri(spaced)[0] == tmp_path / "a b.db"
    for other in ("memory://", "redis://127.0.0.1:6379/0", "valkey://h/1"):
        assert resolve_storage_uri(other, base_dir=tmp_path) == other


def test_uri_options(tmp_path: Path) -> None:
    _, options = parse_sqlite_uri("sqlite:///b.db?timeout=1.5&lock_timeout=3&synchronous=FULL")
    assert options == {"timeout": 1.5, "lock_timeout": 3.0, "synchronous": "full"}


BAD_URIS = [
    ("sqlite://host/budgets.db", "not a host"),
    ("sqlite://budgets.db", "not a host"),
    ("sqlite://", "not a host"),
    ("sqlite:///", "needs a file name"),
    ("sqlite:///?timeout=1", "needs a file name"),
    ("sqlite:///:memory:", "memory://"),
    ("sqlite:///file:b.db?mode=ro", "memory://"),
    ("sqlite:///data/", "folder"),
    ("sqlite:///b%00.db", "NUL"),
    ("sqlite:///b.db?cache=shared", "does not accept the option 'cache'"),
    ("sqlite:///b.db?timeout=soon", "timeout must be a number"),
    ("sqlite:///b.db?timeout=0", "timeout must be a positive number"),
    ("sqlite:///b.db?lock_timeout=-1", "lock_timeout must be a positive number"),
    ("sqlite:///b.db?timeout=nan", "timeout must be a positive number"),
    ("sqlite:///b.db?synchronous=off", "synchronous must be normal or full"),
]


@pytest.mark.parametrize(("uri", "message"), BAD_URIS, ids=[b[0] for b in BAD_URIS])
def test_bad_uris_are_config_errors(tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_ledger(uri, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        open_async_ledger(uri, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=message):
        resolve_storage_uri(uri, base_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing was created


def test_bad_keyword_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not accept the option.*socket_timeout"):
        open_ledger("sqlite:///b.db", base_dir=tmp_path, socket_timeout=1)
    with pytest.raises(ConfigError, match=r"does not accept the option.*workers"):
        open_ledger("sqlite:///b.db", base_dir=tmp_path, workers=2)
    with pytest.raises(ConfigError, match="timeout must be a positive number"):
        open_ledger("sqlite:///b.db", base_dir=tmp_path, timeout=0)
    with pytest.raises(ConfigError, match="lock_timeout must be a positive number"):
        open_ledger("sqlite:///b.db", base_dir=tmp_path, lock_timeout=10**400)
    with pytest.raises(ConfigError, match="shared applies to memory:// only"):
        open_async_ledger("sqlite:///b.db", base_dir=tmp_path, shared=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="workers"):
        AsyncSqliteLedger(tmp_path / "b.db", workers=0)
    with pytest.raises(ValueError, match="prune_batch"):
        SqliteLedger(tmp_path / "b.db", prune_batch=0)
    with pytest.raises(ValueError, match="closed_ttl"):
        SqliteLedger(tmp_path / "b.db", closed_ttl=0)
    # One name everywhere: the ledger's closed ids are always on.
    for gone in ("idempotent", "tombstone_ttl"):
        with pytest.raises(ConfigError, match=f"does not accept the option.*{gone}"):
            open_ledger("sqlite:///b.db", base_dir=tmp_path, **{gone: True})
    with pytest.raises(ValueError, match="path"):
        SqliteLedger("")
    # Keyword options win over the URI's.
    ledger = open_async_ledger("sqlite:///b.db?timeout=5", base_dir=tmp_path, workers=2)
    assert isinstance(ledger, AsyncSqliteLedger)
    assert "workers=2" in repr(ledger)


def test_the_options_every_ledger_takes_are_accepted(tmp_path: Path, clock: FakeClock) -> None:
    seen: list[object] = []
    # on_event and marker_key are accepted and unused: a restart does not empty a file.
    options: dict[str, Any] = {"closed_ttl": 30, "on_event": seen.append, "marker_key": "pg:m"}
    assert isinstance(open_async_ledger("sqlite:///b.db", base_dir=tmp_path, **options),
                      AsyncSqliteLedger)  # fmt: skip
    ledger = open_ledger("sqlite:///b.db", base_dir=tmp_path, **options)
    now, e = clock.now(), exp(clock)
    ledger.commit("r1", [Charge(K1, 5, None, e)], now=now)
    ledger.commit("r1", [Charge(K1, 5, None, e)], now=now + 29)
    ledger.commit("r1", [Charge(K1, 5, None, e)], now=now + 30)  # forgotten: a new id
    assert ledger.read([K1], now=now + 30) == (CounterState(10, 0),)
    assert seen == []
    ledger.close()


# -- the file --------------------------------------------------------------------------------


def test_the_file_is_a_wal_ledger_with_its_schema(ledger: SqliteLedger, db: Path) -> None:
    assert rows(db, "PRAGMA journal_mode") == [("wal",)]
    assert rows(db, "PRAGMA user_version") == [(4,)]
    tables = {name for (name,) in rows(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"counters", "holds", "closed", "journal", "tallies"}


def test_a_missing_folder_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="open"):
        SqliteLedger(tmp_path / "missing" / "b.db")


async def test_an_async_ledger_opens_the_file_on_first_use(
    tmp_path: Path, clock: FakeClock
) -> None:
    missing = AsyncSqliteLedger(tmp_path / "missing" / "b.db")  # nothing is opened here
    with pytest.raises(StorageError, match="open"):
        await missing.read([K1], now=clock.now())
    await missing.aclose()


def test_a_file_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "app.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="not a payi_guard ledger"):
        SqliteLedger(other)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StorageError, match="open"):
        SqliteLedger(junk)


def test_a_newer_layout_is_refused(ledger: SqliteLedger, db: Path) -> None:
    ledger.close()
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StorageError, match="upgrade payi_guard"):
        SqliteLedger(db)


def test_a_layout_2_file_moves_its_closed_ids_out_of_holds(
    tmp_path: Path, clock: FakeClock
) -> None:
    old = tmp_path / "old.db"
    now, e = clock.now(), exp(clock)
    conn = sqlite3.connect(old)  # a file layout 2 wrote: closed ids were holds with open = 0
    conn.execute("PRAGMA journal_mode = WAL")
    for statement in (*MIGRATIONS[0], *MIGRATIONS[1]):
        conn.execute(statement)
    conn.execute("INSERT INTO counters VALUES (?, 100, 50, ?)", (K1, e))
    conn.execute("INSERT INTO holds VALUES (?, 'r1', 50, ?, 1)", (K1, now + 60))
    conn.execute("INSERT INTO holds VALUES (?, 'r0', 0, ?, 0)", (K1, now + 600))
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    ledger = SqliteLedger(old)
    assert rows(old, "PRAGMA user_version") == [(4,)]
    tables = {name for (name,) in rows(old, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"counters", "holds", "closed", "journal", "tallies"}
    # The open reservation is kept; the old closed id is forgotten, nothing else.
    assert rows(old, "SELECT key, rid, amount, deadline FROM holds") == [(K1, "r1", 50, now + 60)]
    assert ledger.read([K1], now=now) == (CounterState(100, 50),)
    assert ledger.commit("r1", [Charge(K1, 30, None, e)], now=now) == (CounterState(130, 0),)
    assert ledger.commit("r1", [Charge(K1, 30, None, e)], now=now) == (CounterState(130, 0),)
    refused = ledger.reserve("r2", [Charge(K1, 900, 1000, e)], now=now, ttl=60)
    assert refused.states == (CounterState(130, 0, refused=900),)
    ledger.close()


def test_counters_survive_closing_and_reopening(db: Path, clock: FakeClock) -> None:
    first = SqliteLedger(db)
    now, e = clock.now(), exp(clock)
    first.commit("r0", [Charge(K1, 250, None, e)], now=now)
    assert first.reserve(
        "r1", [Charge(K1, 700, 1000, e), Charge(K2, 700, None, e)], now=now, ttl=60
    ).ok
    first.close()
    second = SqliteLedger(db)
    assert second.read([K1, K2], now=now) == (CounterState(250, 700), CounterState(0, 700))
    # The open reservation kept its deadline and its id across the restart.
    assert second.commit("r1", [Charge(K1, 600, None, e)], now=now) == (CounterState(850, 0),)
    clock.advance(60)
    assert second.read([K2], now=clock.now()) == (CounterState(0, 0),)
    second.close()


def test_a_closed_ledger_reopens_when_used_again(ledger: SqliteLedger, clock: FakeClock) -> None:
    ledger.commit("r1", [Charge(K1, 5, None, exp(clock))], now=clock.now())
    ledger.close()
    assert ledger.read([K1], now=clock.now()) == (CounterState(5, 0),)


def test_sync_and_async_ledgers_and_other_handles_share_the_file(
    db: Path, clock: FakeClock
) -> None:
    one, two = SqliteLedger(db), SqliteLedger(db)
    now, e = clock.now(), exp(clock)
    assert one.reserve("r1", [Charge(K1, 600, 1000, e)], now=now, ttl=60).ok
    assert not two.reserve("r2", [Charge(K1, 600, 1000, e)], now=now, ttl=60).ok

    async def from_async() -> tuple[CounterState, ...]:
        three = AsyncSqliteLedger(db)
        try:
            return await three.commit("r1", [Charge(K1, 100, None, e)], now=now)
        finally:
            await three.aclose()

    # The refusal that `two` noted is seen by every handle.
    assert asyncio.run(from_async()) == (CounterState(100, 0, refused=600),)
    assert one.read([K1], now=now) == two.read([K1], now=now) == (CounterState(100, 0, 600),)
    one.close()
    two.close()


def test_threads_reuse_pooled_connections(ledger: SqliteLedger, db: Path, clock: FakeClock) -> None:
    def work(i: int) -> None:
        ledger.commit(f"r{i}", [Charge(K1, 1, None, exp(clock))], now=clock.now())
        ledger.read([K1], now=clock.now())

    for i in range(50):  # one short-lived thread after another, like thread-per-request
        thread = threading.Thread(target=work, args=(i,))
        thread.start()
        thread.join()
    assert ledger.read([K1], now=clock.now()) == (CounterState(50, 0),)
    mine = [f for f in psutil.Process().open_files() if Path(f.path) == db]
    assert len(mine) == 1  # one pooled connection served them all


# -- what the contract suite cannot see from outside ------------------------------------------


def test_no_counter_is_made_for_a_refused_reserve_or_a_zero_commit(
    ledger: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    now, e = clock.now(), exp(clock)
    assert ledger.release("r0", [K1], now=now) == (CounterState(0, 0),)
    assert ledger.commit("r0b", [Charge(K1, 0, None, e)], now=now) == (CounterState(0, 0),)
    assert count(db, "counters") == 0
    assert [rid for (rid,) in rows(db, "SELECT rid FROM closed")] == ["r0", "r0b"]
    ledger.commit("r1", [Charge(K2, 50, None, e)], now=now)
    refused = ledger.reserve("r2", [Charge(K1, 5, 100, e), Charge(K2, 60, 100, e)], now=now, ttl=60)
    assert not refused.ok
    assert rows(db, "SELECT key FROM counters") == [(K2,)]
    assert count(db, "holds") == 0


def test_expired_holds_are_deleted_by_the_next_write_on_their_counter(
    ledger: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    e = exp(clock)
    assert ledger.reserve("r1", [Charge(K1, 400, 1000, e)], now=clock.now(), ttl=30).ok
    assert ledger.reserve("r2", [Charge(K1, 100, 1000, e)], now=clock.now(), ttl=90).ok
    clock.advance(30)
    # A read does not write: the expired hold is still stored, but no longer counted.
    assert ledger.read([K1], now=clock.now()) == (CounterState(0, 100),)
    assert count(db, "holds") == 2
    assert ledger.commit("r3", [Charge(K1, 7, None, e)], now=clock.now()) == (CounterState(7, 100),)
    assert rows(db, "SELECT rid, amount FROM holds") == [("r2", 100)]
    assert rows(db, "SELECT settled, pending FROM counters") == [(7, 100)]


def test_past_windows_are_pruned_a_bounded_batch_at_a_time(db: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(db, prune_every=1, prune_batch=50)
    now = clock.now()
    for i in range(120):
        key = f"pg:{{u:{i}}}:usd:day:1"
        ledger.reserve(f"r{i}", [Charge(key, 1, 10, now + 60)], now=now, ttl=600)
        ledger.commit(f"r{i}", [Charge(key, 1, None, now + 60)], now=now)
    ledger.reserve("open", [Charge("pg:{u:7}:usd:day:1", 1, 10, now + 60)], now=now, ttl=600)
    assert count(db, "counters") == 120
    clock.advance(60)  # every counter is past its expiry
    later = clock.now()
    sizes = []
    for i in range(3):
        ledger.commit(f"s{i}", [Charge("pg:{u:x}:usd:day:2", 1, None, later + 60)], now=later)
        sizes.append(count(db, "counters"))
    assert sizes == [71, 21, 1]
    assert rows(db, "SELECT key, rid FROM holds") == []  # their holds went with them
    ledger.close()


def test_pruning_runs_every_prune_every_writes(db: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(db, prune_every=4, prune_batch=1000)
    now = clock.now()
    ledger.commit(
        "old", [Charge(f"pg:{{u:{i}}}:usd", 1, None, now + 1) for i in range(10)], now=now
    )
    clock.advance(2)
    seen = []
    for i in range(3):  # writes 2, 3 and 4 (the 4th prunes, before its own work)
        ledger.commit(
            f"n{i}", [Charge("pg:{u:new}:usd", 1, None, clock.now() + 60)], now=clock.now()
        )
        seen.append(count(db, "counters"))
    assert seen == [11, 11, 1]
    assert count(db, "counters") == 1
    ledger.close()


def test_prune_drops_every_expired_counter_at_once(
    ledger: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    now = clock.now()
    exp_at = now + 3600
    ledger.reserve("r1", [Charge(K1, 10, 100, exp_at)], now=now, ttl=60)
    ledger.commit("r2", [Charge(K2, 10, None, exp_at + 1)], now=now)
    ledger.commit(
        "r3", [Charge(f"pg:{{u:{i}}}:usd", 1, None, exp_at) for i in range(2500)], now=now
    )
    clock.set(exp_at + 0.5)  # K1 and the 2500 are past their expiry, K2 not yet
    assert ledger.prune(clock.now()) == 2501
    assert rows(db, "SELECT key FROM counters") == [(K2,)]
    assert count(db, "holds") == 0
    assert ledger.read([K1, K2], now=clock.now()) == (CounterState(0, 0), CounterState(10, 0))


# -- locking and timeouts ----------------------------------------------------------------------


@pytest.fixture
def blocker(ledger: SqliteLedger, db: Path) -> Iterator[sqlite3.Connection]:
    """A connection of 'another process' that holds the file's write lock."""
    conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def test_a_file_locked_past_the_timeout_is_a_storage_error(
    db: Path, blocker: sqlite3.Connection, clock: FakeClock
) -> None:
    ledger = open_ledger("sqlite:///budgets.db?timeout=0.05", base_dir=db.parent)
    charge = [Charge(K1, 1, 10, exp(clock))]
    with pytest.raises(StorageError, match=r"locked by another process for more than 0.05 s"):
        ledger.reserve("r1", charge, now=clock.now(), ttl=60)
    with pytest.raises(StorageError, match="commit failed"):
        ledger.commit("r1", charge, now=clock.now())
    # Readers never wait for a writer (WAL).
    assert ledger.read([K1], now=clock.now()) == (CounterState(0, 0),)
    blocker.execute("COMMIT")
    assert ledger.reserve("r1", charge, now=clock.now(), ttl=60).ok
    ledger.close()


def test_threads_of_one_process_wait_at_most_lock_timeout(
    db: Path, blocker: sqlite3.Connection, clock: FakeClock
) -> None:
    patient = SqliteLedger(db, timeout=BOUND)
    probe = SqliteLedger(db, timeout=0.01, lock_timeout=0.01)
    charge = [Charge(K1, 1, 10, exp(clock))]
    outcome: list[object] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(patient.reserve("r1", charge, now=clock.now(), ttl=60))
    )
    waiter.start()

    def probe_queues_behind_the_waiter() -> bool:
        try:
            probe.read([K1], now=clock.now())  # readers take no lock at all
            probe.reserve("r2", charge, now=clock.now(), ttl=60)
        except StorageError as exc:
            # Until the waiter holds this process's writer lock, the probe gets it and
            # then times out on the file instead.
            return "this process's other writers" in str(exc)
        raise AssertionError("the probe reserved while the file was locked")

    until(probe_queues_behind_the_waiter, "the probe queues behind the waiting thread")
    blocker.execute("COMMIT")
    waiter.join(BOUND)
    assert [getattr(r, "ok", r) for r in outcome] == [True]
    patient.close()
    probe.close()


async def test_the_async_ledger_waits_for_the_file_without_blocking_the_loop(
    db: Path, blocker: sqlite3.Connection, clock: FakeClock
) -> None:
    ledger = AsyncSqliteLedger(db, timeout=BOUND)
    task = asyncio.create_task(
        ledger.reserve("r1", [Charge(K1, 1, 10, exp(clock))], now=clock.now(), ttl=60)
    )
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done()  # it cannot finish while the file is locked...
    # ...and the loop is free meanwhile: this coroutine runs and unlocks the file. (Had
    # the reserve blocked the loop, nothing would unlock it and it would time out.)
    blocker.execute("COMMIT")
    result = await task
    assert result.ok
    await ledger.aclose()


async def test_the_async_ledger_works_across_event_loops_and_after_aclose(
    db: Path, clock: FakeClock
) -> None:
    ledger = AsyncSqliteLedger(db, workers=2)
    e = exp(clock)
    await ledger.commit("a", [Charge(K1, 1, None, e)], now=clock.now())

    def in_another_loop() -> tuple[CounterState, ...]:
        return asyncio.run(ledger.commit("b", [Charge(K1, 2, None, e)], now=clock.now()))

    assert await asyncio.to_thread(in_another_loop) == (CounterState(3, 0),)
    await ledger.aclose()
    assert await ledger.read([K1], now=clock.now()) == (CounterState(3, 0),)
    results = await asyncio.gather(
        *(ledger.commit(f"c{i}", [Charge(K1, 1, None, e)], now=clock.now()) for i in range(40))
    )
    assert max(r[0].settled for r in results) == 43
    await ledger.aclose()
    await ledger.aclose()  # twice is fine


# -- closed ids and renew ------------------------------------------------------------------


@pytest.fixture
def short(db: Path) -> Iterator[SqliteLedger]:
    opened = SqliteLedger(db, closed_ttl=300, prune_every=10**6)
    yield opened
    opened.close()


def closed_rows(db: Path) -> list[tuple[str, list[str], float]]:
    """The closed ids in the file: id, the keys it is closed on, until when."""
    found = rows(db, "SELECT rid, keys, until FROM closed ORDER BY rid")
    return [(rid, json.loads(keys), until) for rid, keys, until in found]


def test_a_closed_id_is_one_row_until_the_closed_ttl(
    short: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    now, e = clock.now(), exp(clock)
    charges = [Charge(K1, 100, 1000, e), Charge(K2, 100, None, e)]
    assert short.reserve("r1", charges, now=now, ttl=60).ok
    actual = [Charge(K1, 30, None, e), Charge(K2, 30, None, e)]
    first = short.commit("r1", actual, now=now)
    assert first == (CounterState(30, 0), CounterState(30, 0))
    assert short.commit("r1", actual, now=now) == first  # a retry after a lost reply
    assert count(db, "holds") == 0
    assert closed_rows(db) == [("r1", [K1, K2], now + 300)]
    # Closed on one more key later: the same row names it too, from then on.
    clock.advance(100)
    k3 = "pg:{g:*}:usd:month:1793491200"
    assert short.release("r1", [K1, k3], now=clock.now()) == (
        CounterState(30, 0),
        CounterState(0, 0),
    )
    assert closed_rows(db) == [("r1", [K1, K2, k3], clock.now() + 300)]
    # Past closed_ttl the id is unknown again.
    clock.advance(300)
    assert short.commit("r1", [Charge(K1, 1, None, e)], now=clock.now()) == (CounterState(31, 0),)
    assert closed_rows(db) == [("r1", [K1], clock.now() + 300)]


def test_a_release_closes_the_id_where_no_counter_exists_yet(
    short: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    now, e = clock.now(), exp(clock)
    # The caller gave up before its reserve reached the file: release it first.
    assert short.release("late", [K1, K2], now=now) == (CounterState(0, 0),) * 2
    assert count(db, "counters") == 0
    assert closed_rows(db) == [("late", [K1, K2], now + 300)]
    late = short.reserve(
        "late", [Charge(K1, 500, 1000, e), Charge(K2, 5, None, e)], now=now, ttl=60
    )
    assert late.closed
    assert count(db, "counters") == 0
    assert count(db, "holds") == 0


def test_keys_of_any_text_survive_being_closed(short: SqliteLedger, clock: FakeClock) -> None:
    now, e = clock.now(), exp(clock)
    odd = ['pg:{u:"quoted"}', "pg:{u:a,b}", "pg:{u:\\n}", "pg:{u:\u00e9\u4e16}", "pg:[x]"]
    charges = [Charge(k, 1, None, e) for k in odd]
    assert short.commit("r1", charges, now=now) == (CounterState(1, 0),) * len(odd)
    assert short.commit("r1", charges, now=now) == (CounterState(1, 0),) * len(odd)
    assert short.reserve("r1", [Charge(odd[3], 1, 10, e)], now=now, ttl=60).closed


def test_expired_closed_ids_are_forgotten_as_fast_as_they_are_made(
    db: Path, clock: FakeClock
) -> None:
    ledger = SqliteLedger(db, closed_ttl=300, prune_every=4, prune_batch=5)
    now, e = clock.now(), exp(clock)
    # 100 ids closed on keys that never had a counter: nothing else would delete them.
    for i in range(100):
        ledger.release(f"gone{i}", [f"pg:{{u:{i}}}:usd:day:1", K2], now=now)
    assert count(db, "closed") == 100  # none expired yet: the pruning turns left them
    clock.advance(300)
    left = []
    for i in range(8):
        ledger.commit(f"new{i}", [Charge(K1, 1, None, e), Charge(K2, 1, None, e)], now=clock.now())
        left.append(count(db, "closed"))
    # Every 4th write forgets what the last 4 writes closed, plus prune_batch: a backlog
    # shrinks by 5 a turn however many ids each call closes.
    assert left == [101, 102, 103, 95, 96, 97, 98, 90]
    assert ledger.prune(clock.now()) == 0  # no counter expired; every old id goes
    assert [rid for rid, _, _ in closed_rows(db)] == [f"new{i}" for i in range(8)]
    ledger.close()


def test_periodic_pruning_forgets_expired_closed_ids_too(db: Path, clock: FakeClock) -> None:
    ledger = SqliteLedger(db, closed_ttl=60, prune_every=2, prune_batch=30)
    now = clock.now()
    for i in range(50):
        ledger.release(f"gone{i}", [f"pg:{{u:{i}}}:usd:day:1"], now=now)
    assert count(db, "closed") == 50
    clock.advance(60)
    # Renewals of nothing change nothing, yet the second one's pruning turn is committed.
    for _ in range(2):
        assert not ledger.renew("nothing", [K1], now=clock.now(), ttl=1)
    assert count(db, "closed") == 20
    ledger.close()


def test_forgetting_closed_ids_reads_only_the_expired_ones(
    short: SqliteLedger, db: Path, clock: FakeClock
) -> None:
    from payi_guard.ledger._sqlite_sql import _FORGET

    short.release("r1", [K1], now=clock.now())
    plan = " | ".join(str(r[-1]) for r in rows(db, "EXPLAIN QUERY PLAN " + _FORGET, 0.0, 10))
    # The oldest first, through the index on `until`: never a scan of the whole table.
    assert "closed_by_until" in plan, plan
    assert "SCAN closed" not in plan.replace("USING COVERING INDEX", ""), plan


def test_renew_keeps_an_open_reservation(ledger: SqliteLedger, clock: FakeClock) -> None:
    start, e = clock.now(), exp(clock)
    assert ledger.reserve(
        "r1", [Charge(K1, 600, 1000, e), Charge(K2, 600, None, e)], now=start, ttl=30
    ).ok
    clock.advance(20)
    assert ledger.renew("r1", [K1, K2], now=clock.now(), ttl=30)  # now due at start + 50
    clock.advance(20)
    assert ledger.read([K1, K2], now=clock.now()) == (CounterState(0, 600),) * 2
    assert not ledger.reserve("r2", [Charge(K1, 600, 1000, e)], now=clock.now(), ttl=30).ok
    # A renew never shortens a deadline.
    assert ledger.renew("r1", [K1], now=clock.now(), ttl=1)
    clock.advance(9.5)
    assert ledger.read([K1], now=clock.now()) == (CounterState(0, 600, refused=600),)
    clock.advance(0.5)  # start + 50
    assert ledger.read([K1], now=clock.now()) == (CounterState(0, 0, refused=600),)
    # An expired reservation is not revived, nor is one that is not there.
    assert not ledger.renew("r1", [K1, K2], now=clock.now(), ttl=30)
    assert ledger.read([K1, K2], now=clock.now()) == (CounterState(0, 0, 600), CounterState(0, 0))
    assert not ledger.renew("nope", [K1], now=clock.now(), ttl=30)
    assert ledger.renew("r1", [], now=clock.now(), ttl=30)


def test_renew_after_a_commit_is_false(ledger: SqliteLedger, clock: FakeClock) -> None:
    now, e = clock.now(), exp(clock)
    ledger.reserve("r1", [Charge(K1, 10, 100, e), Charge(K2, 10, 100, e)], now=now, ttl=30)
    ledger.commit("r1", [Charge(K1, 5, None, e)], now=now)  # K2 still holds r1
    assert not ledger.renew("r1", [K1, K2], now=now, ttl=60)
    clock.advance(45)
    assert ledger.read([K1, K2], now=clock.now()) == (CounterState(5, 0), CounterState(0, 10))


async def test_async_renew_and_invalid_arguments(db: Path, clock: FakeClock) -> None:
    ledger = AsyncSqliteLedger(db)
    now, e = clock.now(), exp(clock)
    assert (await ledger.reserve("r1", [Charge(K1, 1, 10, e)], now=now, ttl=10)).ok
    assert await ledger.renew("r1", [K1], now=now + 5, ttl=10)
    assert await ledger.read([K1], now=now + 12) == (CounterState(0, 1),)
    for bad in ({"ttl": 0}, {"ttl": float("nan")}):
        with pytest.raises(ValueError, match="ttl"):
            await ledger.renew("r1", [K1], now=now, **bad)
    with pytest.raises(ValueError, match="reservation_id"):
        await ledger.renew("", [K1], now=now, ttl=1)
    with pytest.raises(ValueError, match="once"):
        await ledger.renew("r1", [K1, K1], now=now, ttl=1)
    assert await ledger.prune(now + 10**6) == 1
    await ledger.aclose()


# -- processes -----------------------------------------------------------------------------------


def _commit_in_child(ledger: SqliteLedger, key: str, now: float, expires_at: float) -> None:
    ledger.commit("child", [Charge(key, 7, None, expires_at)], now=now)
    ledger.close()


def _hold_write_lock(path: Path, locked: Any, release: Any) -> None:
    """Another process that holds the file's write lock until told to let go."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    locked.set()
    release.wait(BOUND)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_neither_reuses_nor_waits_on_its_parents_state(
    db: Path, clock: FakeClock
) -> None:
    ledger = SqliteLedger(db, timeout=BOUND)
    now, e = clock.now(), exp(clock)
    ledger.commit("parent", [Charge(K1, 5, None, e)], now=now)  # a pooled connection now
    spawn = multiprocessing.get_context("spawn")
    locked, release = spawn.Event(), spawn.Event()
    holder = spawn.Process(target=_hold_write_lock, args=(db, locked, release))
    holder.start()
    try:
        assert locked.wait(BOUND)
        waiter = threading.Thread(
            target=ledger.commit, args=("waiting", [Charge(K1, 1, None, e)]), kwargs={"now": now}
        )
        waiter.start()
        probe = SqliteLedger(db, timeout=0.01, lock_timeout=0.01)

        def parent_thread_holds_the_writer_lock() -> bool:
            try:
                probe.reserve("probe", [Charge(K1, 1, None, e)], now=now, ttl=1)
            except StorageError as exc:
                return "this process's other writers" in str(exc)
            raise AssertionError("the probe wrote while the file was locked")

        until(parent_thread_holds_the_writer_lock, "the parent's thread holds the writer lock")
        # Fork now: the child inherits a held writer lock (never released in the child)
        # and a pooled connection (unusable there); it must use neither.
        child = multiprocessing.get_context("fork").Process(
            target=_commit_in_child, args=(ledger, K1, now, e)
        )
        child.start()
    finally:
        release.set()
        holder.join(BOUND)
    child.join(BOUND)
    waiter.join(BOUND)
    assert child.exitcode == 0
    assert ledger.read([K1], now=now) == (CounterState(5 + 1 + 7, 0),)
    probe.close()
    ledger.close()


# -- the model-based test ------------------------------------------------------------------------


def test_sqlite_ledger_matches_the_model(tmp_path: Path) -> None:
    def make(prefix: str) -> tuple[Ledger, Callable[[], None]]:
        path = tmp_path / f"{prefix.rsplit(':', 1)[-1]}.db"
        ledger = SqliteLedger(path, prune_every=3)
        return ledger, ledger.close

    _run(make, examples=100)


# -- the file stays the size of the live windows -------------------------------------------------


def _simulate_days(path: Path, users: int, days: int, prune_every: int) -> list[tuple[int, int]]:
    """Each user calls once a day (day, month and per-minute counters); size after each day."""
    ledger = SqliteLedger(path, prune_every=prune_every)
    start = 1_795_737_600  # a day boundary (2026-11-27)
    out = []
    for day in range(days):
        for i in range(users):
            now = start + day * 86_400 + i * 86_400 / users
            d, m = int(now) // 86_400 * 86_400, int(now) // 60 * 60
            charges = [
                Charge(f"pg:{{u:{i}}}:usd:day:{d}", 500, 10**12, d + 86_400 + 3_600),
                Charge(f"pg:{{u:{i}}}:usd:month:1", 500, 10**12, start + 40 * 86_400),
                Charge(f"pg:{{u:{i}}}:requests:minute:{m}", 1, 30, m + 60 + 3_600),
            ]
            assert ledger.reserve(f"r{day}-{i}", charges, now=now, ttl=300).ok
            ledger.commit(f"r{day}-{i}", charges, now=now)
        out.append((path.stat().st_size, count(path, "counters")))
    ledger.close()
    return out


def test_the_file_stops_growing_once_old_windows_are_pruned(tmp_path: Path) -> None:
    users, days = 2_000, 5
    pruned = _simulate_days(tmp_path / "pruned.db", users, days, prune_every=8)
    kept = _simulate_days(tmp_path / "kept.db", users, days, prune_every=10**9)
    # Pruned: the month's and today's counters, and the minute counters of about the
    # last hour (one call every 43.2 s), the same number at the end of every day.
    assert len({n for _, n in pruned}) == 1
    assert 2 * users < pruned[0][1] < 2 * users + 100
    # Kept: one month counter per user, and a day and a minute counter per call.
    assert [n for _, n in kept] == [users + 2 * users * (day + 1) for day in range(days)]
    assert pruned[-1][0] <= 1.25 * pruned[1][0]  # freed pages are reused
    assert kept[-1][0] > 2 * pruned[-1][0]
