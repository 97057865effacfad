"""The engine's fault handling on the in-memory store: calls larger than a counter,
renewal of live reservations, work that outlives a cancelled caller, what the guard
reads from the storage settings."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import sys
import time
from collections.abc import MutableMapping, Sequence
from typing import Any

import pytest
from structlog.testing import capture_logs

from payi_guard import BudgetExceeded, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.engine.detached import Detached
from payi_guard.engine.renewer import Renewer
from payi_guard.engine.storage import Storage
from payi_guard.ledger import Charge
from payi_guard.pricing import TokenUsage

PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 1_000_000}}
"""$1 per output token: ten million tokens are more than a counter holds (2**53 - 1
nano-USD, about $9 million)."""
KEY = "pg:{u:alice}:usd:day:0"


def events_named(
    logs: Sequence[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def wait_until(condition: Any, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.01)


# --- calls larger than a counter -------------------------------------------------------------


@pytest.mark.parametrize("policy", ["block", "allow"])
async def test_a_bound_above_a_counters_capacity_is_refused_sync_and_async(
    clock: FakeClock, policy: str
) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}], "on_storage_error": policy},
        clock=clock,
    )
    huge = CallRequest(model="test-model", input_tokens=10, max_output_tokens=10_000_000)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(BudgetExceeded) as sync_refusal:
            guard.begin(huge)
        with pytest.raises(BudgetExceeded):
            await guard.abegin(huge)
    assert sync_refusal.value.limit.name == "user:0"
    assert len(events_named(logs, "budget_exceeded")) == 2
    assert "counter can hold" in events_named(logs, "budget_exceeded")[0]["detail"]
    assert not events_named(logs, "storage_error")
    assert guard.usage("alice")[0].used == 0


async def test_a_recorded_cost_above_a_counters_capacity_is_refused(clock: FakeClock) -> None:
    # An allow limit never refuses for the budget; a counter that cannot hold the amount
    # still cannot count it.
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day", "type": "allow"}]}, clock=clock
    )
    with capture_logs() as logs:
        with pytest.raises(BudgetExceeded):
            guard.record(user_id="alice", model="test-model", cost_usd=10_000_000)
        with pytest.raises(BudgetExceeded):
            await guard.arecord(user_id="alice", model="test-model", cost_usd="9999999.5")
        with pytest.raises(BudgetExceeded):  # a cost past a float's range, logged as one
            guard.record(user_id="alice", model="test-model", output_tokens=10**400)
        guard.record(user_id="alice", model="test-model", cost_usd=5)  # an overrun, charged
    assert len(events_named(logs, "budget_exceeded")) == 3
    assert events_named(logs, "budget_exceeded")[2]["needed"] == sys.float_info.max
    assert len(events_named(logs, "genai_call")) == 1
    assert guard.usage("alice")[0].used == 5


# --- renewal ---------------------------------------------------------------------------------


class Call:
    """Stands for a call under way (the renewer holds its owner weakly)."""


def reserve(storage: Storage, clock: FakeClock, rid: str, ttl: float) -> None:
    charge = Charge(KEY, 600, 10_000, clock.now() + 86_400)
    assert storage.ledger.reserve(rid, [charge], now=clock.now(), ttl=ttl).ok


def pending(storage: Storage, clock: FakeClock) -> int:
    (state,) = storage.ledger.read([KEY], now=clock.now())
    return state.pending


def test_a_renewed_reservation_outlives_its_ttl_and_a_dropped_one_does_not(
    clock: FakeClock,
) -> None:
    storage = Storage("memory://")
    renewer = Renewer(storage, clock, lambda: 30.0)
    live, dropped = Call(), Call()
    reserve(storage, clock, "live", 30)
    reserve(storage, clock, "dropped", 30)
    # The renewer's thread calls renew() every ttl / 3; here it is driven by hand.
    renewer.add("live", [KEY], live, "alice")
    renewer.add("dropped", [KEY], dropped, "alice")
    del dropped  # its caller let go of it without settling it
    gc.collect()
    for _ in range(4):  # 100 s on the fake clock, each step within a ttl
        clock.advance(25)
        renewer.renew(30.0)
    assert pending(storage, clock) == 600  # the live one only
    assert len(renewer) == 1
    renewer.discard("live")
    clock.advance(31)
    assert pending(storage, clock) == 0
    renewer.close()


def test_a_reservation_the_store_no_longer_holds_is_logged_and_dropped(clock: FakeClock) -> None:
    storage = Storage("memory://")
    renewer = Renewer(storage, clock, lambda: 30.0)
    call = Call()
    reserve(storage, clock, "r1", 30)
    renewer.add("r1", [KEY], call, "alice")
    clock.advance(31)  # expired before it was renewed
    with capture_logs() as logs:
        renewer.renew(30.0)
        renewer.renew(30.0)
    (lost,) = events_named(logs, "reservation_lost")
    assert lost["user_id"] == "alice"
    assert len(renewer) == 0
    renewer.close()


def test_the_renewal_thread_runs_only_while_calls_are_live(clock: FakeClock) -> None:
    storage = Storage("memory://")
    renewer = Renewer(storage, clock, lambda: 0.3)
    seen = [renewer.running]
    call = Call()
    reserve(storage, clock, "r1", 30)
    renewer.add("r1", [KEY], call, "alice")
    seen.append(renewer.running)
    renewer.discard("r1")
    wait_until(lambda: not renewer.running)  # one interval with nothing live
    renewer.add("r1", [KEY], call, "alice")  # a new call starts it again
    seen.append(renewer.running)
    renewer.close()
    seen.append(renewer.running)
    assert seen == [False, True, True, False]


def test_a_guard_renews_held_reservations_until_they_settle(clock: FakeClock) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}], "reservation_ttl": 30},
        clock=clock,
    )
    with track_context(user_id="alice"):
        reservation = guard.begin(CallRequest(model="test-model", max_output_tokens=1))
    renewer = guard._books.renewer
    seen = [(renewer.running, len(renewer))]
    reservation.settle(TokenUsage(0, 1))
    seen.append((renewer.running, len(renewer)))
    guard.close()
    seen.append((renewer.running, len(renewer)))
    assert seen == [(True, 1), (True, 0), (False, 0)]


# --- the storage settings --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "options", "timeout"),
    [
        ("redis://127.0.0.1:6379/0", {}, 0.25),
        ("redis://127.0.0.1:6379/0?socket_timeout=1.5", {}, 1.5),
        ("redis://127.0.0.1:6379/0?socket_timeout=1.5", {"socket_timeout": 2}, 2.0),
        ("sqlite:///budgets.db?timeout=0.5", {}, 0.5),
        ("memory://", {}, 0.25),
    ],
)
def test_the_storage_knows_its_socket_timeout(
    uri: str, options: dict[str, Any], timeout: float
) -> None:
    assert Storage(uri, options).timeout == timeout


def test_the_storage_knows_how_long_closed_ids_are_kept() -> None:
    assert Storage("memory://").closed_ttl == 600.0
    assert Storage("memory://", {"closed_ttl": 30}).closed_ttl == 30.0


def test_only_the_memory_store_is_in_process(tmp_path: Any) -> None:
    assert Storage("memory://").in_process
    assert not Storage(f"sqlite:///{tmp_path / 'b.db'}").in_process
    assert not Storage("redis://127.0.0.1:6379/0").in_process


# --- work that outlives a cancelled caller -------------------------------------------------


async def test_detached_work_goes_on_when_its_caller_is_cancelled() -> None:
    detached = Detached()
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        await release.wait()
        finished.append("done")
        return "done"

    caller = asyncio.create_task(detached.run(work()))
    await asyncio.sleep(0)  # the caller starts the work and waits for it
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert len(detached) == 1  # held until done, though nobody awaits it
    release.set()
    assert await detached.drain(timeout=30)
    assert finished == ["done"]
    assert len(detached) == 0


def test_detached_work_runs_in_place_outside_asyncio() -> None:
    async def work() -> int:
        return 42

    runner = Detached().run(work())
    with pytest.raises(StopIteration) as done:
        runner.send(None)
    assert done.value.value == 42


_STEP: contextvars.ContextVar[str] = contextvars.ContextVar("step", default="caller")


async def test_inline_work_that_needs_no_wait_costs_no_pass_of_the_loop() -> None:
    detached = Detached()
    passes: list[int] = []

    async def work() -> int:
        _STEP.set("work")
        return 7

    asyncio.get_running_loop().call_soon(passes.append, 1)  # runs at the loop's next pass
    assert await detached.run(work(), inline=True) == 7
    assert passes == []  # the work ran and returned with no pass of the loop
    assert _STEP.get() == "caller"  # in a copy of the caller's context
    assert len(detached) == 0
    await asyncio.sleep(0)
    assert passes == [1]
    # Without inline, the work runs in a task: the loop passes at least once.
    passes.clear()
    asyncio.get_running_loop().call_soon(passes.append, 2)
    assert await detached.run(work()) == 7
    assert passes == [2]


async def test_inline_work_that_waits_goes_on_when_its_caller_is_cancelled() -> None:
    detached = Detached()
    release = asyncio.Event()
    seen: list[str] = []

    async def work() -> str:
        _STEP.set("work")
        await release.wait()
        await asyncio.sleep(0)
        seen.append(_STEP.get())
        return "done"

    caller = asyncio.create_task(detached.run(work(), inline=True))
    await asyncio.sleep(0)  # the caller ran the first step; the rest waits in a task
    assert len(detached) == 1
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    release.set()
    assert await detached.drain(timeout=30)
    assert seen == ["work"]  # what the first step set, the rest sees
    assert _STEP.get() == "caller"
    assert len(detached) == 0
    # Awaited to its end, its value reaches the caller.
    release.clear()
    runner = asyncio.create_task(detached.run(work(), inline=True))
    await asyncio.sleep(0)
    release.set()
    assert await runner == "done"


async def test_inline_work_raises_to_its_caller_before_and_after_a_wait() -> None:
    detached = Detached()

    async def fails_at_once() -> None:
        raise ValueError("first step")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("after a wait")

    with pytest.raises(ValueError, match="first step"):
        await detached.run(fails_at_once(), inline=True)
    with pytest.raises(KeyError, match="after a wait"):
        await detached.run(fails_later(), inline=True)
    assert len(detached) == 0


async def test_inline_work_cancelled_in_its_task_sees_the_cancellation() -> None:
    detached = Detached()
    release = asyncio.Event()
    cleaned: list[str] = []

    async def work() -> None:
        try:
            await release.wait()
        except asyncio.CancelledError:
            cleaned.append("cancelled")
            raise

    before = asyncio.all_tasks()
    caller = asyncio.create_task(detached.run(work(), inline=True))
    await asyncio.sleep(0)
    (task,) = asyncio.all_tasks() - before - {caller}
    task.cancel()  # as the loop does to what is left when it shuts down
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert cleaned == ["cancelled"]
    assert task.cancelled()


async def test_a_started_coroutine_awaited_goes_on_from_its_first_wait() -> None:
    from payi_guard.engine.detached import _Resumed

    release = asyncio.Event()
    steps: list[str] = []

    async def work() -> str:
        steps.append("first")
        await release.wait()
        steps.append("second")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append("cancelled")
            return "stopped"
        return "never"

    coro = work()
    waiting_on = coro.send(None)
    runner = asyncio.create_task(_awaiting(_Resumed(coro, waiting_on)))
    await asyncio.sleep(0)
    assert steps == ["first"]
    release.set()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert steps == ["first", "second"]
    runner.cancel()  # thrown into the work, which returns
    assert await runner == "stopped"
    assert steps == ["first", "second", "cancelled"]


async def _awaiting(awaitable: Any) -> Any:
    return await awaitable
