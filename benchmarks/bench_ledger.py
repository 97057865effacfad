"""Ledger benchmark: reserve+commit on memory, SQLite and Redis beside `limits` FixedWindow.

Run by hand from the repository root::

    python benchmarks/bench_ledger.py [--redis redis://127.0.0.1:6379/0] [--quick]

In one run on one machine it measures:

* throughput and latency (p50 / p99) of one reserve+commit pair on memory, SQLite
  (sync, and async with 1 and 32 tasks), Redis sync and Redis async (sequential and 32
  concurrent tasks), with 1 and 3 counters per call, next to
  ``FixedWindowRateLimiter.hit`` on limits' MemoryStorage, RedisStorage and async
  RedisStorage (``implementation="redispy"``);
* reserve+commit latency (p50 / p99) with 1 and with 4 worker processes calling at once
  (3 counters per call, the org and global counters shared by every process), for
  memory (each process its own store: not shared, shown for scale), SQLite (one file)
  and Redis;
* Redis requests sent per reserve and per commit (a counting connection class), and
  per limits hit;
* the worst event-loop lag seen by a 1 ms ticker task while the async ledger runs, next
  to the lag a sync Redis ledger would cause if it were called inside the loop;
* memory per tracked counter with 100,000 users (tracemalloc for the memory ledger,
  ``MEMORY USAGE`` on a sample of keys for Redis).

Every Redis key it writes is under a unique ``pgbench:<hex>`` prefix, expires within
ten minutes and is deleted at the end; it never flushes anything. The SQLite file is
made in a temporary folder (``--sqlite-dir`` to choose one: put it on the disk the app
would use) and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.asyncio
from limits import RateLimitItemPerDay
from limits.aio.storage import RedisStorage as AsyncLimitsRedisStorage
from limits.aio.strategies import FixedWindowRateLimiter as AsyncFixedWindowRateLimiter
from limits.storage import MemoryStorage, RedisStorage
from limits.strategies import FixedWindowRateLimiter

from payi_guard.ledger import (
    AsyncLedger,
    AsyncSqliteLedger,
    Charge,
    Ledger,
    MemoryLedger,
    SqliteLedger,
    open_async_ledger,
    open_ledger,
)

BIG = 10**15  # a max that never refuses, so every reserve runs the full check-and-add


class CountingConnection(redis.Connection):
    sent = 0

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        CountingConnection.sent += 1
        parent: Any = super()
        parent.send_packed_command(command, check_health)


class AsyncCountingConnection(redis.asyncio.Connection):
    sent = 0

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        AsyncCountingConnection.sent += 1
        parent: Any = super()
        await parent.send_packed_command(command, check_health)


@dataclass
class Row:
    name: str
    ops: int
    seconds: float
    latencies_ns: list[int]
    note: str = ""

    @property
    def per_second(self) -> float:
        return self.ops / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ns)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def charges_for(prefix: str, user: str, count: int, expires_at: float) -> list[Charge]:
    scopes = [f"{{u:{user}}}:usd:day", f"{{o:{user.split(':')[0]}}}:usd:month", "{g}:usd:month"]
    return [Charge(f"{prefix}:{scope}", 1000, BIG, expires_at) for scope in scopes[:count]]


# -- sync measurements -------------------------------------------------------------------------


def bench_sync_ledger(name: str, ledger: Ledger, charges: list[Charge], n: int) -> Row:
    now = time.time()
    for i in range(min(200, n)):  # warm up: connections, scripts, caches
        ledger.reserve(f"w{i}", charges, now=now, ttl=60)
        ledger.commit(f"w{i}", charges, now=now)
    latencies = []
    perf = time.perf_counter_ns
    start = time.perf_counter()
    for i in range(n):
        t0 = perf()
        ledger.reserve(f"r{i}", charges, now=now, ttl=60)
        ledger.commit(f"r{i}", charges, now=now)
        latencies.append(perf() - t0)
    return Row(name, n, time.perf_counter() - start, latencies)


def bench_sync_calls(name: str, call: Callable[[int], object], n: int) -> Row:
    for i in range(min(200, n)):
        call(i)
    latencies = []
    perf = time.perf_counter_ns
    start = time.perf_counter()
    for i in range(n):
        t0 = perf()
        call(i)
        latencies.append(perf() - t0)
    return Row(name, n, time.perf_counter() - start, latencies)


# -- async measurements ------------------------------------------------------------------------


async def ticker(stop: asyncio.Event, lags: list[float], interval: float = 0.001) -> None:
    """Record how late each 1 ms sleep wakes up: a blocked loop shows as lag."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        start = loop.time()
        await asyncio.sleep(interval)
        lags.append(loop.time() - start - interval)


