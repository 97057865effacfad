"""Process entry points for the SQLite stress and crash tests (imported by spawned children)."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from ledger._workers import hammer
from payi_guard.ledger import Charge, SqliteLedger

PATIENT = 60.0
"""Seconds a worker's call may wait for the file: these tests check exactness, not speed."""


def _describe(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def _threads(threads: int, run: Any) -> list[BaseException]:
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def body(index: int) -> None:
        try:
            start.wait()
            run(index)
        except BaseException as exc:  # reported to the parent, which fails the test
            errors.append(exc)

    workers = [threading.Thread(target=body, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return errors


def hammer_sqlite_process(
    path: Path,
    user_key: str,
    org_key: str,
    limit: int,
    now: float,
    threads: int,
    attempts: int,
    seed: int,
    out: Queue[Any],
) -> None:
    """Run ``threads`` hammering threads on one SQLite ledger and report their sums."""
    ledger = SqliteLedger(path, timeout=PATIENT, lock_timeout=PATIENT)
    results: list[tuple[int, int, int, int]] = []

    def run(index: int) -> None:
        results.append(hammer(ledger, user_key, org_key, limit, now, attempts, seed * 1000 + index))

    errors = _threads(threads, run)
    ledger.close()
    if errors:
        out.put(("error", _describe(errors[0])))
    else:
        out.put(("ok", [sum(column) for column in zip(*results, strict=True)]))


def slot_key(process: int, thread: int) -> str:
    """The counter only thread ``thread`` of worker ``process`` charges."""
    return f"pg:{{t:{process}:{thread}}}:usd:day:1"


def logged_worker_process(
    path: Path,
    user_key: str,
    org_key: str,
    limit: int,
    now: float,
    ttl: float,
    process: int,
    threads: int,
    attempts: int,
    seed: int,
    logs: Path,
    out: Queue[Any],
) -> None:
    """Reserve and commit on three counters per call, logging each commit around it.

    Each thread charges the shared user and org counters and its own slot counter, and
    writes ``C rid actual`` to its log before each commit and ``D rid`` once the commit
    returned (line-buffered: a line written is in the OS's hands, so a SIGKILL keeps
    it). A thread killed mid-commit leaves at most one ``C`` without its ``D``.
    """
    ledger = SqliteLedger(path, timeout=PATIENT, lock_timeout=PATIENT)
    expires_at = now + 86_400

    def run(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        own = slot_key(process, index)
        name = logs / f"p{process}-t{index}-s{seed}.log"
        with name.open("a", buffering=1, encoding="ascii") as log:
            for attempt in range(attempts):
                estimate = rng.randint(20_000_000, 300_000_000)
                rid = f"s{seed}p{process}t{index}n{attempt}"
                charges = [
                    Charge(user_key, estimate, limit, expires_at),
                    Charge(org_key, estimate, None, expires_at),
                    Charge(own, estimate, None, expires_at),
                ]
                if not ledger.reserve(rid, charges, now=now, ttl=ttl).ok:
                    continue
                actual = rng.randint(0, estimate)
                log.write(f"C {rid} {actual}\n")
                ledger.commit(
                    rid, [Charge(c.key, actual, None, expires_at) for c in charges], now=now
                )
                log.write(f"D {rid}\n")

    errors = _threads(threads, run)
    ledger.close()
    out.put(("error", _describe(errors[0])) if errors else ("ok", process))


def die_mid_transaction(path: Path, key: str, ready: Event) -> None:
    """Begin a write transaction on the ledger's tables, change a counter, and hang."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("UPDATE counters SET settled = settled + 1000000 WHERE key = ?", (key,))
    conn.execute(
        "INSERT INTO holds (key, rid, amount, deadline) VALUES (?, 'ghost', 5, 1e12)",
        (key,),
    )
    ready.set()
    time.sleep(120)


GUARD_PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
GUARD_CONFIG: dict[str, Any] = {
    "prices": GUARD_PRICES,
    "default": [{"max": 0.05, "per": "month"}],
    "orgs": {"acme": [{"max": 0.04, "per": "month"}]},
}


def guard_worker(storage: str, log_path: Path, process: int, start: float) -> None:
    """One app worker: a Guard on the shared file, 4 threads calling, JSON logs to a file.

    Every worker's clock stands at ``start``: the monthly windows are one whatever the
    date (a month that ends during the test would split the spend over two windows).
    """
    from payi_guard import BudgetExceeded, Guard, TokenUsage, track_context
    from payi_guard.clock import FakeClock
    from payi_guard.engine import CallRequest
    from payi_guard.log import configure_json

    with log_path.open("w") as stream:
        configure_json(stream)
        guard = Guard(GUARD_CONFIG, storage=storage, clock=FakeClock(start))

        def run(index: int) -> None:
            for j in range(40):
                user = f"acme:user{(process * 4 + index + j) % 6}"
                with track_context(user_id=user):
                    try:
                        reservation = guard.begin(
                            CallRequest(model="test-model", input_tokens=400, max_output_tokens=100)
                        )
                    except BudgetExceeded:
                        continue
                    # Actual usage never exceeds the estimate: the hard limit must hold.
                    reservation.settle(TokenUsage(200 + (j * 7) % 200, (j * 13) % 100))

        errors = _threads(4, run)
        guard.close()
    if errors:
        raise errors[0]


def open_fresh_files(directory: Path, count: int, barrier: Any, errors: Queue[str]) -> None:
    """Open ``count`` new ledger files, each at the same moment as the other processes."""
    for index in range(count):
        barrier.wait()
        try:
            SqliteLedger(directory / f"fresh{index}.db").close()
        except Exception as exc:
            errors.put(f"file {index}: {_describe(exc)}")
