"""The ledger contract, run over memory, SQLite and real Redis (each sync and async)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ledger._support import LedgerAdapter
from payi_guard.clock import FakeClock
from payi_guard.exceptions import StorageError
from payi_guard.ledger import MAX_UNITS, CapacityExceeded, Charge, CounterState, Tally
from payi_guard.ledger._glob import escape
from payi_guard.ledger.redis import CLOSED_SUFFIX, INDEX_SUFFIX

DAY = 86_400
WINDOW = 1_795_737_600  # the day of the `clock` fixture


def key(prefix: str, owner: str, window: int = WINDOW) -> str:
    return f"{prefix}:{{u:{owner}}}:usd:day:{window}"


def expiry(clock: FakeClock) -> float:
    return clock.now() + 2 * DAY


@pytest.fixture
def k1(key_prefix: str) -> str:
    return key(key_prefix, "alice")


@pytest.fixture
def k2(key_prefix: str) -> str:
    return key(key_prefix, "acme")


@pytest.fixture
def k3(key_prefix: str) -> str:
    return key(key_prefix, "global")


async def test_reserve_within_max(backend: LedgerAdapter, clock: FakeClock, k1: str) -> None:
    result = await backend.reserve(
        "r1", [Charge(k1, 400, 1000, expiry(clock))], now=clock.now(), ttl=60
    )
    assert result.ok
    assert result.refused is None
    assert result.states == (CounterState(0, 400),)
    assert await backend.read([k1], now=clock.now()) == (CounterState(0, 400),)


async def test_reserve_exactly_at_max_fits(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 600, None, exp)], now=now)
    result = await backend.reserve("r1", [Charge(k1, 400, 1000, exp)], now=now, ttl=60)
    assert result.ok
    assert result.states[0].used == 1000
    refused = await backend.reserve("r2", [Charge(k1, 1, 1000, exp)], now=now, ttl=60)
    assert not refused.ok
    assert refused.refused == 0


async def test_reserve_over_max_is_refused_and_changes_no_total(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 300, None, exp), Charge(k2, 50, None, exp)], now=now)
    await backend.reserve("r1", [Charge(k1, 200, 1000, exp)], now=now, ttl=60)
    before = await backend.read([k1, k2], now=now)
    assert before == (CounterState(300, 200), CounterState(50, 0))

    result = await backend.reserve(
        "r2", [Charge(k2, 10, 100, exp), Charge(k1, 501, 1000, exp)], now=now, ttl=60
    )
    assert not result.ok
    assert result.refused == 1
    # Only what the refused charge needed is noted, on the counter that refused it.
    assert result.states == (CounterState(50, 0), CounterState(300, 200, refused=501))
    assert await backend.read([k1, k2], now=now) == (result.states[1], result.states[0])
    # The refused id holds nothing anywhere: committing it only adds the amount.
    states = await backend.commit("r2", [Charge(k2, 0, None, exp)], now=now)
    assert states == (CounterState(50, 0),)
    if backend.raw is not None:
        assert not backend.raw.hexists(k2, "r:r2")
        assert backend.raw.zscore(k2 + INDEX_SUFFIX, "r:r2") is None


async def test_reserve_is_all_or_nothing_across_keys(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str, k3: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    charges = [Charge(k1, 100, 1000, exp), Charge(k2, 100, 150, exp), Charge(k3, 100, 50, exp)]
    await backend.commit("r0", [Charge(k2, 100, None, exp)], now=now)
    result = await backend.reserve("r1", charges, now=now, ttl=60)
    assert not result.ok
    assert result.refused == 1  # the first charge that does not fit, though k3 fails too
    assert result.states == (
        CounterState(0, 0),
        CounterState(100, 0, refused=100),
        CounterState(0, 0),
    )
    assert await backend.read([k1, k2, k3], now=now) == result.states

    ok = await backend.reserve(
        "r2", [Charge(k1, 100, 1000, exp), Charge(k2, 50, 150, exp)], now=now, ttl=60
    )
    assert ok.ok
    assert ok.states == (CounterState(0, 100), CounterState(100, 50))  # k2 fits: cleared


async def test_max_none_never_refuses(backend: LedgerAdapter, clock: FakeClock, k1: str) -> None:
    now, exp = clock.now(), expiry(clock)
    huge = 2**52
    for rid in ("r1", "r2"):
        result = await backend.reserve(rid, [Charge(k1, huge, None, exp)], now=now, ttl=60)
        assert result.ok
    assert await backend.read([k1], now=now) == (CounterState(0, 2 * huge),)


async def test_commit_adds_actual_more_or_less_than_reserved(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.reserve("r1", [Charge(k1, 100, 1000, exp)], now=now, ttl=60)
    await backend.reserve("r2", [Charge(k1, 100, 1000, exp)], now=now, ttl=60)
    assert await backend.commit("r1", [Charge(k1, 30, None, exp)], now=now) == (
        CounterState(30, 100),
    )
    assert await backend.commit("r2", [Charge(k1, 250, None, exp)], now=now) == (
        CounterState(280, 0),
    )
    # A second commit of a closed id changes nothing: a retried commit counts once.
    assert await backend.commit("r2", [Charge(k1, 250, None, exp)], now=now) == (
        CounterState(280, 0),
    )


async def test_commit_applies_to_the_reserved_keys_only(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, k1: str, k2: str, k3: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.reserve(
        "r1", [Charge(k1, 100, 1000, exp), Charge(k2, 100, None, exp)], now=now, ttl=60
    )
    await backend.reserve("other", [Charge(k1, 40, 1000, exp)], now=now, ttl=60)
    states = await backend.commit(
        "r1", [Charge(k1, 70, None, exp), Charge(k2, 70, None, exp)], now=now
    )
    assert states == (CounterState(70, 40), CounterState(70, 0))
    assert await backend.read([k3], now=now) == (CounterState(0, 0),)
    await backend.release("other", [k1], now=now)

    # After the window rolled over the commit still lands on the keys it names (the
    # old window): the new window's counter is untouched and never negative.
    new_day = key(key_prefix, "alice", WINDOW + DAY)
    await backend.reserve("r3", [Charge(k1, 200, 1000, exp)], now=now, ttl=600)
    clock.advance(DAY / 2)
    later = clock.now()
    await backend.reserve("r4", [Charge(new_day, 10, 1000, exp + DAY)], now=later, ttl=60)
    assert await backend.commit("r3", [Charge(k1, 150, None, exp)], now=later) == (
        CounterState(220, 0),
    )
    assert await backend.read([new_day], now=later) == (CounterState(0, 10),)


async def test_release_gives_the_budget_back(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    charges = [Charge(k1, 1000, 1000, exp), Charge(k2, 5, None, exp)]
    assert (await backend.reserve("r1", charges, now=now, ttl=60)).ok
    assert not (await backend.reserve("r2", charges, now=now, ttl=60)).ok
    assert await backend.release("r1", [k1, k2], now=now) == (
        CounterState(0, 0, refused=1000),  # r2's, until a reserve fits
        CounterState(0, 0),
    )
    assert (await backend.reserve("r2", charges, now=now, ttl=60)).ok
    # Releasing an unknown id or a missing key changes and creates nothing.
    assert await backend.release("nope", [k1], now=now) == (CounterState(0, 1000),)


async def test_release_of_missing_counter_creates_nothing(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    assert await backend.release("r1", [k1], now=clock.now()) == (CounterState(0, 0),)
    if backend.raw is not None:
        assert backend.raw.exists(k1, k1 + INDEX_SUFFIX) == 0
    if backend.memory is not None:
        assert len(backend.memory) == 0


async def test_reservation_expires_after_ttl(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    exp = expiry(clock)
    ttl = backend.short_ttl
    assert (await backend.reserve("r1", [Charge(k1, 800, 1000, exp)], now=clock.now(), ttl=ttl)).ok
    # A reservation with a long ttl on another counter outlives the first.
    assert (await backend.reserve("r9", [Charge(k2, 5, 10, exp)], now=clock.now(), ttl=3600)).ok
    refused = await backend.reserve("r2", [Charge(k1, 800, 1000, exp)], now=clock.now(), ttl=ttl)
    assert not refused.ok
    await backend.elapse(clock, ttl)  # deadline reached: the reservation no longer counts
    assert await backend.read([k1, k2], now=clock.now()) == (
        CounterState(0, 0, refused=800),
        CounterState(0, 5),
    )
    result = await backend.reserve("r2", [Charge(k1, 800, 1000, exp)], now=clock.now(), ttl=60)
    assert result.ok
    assert result.states == (CounterState(0, 800),)


async def test_commit_after_expiry_still_adds(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    exp = expiry(clock)
    ttl = backend.short_ttl
    await backend.reserve("r1", [Charge(k1, 500, 1000, exp)], now=clock.now(), ttl=ttl)
    await backend.elapse(clock, ttl)
    await backend.reserve("r2", [Charge(k1, 300, 1000, exp)], now=clock.now(), ttl=3600)
    states = await backend.commit("r1", [Charge(k1, 450, None, exp)], now=clock.now())
    assert states == (CounterState(450, 300),)  # r2 still holds its 300


async def test_commit_of_unknown_id_adds_like_a_manual_record(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.reserve("r1", [Charge(k1, 100, 1000, exp)], now=now, ttl=60)
    states = await backend.commit(
        "record-1", [Charge(k1, 25, None, exp), Charge(k2, 7, None, exp)], now=now
    )
    assert states == (CounterState(25, 100), CounterState(7, 0))


async def test_zero_commit_on_missing_counter_creates_nothing(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    states = await backend.commit("r1", [Charge(k1, 0, None, expiry(clock))], now=clock.now())
    assert states == (CounterState(0, 0),)
    if backend.raw is not None:
        assert backend.raw.exists(k1) == 0
    if backend.memory is not None:
        assert len(backend.memory) == 0


async def test_reserving_an_open_id_again_replaces_it(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    assert (await backend.reserve("r1", [Charge(k1, 600, 1000, exp)], now=now, ttl=60)).ok
    # The old 600 does not count against its own replacement.
    result = await backend.reserve("r1", [Charge(k1, 900, 1000, exp)], now=now, ttl=60)
    assert result.ok
    assert result.states == (CounterState(0, 900),)
    assert await backend.commit("r1", [Charge(k1, 10, None, exp)], now=now) == (
        CounterState(10, 0),
    )


async def test_read_of_missing_keys_is_zero(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    assert await backend.read([k1, k2], now=clock.now()) == (CounterState(0, 0),) * 2
    assert await backend.read([], now=clock.now()) == ()


async def test_empty_calls_are_no_ops(backend: LedgerAdapter, clock: FakeClock) -> None:
    now = clock.now()
    result = await backend.reserve("r1", [], now=now, ttl=60)
    assert (result.ok, result.refused, result.states) == (True, None, ())
    assert await backend.commit("r1", [], now=now) == ()
    assert await backend.release("r1", [], now=now) == ()


async def test_counter_past_its_expiry_reads_as_zero(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    # In the past both for the fake clock (memory) and the server's clock (Redis).
    gone = min(clock.now(), time.time()) - 10
    # The commit reports what it made of the counter; then the counter is gone.
    states = await backend.commit("r1", [Charge(k1, 500, None, gone)], now=clock.now())
    assert states == (CounterState(500, 0),)
    assert await backend.read([k1], now=clock.now()) == (CounterState(0, 0),)


async def test_key_expiry_is_set_and_derived_keys_keep_the_hash_tag(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, k1: str, k2: str
) -> None:
    now = clock.now()
    exp = now + 3600
    await backend.reserve("r1", [Charge(k1, 10, 100, exp)], now=now, ttl=60)
    await backend.commit("r2", [Charge(k2, 10, None, exp + 1)], now=now)
    if backend.raw is not None:
        raw = backend.raw
        # Expiry is relative (Redis expires by its own clock, whatever the caller's clock
        # says): the keys live for what is left of their window from the caller's `now`.
        # The bound is loose by design: the test only waits on Redis, never on time.
        for key, ttl_ms in ((k1, 3_600_000), (k1 + INDEX_SUFFIX, 3_600_000), (k2, 3_601_000)):
            assert ttl_ms - 600_000 < raw.pttl(key) <= ttl_ms
        # The committed id is remembered for the closed ttl (600 s), whatever the window.
        assert 0 < raw.pttl(k2 + CLOSED_SUFFIX) <= 600_000
        keys = sorted(k.decode() for k in raw.scan_iter(match=f"{key_prefix}*"))
        assert keys == sorted([k1, k1 + INDEX_SUFFIX, k2, k2 + CLOSED_SUFFIX])
        for stored in keys:
            assert "{u:alice}" in stored or "{u:acme}" in stored
            tag = stored[stored.index("{") : stored.index("}") + 1]
            assert stored.startswith(f"{key_prefix}:{tag}")
    elif backend.memory is not None:
        memory = backend.memory
        assert len(memory) == 2
        clock.set(exp + 0.5)  # k1 is past its expiry, k2 not yet
        assert memory.sweep(clock.now()) == 1
        assert len(memory) == 1
        assert await backend.read([k1, k2], now=clock.now()) == (
            CounterState(0, 0),
            CounterState(10, 0),
        )


BAD_CHARGES: list[tuple[str, Any]] = [
    ("negative amount", lambda k, e: [Charge(k, -1, 10, e)]),
    ("float amount", lambda k, e: [Charge(k, 1.5, 10, e)]),  # type: ignore[arg-type]
    ("bool amount", lambda k, e: [Charge(k, True, 10, e)]),
    ("negative max", lambda k, e: [Charge(k, 1, -10, e)]),
    ("amount too large", lambda k, e: [Charge(k, MAX_UNITS + 1, None, e)]),
    ("max too large", lambda k, e: [Charge(k, 1, MAX_UNITS + 1, e)]),
    ("empty key", lambda k, e: [Charge("", 1, 10, e)]),
    ("repeated key", lambda k, e: [Charge(k, 1, 10, e), Charge(k, 2, 10, e)]),
    ("nan expiry", lambda k, e: [Charge(k, 1, 10, float("nan"))]),
    ("int expiry past a float's range", lambda k, e: [Charge(k, 1, 10, 10**400)]),
    ("text expiry", lambda k, e: [Charge(k, 1, 10, "soon")]),  # type: ignore[arg-type]
    ("not a charge", lambda k, e: [(k, 1, 10, e)]),
]


@pytest.mark.parametrize(("what", "make"), BAD_CHARGES, ids=[b[0] for b in BAD_CHARGES])
async def test_invalid_charges_raise_value_error(
    backend: LedgerAdapter, clock: FakeClock, k1: str, what: str, make: Any
) -> None:
    charges = make(k1, expiry(clock))
    with pytest.raises(ValueError, match=r"charge|key"):
        await backend.reserve("r1", charges, now=clock.now(), ttl=60)
    with pytest.raises(ValueError, match=r"charge|key"):
        await backend.commit("r1", charges, now=clock.now())
    assert await backend.read([k1], now=clock.now()) == (CounterState(0, 0),)


async def test_times_given_as_ints_are_taken_as_floats_are(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    # The quick checks take float times; an int one goes through the detailed checks,
    # which take it.
    now, exp = int(clock.now()), int(expiry(clock))
    tally = Tally(k1.replace(":usd", ":an"), (("c", 5),), exp)
    assert (await backend.reserve("r1", [Charge(k1, 5, 10, exp)], now=now, ttl=60)).ok
    await backend.commit("r1", [Charge(k1, 5, None, exp)], now=now, tallies=[tally])
    assert await backend.read([k1], now=now) == (CounterState(5, 0),)


async def test_invalid_ids_times_and_keys_raise_value_error(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    charges = [Charge(k1, 1, 10, exp)]
    with pytest.raises(ValueError, match="reservation_id"):
        await backend.reserve("", charges, now=now, ttl=60)
    with pytest.raises(ValueError, match="reservation_id"):
        await backend.commit("", charges, now=now)
    with pytest.raises(ValueError, match="reservation_id"):
        await backend.release("", [k1], now=now)
    for ttl in (0, -1, float("inf"), 10**400):
        with pytest.raises(ValueError, match="ttl"):
            await backend.reserve("r1", charges, now=now, ttl=ttl)
    for bad_now in (float("nan"), 10**400):
        with pytest.raises(ValueError, match="now"):
            await backend.reserve("r1", charges, now=bad_now, ttl=60)
    with pytest.raises(ValueError, match="once"):
        await backend.release("r1", [k1, k1], now=now)
    with pytest.raises(ValueError, match="key"):
        await backend.read([""], now=now)
    with pytest.raises(ValueError, match="sequence"):
        await backend.read(k1, now=now)
    assert await backend.read([k1], now=now) == (CounterState(0, 0),)


# -- refusals: what the counter that refused needed ---------------------------------------


async def test_a_refusal_records_what_it_needed_until_a_reserve_fits(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 600, None, exp)], now=now)
    # k2 fits and k1 does not: only the counter that refused records the amount.
    result = await backend.reserve(
        "r1", [Charge(k2, 500, 1000, exp), Charge(k1, 500, 1000, exp)], now=now, ttl=60
    )
    assert (result.ok, result.refused) == (False, 1)
    assert result.states == (CounterState(0, 0), CounterState(600, 0, refused=500))
    assert await backend.read([k2, k1], now=now) == result.states
    # The last refusal is what the counter remembers, smaller or larger.
    again = await backend.reserve("r2", [Charge(k1, 401, 1000, exp)], now=now, ttl=60)
    assert again.states == (CounterState(600, 0, refused=401),)
    # Commits, releases and reads leave it; a closed id's reserve is no refusal.
    await backend.commit("rec", [Charge(k1, 0, None, exp)], now=now)
    await backend.release("gone", [k1], now=now)
    closed = await backend.reserve("gone", [Charge(k1, 10**6, 1000, exp)], now=now, ttl=60)
    assert closed.closed
    assert await backend.read([k1], now=now) == (CounterState(600, 0, refused=401),)
    # A reserve that fits on the counter clears it (a smaller call went through).
    ok = await backend.reserve("r3", [Charge(k1, 400, 1000, exp)], now=now, ttl=60)
    assert ok.ok
    assert ok.states == (CounterState(600, 400),)
    assert await backend.read([k1], now=now) == (CounterState(600, 400, refused=0),)
    # A counter that never refused and has no max records nothing.
    assert (await backend.reserve("r4", [Charge(k2, 10**9, None, exp)], now=now, ttl=60)).ok
    assert (await backend.read([k2], now=now))[0].refused == 0


async def test_a_refusal_on_a_missing_counter_makes_it_for_the_window(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, k1: str
) -> None:
    now = clock.now()
    exp = now + 3600
    # A call larger than the whole limit: the counter exists from then on, so the
    # owner's refusal is seen (the users page lists owners by their counters).
    result = await backend.reserve("r1", [Charge(k1, 2000, 1000, exp)], now=now, ttl=60)
    assert (result.refused, result.states) == (0, (CounterState(0, 0, refused=2000),))
    assert await backend.read([k1], now=now) == result.states
    assert await backend.scan(escape(key_prefix) + ":*", now=now) == [k1]
    # It lives as long as a reserve would have made it live.
    if backend.raw is not None:
        assert 3_000_000 < backend.raw.pttl(k1) <= 3_600_000
    else:
        clock.set(exp)
        assert await backend.read([k1], now=clock.now()) == (CounterState(0, 0),)
        assert await backend.scan(escape(key_prefix) + ":*", now=clock.now()) == []


# -- closed ids: idempotent commits and releases --------------------------------------------


async def test_commit_and_release_are_applied_once_per_id(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    charges = [Charge(k1, 400, 1000, exp), Charge(k2, 400, None, exp)]
    assert (await backend.reserve("r1", charges, now=now, ttl=60)).ok
    actual = [Charge(k1, 300, None, exp), Charge(k2, 300, None, exp)]
    first = await backend.commit("r1", actual, now=now)
    assert first == (CounterState(300, 0), CounterState(300, 0))
    # A retry (its first reply was lost) and a late release change nothing.
    assert await backend.commit("r1", actual, now=now) == first
    assert await backend.release("r1", [k1, k2], now=now) == first
    # A manual record is closed the same way: recorded once.
    assert await backend.commit("rec", [Charge(k1, 7, None, exp)], now=now) == (
        CounterState(307, 0),
    )
    assert await backend.commit("rec", [Charge(k1, 7, None, exp)], now=now) == (
        CounterState(307, 0),
    )


async def test_a_released_id_is_not_committed_later(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    assert (await backend.reserve("r1", [Charge(k1, 400, 1000, exp)], now=now, ttl=60)).ok
    assert await backend.release("r1", [k1], now=now) == (CounterState(0, 0),)
    assert await backend.release("r1", [k1], now=now) == (CounterState(0, 0),)
    assert await backend.commit("r1", [Charge(k1, 300, None, exp)], now=now) == (
        CounterState(0, 0),
    )


async def test_a_reserve_of_a_closed_id_holds_nothing(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    await backend.commit("r0", [Charge(k1, 100, None, exp)], now=now)
    # Released before its reserve ever arrived (the caller gave up on it).
    assert await backend.release("late", [k1, k2], now=now) == (
        CounterState(100, 0),
        CounterState(0, 0),
    )
    charges = [Charge(k1, 500, 1000, exp), Charge(k2, 500, None, exp)]
    result = await backend.reserve("late", charges, now=now, ttl=60)
    assert (result.ok, result.refused, result.closed) == (False, None, True)
    assert result.states == (CounterState(100, 0), CounterState(0, 0))
    assert await backend.read([k1, k2], now=now) == result.states
    # So is a committed id reserved again, on any one of its keys.
    again = await backend.reserve("r0", [Charge(k2, 1, None, exp), Charge(k1, 1, 1000, exp)],
                                  now=now, ttl=60)  # fmt: skip
    assert again.closed
    assert await backend.read([k1, k2], now=now) == result.states


async def test_a_refused_or_expired_reservation_is_not_closed(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    assert not (await backend.reserve("r1", [Charge(k1, 2000, 1000, exp)], now=now, ttl=60)).ok
    assert (await backend.reserve("r1", [Charge(k1, 200, 1000, exp)], now=now, ttl=60)).ok
    ttl = backend.short_ttl
    assert (await backend.reserve("r2", [Charge(k1, 300, 1000, exp)], now=now, ttl=ttl)).ok
    await backend.elapse(clock, ttl)
    # The expired reservation's late commit is still charged.
    states = await backend.commit("r2", [Charge(k1, 250, None, exp)], now=clock.now())
    assert states == (CounterState(250, 200),)


async def test_closed_ids_are_forgotten_after_the_closed_ttl(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    closed_ttl = 0.3 if backend.raw is not None else 600.0
    ledger = backend.with_options(closed_ttl=closed_ttl)
    now, exp = clock.now(), expiry(clock)
    try:
        await ledger.commit("r1", [Charge(k1, 10, None, exp)], now=now)
        await ledger.commit("r1", [Charge(k1, 10, None, exp)], now=now)
        assert await ledger.read([k1], now=now) == (CounterState(10, 0),)
        await ledger.elapse(clock, closed_ttl)
        # Past the closed ttl the id is a new one again.
        await ledger.commit("r1", [Charge(k1, 10, None, exp)], now=clock.now())
        assert await ledger.read([k1], now=clock.now()) == (CounterState(20, 0),)
    finally:
        await ledger.close()


# -- renew -------------------------------------------------------------------------------------


async def test_renew_keeps_a_live_reservation(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    exp, ttl = expiry(clock), backend.short_ttl
    charges = [Charge(k1, 600, 1000, exp), Charge(k2, 5, None, exp)]
    assert (await backend.reserve("r1", charges, now=clock.now(), ttl=ttl)).ok
    assert await backend.renew("r1", [k1, k2], now=clock.now(), ttl=3600)
    await backend.elapse(clock, ttl)
    assert await backend.read([k1, k2], now=clock.now()) == (
        CounterState(0, 600),
        CounterState(0, 5),
    )
    assert not (await backend.reserve("r2", charges, now=clock.now(), ttl=60)).ok
    # A renewal never shortens a deadline.
    assert await backend.renew("r1", [k1, k2], now=clock.now(), ttl=ttl)
    await backend.elapse(clock, ttl)
    assert await backend.read([k1], now=clock.now()) == (CounterState(0, 600, refused=600),)
    await backend.commit("r1", [Charge(k1, 500, None, exp), Charge(k2, 5, None, exp)],
                         now=clock.now())  # fmt: skip
    assert not await backend.renew("r1", [k1, k2], now=clock.now(), ttl=3600)


async def test_renew_reports_what_is_no_longer_open(
    backend: LedgerAdapter, clock: FakeClock, k1: str, k2: str
) -> None:
    exp, ttl = expiry(clock), backend.short_ttl
    assert (
        await backend.reserve("gone", [Charge(k1, 100, 1000, exp)], now=clock.now(), ttl=ttl)
    ).ok
    assert (
        await backend.reserve("live", [Charge(k1, 100, 1000, exp)], now=clock.now(), ttl=3600)
    ).ok
    await backend.elapse(clock, ttl)
    assert not await backend.renew("gone", [k1], now=clock.now(), ttl=3600)
    assert not await backend.renew("never", [k1, k2], now=clock.now(), ttl=3600)
    # Open on one key only: not open as a whole.
    assert not await backend.renew("live", [k1, k2], now=clock.now(), ttl=3600)
    assert await backend.renew("live", [k1], now=clock.now(), ttl=3600)
    assert await backend.read([k1], now=clock.now()) == (CounterState(0, 100),)


async def test_renew_many_renews_each_reservation_in_one_step(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    exp, ttl = expiry(clock), backend.short_ttl
    keys = [key(key_prefix, f"user{i}") for i in range(6)]
    shared = key(key_prefix, "org")
    for i, k in enumerate(keys):
        charges = [Charge(k, 10, 100, exp), Charge(shared, 10, None, exp)]
        assert (await backend.reserve(f"r{i}", charges, now=clock.now(), ttl=ttl)).ok
    await backend.release("r5", [keys[5], shared], now=clock.now())
    batch = [(f"r{i}", [k, shared]) for i, k in enumerate(keys)] + [("ghost", [keys[0]])]
    flags = await backend.renew_many(batch, now=clock.now(), ttl=3600)
    assert flags == (True, True, True, True, True, False, False)
    await backend.elapse(clock, ttl)
    states = await backend.read([*keys, shared], now=clock.now())
    assert states == (*[CounterState(0, 10)] * 5, CounterState(0, 0), CounterState(0, 50))
    assert await backend.renew_many([], now=clock.now(), ttl=60) == ()


async def test_invalid_renewals_raise_value_error(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now = clock.now()
    with pytest.raises(ValueError, match="reservation_id"):
        await backend.renew("", [k1], now=now, ttl=60)
    with pytest.raises(ValueError, match="ttl"):
        await backend.renew("r1", [k1], now=now, ttl=0)
    with pytest.raises(ValueError, match="once"):
        await backend.renew("r1", [k1, k1], now=now, ttl=60)
    with pytest.raises(ValueError, match="twice"):
        await backend.renew_many([("r1", [k1]), ("r1", [k1])], now=now, ttl=60)
    with pytest.raises(ValueError, match="pair"):
        await backend.renew_many([("r1",)], now=now, ttl=60)  # type: ignore[list-item]


# -- capacity ----------------------------------------------------------------------------------


async def test_amounts_above_the_capacity_are_refused_as_such(
    backend: LedgerAdapter, clock: FakeClock, k1: str
) -> None:
    now, exp = clock.now(), expiry(clock)
    with pytest.raises(CapacityExceeded) as caught:
        await backend.reserve("r1", [Charge(k1, MAX_UNITS + 1, None, exp)], now=now, ttl=60)
    assert (caught.value.index, caught.value.field) == (0, "amount")
    assert (caught.value.value, caught.value.capacity) == (MAX_UNITS + 1, MAX_UNITS)
    assert not isinstance(caught.value, StorageError)
    with pytest.raises(CapacityExceeded, match="max"):
        await backend.reserve(
            "r1", [Charge(k1, 1, 10, exp), Charge(k1 + "b", 1, MAX_UNITS + 1, exp)], now=now, ttl=60
        )
    with pytest.raises(CapacityExceeded):
        await backend.commit("r1", [Charge(k1, MAX_UNITS + 1, None, exp)], now=now)
    # The capacity itself fits.
    assert (
        await backend.reserve("r1", [Charge(k1, MAX_UNITS, MAX_UNITS, exp)], now=now, ttl=60)
    ).ok


# -- scan ------------------------------------------------------------------------------------


def owner_key(prefix: str, tag: str, unit: str = "usd") -> str:
    return f"{prefix}:{{{tag}}}:{unit}:day:{WINDOW}"


async def seed(backend: LedgerAdapter, clock: FakeClock, keys: list[str]) -> None:
    charges = [Charge(k, 1, None, expiry(clock)) for k in keys]
    await backend.commit("seed", charges, now=clock.now())


async def test_scan_lists_the_matching_counters_once(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    users = [
        owner_key(key_prefix, "u:alice"),
        owner_key(key_prefix, "u:alice", "requests"),
        owner_key(key_prefix, "u:acme:bob"),
    ]
    others = [
        owner_key(key_prefix, "o:acme"),
        owner_key(key_prefix, "g:*"),
        owner_key(key_prefix, "a:anonymous"),
        owner_key(f"{key_prefix}-other", "u:mallory"),  # another prefix that starts alike
    ]
    await seed(backend, clock, users + others)
    # A counter with only an open reservation exists too (and its Redis index must not
    # be listed as a key of its own).
    reserved = owner_key(key_prefix, "u:carol")
    now = clock.now()
    assert (
        await backend.reserve("r1", [Charge(reserved, 5, 10, expiry(clock))], now=now, ttl=60)
    ).ok

    found = await backend.scan(escape(key_prefix) + ":{u:*", now=now)
    assert sorted(found) == sorted([*users, reserved])
    everything = await backend.scan(escape(key_prefix) + ":*", now=now)
    assert sorted(everything) == sorted([*users, reserved, *others[:3]])
    assert await backend.scan(escape(key_prefix) + ":{x:*", now=now) == []


GLOBS: list[tuple[str, list[str]]] = [
    (":{[ua]:*", ["u:alice", "u:bob", "a:anonymous", "a:anonymous:s1"]),
    (":{[^ua]:*", ["o:acme", "g:*", "l:proj"]),
    (":{u:?????}*", ["u:alice"]),
    (":{g:\\*}*", ["g:*"]),
    (":{a:anonymous}*", ["a:anonymous"]),
    (":{[a-g]:*", ["a:anonymous", "a:anonymous:s1", "g:*"]),
    (":{[g-a]:*", ["a:anonymous", "a:anonymous:s1", "g:*"]),  # a reversed range is swapped
    (":{[]:*", []),  # an empty class matches nothing
    (":{*:*:*}*", ["a:anonymous:s1"]),  # "*" spans ":"; one tag has two
]


@pytest.mark.parametrize(("glob", "owners"), GLOBS, ids=[g[0] for g in GLOBS])
async def test_scan_follows_redis_glob_rules(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, glob: str, owners: list[str]
) -> None:
    tags = ["u:alice", "u:bob", "o:acme", "g:*", "a:anonymous", "a:anonymous:s1", "l:proj"]
    await seed(backend, clock, [owner_key(key_prefix, tag) for tag in tags])
    found = await backend.scan(escape(key_prefix) + glob, now=clock.now())
    assert sorted(found) == sorted(owner_key(key_prefix, tag) for tag in owners)


async def test_scan_stops_at_the_limit(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    keys = [owner_key(key_prefix, f"u:user{i}") for i in range(5)]
    await seed(backend, clock, keys)
    pattern = escape(key_prefix) + ":*"
    some = await backend.scan(pattern, now=clock.now(), limit=2)
    assert len(some) == 2
    assert len(set(some)) == 2
    assert set(some) <= set(keys)
    assert sorted(await backend.scan(pattern, now=clock.now(), limit=5)) == sorted(keys)
    assert sorted(await backend.scan(pattern, now=clock.now(), limit=50)) == sorted(keys)


async def test_scan_walks_past_many_server_batches(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    # More keys than one SCAN COUNT, so the Redis backends follow the cursor.
    keys = [owner_key(key_prefix, f"u:user{i}") for i in range(2500)]
    await seed(backend, clock, keys)
    found = await backend.scan(escape(key_prefix) + ":{u:*", now=clock.now())
    assert len(found) == len(keys)
    assert set(found) == set(keys)


async def test_scan_leaves_out_expired_counters(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    live, gone = owner_key(key_prefix, "u:live"), owner_key(key_prefix, "u:gone")
    # In the past for both the fake clock (memory) and the server's clock (Redis).
    past = min(clock.now(), time.time()) - 10
    await backend.commit("r1", [Charge(gone, 5, None, past)], now=clock.now())
    await backend.commit("r2", [Charge(live, 5, None, expiry(clock))], now=clock.now())
    assert await backend.scan(escape(key_prefix) + ":*", now=clock.now()) == [live]


async def test_scan_refuses_invalid_arguments(backend: LedgerAdapter, clock: FakeClock) -> None:
    now = clock.now()
    for limit in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="limit"):
            await backend.scan("pg:*", now=now, limit=limit)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match"):
        await backend.scan("", now=now)
    with pytest.raises(ValueError, match="now"):
        await backend.scan("pg:*", now=float("nan"))
