"""Tallies (usage analytics) in the ledger contract: memory, SQLite and real Redis."""

from __future__ import annotations

import random
import sqlite3
from collections import deque
from pathlib import Path

import pytest

from ledger._support import LedgerAdapter
from payi_guard.clock import FakeClock
from payi_guard.ledger import Charge, CounterState, SqliteLedger, Tally, open_ledger

DAY = 86_400
WINDOW = 1_795_737_600


def key(prefix: str, owner: str) -> str:
    return f"{prefix}:{{u:{owner}}}:usd:day:{WINDOW}"


def tally_key(prefix: str, owner: str, day: str = "20261125") -> str:
    return f"{prefix}:{{u:{owner}}}:an:{day}"


def tally(prefix: str, owner: str, cost: int, until: float, model: str = "gpt-4o") -> Tally:
    return Tally(tally_key(prefix, owner), (("c", cost), ("n", 1), (f"mc:{model}", cost)), until)


async def test_commit_adds_tallies_once(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    now, exp = clock.now(), clock.now() + 2 * DAY
    k = key(key_prefix, "alice")
    t = tally(key_prefix, "alice", 700, exp)
    await backend.reserve("r1", [Charge(k, 1000, 5000, exp)], now=now, ttl=60)
    states = await backend.commit("r1", [Charge(k, 700, None, exp)], now=now, tallies=[t])
    assert states == (CounterState(700, 0),)
    # A retried commit (its reply lost) adds nothing, to the counter or the tally.
    await backend.commit("r1", [Charge(k, 700, None, exp)], now=now, tallies=[t])
    assert await backend.read_tallies([t.key], now=now) == ({"c": 700, "n": 1, "mc:gpt-4o": 700},)
    t2 = tally(key_prefix, "alice", 300, exp)
    await backend.commit("r2", [Charge(k, 300, None, exp)], now=now, tallies=[t2])
    (fields,) = await backend.read_tallies([t.key], now=now)
    assert fields == {"c": 1000, "n": 2, "mc:gpt-4o": 1000}


async def test_release_and_fitting_reserve_add_no_tally(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    now, exp = clock.now(), clock.now() + 2 * DAY
    k = key(key_prefix, "bob")
    t = tally(key_prefix, "bob", 1, exp)
    result = await backend.reserve("r1", [Charge(k, 10, 100, exp)], now=now, ttl=60, tallies=[t])
    assert result.ok
    await backend.release("r1", [k], now=now)
    # Committing a released id closes nothing: no tally either.
    await backend.commit("r1", [Charge(k, 10, None, exp)], now=now, tallies=[t])
    assert await backend.read_tallies([t.key], now=now) == ({},)


async def test_refused_reserve_adds_its_tallies(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    now, exp = clock.now(), clock.now() + 2 * DAY
    k = key(key_prefix, "carol")
    refusal = Tally(tally_key(key_prefix, "carol"), (("f", 1),), exp)
    result = await backend.reserve(
        "r1", [Charge(k, 101, 100, exp)], now=now, ttl=60, tallies=[refusal]
    )
    assert not result.ok
    await backend.reserve("r2", [Charge(k, 500, 100, exp)], now=now, ttl=60, tallies=[refusal])
    assert await backend.read_tallies([refusal.key], now=now) == ({"f": 2},)


async def test_tallies_expire_and_are_listed_by_scan(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    now = clock.now()
    k = key(key_prefix, "dave")
    short = tally(key_prefix, "dave", 5, now + 100)
    await backend.commit("r1", [Charge(k, 5, None, now + 2 * DAY)], now=now, tallies=[short])
    found = await backend.scan(f"{key_prefix}:{{u:dave}}:an:*", now=now)
    assert found == [short.key]
    if backend.is_redis:
        assert backend.raw is not None
        assert 0 < backend.raw.pttl(short.key) <= 100_000
        return
    later = now + 101
    assert await backend.read_tallies([short.key], now=later) == ({},)
    assert await backend.scan(f"{key_prefix}:{{u:dave}}:an:*", now=later) == []
    # Written again after it expired: it starts afresh.
    await backend.commit(
        "r2",
        [Charge(k, 7, None, later + DAY)],
        now=later,
        tallies=[tally(key_prefix, "dave", 7, later + 100)],
    )
    assert await backend.read_tallies([short.key], now=later) == ({"c": 7, "n": 1, "mc:gpt-4o": 7},)


async def test_tallies_of_several_owners_in_one_commit(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str
) -> None:
    now, exp = clock.now(), clock.now() + 2 * DAY
    user, org = key(key_prefix, "acme:erin"), f"{key_prefix}:{{o:acme}}:usd:day:{WINDOW}"
    tallies = [
        Tally(tally_key(key_prefix, "acme:erin"), (("c", 9), ("i", 120), ("o", 30)), exp),
        Tally(f"{key_prefix}:{{o:acme}}:an:20261125", (("c", 9), ("n", 1)), exp),
    ]
    await backend.commit(
        "r1", [Charge(user, 9, None, exp), Charge(org, 9, None, exp)], now=now, tallies=tallies
    )
    assert await backend.read_tallies([t.key for t in tallies], now=now) == (
        {"c": 9, "i": 120, "o": 30},
        {"c": 9, "n": 1},
    )


@pytest.mark.parametrize(
    "bad",
    [
        Tally("", (("c", 1),), 1e10),
        Tally("t", (("c", 1.5),), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), ("c", 2)), 1e10),
        Tally("t", (("c", 2**60),), 1e10),
        Tally("t", (("c", -(2**60)),), 1e10),
        Tally("t", (("", 1),), 1e10),
        Tally("t", (("c", True),), 1e10),
        Tally("t", (("c", 1),), float("inf")),
        Tally("t", (("c", 1),), 10**400),
        Tally("t", (("c", 1),), "soon"),  # type: ignore[arg-type]
        Tally("t", (("c", 1), ("n", 1), ("c", 1)), 1e10),
        Tally("t", (("c", 1), ("n",)), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), ("n", 1, 2)), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), 7), 1e10),  # type: ignore[arg-type]
        Tally("t", ((5, 1),), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), (b"n", 1)), 1e10),  # type: ignore[arg-type]
        # Not (name, increment) pairs, though some unpack as two values.
        Tally("t", {"c": 1}, 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), deque(["n", 2])), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), "n2"), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), ("n", 2.0)), 1e10),  # type: ignore[arg-type]
        Tally("t", (("c", 1), ("n", 2**53)), 1e10),
        Tally("t", (("c", 1), (("n",), 2)), 1e10),  # type: ignore[arg-type]
    ],
)
async def test_malformed_tallies_are_refused(
    backend: LedgerAdapter, clock: FakeClock, key_prefix: str, bad: Tally
) -> None:
    k = key(key_prefix, "frank")
    with pytest.raises(ValueError):
        await backend.commit(
            "r1", [Charge(k, 1, None, clock.now() + DAY)], now=clock.now(), tallies=[bad]
        )
    assert await backend.read([k], now=clock.now()) == (CounterState(0, 0),)


