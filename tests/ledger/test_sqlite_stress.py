"""Many processes on one SQLite file: a hard limit holds exactly (ledger and Guard), and a
worker killed with SIGKILL (mid-call, or mid-transaction) loses nothing that was settled."""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from ledger._sqlite_workers import (
    GUARD_CONFIG,
    die_mid_transaction,
    guard_worker,
    hammer_sqlite_process,
    logged_worker_process,
    open_fresh_files,
    slot_key,
)
from payi_guard import Guard
from payi_guard.clock import FakeClock
from payi_guard.ledger import Charge, CounterState, SqliteLedger

BOUND = 90.0  # seconds: the generous bound of every wait on a child process
LIMIT = 5_000_000_000  # $5 in nano-USD
USER = "pg:{u:acme:alice}:usd:day:1"
ORG = "pg:{o:acme}:usd:day:1"


def _check(user: CounterState, org: CounterState, sums: list[int]) -> None:
    total, granted, refused, overshoot = sums
    assert overshoot == 0  # no reserve ever saw the counter above its max
    assert user.pending == org.pending == 0
    assert user.settled == org.settled == total  # the ledger equals what the workers spent
    assert user.settled <= LIMIT
    assert refused > 0  # the limit was actually contested
    assert granted > 20


def _reports(out: Any, count: int) -> list[Any]:
    reports = [out.get(timeout=BOUND) for _ in range(count)]
    errors = [body for kind, body in reports if kind != "ok"]
    if errors:
        pytest.fail("a worker failed:\n" + "\n".join(errors), pytrace=False)
    return [body for _, body in reports]


