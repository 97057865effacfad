"""Process entry point of the adjust races (imported by spawned children)."""

from __future__ import annotations

import random
import threading
import uuid
from multiprocessing.queues import Queue
from typing import Any

from payi_guard.ledger import Adjustment, Charge, Ledger, open_ledger

Outcome = tuple[str, bool, int, int, int]
"""(``"reserve"`` or ``"adjust"``, admitted, settled after, pending after, amount)."""


def race(
    ledger: Ledger, key: str, journal: str, limit: int, now: float, attempts: int, seed: int
) -> list[Outcome]:
    """Reserve (never settled) or add spend with ``adjust``, at random, ``attempts`` times.

    Both only grow the counter, so every state any operation saw lies on one chain.
    """
    rng = random.Random(seed)
    expires_at = now + 86_400
    out: list[Outcome] = []
    for _ in range(attempts):
        amount = rng.randint(1, 40)
        if rng.random() < 0.25:
            (entry,) = ledger.adjust(
                [Adjustment(key, amount, expires_at, "race")],
                now=now,
                journal=journal,
                keep=1000,
                journal_expires_at=expires_at,
            )
            out.append(("adjust", True, entry.settled, entry.pending, amount))
            continue
        result = ledger.reserve(
            uuid.uuid4().hex, [Charge(key, amount, limit, expires_at)], now=now, ttl=3600
        )
        state = result.states[0]
        out.append(("reserve", result.ok, state.settled, state.pending, amount))
    return out


def race_process(
    uri: str,
    key: str,
    journal: str,
    limit: int,
    now: float,
    threads: int,
    attempts: int,
    seed: int,
    out: Queue[Any],
) -> None:
    """Run ``threads`` racing threads on one ledger opened from ``uri``; report outcomes."""
    options: dict[str, Any] = {"timeout": 10}
    if uri.startswith("redis"):
        options = {"socket_timeout": 10, "socket_connect_timeout": 10}
    ledger = open_ledger(uri, **options)
    outcomes: list[Outcome] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        try:
            start.wait()
            outcomes.extend(race(ledger, key, journal, limit, now, attempts, seed * 100 + index))
        except BaseException as exc:  # reported to the parent, which fails the test
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ledger.close()
    out.put(("error", repr(errors[0])) if errors else ("ok", outcomes))
