"""Process entry points for the stress and crash tests (imported by spawned children)."""

from __future__ import annotations

import random
import threading
import time
import uuid
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from typing import Any

from payi_guard.ledger import Charge, Ledger, open_ledger


def hammer(
    ledger: Ledger,
    user_key: str,
    org_key: str,
    limit: int,
    now: float,
    attempts: int,
    seed: int,
) -> tuple[int, int, int, int]:
    """Reserve a random estimate, commit a random actual <= estimate, ``attempts`` times.

    Returns:
        (sum of actual amounts committed, reserves granted, reserves refused,
        grants whose reported usage exceeded ``limit``).
    """
    rng = random.Random(seed)
    expires_at = now + 86_400
    total = granted = refused = overshoot = 0
    for _ in range(attempts):
        estimate = rng.randint(20_000_000, 300_000_000)
        rid = uuid.uuid4().hex
        result = ledger.reserve(
            rid,
            [
                Charge(user_key, estimate, limit, expires_at),
                Charge(org_key, estimate, None, expires_at),
            ],
            now=now,
            ttl=600,
        )
        if not result.ok:
            refused += 1
            continue
        granted += 1
        if result.states[0].used > limit:
            overshoot += 1
        actual = rng.randint(0, estimate)
        ledger.commit(
            rid,
            [Charge(user_key, actual, None, expires_at), Charge(org_key, actual, None, expires_at)],
            now=now,
        )
        total += actual
    return total, granted, refused, overshoot


def hammer_process(
    redis_url: str,
    user_key: str,
    org_key: str,
    limit: int,
    now: float,
    threads: int,
    attempts: int,
    seed: int,
    out: Queue[Any],
) -> None:
    """Run ``threads`` hammering threads on one Redis ledger and report their sums."""
    # Generous timeouts: this checks exactness under contention, not latency.
    ledger = open_ledger(redis_url, socket_timeout=10, socket_connect_timeout=10)
    results: list[tuple[int, int, int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def run(index: int) -> None:
        try:
            start.wait()
            results.append(
                hammer(ledger, user_key, org_key, limit, now, attempts, seed * 1000 + index)
            )
        except BaseException as exc:  # reported to the parent, which fails the test
            errors.append(exc)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    ledger.close()
    if errors:
        out.put(("error", repr(errors[0])))
    else:
        out.put(("ok", [sum(column) for column in zip(*results, strict=True)]))


def hold_reservation(
    redis_url: str, key: str, amount: int, limit: int, now: float, ttl: float, ready: Event
) -> None:
    """Reserve ``amount`` and then hang, holding it, until the parent kills the process."""
    ledger = open_ledger(redis_url)
    result = ledger.reserve("doomed", [Charge(key, amount, limit, now + 86_400)], now=now, ttl=ttl)
    if result.ok:
        ready.set()
    time.sleep(120)
