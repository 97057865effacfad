"""How large the SQLite ledger file grows: many users over several simulated days.

Run by hand from the repository root::

    python benchmarks/bench_sqlite_size.py [--users 100000] [--days 7] [--no-compare]

Every simulated user makes ``--calls`` calls a day, spread over the day, each a reserve
and a commit on the counters the default budgets of the README charge: the user's day
and month spend, the user's requests per minute, the org's month spend (1,000 orgs)
and the global month spend, keyed and expiring as the engine keys them (window end plus
one hour). The run starts on 27 November so that a month ends on the way. After each
day it prints the size of the database file and its WAL, the counters stored and the
free pages SQLite will reuse; then, unless ``--no-compare``, the same run with pruning
turned off, for contrast. The time is simulated (the ``now`` passed to the ledger), so
a week runs in minutes.
"""

from __future__ import annotations

import argparse
import calendar
import sqlite3
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from payi_guard.ledger import Charge, SqliteLedger

DAY = 86_400
GRACE = 3_600  # the engine keeps a counter one hour past its window's end
START = datetime(2026, 11, 27, tzinfo=timezone.utc)
HUGE = 10**15


def month_window(ts: float) -> tuple[int, int]:
    moment = datetime.fromtimestamp(ts, timezone.utc)
    start = datetime(moment.year, moment.month, 1, tzinfo=timezone.utc)
    days = calendar.monthrange(moment.year, moment.month)[1]
    begin = int(start.timestamp())
    return begin, begin + days * DAY


def charges(user: int, now: float, estimate: int) -> list[Charge]:
    day = int(now) // DAY * DAY
    minute = int(now) // 60 * 60
    month, month_end = month_window(now)
    org = user % 1000
    owner = f"acme{org}:user{user}"
    return [
        Charge(f"pg:{{u:{owner}}}:usd:day:{day}", estimate, HUGE, day + DAY + GRACE),
        Charge(f"pg:{{u:{owner}}}:usd:month:{month}", estimate, HUGE, month_end + GRACE),
        Charge(f"pg:{{u:{owner}}}:requests:minute:{minute}", 1, 30, minute + 60 + GRACE),
        Charge(f"pg:{{o:acme{org}}}:usd:month:{month}", estimate, HUGE, month_end + GRACE),
        Charge(f"pg:{{g:*}}:usd:month:{month}", estimate, HUGE, month_end + GRACE),
    ]


def sizes(path: Path) -> tuple[int, int, int, int]:
    wal = path.with_name(path.name + "-wal")
    conn = sqlite3.connect(path)
    try:
        counters = conn.execute("SELECT count(*) FROM counters").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        conn.close()
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0, counters, free


def simulate(folder: Path, users: int, days: int, calls: int, prune: bool) -> list[str]:
    path = folder / ("pruned.db" if prune else "unpruned.db")
    ledger = SqliteLedger(path, prune_every=8 if prune else 10**12)
    lines = []
    start = START.timestamp()
    began = time.perf_counter()
    for day in range(days):
        per_day = users * calls
        for i in range(per_day):
            now = start + day * DAY + i * DAY / per_day
            user = (i * 7919) % users  # every user, in a scattered order
            rid = f"d{day}c{i}"
            estimate = 1_000_000 + user % 1000
            ledger.reserve(rid, charges(user, now, estimate), now=now, ttl=300)
            ledger.commit(rid, charges(user, now, estimate // 2), now=now)
        db, wal, counters, free = sizes(path)
        date = datetime.fromtimestamp(start + day * DAY, timezone.utc).date()
        lines.append(
            f"  day {day + 1} ({date}): file {db / 1e6:7.1f} MB + WAL {wal / 1e6:5.1f} MB, "
            f"{counters:>9,} counters, {free:>7,} free pages "
            f"({time.perf_counter() - began:.0f} s)"
        )
        print(lines[-1], flush=True)
    ledger.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--calls", type=int, default=1, help="calls per user per day")
    parser.add_argument("--no-compare", action="store_true", help="skip the unpruned run")
    parser.add_argument("--dir", help="folder for the files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgsize-", dir=args.dir) as name:
        folder = Path(name)
        print(f"{args.users:,} users, {args.calls} call(s) each a day, {args.days} days, pruned:")
        simulate(folder, args.users, args.days, args.calls, prune=True)
        if not args.no_compare:
            print("the same without pruning:")
            simulate(folder, args.users, args.days, args.calls, prune=False)


if __name__ == "__main__":
    main()
