"""The Guard on real Redis: several processes, one budget, logs that reconcile."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from payi_guard import BudgetExceeded, StorageError, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage

PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
CONFIG: dict[str, Any] = {
    "prices": PRICES,
    "default": [{"max": 0.05, "per": "month", "warn_at": 0.5}],
    "orgs": {"acme": [{"max": 0.04, "per": "month"}]},
}


def _worker(redis_url: str, key_prefix: str, log_path: str, proc: int, start: float) -> None:
    """One process: 4 threads hammering the same org budget; JSON logs to a file.

    Every process's clock stands at ``start``: the monthly windows are one whatever the
    date (a month that ends during the test would split the spend over two windows).
    """
    from payi_guard.log import configure_json

    with open(log_path, "w") as stream:
        configure_json(stream)
        guard = Guard(CONFIG, storage=redis_url, key_prefix=key_prefix, clock=FakeClock(start))

        def thread(t: int) -> None:
            for j in range(40):
                user = f"acme:user{(proc * 4 + t + j) % 6}"
                with track_context(user_id=user):
                    try:
                        reservation = guard.begin(
                            CallRequest(model="test-model", input_tokens=400, max_output_tokens=100)
                        )
                    except BudgetExceeded:
                        continue
                    # Actual usage never exceeds the estimate: the hard limit must hold.
                    reservation.settle(TokenUsage(200 + (j * 7) % 200, (j * 13) % 100))

        threads = [threading.Thread(target=thread, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        guard.close()


@pytest.mark.redis
def test_four_processes_share_one_org_budget_exactly(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    logs = [tmp_path / f"p{i}.jsonl" for i in range(4)]
    start = time.time()
    procs = [
        ctx.Process(target=_worker, args=(redis_url, key_prefix, str(path), i, start))
        for i, path in enumerate(logs)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0

    lines = [json.loads(line, parse_float=Decimal) for path in logs for line in path.open()]
    calls = [e for e in lines if e["event"] == "genai_call"]
    logged = sum((e["cost_usd"] for e in calls), Decimal(0))

    guard = Guard(CONFIG, storage=redis_url, key_prefix=key_prefix, clock=FakeClock(start))
    org = guard.usage("acme:user0")[1]
    assert org.scope == "org"
    # Zero overshoot of the hard org limit, and the ledger equals the logged spend.
    assert org.used <= Decimal("0.04")
    assert org.used == logged
    assert org.used > Decimal("0.039")
    per_user = sum(
        (u.used for uid in range(6) for u in guard.usage(f"acme:user{uid}")[:1]), Decimal(0)
    )
    assert per_user == logged
    assert any(e["event"] == "budget_exceeded" for e in lines)
    guard.close()


@pytest.mark.redis
def test_warning_is_logged_once_per_window_across_processes(
    redis_url: str, key_prefix: str, tmp_path: Path
) -> None:
    config = {"prices": PRICES, "default": [{"max": 1, "per": "day", "warn_at": 0.5}]}
    clock = FakeClock(1_795_780_800.0)
    guards = [
        Guard(config, storage=redis_url, key_prefix=key_prefix, clock=clock) for _ in range(3)
    ]
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        for i in range(900):
            g = guards[i % 3]
            with track_context(user_id="alice"):
                g.begin(CallRequest(model="test-model", input_tokens=1000)).settle(
                    TokenUsage(1000, 0)
                )
    warnings = [e for e in logs if e["event"] == "budget_warning"]
    assert len(warnings) == 1
    assert warnings[0]["used"] == 0.5
    for g in guards:
        g.close()


@pytest.mark.redis
async def test_async_guard_on_redis(redis_url: str, key_prefix: str, clock: FakeClock) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 0.002, "per": "day"}]},
        storage=redis_url,
        key_prefix=key_prefix,
        clock=clock,
    )
    async with track_context(user_id="alice"):
        first = await guard.abegin(CallRequest(model="test-model", input_tokens=1500))
        with pytest.raises(BudgetExceeded):
            await guard.abegin(CallRequest(model="test-model", input_tokens=1000))
        await first.asettle(TokenUsage(1000, 0))
        await (await guard.abegin(CallRequest(model="test-model", input_tokens=1000))).asettle(
            TokenUsage(1000, 0)
        )
    usage = await guard.ausage("alice")
    assert usage[0].used == Decimal("0.002")
    assert usage[0].state == "exceeded"
    assert await guard.aexhausted_limit(None) is None  # no user in context: anonymous
    await guard.aclose()


@pytest.mark.redis
def test_exhausted_user_is_refused_without_a_round_trip(
    redis_url: str, key_prefix: str, clock: FakeClock
) -> None:
    import redis

    guard = Guard(
        {"prices": PRICES, "default": [{"max": 0.001, "per": "day"}]},
        storage=redis_url,
        key_prefix=key_prefix,
        clock=clock,
    )
    with track_context(user_id="alice"):
        guard.begin(CallRequest(model="test-model", input_tokens=1000)).settle(TokenUsage(1000, 0))
        with pytest.raises(BudgetExceeded):
            guard.begin(CallRequest(model="test-model", input_tokens=1))
        client = redis.Redis.from_url(redis_url)
        before = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        for _ in range(50):
            with pytest.raises(BudgetExceeded):
                guard.begin(CallRequest(model="test-model", input_tokens=1))
        after = client.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0)
        client.close()
    # Other tests may run scripts concurrently on the shared server; ours made none.
    assert after - before < 50
    guard.close()


@pytest.mark.redis
@pytest.mark.parametrize("policy", ["block", "allow"])
def test_redis_stopped_mid_run_follows_the_policy_within_the_timeout(
    policy: str, clock: FakeClock
) -> None:
    """Redis freezes, then dies, then comes back: each call is answered within the timeout."""
    import time

    from ledger._support import RedisServer, free_port
    from structlog.testing import capture_logs

    server = RedisServer(free_port())
    server.start()
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}], "on_storage_error": policy},
        storage=f"redis://127.0.0.1:{server.port}/0",
        clock=clock,
    )

    def one_call() -> float:
        started = time.perf_counter()
        with track_context(user_id="alice"):
            if policy == "block":
                with pytest.raises(StorageError):
                    guard.begin(CallRequest(model="test-model", input_tokens=100))
            else:
                reservation = guard.begin(CallRequest(model="test-model", input_tokens=100))
                reservation.settle(TokenUsage(100, 0))
        return time.perf_counter() - started

    try:
        with track_context(user_id="alice"):
            guard.begin(CallRequest(model="test-model", input_tokens=100)).settle(
                TokenUsage(100, 0)
            )
        assert guard.usage("alice")[0].used == Decimal("0.0001")

        server.pause()  # frozen: every storage call hangs until its 0.25 s timeout
        with capture_logs() as logs:
            frozen = [one_call() for _ in range(3)]
        # allow: a reserve and a commit may each wait for the timeout.
        assert all(t < 1.0 for t in frozen), frozen
        assert any(e["event"] == "storage_error" for e in logs)

        server.kill()  # gone: refused connections fail at once
        dead = [one_call() for _ in range(3)]
        assert all(t < 1.0 for t in dead), dead

        server.start()  # back, empty (no persistence): the same guard works again
        with track_context(user_id="alice"):
            guard.begin(CallRequest(model="test-model", input_tokens=100)).settle(
                TokenUsage(100, 0)
            )
        assert guard.usage("alice")[0].used == Decimal("0.0001")
    finally:
        guard.close()
        server.kill()