async def with_ticker(work: Callable[[], Awaitable[Row]]) -> tuple[Row, float]:
    stop = asyncio.Event()
    lags: list[float] = [0.0]
    task = asyncio.create_task(ticker(stop, lags))
    await asyncio.sleep(0.01)
    try:
        row = await work()
    finally:
        stop.set()
        await task
    return row, max(lags)


async def bench_async_ledger(
    name: str, ledger: AsyncLedger, charges: list[Charge], n: int, concurrency: int
) -> Row:
    now = time.time()
    for i in range(100):
        await ledger.reserve(f"aw{i}", charges, now=now, ttl=60)
        await ledger.commit(f"aw{i}", charges, now=now)
    latencies: list[int] = []
    perf = time.perf_counter_ns
    per_task = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            rid = f"a{w}-{i}"
            t0 = perf()
            await ledger.reserve(rid, charges, now=now, ttl=60)
            await ledger.commit(rid, charges, now=now)
            latencies.append(perf() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Row(name, per_task * concurrency, time.perf_counter() - start, latencies)


async def bench_async_calls(
    name: str, call: Callable[[int], Awaitable[object]], n: int, concurrency: int
) -> Row:
    for i in range(100):
        await call(i)
    latencies: list[int] = []
    perf = time.perf_counter_ns
    per_task = n // concurrency

    async def worker(w: int) -> None:
        for i in range(per_task):
            t0 = perf()
            await call(w * per_task + i)
            latencies.append(perf() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return Row(name, per_task * concurrency, time.perf_counter() - start, latencies)


async def blocking_lag(ledger: Ledger, charges: list[Charge], n: int) -> float:
    """The lag a sync ledger causes when (wrongly) called inside the event loop."""

    async def work() -> Row:
        now = time.time()
        for i in range(n):
            ledger.reserve(f"b{i}", charges, now=now, ttl=60)
            ledger.commit(f"b{i}", charges, now=now)
            if i % 20 == 0:
                await asyncio.sleep(0)
        return Row("", n, 1.0, [0])

    _, lag = await with_ticker(work)
    return lag


# -- round trips -------------------------------------------------------------------------------


def sync_round_trips(url: str, prefix: str) -> tuple[float, float]:
    ledger = open_ledger(url, connection_class=CountingConnection)
    now = time.time()
    charges = charges_for(prefix, "acme:rt", 3, now + 600)
    ledger.reserve("warm", charges, now=now, ttl=60)
    ledger.commit("warm", charges, now=now)
    reserve = commit = 0
    n = 100
    for i in range(n):
        before = CountingConnection.sent
        ledger.reserve(f"rt{i}", charges, now=now, ttl=60)
        reserve += CountingConnection.sent - before
        before = CountingConnection.sent
        ledger.commit(f"rt{i}", charges, now=now)
        commit += CountingConnection.sent - before
    ledger.close()
    return reserve / n, commit / n


async def async_round_trips(url: str, prefix: str) -> tuple[float, float]:
    ledger = open_async_ledger(url, connection_class=AsyncCountingConnection)
    now = time.time()
    charges = charges_for(prefix, "acme:art", 3, now + 600)
    await ledger.reserve("warm", charges, now=now, ttl=60)
    await ledger.commit("warm", charges, now=now)
    reserve = commit = 0
    n = 100
    for i in range(n):
        before = AsyncCountingConnection.sent
        await ledger.reserve(f"rt{i}", charges, now=now, ttl=60)
        reserve += AsyncCountingConnection.sent - before
        before = AsyncCountingConnection.sent
        await ledger.commit(f"rt{i}", charges, now=now)
        commit += AsyncCountingConnection.sent - before
    await ledger.aclose()
    return reserve / n, commit / n


def limits_round_trips(url: str, prefix: str) -> float:
    pool = redis.ConnectionPool.from_url(url, connection_class=CountingConnection)
    limiter = FixedWindowRateLimiter(RedisStorage(url, connection_pool=pool, key_prefix=prefix))
    item = RateLimitItemPerDay(10**9)
    limiter.hit(item, "rt")
    before = CountingConnection.sent
    for _ in range(100):
        limiter.hit(item, "rt")
    pool.disconnect()
    return (CountingConnection.sent - before) / 100


# -- memory per counter ------------------------------------------------------------------------


def memory_per_counter(users: int) -> float:
    gc.collect()
    ledger = MemoryLedger()
    now = time.time()
    # Key strings are built first: they belong to the caller, and the ledger keeps them.
    keys = [f"pg:{{u:acme:user{i}}}:usd:day:1764201600" for i in range(users)]
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i, key in enumerate(keys):
        charge = [Charge(key, 123_456_789, 5_000_000_000, now + 86_400)]
        ledger.reserve(f"r{i}", charge, now=now, ttl=60)
        ledger.commit(f"r{i}", charge, now=now)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(ledger) == users
    key_bytes = sum(sys.getsizeof(k) for k in keys) / users
    return used / users + key_bytes


async def redis_memory_per_counter(url: str, prefix: str, users: int) -> float:
    ledger = open_async_ledger(url, max_connections=64)
    now = time.time()
    todo = iter(range(users))

    async def worker() -> None:
        # 64 workers pulling from one iterator, rather than one task per user: 100,000
        # tasks at once would starve the loop past the 0.25 s connect timeout.
        for i in todo:
            key = f"{prefix}:mem:{{u:acme:user{i}}}:usd:day:1764201600"
            charge = [Charge(key, 123_456_789, 5_000_000_000, now + 600)]
            await ledger.reserve(f"r{i}", charge, now=now, ttl=60)
            await ledger.commit(f"r{i}", charge, now=now)

    await asyncio.gather(*(worker() for _ in range(64)))
    await ledger.aclose()
    client = redis.Redis.from_url(url)
    sample = range(0, users, max(1, users // 1000))
    sizes = [
        client.memory_usage(f"{prefix}:mem:{{u:acme:user{i}}}:usd:day:1764201600", samples=0)
        for i in sample
    ]
    client.close()
    return statistics.mean(s for s in sizes if s)


# -- several processes at once -----------------------------------------------------------------


def process_worker(
    kind: str, target: str, index: int, n: int, prefix: str, start: Any, out: Any
) -> None:
    """One benchmark process: warm up, wait for the others, time ``n`` reserve+commit pairs."""
    ledger: Ledger
    if kind == "memory":
        ledger = MemoryLedger()
    elif kind == "sqlite":
        ledger = SqliteLedger(target)
    else:
        ledger = open_ledger(target)
    now = time.time()
    charges = charges_for(prefix, f"acme:proc{index}", 3, now + 600)
    for i in range(min(200, n)):
        ledger.reserve(f"w{index}-{i}", charges, now=now, ttl=60)
        ledger.commit(f"w{index}-{i}", charges, now=now)
    start.wait()
    perf = time.perf_counter_ns
    latencies = []
    began = time.perf_counter()
    for i in range(n):
        rid = f"p{index}-{i}"
        t0 = perf()
        ledger.reserve(rid, charges, now=now, ttl=60)
        ledger.commit(rid, charges, now=now)
        latencies.append(perf() - t0)
    out.put((time.perf_counter() - began, latencies))
    ledger.close()


def bench_processes(kind: str, target: str, processes: int, n: int, prefix: str) -> Row:
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(processes)
    out: Any = ctx.Queue()
    children = [
        ctx.Process(target=process_worker, args=(kind, target, i, n, prefix, start, out))
        for i in range(processes)
    ]
    for child in children:
        child.start()
    results = [out.get(timeout=600) for _ in children]
    for child in children:
        child.join(timeout=60)
    latencies = [latency for _, part in results for latency in part]
    seconds = max(elapsed for elapsed, _ in results)
    name = f"{kind} reserve+commit, 3 keys, {processes} process(es)"
    return Row(name, processes * n, seconds, latencies)


# -- main --------------------------------------------------------------------------------------


def cleanup(url: str, prefix: str) -> int:
    client = redis.Redis.from_url(url)
    deleted = 0
    batch = []
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        batch.append(key)
        if len(batch) == 1000:
            deleted += client.delete(*batch)
            batch.clear()
    if batch:
        deleted += client.delete(*batch)
    client.close()
    return deleted


def print_table(rows: list[Row], lags: dict[str, float]) -> None:
    header = f"{'operation':<58} {'ops/s':>10} {'p50 us':>9} {'p99 us':>9} {'loop lag':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        lag = lags.get(row.name)
        lag_text = f"{lag * 1000:.2f}ms" if lag is not None else ""
        print(
            f"{row.name:<58} {row.per_second:>10,.0f} {row.pct(0.5):>9.1f} "
            f"{row.pct(0.99):>9.1f} {lag_text:>9}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--sqlite-dir", help="folder for the SQLite file (default: a temp dir)")
    args = parser.parse_args()
    url: str = args.redis
    scale = 5 if args.quick else 1
    n_mem, n_redis = 50_000 // scale, 5_000 // scale
    n_sqlite = 5_000 // scale
    prefix = f"pgbench:{uuid.uuid4().hex[:12]}"
    folder = Path(tempfile.mkdtemp(prefix="pgbench-", dir=args.sqlite_dir))
    sqlite_path = str(folder / "bench.db")
    expires = time.time() + 600
    rows: list[Row] = []
    lags: dict[str, float] = {}

    try:
        memory = MemoryLedger()
        for count in (1, 3):
            ch = charges_for("pg", f"acme:mem{count}", count, expires)
            rows.append(
                bench_sync_ledger(
                    f"payi_guard memory reserve+commit, {count} key(s)", memory, ch, n_mem
                )
            )
        limiter = FixedWindowRateLimiter(MemoryStorage())
        item = RateLimitItemPerDay(10**12)
        rows.append(
            bench_sync_calls(
                "limits MemoryStorage FixedWindow hit", lambda i: limiter.hit(item, "u"), n_mem
            )
        )

        sqlite = SqliteLedger(sqlite_path)
        for count in (1, 3):
            ch = charges_for("pg", f"acme:sqlite{count}", count, expires)
            rows.append(
                bench_sync_ledger(
                    f"payi_guard SQLite sync reserve+commit, {count} key(s)", sqlite, ch, n_sqlite
                )
            )

        sync = open_ledger(url)
        for count in (1, 3):
            ch = charges_for(prefix, f"acme:sync{count}", count, expires)
            rows.append(
                bench_sync_ledger(
                    f"payi_guard Redis sync reserve+commit, {count} key(s)", sync, ch, n_redis
                )
            )
        redis_limiter = FixedWindowRateLimiter(RedisStorage(url, key_prefix=prefix))
        rows.append(
            bench_sync_calls(
                "limits RedisStorage FixedWindow hit",
                lambda i: redis_limiter.hit(item, "u"),
                n_redis,
            )
        )

        async def run_async() -> None:
            aio_sqlite = AsyncSqliteLedger(sqlite_path)
            for count in (1, 3):
                ch = charges_for("pg", f"acme:asqlite{count}", count, expires)
                for concurrency in (1, 32):
                    name = (
                        f"payi_guard SQLite async reserve+commit, {count} key(s), "
                        f"{concurrency} task(s)"
                    )

                    async def sqlite_work(
                        ch: list[Charge] = ch, c: int = concurrency, name: str = name
                    ) -> Row:
                        return await bench_async_ledger(name, aio_sqlite, ch, n_sqlite, c)

                    row, lag = await with_ticker(sqlite_work)
                    rows.append(row)
                    lags[row.name] = lag
            await aio_sqlite.aclose()
            aio = open_async_ledger(url)
            for count in (1, 3):
                ch = charges_for(prefix, f"acme:async{count}", count, expires)
                for concurrency in (1, 32):
                    name = (
                        f"payi_guard Redis async reserve+commit, {count} key(s), "
                        f"{concurrency} task(s)"
                    )

                    async def work(
                        ch: list[Charge] = ch, c: int = concurrency, name: str = name
                    ) -> Row:
                        return await bench_async_ledger(name, aio, ch, n_redis, c)

                    row, lag = await with_ticker(work)
                    rows.append(row)
                    lags[row.name] = lag
            await aio.aclose()
            storage = AsyncLimitsRedisStorage(
                url.replace("redis://", "async+redis://", 1),
                implementation="redispy",
                key_prefix=prefix,
            )
            aio_limiter = AsyncFixedWindowRateLimiter(storage)
            for concurrency in (1, 32):
                name = f"limits aio RedisStorage(redispy) hit, {concurrency} task(s)"

                async def hit_work(c: int = concurrency, name: str = name) -> Row:
                    return await bench_async_calls(
                        name, lambda i: aio_limiter.hit(item, "u"), n_redis, c
                    )

                row, lag = await with_ticker(hit_work)
                rows.append(row)
                lags[row.name] = lag
            blocked = await blocking_lag(
                sync, charges_for(prefix, "acme:block", 1, expires), 2000 // scale
            )
            lags["(sync Redis ledger called inside the loop: do not)"] = blocked

        asyncio.run(run_async())
        sync.close()
        sqlite.close()

        print()
        print_table(rows, lags)
        print(
            "\nloop lag: the worst lateness of a 1 ms ticker task while the row ran. With"
            "\n32 tasks it includes the time the loop spends running the other tasks' code."
            "\nFor contrast, a sync Redis ledger called inside the loop (20 calls between"
            f"\nyields) blocked it for up to "
            f"{lags['(sync Redis ledger called inside the loop: do not)'] * 1000:.2f} ms."
        )

        process_rows = []
        n_proc = 5_000 // scale
        for kind, target in (("memory", ""), ("sqlite", sqlite_path), ("redis", url)):
            for processes in (1, 4):
                process_rows.append(bench_processes(kind, target, processes, n_proc, prefix))
        print("\nreserve+commit with 1 and 4 processes calling at once (3 keys per call;")
        print("org and global counters shared; memory: one unshared store per process):")
        print_table(process_rows, {})

        reserve_rt, commit_rt = sync_round_trips(url, prefix)
        areserve_rt, acommit_rt = asyncio.run(async_round_trips(url, prefix))
        hit_rt = limits_round_trips(url, prefix)
        print("\nRedis requests per operation (3 counters per call):")
        print(f"  sync  reserve {reserve_rt:.2f}   commit {commit_rt:.2f}")
        print(f"  async reserve {areserve_rt:.2f}   commit {acommit_rt:.2f}")
        print(f"  limits FixedWindow hit {hit_rt:.2f} (one counter)")

        users = args.users // scale
        per_counter = memory_per_counter(users)
        redis_bytes = asyncio.run(redis_memory_per_counter(url, prefix, users))
        print(f"\nmemory per tracked counter, {users:,} users:")
        print(f"  memory ledger  {per_counter:,.0f} bytes (tracemalloc, including the key string)")
        print(
            f"  Redis          {redis_bytes:,.0f} bytes (MEMORY USAGE of the counter hash, sampled)"
        )

        memory_row = rows[0]
        verdict = "met" if memory_row.pct(0.5) <= 10 else "NOT met"
        print(
            f"\ntarget memory reserve+commit <= 10 us: p50 {memory_row.pct(0.5):.1f} us, "
            f"mean {memory_row.seconds / memory_row.ops * 1e6:.1f} us -> {verdict}"
        )
    finally:
        print(f"\ncleaned up {cleanup(url, prefix)} benchmark keys under {prefix}")
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


if __name__ == "__main__":
    main()