def test_limit_holds_across_processes_and_threads_on_one_file(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "budgets.db"
    SqliteLedger(path).close()  # the file exists before the workers race to open it
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()
    processes = [
        ctx.Process(
            target=hammer_sqlite_process,
            args=(path, USER, ORG, LIMIT, clock.now(), 8, 100, seed, out),
        )
        for seed in range(4)
    ]
    for process in processes:
        process.start()
    reports = _reports(out, len(processes))
    for process in processes:
        process.join(timeout=BOUND)
        assert process.exitcode == 0
    sums = [sum(column) for column in zip(*reports, strict=True)]
    ledger = SqliteLedger(path)
    user, org = ledger.read([USER, ORG], now=clock.now())
    ledger.close()
    _check(user, org, sums)


def _settled_by_log(logs: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Per slot counter: what commits that returned added, and what one in flight adds."""
    done: dict[str, int] = defaultdict(int)
    in_flight: dict[str, int] = {}
    for log in logs.glob("*.log"):
        process, thread = (int(part[1:]) for part in log.name.split("-")[:2])
        key = slot_key(process, thread)
        pending: dict[str, int] = {}
        for line in log.read_text(encoding="ascii").splitlines():
            kind, rid, *rest = line.split()
            if kind == "C":
                pending[rid] = int(rest[0])
            else:
                done[key] += pending.pop(rid)
        assert len(pending) <= 1, f"{log.name}: more than one commit in flight"
        if pending:
            in_flight[key] = in_flight.get(key, 0) + next(iter(pending.values()))
    return done, in_flight


def _commits_logged(logs: Path, process: int) -> int:
    return sum(
        log.read_text(encoding="ascii").count("\nD ") for log in logs.glob(f"p{process}-*.log")
    )


def test_a_worker_killed_mid_call_loses_nothing_settled(tmp_path: Path, clock: FakeClock) -> None:
    path, logs = tmp_path / "budgets.db", tmp_path / "logs"
    logs.mkdir()
    SqliteLedger(path).close()
    limit = 24 * LIMIT  # reached during the second generation of workers
    now, ttl = clock.now(), 300.0
    ctx = multiprocessing.get_context("spawn")
    out: Any = ctx.Queue()

    def start(process: int, attempts: int, seed: int) -> Any:
        args = (path, USER, ORG, limit, now, ttl, process, 8, attempts, seed, logs, out)
        child = ctx.Process(target=logged_worker_process, args=args)
        child.start()
        return child

    # Generation 1: worker 0 would run far longer than the others; it is killed once it
    # has committed for a while, with its eight threads in the middle of their calls.
    doomed = start(0, 100_000, seed=1)
    survivors = [start(p, 40, seed=1) for p in (1, 2, 3)]
    deadline = time.monotonic() + BOUND
    while _commits_logged(logs, 0) < 40:
        assert doomed.is_alive(), "the doomed worker stopped on its own"
        assert time.monotonic() < deadline, "the doomed worker never got going"
        time.sleep(0.01)
    doomed.kill()
    doomed.join(timeout=BOUND)
    assert doomed.exitcode == -signal.SIGKILL
    _reports(out, len(survivors))
    for child in survivors:
        child.join(timeout=BOUND)

    # Generation 2: every worker is restarted on the same file and carries on.
    restarted = [start(p, 40, seed=2) for p in range(4)]
    _reports(out, len(restarted))
    for child in restarted:
        child.join(timeout=BOUND)
        assert child.exitcode == 0

    done, in_flight = _settled_by_log(logs)
    assert set(in_flight) <= {slot_key(0, t) for t in range(8)}  # only the killed worker's
    # Every thread's counter, logged or not: a thread may be killed holding a reservation
    # before it logged anything.
    slots = [slot_key(p, t) for p in range(4) for t in range(8)]
    ledger = SqliteLedger(path)
    states = dict(zip(slots, ledger.read(slots, now=now), strict=True))
    user, org = ledger.read([USER, ORG], now=now)
    for key in slots:
        # Every commit that returned is there; one cut short by the kill is there
        # entirely or not at all.
        assert states[key].settled in (done[key], done[key] + in_flight.get(key, 0)), key
    # Each commit was atomic across its three counters, kill or not.
    assert user.settled == org.settled == sum(state.settled for state in states.values())
    assert user.settled <= limit
    assert sum(done.values()) > 0
    survivors_pending = [states[slot_key(p, t)].pending for p in (1, 2, 3) for t in range(8)]
    assert survivors_pending == [0] * 24
    # What the killed worker still held is given back when its reservations' ttl ends.
    later = now + ttl
    assert user.pending == org.pending == sum(s.pending for s in states.values())
    after = ledger.read([USER, ORG, *slots], now=later)
    assert [s.pending for s in after] == [0] * len(after)
    assert [s.settled for s in after] == [
        user.settled,
        org.settled,
        *(states[k].settled for k in slots),
    ]
    # The spend still counts against the limit.
    assert not ledger.reserve("more", [Charge(USER, limit, limit, now + 1)], now=later, ttl=1).ok
    ledger.close()


def test_a_writer_killed_mid_transaction_leaves_no_trace_and_no_lock(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "budgets.db"
    ledger = SqliteLedger(path, timeout=BOUND)
    now, expires_at = clock.now(), clock.now() + 86_400
    ledger.reserve("r1", [Charge(USER, 300, 1000, expires_at)], now=now, ttl=60)
    ledger.commit("r1", [Charge(USER, 200, None, expires_at)], now=now)
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    child = ctx.Process(target=die_mid_transaction, args=(path, USER, ready))
    child.start()
    try:
        assert ready.wait(timeout=BOUND), "the child never began its transaction"
        # Its uncommitted changes are invisible while it holds the write lock...
        assert ledger.read([USER], now=now) == (CounterState(200, 0),)
    finally:
        child.kill()
        child.join(timeout=BOUND)
    assert child.exitcode == -signal.SIGKILL
    # ...and gone after the kill; the lock went with the process.
    assert ledger.read([USER], now=now) == (CounterState(200, 0),)
    result = ledger.reserve("r2", [Charge(USER, 800, 1000, expires_at)], now=now, ttl=60)
    assert result.ok
    assert result.states == (CounterState(200, 800),)
    ledger.close()
    reopened = SqliteLedger(path)
    assert reopened.read([USER], now=now) == (CounterState(200, 800),)
    reopened.close()


def test_guards_in_four_processes_share_one_budget_and_the_logs_reconcile(
    tmp_path: Path,
) -> None:
    storage = f"sqlite:///{tmp_path / 'budgets.db'}"
    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"p{i}.jsonl" for i in range(4)]
    start = time.time()
    workers = [
        ctx.Process(target=guard_worker, args=(storage, path, i, start))
        for i, path in enumerate(logs)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=BOUND)
        assert worker.exitcode == 0
    events = [json.loads(line, parse_float=Decimal) for path in logs for line in path.open()]
    logged = sum((e["cost_usd"] for e in events if e["event"] == "genai_call"), Decimal(0))
    guard = Guard(GUARD_CONFIG, storage=storage, clock=FakeClock(start))
    org = guard.usage("acme:user0")[1]
    assert org.scope == "org"
    assert org.used <= Decimal("0.04")  # no overshoot of the hard org limit...
    assert org.used == logged  # ...and the ledger equals the logged spend
    assert org.used > Decimal("0.039")
    assert any(e["event"] == "budget_exceeded" for e in events)
    guard.close()


def test_processes_opening_a_new_file_at_once_all_find_a_ledger(tmp_path: Path) -> None:
    # Each new file is opened by four processes at the same moment: while one writes the
    # schema, the others must read the file as empty or as a ledger, never as a foreign
    # SQLite file (the layout is read in one statement, so from one snapshot).
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4, timeout=BOUND)
    errors: Any = ctx.Queue()
    files = 40
    workers = [
        ctx.Process(target=open_fresh_files, args=(tmp_path, files, barrier, errors))
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=BOUND)
        assert worker.exitcode == 0
    found = []
    while not errors.empty():
        found.append(errors.get())
    assert found == []
    for index in range(files):  # each file is a ledger now: it opens as one
        SqliteLedger(tmp_path / f"fresh{index}.db").close()
