"""What only the memory ledger has: bounded bookkeeping and a store shared with async."""

from __future__ import annotations

from typing import Any

import pytest

from payi_guard.clock import FakeClock
from payi_guard.ledger import (
    AsyncMemoryLedger,
    Charge,
    CounterState,
    MemoryLedger,
    open_async_ledger,
    open_ledger,
)


def test_expired_counters_are_swept_incrementally(clock: FakeClock) -> None:
    memory = MemoryLedger(sweep_batch=256)
    now = clock.now()
    for i in range(600):
        memory.commit(f"r{i}", [Charge(f"pg:{{u:{i}}}:usd", 1, None, now + 60)], now=now)
    assert len(memory) == 600
    clock.advance(61)
    later = clock.now()
    sizes = []
    for i in range(3):  # each operation drops at most sweep_batch expired counters
        memory.commit(f"s{i}", [Charge("pg:{u:x}:usd", 1, None, later + 60)], now=later)
        sizes.append(len(memory))
    assert sizes == [600 - 256 + 1, 600 - 512 + 1, 1]
    assert memory.read(["pg:{u:5}:usd"], now=later) == (CounterState(0, 0),)


def test_a_counter_extended_by_a_later_charge_is_not_swept(clock: FakeClock) -> None:
    memory = MemoryLedger()
    now = clock.now()
    memory.commit("a", [Charge("pg:{u:a}:usd", 5, None, now + 60)], now=now)
    memory.commit("b", [Charge("pg:{u:a}:usd", 5, None, now + 600)], now=now)
    clock.advance(100)
    assert memory.sweep(clock.now()) == 0
    assert memory.read(["pg:{u:a}:usd"], now=clock.now()) == (CounterState(10, 0),)
    clock.advance(500)
    assert memory.sweep(clock.now()) == 1
    assert len(memory) == 0


def _sizes(counter: Any) -> tuple[int, int]:
    """Open reservations and heap entries a memory counter holds."""
    return len(counter.open or ()), len(counter.deadlines or ())


def test_open_reservations_stay_bounded(clock: FakeClock) -> None:
    memory = MemoryLedger()
    key = "pg:{u:a}:usd"
    exp = clock.now() + 86_400
    for i in range(2000):
        memory.reserve(f"r{i}", [Charge(key, 1, None, exp)], now=clock.now(), ttl=60)
        memory.commit(f"r{i}", [Charge(key, 1, None, exp)], now=clock.now())
    counter = memory._counters[key]
    assert _sizes(counter) == (0, 0)
    for i in range(2000):
        memory.reserve(f"x{i}", [Charge(key, 1, None, exp)], now=clock.now(), ttl=60)
        if i % 2:
            memory.commit(f"x{i}", [Charge(key, 1, None, exp)], now=clock.now())
    opened, heap = _sizes(counter)
    assert opened == 1000
    # Closed reservations leave heap entries behind, but never more than the live ones.
    assert heap <= 2 * opened + 16
    clock.advance(60)
    assert memory.read([key], now=clock.now()) == (CounterState(3000, 0),)
    assert _sizes(counter) == (0, 0)


def test_a_refused_reserve_creates_only_the_counter_that_refused(clock: FakeClock) -> None:
    memory = MemoryLedger()
    exp = clock.now() + 60
    result = memory.reserve(
        "r1",
        [Charge("pg:{u:a}:usd", 1, None, exp), Charge("pg:{u:b}:usd", 11, 10, exp)],
        now=clock.now(),
        ttl=60,
    )
    assert not result.ok
    assert len(memory) == 1  # {u:b}: what it refused is shown until its window ends
    clock.set(exp)
    assert memory.sweep(clock.now()) == 1


async def test_async_ledger_shares_the_sync_store(clock: FakeClock) -> None:
    memory = open_ledger("memory://")
    assert isinstance(memory, MemoryLedger)
    aio = open_async_ledger("memory://", shared=memory)
    assert isinstance(aio, AsyncMemoryLedger)
    assert aio.ledger is memory
    key, exp, now = "pg:{u:a}:usd", clock.now() + 60, clock.now()
    assert (await aio.reserve("r1", [Charge(key, 70, 100, exp)], now=now, ttl=30)).ok
    assert not memory.reserve("r2", [Charge(key, 40, 100, exp)], now=now, ttl=30).ok
    memory.commit("r1", [Charge(key, 50, None, exp)], now=now)
    assert await aio.read([key], now=now) == (CounterState(50, 0, refused=40),)
    await aio.aclose()
    memory.close()
    assert memory.read([key], now=now) == (CounterState(50, 0, refused=40),)


def test_separate_memory_ledgers_do_not_share(clock: FakeClock) -> None:
    key, exp, now = "pg:{u:a}:usd", clock.now() + 60, clock.now()
    first = open_ledger("memory://")
    first.commit("r1", [Charge(key, 5, None, exp)], now=now)
    second = open_async_ledger("memory://")
    assert isinstance(second, AsyncMemoryLedger)
    assert second.ledger.read([key], now=now) == (CounterState(0, 0),)


def test_sweep_batch_is_validated() -> None:
    with pytest.raises(ValueError, match="sweep_batch"):
        MemoryLedger(sweep_batch=0)
    with pytest.raises(ValueError, match="closed_ttl"):
        MemoryLedger(closed_ttl=0)


def test_a_reservation_holds_until_its_deadline_exactly(clock: FakeClock) -> None:
    # The memory store's clock is the caller's: its deadlines can be read to the instant.
    ledger = MemoryLedger()
    key, exp = "pg:{u:a}:usd", clock.now() + 86_400
    assert ledger.reserve("r1", [Charge(key, 800, 1000, exp)], now=clock.now(), ttl=30).ok
    clock.advance(29.5)
    assert ledger.read([key], now=clock.now()) == (CounterState(0, 800),)
    assert ledger.renew("r1", [key], now=clock.now(), ttl=0.25)  # never shortens
    clock.advance(0.5)
    assert ledger.read([key], now=clock.now()) == (CounterState(0, 0),)
    assert not ledger.renew("r1", [key], now=clock.now(), ttl=30)


def test_closed_ids_stay_bounded(clock: FakeClock) -> None:
    ledger = MemoryLedger(closed_ttl=60, sweep_batch=1000)
    key, exp = "pg:{u:a}:usd", clock.now() + 86_400
    for i in range(500):
        ledger.commit(f"c{i}", [Charge(key, 1, None, exp)], now=clock.now())
    assert len(ledger._closed) == 500
    clock.advance(61)
    ledger.commit("last", [Charge(key, 1, None, exp)], now=clock.now())
    assert ledger._closed.remembered() == (["last"], 1)
    # Forgotten ids are new ids again.
    assert ledger.commit("c0", [Charge(key, 1, None, exp)], now=clock.now()) == (
        CounterState(502, 0),
    )


def test_store_options_are_accepted_by_memory(clock: FakeClock) -> None:
    events: list[object] = []
    ledger = open_ledger("memory://", on_event=events.append, marker_key="x", closed_ttl=5)
    assert isinstance(ledger, MemoryLedger)
    key, exp = "pg:{u:a}:usd", clock.now() + 86_400
    ledger.commit("c", [Charge(key, 1, None, exp)], now=clock.now())
    clock.advance(5)
    ledger.commit("c", [Charge(key, 1, None, exp)], now=clock.now())  # forgotten after 5 s
    assert ledger.read([key], now=clock.now()) == (CounterState(2, 0),)
    assert events == []
