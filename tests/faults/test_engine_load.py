"""Load through the Guard and the real openai SDK while a private store is frozen, killed
and restarted, with and without persistence.

Asyncio tasks and threads make plain and streamed calls for a dozen users (a few of
whom run out of budget mid-run) until stopped; the store is faulted mid-run. Then, once
every settle has gone through: each call that reached the provider is logged once, the
ledger equals the sum of the logged costs to the unit (what a restart without
persistence forgot aside), no counter is above its max, nothing is pending, callers saw
storage errors only while the store was down, and no call waited on it much longer than
twice the socket timeout per operation.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from ledger._support import RedisServer, own_marker
from structlog.testing import capture_logs

from faults._stall import unstalled
from faults._support import FakeProvider, MiddayClock, async_wait_until
from payi_guard import Guard, StorageError, is_refusal, track_context
from payi_guard.ledger import StorageEvent, open_ledger
from payi_guard.ledger.factory import DEFAULT_TIMEOUT
from payi_guard.ledger.keys import parse_key
from payi_guard.money import parse_usd

pytestmark = pytest.mark.slow

PREFIX = "load"
PRICES = {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2}}
PROMPT: Any = [{"role": "user", "content": "Tell me about the weather today"}]
USERS = 12
TINY_USERS = 4
"""Users ``user-0`` to ``user-3`` are on a tier that runs out mid-run."""
TINY_MAX = Decimal("0.0003")
DEFAULT_MAX = Decimal(100)
TASKS = 40
THREADS = 6
PROGRESS = 150
"""Calls that must succeed before each fault, and after it, before the run stops."""
OUTAGE = 3.0
"""Seconds the store stays frozen or down: longer than any call may wait on it."""
BOUND = 4 * DEFAULT_TIMEOUT + 1.5
"""The longest a call may take: a reserve and a settle each wait on the store at most
twice the socket timeout, plus a generous allowance for a loaded machine (the fake
provider, hundreds of exceptions at once)."""


@dataclass(frozen=True)
class Call:
    """One call made by the load: when, for whom, how it ended."""

    user: str
    stream: bool
    started: float
    ended: float
    outcome: str  # ok, refused, storage, or the type of anything else


@dataclass
class Load:
    """Async tasks (on the test's loop) and threads calling through one guard until stopped."""

    guard: Guard
    fake: FakeProvider
    calls: list[Call] = field(default_factory=list)
    outages: list[tuple[float, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=TASKS))
        self.aclient = self.guard.wrap(
            openai.AsyncOpenAI(
                base_url=self.fake.openai_base_url, api_key="k", max_retries=0, http_client=http
            )
        )
        self.client = self.guard.wrap(
            openai.OpenAI(base_url=self.fake.openai_base_url, api_key="k", max_retries=0)
        )
        self.tasks: list[asyncio.Task[None]] = []
        self.threads = [threading.Thread(target=self._thread, args=(i,)) for i in range(THREADS)]

    def _done(self, user: str, stream: bool, started: float, exc: BaseException | None) -> str:
        if exc is None:
            outcome = "ok"
        elif is_refusal(exc):
            outcome = "refused"
        elif isinstance(exc, StorageError):
            outcome = "storage"
        else:
            outcome = type(exc).__name__
        with self.lock:
            self.calls.append(Call(user, stream, started, time.monotonic(), outcome))
        return outcome

    async def _task(self, index: int) -> None:
        user = f"user-{index % USERS}"
        async with track_context(user_id=user):
            turn = 0
            while not self.stop.is_set():
                stream = turn % 2 == 1
                turn += 1
                started = time.monotonic()
                error: BaseException | None = None
                try:
                    reply = await self.aclient.chat.completions.create(
                        model="gpt-test", messages=PROMPT, max_tokens=20, stream=stream
                    )
                    if stream:
                        async for _ in reply:
                            pass
                except Exception as exc:
                    error = exc
                if self._done(user, stream, started, error) != "ok":
                    await asyncio.sleep(0.05)  # a down store or a spent user: no busy loop
                await asyncio.sleep(0)

    def _thread(self, index: int) -> None:
        user = f"user-{(index * 5) % USERS}"
        with track_context(user_id=user):
            turn = 0
            while not self.stop.is_set():
                stream = turn % 2 == 0
                turn += 1
                started = time.monotonic()
                error: BaseException | None = None
                try:
                    reply = self.client.chat.completions.create(
                        model="gpt-test", messages=PROMPT, max_tokens=20, stream=stream
                    )
                    if stream:
                        for _ in reply:
                            pass
                except Exception as exc:
                    error = exc
                if self._done(user, stream, started, error) != "ok":
                    time.sleep(0.05)

    def ok(self) -> int:
        with self.lock:
            return sum(call.outcome == "ok" for call in self.calls)

    async def progress(self, calls: int = PROGRESS) -> None:
        """Wait until ``calls`` more calls succeeded."""
        target = self.ok() + calls
        await async_wait_until(lambda: self.ok() >= target, timeout=120, what="calls succeeding")

    async def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.tasks = [asyncio.create_task(self._task(i)) for i in range(TASKS)]
        await self.progress()

    async def outage(self, begin: Callable[[], None], end: Callable[[], None]) -> None:
        """Fault the store for :data:`OUTAGE` seconds (``begin`` ... ``end``), then run on."""
        started = time.monotonic()
        await asyncio.to_thread(begin)
        await asyncio.sleep(OUTAGE)
        await asyncio.to_thread(end)
        self.outages.append((started, time.monotonic()))
        await self.progress()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)
        for thread in self.threads:
            await asyncio.to_thread(thread.join, 60)

    async def close(self) -> None:
        self.stop.set()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for thread in self.threads:
            await asyncio.to_thread(thread.join, 60)
        await self.aclient.close()
        self.client.close()
        await self.guard.aclose()


