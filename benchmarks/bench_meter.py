"""Meter benchmark: a guarded SDK call next to the same bare call, in one run.

Run by hand from the repository root::

    python benchmarks/bench_meter.py [--quick]

It measures, with the real openai SDK (3.x, httpx2) and the memory store:

* per-call time of ``chat.completions.create`` bare and guarded (with the sync client,
  and over the mock transport with the async one too), over an in-process
  ``httpx2.MockTransport`` (no network: the bare call is only SDK overhead, so the
  percentage is the harshest view) and over loopback HTTP to a local
  :class:`~payi_guard.testing.FakeProvider` run in a child process (the nearest
  thing to a real call);
* time to the first streamed chunk, bare and guarded, over both (the stream is then
  closed, outside the time), and over the mock transport the close alone: a stream cut
  before its usage is settled then, its input counted with the model's tokenizer;
* the cost per chunk of the stream wrapper: a 200-chunk stream read bare and guarded
  over the mock transport (with the sync client, and with the async one), the guard's
  added time per chunk (the slope of what it adds between 50- and 400-chunk streams, so
  its per-call work cancels out), and
  :class:`~payi_guard.meter.sse.StreamMeter` alone;
* the same with the ``genai_call`` line rendered as JSON (to a null stream), since apps
  log every call;
* the floor: the same ``create()`` through :class:`FloorTransport`, the least any
  transport-level meter does (parse the request and the response, hold and settle an
  amount under a lock, log one line), so the guard's cost can be read against what no
  meter avoids as well as against the bare call;
* the guard with no SDK around it: one chat request, built once, sent again and again
  by a plain httpx2 client, bare and guarded, so the guard's code stays in the caches
  (what its own work costs at best; between two SDK calls it costs more).

Bare and guarded runs alternate, round by round, so drift hits both; the bare median is
shown, and the guarded time as that times the median of the rounds' ratios. Each
target's line also gives the middle half of the rounds' ratios (from the lower to the
upper quartile): on a shared machine one run's ratio moves by tens of per cent, and a
verdict whose middle half straddles the target is not settled by that run.
Each mode ends with its targets, as ratios to the bare SDK measured in the same run:
``create()`` at most 1.10x the bare call (with JSON logging), the 200-chunk stream at
most 1.05x the bare stream and 5 µs per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, NamedTuple

import httpx2
import openai
import structlog

from payi_guard import Guard, track_context
from payi_guard.log import configure_json
from payi_guard.meter.parse import classify
from payi_guard.meter.sse import StreamMeter

PRICES = {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2}}
MESSAGES: Any = [{"role": "user", "content": "Write a haiku about benchmarks, please."}]

CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-test",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Numbers in a row, " * 4},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 20, "total_tokens": 32},
}


def sse_chunks(n: int, *, include_usage: bool = True) -> list[bytes]:
    """A chat stream of ``n`` text chunks shaped as OpenAI sends them.

    As in recorded OpenAI traffic: a role chunk, the text chunks, a ``finish_reason``
    chunk, then ``[DONE]``; each chunk carries ``"usage":null`` and ends with the
    ``obfuscation`` member, and the usage-only chunk comes before ``[DONE]``, only when
    the request asked for ``stream_options.include_usage`` (the guard asks; a bare app
    usually does not).
    """

    def event(obj: dict[str, Any]) -> bytes:
        return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"

    def chunk(choices: list[Any], index: int) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": "chatcmpl-Dx0XpqH8w09uBXwq1zFGYdETjtnEl",
            "object": "chat.completion.chunk",
            "created": 1782955817,
            "model": "gpt-4o-mini-2024-07-18",
            "service_tier": "default",
            "system_fingerprint": "fp_d0469e1700",
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = None
        obj["obfuscation"] = "C63rUqdZk18g"[: 4 + index % 8]
        return obj

    def choice(delta: dict[str, Any], finish: str | None = None) -> list[Any]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    chunks = [event(chunk(choice({"role": "assistant", "content": ""}), 0))]
    chunks += [event(chunk(choice({"content": f" word{i}"}), i)) for i in range(n)]
    chunks.append(event(chunk(choice({}, "stop"), n)))
    if include_usage:
        last = chunk([], 0)
        last["usage"] = CHAT["usage"]
        chunks.append(event(last))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


class _Chunks(httpx2.SyncByteStream, httpx2.AsyncByteStream):
    """A response body read as from the network: each chunk once.

    Iterating again goes on where the last iteration stopped, as a connection's body
    does: the async SDK drains the body after ``[DONE]`` (``async for`` over the
    stream once more), and a stream that started over would be read twice.
    """

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks
        self._next = 0

    def __iter__(self) -> Iterator[bytes]:
        chunks = self._chunks
        while self._next < len(chunks):
            self._next += 1
            yield chunks[self._next - 1]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._chunks
        while self._next < len(chunks):
            self._next += 1
            yield chunks[self._next - 1]


def mock_transport(stream_chunks: int) -> httpx2.MockTransport:
    """An in-process transport answering chat calls as OpenAI does (JSON or a stream)."""
    body = json.dumps(CHAT).encode()
    streams = {flag: sse_chunks(stream_chunks, include_usage=flag) for flag in (False, True)}

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent = json.loads(request.content)
        if sent.get("stream"):
            options = sent.get("stream_options") or {}
            chunks = streams[options.get("include_usage") is True]
            return httpx2.Response(
                200, headers={"content-type": "text/event-stream"}, stream=_Chunks(chunks)
            )
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=body)

    return httpx2.MockTransport(handler)


class FloorTransport(httpx2.BaseTransport):
    """The least a transport-level meter does per plain call: a baseline, not a meter.

    It parses the request body (for the model and an upper bound), adds that bound to a
    counter under a lock, sends, reads and parses the response body (for the usage),
    swaps the bound for the cost under the lock, and logs one ``genai_call`` line
    through structlog, as configured. No attribution, no limits, no prices, no
    refusal, no analytics, no idempotence: what the guard does beyond this is what it
    offers beyond metering.
    """

    def __init__(self, inner: httpx2.BaseTransport) -> None:
        self._inner = inner
        self._lock = threading.Lock()
        self._held: dict[tuple[str, str], int] = {}
        self._log = structlog.get_logger("payi_guard")

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        model = json.loads(request.content)["model"]
        bound = len(request.content) + 4096  # bytes bound the input tokens; + max output
        key = ("bench", model)
        with self._lock:
            self._held[key] = self._held.get(key, 0) + bound
        response = self._inner.handle_request(request)
        response.read()
        usage = json.loads(response.content)["usage"]
        cost = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
        with self._lock:
            self._held[key] += cost - bound
        self._log.info(
            "genai_call",
            user_id="bench",
            model=model,
            input_tokens=usage["prompt_tokens"],
            output_tokens=usage["completion_tokens"],
            cost=cost,
        )
        return response


def make_client(base_url: str, transport: httpx2.BaseTransport | None) -> openai.OpenAI:
    http_client = httpx2.Client(transport=transport) if transport is not None else None
    return openai.OpenAI(base_url=base_url, api_key="k", max_retries=0, http_client=http_client)


def make_async_client(transport: httpx2.AsyncBaseTransport) -> openai.AsyncOpenAI:
    http_client = httpx2.AsyncClient(transport=transport)
    return openai.AsyncOpenAI(
        base_url="http://mock/v1", api_key="k", max_retries=0, http_client=http_client
    )


def async_stream(client: openai.AsyncOpenAI) -> Callable[[], Awaitable[object]]:
    async def run() -> object:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, stream=True
        )
        count = 0
        async for _ in stream:
            count += 1
        return count

    return run


def plain_call(client: openai.OpenAI) -> Callable[[], object]:
    return lambda: client.chat.completions.create(model="gpt-test", messages=MESSAGES)


def plain_send(client: httpx2.Client) -> Callable[[], object]:
    """One chat request, built once, sent again and again by a plain httpx2 client.

    No SDK runs between two sends, so the code and data of the guard's transport stay
    in the caches: guarded against bare, what the guard's own work costs at best.
    """
    request = client.build_request(
        "POST", "http://mock/v1/chat/completions", json={"model": "gpt-test", "messages": MESSAGES}
    )
    return lambda: client.send(request)


def async_plain_call(client: openai.AsyncOpenAI) -> Callable[[], Awaitable[object]]:
    return lambda: client.chat.completions.create(model="gpt-test", messages=MESSAGES)


def first_chunk(client: openai.OpenAI) -> Callable[[], float]:
    """Open a stream, read its first chunk, close it: seconds to the first chunk."""

    def run() -> float:
        start = time.perf_counter()
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        next(iter(stream))
        elapsed = time.perf_counter() - start
        stream.close()
        return elapsed

    return run


def close_after_first_chunk(client: openai.OpenAI) -> Callable[[], float]:
    """:func:`first_chunk`, timing only the close (the guard settles the cut stream)."""

    def run() -> float:
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        next(iter(stream))
        start = time.perf_counter()
        stream.close()
        return time.perf_counter() - start

    return run


def whole_stream(client: openai.OpenAI) -> Callable[[], object]:
    def run() -> object:
        stream = client.chat.completions.create(model="gpt-test", messages=MESSAGES, stream=True)
        return sum(1 for _ in stream)

    return run


class Pair(NamedTuple):
    """Seconds per call, bare and guarded, and the spread of the rounds' ratios."""

    bare: float
    """The median of the bare rounds."""
    guarded: float
    """:attr:`bare` times the median of the rounds' ratios."""
    low: float
    """The lower quartile of the rounds' guarded/bare ratios."""
    high: float
    """The upper quartile of the rounds' guarded/bare ratios."""

    @property
    def ratio(self) -> float:
        """Guarded over bare: the median of the rounds' ratios."""
        return self.guarded / self.bare