def test_sqlite_prunes_tallies_past_their_expiry(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "ledger.db"
    ledger = SqliteLedger(path)
    now = clock.now()
    k = key("p", "gina")
    kept = Tally(tally_key("p", "gina", "20261126"), (("c", 1),), now + 1000)
    gone = Tally(tally_key("p", "gina"), (("c", 5), ("n", 1)), now + 100)
    ledger.commit("r1", [Charge(k, 5, None, now + DAY)], now=now, tallies=[gone, kept])
    ledger.prune(now + 101)
    with sqlite3.connect(path) as conn:
        left = conn.execute("SELECT key, field FROM tallies ORDER BY key, field").fetchall()
    ledger.close()
    assert left == [(kept.key, "c")]


def test_slot_grouped_redis_writes_each_tally_with_its_own_slot(
    redis_url: str, clock: FakeClock, key_prefix: str
) -> None:
    ledger = open_ledger(redis_url, group_by_slot=True)
    now, exp = clock.now(), clock.now() + 2 * DAY
    user, org = key(key_prefix, "acme:hal"), f"{key_prefix}:{{o:acme}}:usd:day:{WINDOW}"
    tallies = [
        Tally(tally_key(key_prefix, "acme:hal"), (("c", 4), ("n", 1)), exp),
        Tally(f"{key_prefix}:{{o:acme}}:an:20261125", (("c", 4), ("n", 1)), exp),
        # No charge shares this one's slot: it cannot ride in an atomic step.
        Tally(f"{key_prefix}:{{o:elsewhere}}:an:20261125", (("c", 4),), exp),
    ]
    charges = [Charge(user, 4, 100, exp), Charge(org, 4, 100, exp)]
    try:
        assert ledger.reserve("r1", charges, now=now, ttl=60).ok
        ledger.commit("r1", charges, now=now, tallies=tallies)
        ledger.commit("r1", charges, now=now, tallies=tallies)  # a retry adds nothing
        refused = [Charge(user, 500, 100, exp), Charge(org, 1, 100, exp)]
        refusal = [Tally(tallies[0].key, (("f", 1),), exp)]
        assert not ledger.reserve("r2", refused, now=now, ttl=60, tallies=refusal).ok
        read = ledger.read_tallies([t.key for t in tallies], now=now)
    finally:
        ledger.close()
    assert read == ({"c": 4, "n": 1, "f": 1}, {"c": 4, "n": 1}, {})


def test_the_quick_tally_check_refuses_what_the_detailed_one_refuses() -> None:
    """check_tallies' quick pass accepts exactly what its detailed checks accept."""
    from payi_guard.ledger._tally import _check_tallies_slowly, check_tallies

    rng = random.Random(21)
    names: list[object] = ["c", "n", "", "mc:gpt-4o", b"c", 5, ("c",), None]
    values: list[object] = [0, 1, -1, 2**53 - 1, -(2**53 - 1), 2**53, True, 1.0, "1", None]

    def pair() -> object:
        shape = rng.random()
        name, value = rng.choice(names), rng.choice(values)
        if shape < 0.55:
            return (name, value)
        if shape < 0.7:
            return [name, value]
        if shape < 0.8:
            return (name, value, 1)
        if shape < 0.9:
            return rng.choice(["ab", b"ab", deque([name, value])])
        return 7

    outcomes = {True: 0, False: 0}
    for _ in range(5_000):
        fields: object = [pair() for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.7:
            fields = tuple(fields)  # type: ignore[arg-type]
        elif rng.random() < 0.3:
            fields = {"c": 1}
        tallies = [Tally("t", fields, 1e10)]  # type: ignore[arg-type]
        try:
            _check_tallies_slowly(tallies)
            detailed = True
        except ValueError:
            detailed = False
        try:
            check_tallies(tallies)
            quick = True
        except ValueError:
            quick = False
        assert quick == detailed, fields
        outcomes[quick] += 1
    assert min(outcomes.values()) > 500, outcomes