@dataclass(frozen=True)
class Totals:
    """The store's counters per user: settled and pending, in nano-USD."""

    settled: dict[str, int]
    pending: dict[str, int]


def read_totals(url: str) -> Totals:
    ledger = open_ledger(url)
    try:
        now = time.time()
        keys = sorted(ledger.scan(f"{PREFIX}:*", now=now))
        states = ledger.read(keys, now=now) if keys else ()
    finally:
        ledger.close()
    settled: dict[str, int] = {}
    pending: dict[str, int] = {}
    for key, state in zip(keys, states, strict=True):
        parsed = parse_key(PREFIX, key)
        if parsed is None or parsed.unit != "usd":
            continue
        settled[parsed.owner] = state.settled
        pending[parsed.owner] = state.pending
    return Totals(settled, pending)


def nano(value: Any) -> int:
    return parse_usd(str(value))


def genai_calls(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [event for event in list(logs) if event["event"] == "genai_call"]


def logged_by_user(events: Sequence[MutableMapping[str, Any]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for event in events:
        out[event["user_id"]] += nano(event["cost_usd"])
    return dict(out)


def make_guard(url: str, **storage_options: Any) -> Guard:
    # A marker key of its own: the store is new to this process whatever port it got.
    storage_options = {"marker_key": own_marker(), **storage_options}
    return Guard(
        {
            "prices": PRICES,
            "tiers": {"tiny": [{"max": float(TINY_MAX), "per": "day"}]},
            "users": {f"user-{i}": "tiny" for i in range(TINY_USERS)},
            "default": [{"max": float(DEFAULT_MAX), "per": "day"}],
        },
        storage=url,
        key_prefix=PREFIX,
        storage_options=storage_options,
        clock=MiddayClock(),
    )


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


async def settled_everything(load: Load, logs: Sequence[MutableMapping[str, Any]]) -> Totals:
    """Wait until every successful call is logged and nothing is pending in the store."""
    url = load.guard.storage_uri

    def done() -> Totals | None:
        totals = read_totals(url)
        logged = len(genai_calls(logs)) == load.ok()
        return totals if logged and not any(totals.pending.values()) else None

    totals: Totals = await async_wait_until(
        done, timeout=120, what="every settle logged, nothing pending"
    )
    return totals


def check_calls(load: Load, logs: Sequence[MutableMapping[str, Any]], totals: Totals) -> None:
    """What holds whatever the fault: one log line per call, limits, errors, waits."""
    calls = load.calls
    outcomes = Counter(call.outcome for call in calls)
    assert set(outcomes) <= {"ok", "refused", "storage"}, outcomes
    assert outcomes["refused"], "the tiny users never ran out: the limits were not tested"
    assert outcomes["storage"], "the outage was not felt"
    events = genai_calls(logs)
    assert len(events) == outcomes["ok"]
    streams = Counter(c.stream for c in calls if c.outcome == "ok")
    assert Counter(e["stream"] for e in events) == streams
    # Every commit got through in the end: none is logged as failed or unknown.
    assert not [e for e in events if "ledger" in e], [e for e in events if "ledger" in e][:3]
    tiny = parse_usd(TINY_MAX)
    for owner, settled in totals.settled.items():
        tier_max = tiny if int(owner.split("-")[1]) < TINY_USERS else parse_usd(DEFAULT_MAX)
        assert settled <= tier_max, owner
    # Storage errors only while the store was down (or for a call already waiting on it).
    for call in calls:
        if call.outcome == "storage":
            assert any(
                call.started <= end + BOUND and call.ended >= start for start, end in load.outages
            ), call
    # Each call's length less the time this process was kept from running meanwhile.
    longest = max(unstalled(call.started, call.ended) for call in calls)
    assert longest <= BOUND, longest


async def test_a_frozen_store_loses_nothing_and_holds_nothing(
    server: RedisServer, fake: FakeProvider
) -> None:
    load = Load(make_guard(server.url), fake)
    try:
        with capture_logs() as logs:
            await load.start()
            for _ in range(2):
                await load.outage(server.pause, server.resume)
            await load.finish()
            totals = await settled_everything(load, logs)
        check_calls(load, logs, totals)
        assert totals.settled == logged_by_user(genai_calls(logs))
        assert not [e for e in logs if e["event"] == "storage_reset"]
    finally:
        await load.close()


async def test_a_store_restarted_with_persistence_loses_nothing(
    aof_server: RedisServer, fake: FakeProvider
) -> None:
    load = Load(make_guard(aof_server.url), fake)
    try:
        with capture_logs() as logs:
            await load.start()
            await load.outage(aof_server.kill, aof_server.start)
            await load.finish()
            totals = await settled_everything(load, logs)
        check_calls(load, logs, totals)
        assert totals.settled == logged_by_user(genai_calls(logs))
        assert not [e for e in logs if e["event"] == "storage_reset"]
    finally:
        await load.close()


async def test_a_store_restarted_without_persistence_is_logged_once_and_holds_nothing(
    server: RedisServer, fake: FakeProvider
) -> None:
    resets: list[float] = []

    def on_event(event: StorageEvent) -> None:
        if event.kind == "reset":
            resets.append(time.monotonic())

    load = Load(make_guard(server.url, on_event=on_event), fake)
    try:
        with capture_logs() as logs:
            await load.start()
            await load.outage(server.kill, server.start)
            await load.finish()
            totals = await settled_everything(load, logs)
        check_calls(load, logs, totals)
        assert len([e for e in logs if e["event"] == "storage_reset"]) == 1
        assert len(resets) == 1
        # The store forgot what was charged before the restart, and nothing after it.
        events = genai_calls(logs)
        after = [c for c in load.calls if c.outcome == "ok" and c.started > resets[0]]
        assert after
        ledger = sum(totals.settled.values())
        assert ledger <= sum(logged_by_user(events).values())
        # Calls and their lines match by count, not one by one: every call costs the same.
        cost = nano(events[0]["cost_usd"])
        assert all(nano(e["cost_usd"]) == cost for e in events)
        assert ledger >= cost * len(after)
    finally:
        await load.close()