def paired(
    bare: Callable[[], object], guarded: Callable[[], object], rounds: int, batch: int
) -> Pair:
    """Median seconds per call of each, alternating batches of ``batch`` calls."""

    def batches(fn: Callable[[], object]) -> Callable[[int], None]:
        def run(count: int) -> None:
            for _ in range(count):
                fn()

        return run

    return paired_batches(batches(bare), batches(guarded), rounds, batch)


def paired_parts(
    bare: Callable[[], float], guarded: Callable[[], float], rounds: int, batch: int
) -> Pair:
    """:func:`paired` of calls that time a part of themselves (they return its seconds)."""

    def batches(fn: Callable[[], float]) -> Callable[[int], float]:
        def run(count: int) -> float:
            return sum(fn() for _ in range(count))

        return run

    return paired_batches(batches(bare), batches(guarded), rounds, batch)


def paired_async(
    bare: Callable[[], Awaitable[object]],
    guarded: Callable[[], Awaitable[object]],
    rounds: int,
    batch: int,
) -> Pair:
    """:func:`paired` for coroutines: each batch runs in one event loop, in one go."""
    loop = asyncio.new_event_loop()

    def batches(fn: Callable[[], Awaitable[object]]) -> Callable[[int], None]:
        async def calls(count: int) -> None:
            for _ in range(count):
                await fn()

        return lambda count: loop.run_until_complete(calls(count))

    try:
        return paired_batches(batches(bare), batches(guarded), rounds, batch)
    finally:
        # Streams read to their end leave async generators for the loop to finalise.
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def paired_batches(
    bare: Callable[[int], float | None],
    guarded: Callable[[int], float | None],
    rounds: int,
    batch: int,
) -> Pair:
    """Median seconds per call of two batch runners (``runner(count)``), alternated.

    A runner that returns seconds timed what it measures itself; else the whole batch
    is timed.
    """
    for run in (bare, guarded):
        run(max(5, batch // 4))
    bare_times: list[float] = []
    guarded_times: list[float] = []
    for _ in range(rounds):
        for run, out in ((bare, bare_times), (guarded, guarded_times)):
            start = time.perf_counter()
            timed = run(batch)
            elapsed = time.perf_counter() - start if timed is None else timed
            out.append(elapsed / batch)
    # The guarded time is the bare median times the median of the per-round ratios:
    # each round's pair ran back to back, so a slow spell of the machine cancels out.
    bare_median = statistics.median(bare_times)
    ratios = [g / b for b, g in zip(bare_times, guarded_times, strict=True)]
    low, middle, high = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return Pair(bare_median, bare_median * middle, low, high)  # middle: the median


STREAM_CHUNKS = 200
SHORT_STREAM = 50
LONG_STREAM = 400
CREATE_TARGET = 1.10
STREAM_TARGET = 1.05
CHUNK_TARGET_US = 5.0


def chunk_slope(guard: Guard, rounds: int, batch: int) -> float:
    """Seconds the guard adds per chunk: the slope of its added time over stream length.

    The guarded and bare streams are read at :data:`SHORT_STREAM` and
    :data:`LONG_STREAM` chunks (paired, as everywhere here); what the guard adds per
    call (planning, reserving, settling, the log line) is the same at both lengths and
    cancels out.
    """
    added: list[float] = []
    for count in (SHORT_STREAM, LONG_STREAM):
        bare = make_client("http://mock/v1", mock_transport(count))
        guarded = guard.wrap(make_client("http://mock/v1", mock_transport(count)))
        pair = paired(whole_stream(bare), whole_stream(guarded), rounds, max(4, batch // 10))
        added.append(pair.guarded - pair.bare)
    return (added[1] - added[0]) / (LONG_STREAM - SHORT_STREAM)


def row(name: str, pair: Pair) -> None:
    bare, guarded = pair.bare, pair.guarded
    print(
        f"  {name:<44} bare {bare * 1e6:9.1f} µs   guarded {guarded * 1e6:9.1f} µs   "
        f"+{(guarded - bare) * 1e6:7.1f} µs  ({pair.ratio:.3f}x)"
    )


def verdict(name: str, value: float, target: float, unit: str, pair: Pair | None = None) -> None:
    """Print a target's line: met or not by ``value``, and ``pair``'s middle half."""
    met = "met" if value <= target else "NOT met"
    print(f"  target {name:<40} {value:8.3f}{unit} (<= {target:g}{unit}: {met})")
    if pair is not None:
        if pair.high <= target:
            settled = "met in three rounds out of four or more"
        elif pair.low > target:
            settled = "not met in three rounds out of four or more"
        else:
            settled = "the target is inside it: not settled by this run"
        print(f"  {'':<44} rounds' middle half {pair.low:.3f}x to {pair.high:.3f}x ({settled})")


FAKE_SERVER = """
import sys
from payi_guard.testing import FakeProvider
from payi_guard.testing.fake_provider.handler import Handler
# The fake writes a plain answer's headers and body separately: with Nagle's algorithm
# on, the body waits for the client's delayed ACK (about 40 ms on Linux).
Handler.disable_nagle_algorithm = True
with FakeProvider(gzip=False) as fake:
    print(fake.openai_base_url, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def fake_in_another_process() -> Iterator[str]:
    """A FakeProvider in a child process (so it never competes for this GIL)."""
    child = subprocess.Popen(
        [sys.executable, "-c", FAKE_SERVER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        yield child.stdout.readline().strip()
    finally:
        child.terminate()
        child.wait(timeout=10)


def quiet_logs() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def make_guard(*, analytics_days: int = 90) -> Guard:
    """The guard of every guarded row: the memory store, one daily limit no call reaches.

    ``analytics_days=0`` turns the usage analytics off (``bench_instructions.py``).
    """
    limit = {"max": 1_000_000, "per": "day"}
    return Guard({"prices": PRICES, "default": [limit], "analytics_days": analytics_days})


def run(quick: bool) -> None:
    rounds, batch = (5, 40) if quick else (15, 200)
    guard = make_guard()

    print("payi_guard meter benchmark (openai", openai.__version__, "/ httpx2, memory store)")
    print("(loopback: the FakeProvider runs in a child process, Nagle's algorithm off)")
    for logging_mode in ("no log output", "genai_call as JSON to a null stream"):
        if logging_mode == "no log output":
            quiet_logs()
        else:
            configure_json(io.StringIO() if quick else open("/dev/null", "w"))  # noqa: SIM115
        print(f"\n[{logging_mode}]")
        with track_context(user_id="bench"):
            mock_bare = make_client("http://mock/v1", mock_transport(STREAM_CHUNKS))
            mock_guarded = guard.wrap(make_client("http://mock/v1", mock_transport(STREAM_CHUNKS)))
            create = paired(plain_call(mock_bare), plain_call(mock_guarded), rounds, batch)
            row("create(), mock transport", create)
            floor_transport = FloorTransport(mock_transport(STREAM_CHUNKS))
            mock_floor = make_client("http://mock/v1", floor_transport)
            floor = paired(plain_call(mock_bare), plain_call(mock_floor), rounds, batch)
            row("create(), floor: the least a meter does", floor)
            alone = paired(
                plain_send(httpx2.Client(transport=mock_transport(STREAM_CHUNKS))),
                plain_send(guard.wrap(httpx2.Client(transport=mock_transport(STREAM_CHUNKS)))),
                rounds,
                batch,
            )
            row("the same request, no SDK (warm caches)", alone)
            async_create = paired_async(
                async_plain_call(make_async_client(mock_transport(STREAM_CHUNKS))),
                async_plain_call(guard.wrap(make_async_client(mock_transport(STREAM_CHUNKS)))),
                rounds,
                batch,
            )
            row("create(), async client", async_create)
            first = paired_parts(first_chunk(mock_bare), first_chunk(mock_guarded), rounds, batch)
            row("time to first chunk, mock transport", first)
            cut = paired_parts(
                close_after_first_chunk(mock_bare),
                close_after_first_chunk(mock_guarded),
                rounds,
                batch,
            )
            row("close after the first chunk (settled)", cut)
            stream = paired(
                whole_stream(mock_bare),
                whole_stream(mock_guarded),
                rounds,
                max(4, batch // 10),
            )
            row(f"{STREAM_CHUNKS}-chunk stream, mock transport", stream)
            per_chunk = chunk_slope(guard, rounds, batch)
            print(
                f"  {'':<44} per chunk: +{per_chunk * 1e6:.2f} µs (what the guard adds to "
                f"{LONG_STREAM} chunks beyond what it adds to {SHORT_STREAM}, per chunk)"
            )
            async_bare = make_async_client(mock_transport(STREAM_CHUNKS))
            async_guarded = guard.wrap(make_async_client(mock_transport(STREAM_CHUNKS)))
            async_pair = paired_async(
                async_stream(async_bare), async_stream(async_guarded), rounds, max(4, batch // 10)
            )
            row(f"{STREAM_CHUNKS}-chunk stream, async client", async_pair)
            verdict("create() / bare create()", create.ratio, CREATE_TARGET, "x", create)
            beyond = create.guarded - create.bare - floor.guarded + floor.bare
            print(
                f"  {'':<44} (the floor: {floor.ratio:.3f}x; the guard beyond it: "
                f"+{beyond * 1e6:.1f} µs; the guard with no SDK between two calls: "
                f"+{(alone.guarded - alone.bare) * 1e6:.1f} µs)"
            )
            verdict("async create() / bare", async_create.ratio, CREATE_TARGET, "x", async_create)
            verdict("stream / bare stream", stream.ratio, STREAM_TARGET, "x", stream)
            verdict("async stream / bare", async_pair.ratio, STREAM_TARGET, "x", async_pair)
            verdict("stream, per chunk", per_chunk * 1e6, CHUNK_TARGET_US, " µs")
            with fake_in_another_process() as base_url:
                loop_bare = make_client(base_url, None)
                loop_guarded = guard.wrap(make_client(base_url, None))
                loop_batch = max(10, batch // 4)
                loop_create = paired(
                    plain_call(loop_bare), plain_call(loop_guarded), rounds, loop_batch
                )
                row("create(), loopback FakeProvider", loop_create)
                loop_first = paired_parts(
                    first_chunk(loop_bare), first_chunk(loop_guarded), rounds, loop_batch
                )
                row("time to first chunk, loopback FakeProvider", loop_first)
                loop_bare.close()
                loop_guarded.close()

    endpoint = classify("POST", "/v1/chat/completions")
    assert endpoint is not None
    print()
    # 200 chunks stay under the tracker's deferred limit (text-only chunks are never
    # parsed); 10,000 chunks go past it (they are parsed as the stream goes).
    for count in (STREAM_CHUNKS, 10_000):
        chunks = sse_chunks(count)
        best = float("inf")
        for _ in range(5 if count < 1000 else 1):
            start = time.perf_counter()
            meter = StreamMeter(endpoint, added_include_usage=True)
            forwarded = sum(len(meter.feed(chunk)) for chunk in chunks) + len(meter.finish())
            best = min(best, time.perf_counter() - start)
        print(
            f"StreamMeter alone: {best / len(chunks) * 1e6:.2f} µs per chunk "
            f"({len(chunks)} chunks, {forwarded} bytes forwarded, usage "
            f"{'found' if meter.tracker.usage_complete else 'missing'})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args()
    run(args.quick)


if __name__ == "__main__":
    main()
