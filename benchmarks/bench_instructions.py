"""Instructions per call, guarded and bare, counted by valgrind (run by hand).

    python benchmarks/bench_instructions.py [--calls 40] [--jobs 2] [--cache KIB] [--footprint]
        [CASE ...]

Timings on a shared machine move by tens of percent from one run to the next; the
number of instructions a call executes does not (every run hashes strings with
``PYTHONHASHSEED=0``, or the seed given in the environment: string hashes decide how
dicts lay out, which moves a count by a few per cent from one process to the next).
Each case runs in its own Python process under ``valgrind --tool=callgrind``, which
counts only what runs inside one ``functools.reduce`` call
(``--toggle-collect=functools_reduce``): ``--calls`` calls after a warm-up, not the
imports or the set-up. The count divided by ``--calls`` is printed per case, and each
guarded case as a ratio to its bare baseline:

* ``create``: ``chat.completions.create`` over an in-memory transport (the
  ``bench_meter.py`` set-up: openai over httpx2, the memory store), bare, guarded with
  the ``genai_call`` line as JSON to ``/dev/null``, guarded with logging off, guarded
  with the usage analytics off (``analytics_days: 0``), and through ``bench_meter.py``'s
  ``FloorTransport``, the least a transport-level meter does (the floor);
* ``acreate``: the same ``create()`` through the async client (``openai.AsyncOpenAI``),
  bare and guarded (JSON log), one event-loop run a call;
* ``stream``: the same 200-chunk chat stream read whole, bare and guarded (JSON log);
* ``astream``: the same stream through the async client (``openai.AsyncOpenAI``);
* ``asgi``: one request through the ``bench_web.py`` Starlette apps: bare, auth, auth
  and the guard gating the path, auth and slowapi; the guard's instructions over auth
  as a ratio to slowapi's.

What instructions leave out: time spent waiting on memory (caches), in the kernel
(the log line's ``write``), or on other threads. ``--cache KIB`` adds the first:
callgrind then simulates a last-level cache of that size and counts its misses per
call (each one a trip past the core's own cache; 512 KiB is a core's L2 on this
project's 2-core AMD EPYC machines). ``--footprint`` counts what fills that cache:
the distinct Python functions one call runs and the bytes of their bytecode.
``bench_meter.py`` and ``bench_web.py`` give the wall-clock view beside it. Needs
``valgrind`` on ``PATH`` and a CPython whose symbols name ``functools_reduce`` (the
usual builds do).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import CodeType, FrameType

HERE = Path(__file__).resolve().parent
WARM_UP = {"create": 30, "acreate": 30, "stream": 5, "astream": 5, "asgi": 300}
"""Calls before counting, per group (``asgi``: every cache of its 100 users filled)."""

CASES: dict[str, str] = {
    "create/bare": "chat.completions.create, bare SDK",
    "create/guarded": "chat.completions.create, guarded, JSON log",
    "create/guarded-quiet": "chat.completions.create, guarded, logging off",
    "create/no-analytics": "chat.completions.create, guarded, JSON log, analytics_days: 0",
    "create/floor": "chat.completions.create, the least a meter does, JSON log",
    "acreate/bare": "chat.completions.create, bare async SDK",
    "acreate/guarded": "chat.completions.create, guarded async SDK, JSON log",
    "stream/bare": "200-chunk stream, bare SDK",
    "stream/guarded": "200-chunk stream, guarded, JSON log",
    "astream/bare": "200-chunk stream, bare async SDK",
    "astream/guarded": "200-chunk stream, guarded async SDK, JSON log",
    "asgi/bare": "request, Starlette endpoint",
    "asgi/auth": "request, + AuthenticationMiddleware",
    "asgi/guard": "request, + auth + GuardMiddleware (gated)",
    "asgi/slowapi": "request, + auth + slowapi decorator",
}


# -- inside valgrind: one case ---------------------------------------------------------


def _call_factory(case: str) -> Callable[[], object]:
    """The function one call of ``case`` runs (set up, not yet warmed up)."""
    sys.path.insert(0, str(HERE))
    group, variant = case.split("/")
    if group == "asgi":
        import bench_web

        apps = {
            "bare": bench_web.bare_app,
            "auth": bench_web.auth_app,
            "guard": lambda: bench_web.guard_app(["/api/*"]),
            "slowapi": bench_web.slowapi_app,
        }
        app = apps[variant]()
        templates = itertools.cycle(bench_web.scopes(100))
        loop = asyncio.new_event_loop()

        async def send(message: dict[str, object]) -> None:
            if message["type"] == "http.response.start" and message["status"] != 200:
                raise SystemExit(f"{case}: status {message['status']}")

        # As bench_web.run: a fresh scope per request, users in turn.
        return lambda: loop.run_until_complete(
            app({**next(templates), "state": {}}, bench_web.receive, send)
        )

    import bench_meter
    import httpx2

    from payi_guard import track_context
    from payi_guard.log import configure_json

    if variant == "guarded-quiet":
        bench_meter.quiet_logs()
    else:
        configure_json(open(os.devnull, "w"))  # noqa: SIM115 - lives as long as the process
    track_context(user_id="bench").__enter__()  # for the life of the process, as the calls run
    transport: httpx2.BaseTransport = bench_meter.mock_transport(200)
    if variant == "floor":
        transport = bench_meter.FloorTransport(transport)
    client = bench_meter.make_client("http://mock/v1", transport)
    if variant in ("guarded", "guarded-quiet"):
        client = bench_meter.make_guard().wrap(client)
    elif variant == "no-analytics":
        client = bench_meter.make_guard(analytics_days=0).wrap(client)
    if group == "stream":
        return bench_meter.whole_stream(client)
    if group in ("astream", "acreate"):
        aclient = bench_meter.make_async_client(bench_meter.mock_transport(200))
        if variant == "guarded":
            aclient = bench_meter.make_guard().wrap(aclient)
        if group == "astream":
            run = bench_meter.async_stream(aclient)
        else:
            run = bench_meter.async_plain_call(aclient)
        aloop = asyncio.new_event_loop()
        return lambda: aloop.run_until_complete(run())
    return bench_meter.plain_call(client)


def run_case(case: str, calls: int, footprint: bool) -> None:
    """Run ``calls`` calls of ``case`` inside ``functools.reduce`` (what is counted).

    With ``footprint``, run one call instead and print, as JSON, how many distinct
    Python functions it ran and the size of their bytecode.
    """
    call = _call_factory(case)
    for _ in range(WARM_UP[case.split("/")[0]]):
        call()
    if not footprint:
        functools.reduce(lambda _, __: call(), range(calls), None)
        return
    codes: dict[int, CodeType] = {}

    def note(frame: FrameType, event: str, arg: object) -> None:
        if event == "call":
            codes[id(frame.f_code)] = frame.f_code

    sys.setprofile(note)
    call()
    sys.setprofile(None)
    sizes = [len(code.co_code) for code in codes.values()]
    print(json.dumps({"functions": len(sizes), "bytecode": sum(sizes)}))


# -- outside: run every case under valgrind --------------------------------------------


def count(case: str, calls: int, cache_kib: int | None) -> dict[str, float]:
    """Per call of ``case``: instructions, and misses of a simulated cache when asked.

    Args:
        case: the case.
        calls: calls counted.
        cache_kib: when given, callgrind also simulates a last-level cache of that size
            (8-way, 64-byte lines) and the misses of instruction fetches, reads and
            writes in it are counted (``misses``).
    """
    command = ["valgrind", "--tool=callgrind", "--toggle-collect=functools_reduce"]
    if cache_kib is not None:
        command += ["--cache-sim=yes", f"--LL={cache_kib * 1024},8,64"]
    command += [f"--callgrind-out-file={os.devnull}", sys.executable, __file__]
    command += ["--run", case, "--calls", str(calls)]
    # One string hash for every run: a dict's layout (and so its probes) follows the
    # hashes, which move a count by a few per cent from one process to the next.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    found = re.search(r"Collected\s*:\s*([\d ]+)", out.stderr)
    events = [int(v) for v in found.group(1).split()] if found else []
    if out.returncode != 0 or not events or events[0] == 0:
        raise SystemExit(f"{case}: valgrind run failed\n{out.stderr[-2000:]}")
    result = {"instructions": events[0] / calls}
    if cache_kib is not None:
        # Ir Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw: the last three are the LL misses.
        result["misses"] = sum(events[6:9]) / calls
    return result


def footprint(case: str) -> dict[str, float]:
    """The distinct Python functions one call of ``case`` runs, and their bytecode bytes."""
    out = subprocess.run(
        [sys.executable, __file__, "--run", case, "--footprint"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{case}: footprint run failed\n{out.stderr[-2000:]}")
    values: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return values


def report(counts: dict[str, dict[str, float]], cache_kib: int | None) -> None:
    """Print each case's counts, and each guarded case against its baseline."""
    metrics = [
        m
        for m in ("instructions", "misses", "functions", "bytecode")
        if m in next(iter(counts.values()))
    ]
    out = io.StringIO()
    out.write(f"  {'case':<22}" + "".join(f"{m:>14}" for m in metrics) + "\n")
    for case, values in counts.items():
        row = "".join(f"{values[m]:>14,.0f}" for m in metrics)
        out.write(f"  {case:<22}{row}  {CASES[case]}\n")
    if cache_kib is not None:
        out.write(f"  (misses: of a simulated {cache_kib} KiB last-level cache)\n")
    if "functions" in metrics:
        out.write("  (functions, bytecode: the distinct Python functions one call runs)\n")
    out.write("\n")

    def ratio(name: str, guarded: str, bare: str) -> None:
        if guarded in counts and bare in counts:
            parts = []
            for m in metrics:
                g, b = counts[guarded][m], counts[bare][m]
                parts.append(f"{m} {g / b:.3f}x (+{g - b:,.0f})")
            out.write(f"  {name:<40}{'; '.join(parts)}\n")

    ratio("create(), guarded / bare (JSON log)", "create/guarded", "create/bare")
    ratio("create(), guarded / bare (logging off)", "create/guarded-quiet", "create/bare")
    ratio("create(), analytics off / bare", "create/no-analytics", "create/bare")
    ratio("create(), the floor / bare", "create/floor", "create/bare")
    ratio("create(), guarded / the floor", "create/guarded", "create/floor")
    ratio("async create(), guarded / bare", "acreate/guarded", "acreate/bare")
    ratio("200-chunk stream, guarded / bare", "stream/guarded", "stream/bare")
    ratio("200-chunk async stream, guarded / bare", "astream/guarded", "astream/bare")
    if all(c in counts for c in ("asgi/auth", "asgi/guard", "asgi/slowapi")):
        parts = []
        for m in metrics:
            guard = counts["asgi/guard"][m] - counts["asgi/auth"][m]
            slowapi = counts["asgi/slowapi"][m] - counts["asgi/auth"][m]
            parts.append(f"{m} {guard / slowapi:.3f}x ({guard:,.0f} vs {slowapi:,.0f})")
        out.write(f"  {'middleware over auth, guard / slowapi':<40}{'; '.join(parts)}\n")
    print(out.getvalue(), end="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("cases", nargs="*", help="cases or groups (default: all)")
    parser.add_argument("--calls", type=int, default=40, help="calls counted per case")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at once")
    parser.add_argument(
        "--cache",
        type=int,
        metavar="KIB",
        help="also count misses of a simulated last-level cache of KIB KiB (512: a core's L2 here)",
    )
    parser.add_argument(
        "--footprint",
        action="store_true",
        help="also count the distinct Python functions one call runs and their bytecode",
    )
    parser.add_argument("--run", help=argparse.SUPPRESS)  # inside valgrind
    args = parser.parse_args()
    if args.calls < 1 or args.jobs < 1 or (args.cache is not None and args.cache < 1):
        parser.error("--calls, --jobs and --cache must be at least 1")
    if args.run:
        run_case(args.run, args.calls, args.footprint)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt-get install valgrind)")
    wanted = args.cases or list(CASES)
    cases = [c for c in CASES if c in wanted or c.split("/")[0] in wanted]
    unknown = [w for w in wanted if w not in CASES and w not in {c.split("/")[0] for c in CASES}]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    print(
        f"instructions per call (valgrind callgrind, {args.calls} calls after a warm-up, "
        f"Python {sys.version.split()[0]})\n"
    )
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda c: count(c, args.calls, args.cache), cases))
    if args.footprint:
        for case, result in zip(cases, results, strict=True):
            result.update(footprint(case))
    report(dict(zip(cases, results, strict=True)), args.cache)


if __name__ == "__main__":
    main()
