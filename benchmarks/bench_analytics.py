"""What usage analytics add to a settle: reserve+commit with tallies on and off.

Run by hand from the repository root::

    python benchmarks/bench_analytics.py [--redis redis://127.0.0.1:6379/0] [--n 5000]

For memory, SQLite and Redis (sync), it times the commit (the settle) and the
reserve+commit pair of a call charged to three counters (user, org, global), once
without tallies and once with the two tallies a settled call writes (the user's and the
org's day: spend, calls, tokens, by model and by use case), in the same run,
alternating blocks of calls so that drift hits both the same. The tallies ride in the
commit's own atomic step (one Lua script, one transaction, one lock): no extra round
trip. Every Redis key is under a unique ``pgbench:<hex>`` prefix with a short expiry;
the SQLite file is made in a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from payi_guard.ledger import Charge, Ledger, MemoryLedger, Tally
from payi_guard.ledger.analytics import call_tallies
from payi_guard.ledger.factory import open_ledger

BIG = 10**15
BLOCK = 250


def charges(prefix: str, user: str, expires_at: float) -> list[Charge]:
    org = user.split(":")[0]
    keys = [f"{{u:{user}}}:usd:day:0", f"{{o:{org}}}:usd:month:0", "{g:*}:usd:month:0"]
    return [Charge(f"{prefix}:{key}", 1000, BIG, expires_at) for key in keys]


def tallies(prefix: str, user: str, now: float) -> tuple[Tally, ...]:
    return call_tallies(
        prefix,
        [("user", user), ("org", user.split(":")[0])],
        now=now,
        keep_days=1,
        cost=1000,
        input_tokens=1200,
        output_tokens=300,
        model="gpt-4o-mini",
        use_case="chat",
    )


def measure(ledger: Ledger, prefix: str, n: int) -> dict[str, dict[str, list[int]]]:
    """Latencies (ns) of commit and of reserve+commit, with and without tallies."""
    now = time.time()
    user = "acme:alice"
    charged = charges(prefix, user, now + 600)
    written = tallies(prefix, user, now)
    out: dict[str, dict[str, list[int]]] = {
        mode: {"commit": [], "pair": []} for mode in ("off", "on")
    }
    perf = time.perf_counter_ns
    for i in range(200):  # warm up: connections, scripts, caches
        ledger.reserve(f"w{i}", charged, now=now, ttl=60)
        ledger.commit(f"w{i}", charged, now=now, tallies=written)
    done = 0
    while done < n:
        for mode in ("off", "on"):
            extra: Sequence[Tally] = written if mode == "on" else ()
            for i in range(done, min(done + BLOCK, n)):
                rid = f"{mode}{i}"
                t0 = perf()
                ledger.reserve(rid, charged, now=now, ttl=60)
                t1 = perf()
                ledger.commit(rid, charged, now=now, tallies=extra)
                t2 = perf()
                out[mode]["commit"].append(t2 - t1)
                out[mode]["pair"].append(t2 - t0)
        done += BLOCK
    return out


def pct(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def report(name: str, data: dict[str, dict[str, list[int]]]) -> None:
    for what in ("commit", "pair"):
        off, on = data["off"][what], data["on"][what]
        m_off, m_on = statistics.median(off) / 1000, statistics.median(on) / 1000
        print(
            f"{name:8} {what:7} off p50 {m_off:8.1f} us p99 {pct(off, 0.99):8.1f} us | "
            f"on p50 {m_on:8.1f} us p99 {pct(on, 0.99):8.1f} us | "
            f"+{m_on - m_off:6.1f} us ({(m_on / m_off - 1) * 100:+.0f}%)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--n", type=int, default=5000, help="calls per mode and backend")
    args = parser.parse_args()
    prefix = f"pgbench:{uuid.uuid4().hex[:10]}"
    print(f"{args.n} calls per mode; 3 counters per call; 2 tallies when on")
    report("memory", measure(MemoryLedger(), prefix, args.n))
    with tempfile.TemporaryDirectory() as folder:
        sqlite = open_ledger(f"sqlite:///{Path(folder) / 'bench.db'}")
        try:
            report("sqlite", measure(sqlite, prefix, args.n))
        finally:
            sqlite.close()
    try:
        redis_ledger = open_ledger(args.redis)
        report("redis", measure(redis_ledger, prefix, args.n))
    except Exception as exc:
        print(f"redis    skipped: {exc}", file=sys.stderr)
    else:
        import redis

        raw = redis.Redis.from_url(args.redis)
        keys = list(raw.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            raw.delete(*keys)
        raw.close()
        redis_ledger.close()


if __name__ == "__main__":
    main()
