"""Guarded calls per second on one Redis from 4 processes, next to raw INCRBY round trips.

Run by hand from the repository root::

    python benchmarks/bench_redis.py [--redis redis://127.0.0.1:6379/0] [--seconds 5]

In one run, with ``--processes`` worker processes (4 by default) calling at once:

* raw: each worker sends ``INCRBY`` round trips (redis-py, one connection) to one key of
  its own: the most a client round trip on this Redis and this machine allows;
* guarded: each worker runs ``Guard.begin`` + ``Reservation.settle`` (one reserve and one
  commit, each one round trip: the design's minimum) for the design's example limits
  (daily, monthly and per-minute limits of the user, plus a global one: 4 counters,
  the global one shared by every worker), logging off;
* guarded, asyncio: the same with ``Guard.abegin`` + ``Reservation.asettle``, one call
  after another in each worker's event loop (the async ledger's path).

It prints calls per second for both, their ratio (a guarded call is two round trips, so
0.5 is the ceiling), and what the time went to: the client CPU per call (the workers'
own process time), the Redis server CPU per call (``INFO cpu``) and the machine's cores,
so the limit is visible: a saturated client CPU, a saturated Redis, or the round trips.

Every key it writes is under a unique ``pgbenchr<hex>`` prefix, expires within a day
and is deleted at the end; it never flushes anything.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis
import structlog

from payi_guard.context import Attribution
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage

CONFIG: dict[str, Any] = {
    "version": 1,
    "prices": {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2}},
    "limits": {
        "daily": {"max": 100_000.0, "per": "day"},
        "monthly": {"max": 1_000_000.0, "per": "month"},
        "rpm": {"requests": 1_000_000_000, "per": "minute"},
    },
    "default": ["daily", "monthly", "rpm"],
    "global": [{"max": 5_000_000.0, "per": "month"}],
}
CALL = CallRequest(model="gpt-test", provider="openai", input_tokens=40, max_output_tokens=256)
USAGE = TokenUsage(12, 20)


def timed(step: Callable[[], object], batch: int, seconds: float) -> tuple[int, float, float]:
    """Run ``step`` in batches for ``seconds``: (count, cpu seconds, wall seconds)."""
    count = 0
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline = t0 + seconds
    while True:
        for _ in range(batch):
            step()
        count += batch
        if time.perf_counter() >= deadline:
            break
    return count, time.process_time() - cpu0, time.perf_counter() - t0


def raw_worker(url: str, prefix: str, index: int, seconds: float, start: Any, out: Any) -> None:
    """Send INCRBY round trips for ``seconds``; report (count, cpu seconds, wall seconds)."""
    client = redis.Redis.from_url(url)
    key = f"{prefix}:raw:{index}"
    client.set(key, 0, ex=86_400)
    start.wait()
    out.put(timed(lambda: client.incrby(key, 1), 100, seconds))
    client.close()


def guarded_worker(url: str, prefix: str, index: int, seconds: float, start: Any, out: Any) -> None:
    """Run reserve + commit calls for ``seconds``; report (count, cpu seconds, wall seconds)."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    guard = Guard(CONFIG, storage=url, key_prefix=prefix)
    attribution = Attribution(user_id=f"bench-user-{index}")
    for _ in range(50):  # warm: connections, scripts, caches
        guard.begin(CALL, attribution).settle(USAGE)
    start.wait()
    out.put(timed(lambda: guard.begin(CALL, attribution).settle(USAGE), 50, seconds))
    guard.close()


def async_guarded_worker(
    url: str, prefix: str, index: int, seconds: float, start: Any, out: Any
) -> None:
    """The asyncio twin of :func:`guarded_worker`: one call after another in one loop."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    guard = Guard(CONFIG, storage=url, key_prefix=prefix)
    attribution = Attribution(user_id=f"bench-user-{index}")

    async def call() -> None:
        reservation = await guard.abegin(CALL, attribution)
        await reservation.asettle(USAGE)

    async def main() -> tuple[int, float, float]:
        for _ in range(50):  # warm: connections, scripts, caches
            await call()
        await asyncio.get_running_loop().run_in_executor(None, start.wait)
        count = 0
        cpu0, t0 = time.process_time(), time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(50):
                await call()
            count += 50
            if time.perf_counter() >= deadline:
                break
        result = count, time.process_time() - cpu0, time.perf_counter() - t0
        await guard.aclose()
        return result

    out.put(asyncio.run(main()))


def redis_cpu(client: redis.Redis) -> float:
    """The Redis server's CPU seconds so far (user + system, main thread and children)."""
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run(
    kind: str, url: str, prefix: str, processes: int, seconds: float
) -> tuple[float, float, float]:
    """Calls per second, client CPU µs per call, Redis CPU µs per call."""
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    out = ctx.Queue()
    target = {"raw": raw_worker, "guarded": guarded_worker, "async": async_guarded_worker}[kind]
    workers = [
        ctx.Process(target=target, args=(url, prefix, i, seconds, start, out))
        for i in range(processes)
    ]
    client = redis.Redis.from_url(url)
    for w in workers:
        w.start()
    results = [out.get(timeout=60 + seconds) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    # The Redis CPU is read around the whole run (warm-up included): an upper bound.
    calls = sum(r[0] for r in results)
    wall = max(r[2] for r in results)
    client_cpu = sum(r[1] for r in results)
    client.close()
    return calls / wall, client_cpu / calls * 1e6, wall


def cleanup(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    deleted = 0
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        deleted += int(client.delete(key))
    client.close()
    return deleted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    prefix = f"pgbenchr{uuid.uuid4().hex[:12]}"
    client = redis.Redis.from_url(args.redis)
    version = client.info("server")["redis_version"]
    print(
        f"payi_guard Redis benchmark: {args.processes} processes, {args.seconds:g} s each "
        f"run, Redis {version} at {args.redis}, {os.cpu_count()} cores"
    )
    rows = {}
    try:
        for kind in ("raw", "guarded", "async"):
            before = redis_cpu(client)
            per_second, client_us, wall = run(
                kind, args.redis, prefix, args.processes, args.seconds
            )
            server_us = (redis_cpu(client) - before) / (per_second * wall) * 1e6
            rows[kind] = (per_second, client_us, server_us)
    finally:
        deleted = cleanup(args.redis, prefix)
        client.close()
    print(f"\n{'':<34}{'per second':>12}{'client CPU':>14}{'Redis CPU':>13}")
    names = {
        "raw": "raw INCRBY round trips",
        "guarded": "guarded calls (reserve+commit)",
        "async": "guarded calls, asyncio",
    }
    for kind, (per_second, client_us, server_us) in rows.items():
        print(f"{names[kind]:<34}{per_second:>12,.0f}{client_us:>11.1f} µs{server_us:>10.1f} µs")
    raw, guarded = rows["raw"][0], rows["guarded"][0]
    cores = os.cpu_count() or 1
    busy = guarded * (rows["guarded"][1] + rows["guarded"][2]) / 1e6
    print(
        f"\nratio guarded / raw round trips: {guarded / raw:.2f} (two round trips per "
        f"call: 0.50 at most)\nCPU busy during the guarded run: {busy:.2f} of {cores} "
        f"cores (client {guarded * rows['guarded'][1] / 1e6:.2f}, Redis "
        f"{guarded * rows['guarded'][2] / 1e6:.2f})"
    )
    print(f"({deleted} keys deleted)")


if __name__ == "__main__":
    main()
