"""A model-based test: random reserve / commit / release / record / renew / retry / time /
window steps against memory and real Redis, checked after every step against a plain model.

Memory runs on the caller's clock, so reservations and closed ids expire as the model's
time moves; Redis runs deadlines on its own clock, which hardly moves during a run, so
there the model's reservations and closed ids never expire (the caller's time still
moves, and only decides where counters live)."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from ledger._support import delete_prefix
from payi_guard.ledger import Charge, CounterState, Ledger, MemoryLedger, open_ledger

START = 1_795_780_800.0
EXPIRES = START + 30 * 86_400  # no counter expires during a run
MAXES: tuple[int | None, ...] = (1000, 600, None)  # per window: two limited counters, one not
CLOSED_TTL = 600.0


@dataclass
class Reservation:
    amounts: dict[str, int]
    deadline: float


class LedgerMachine(RuleBasedStateMachine):
    """Drives one ledger and a model; ``make`` builds the ledger and a cleanup."""

    make: Callable[[str], tuple[Ledger, Callable[[], None]]]
    store_clock = False
    """True when deadlines follow the store's own clock rather than the model's time."""
    closed_reserves = True
    """True when a reserve of a closed id answers ``closed`` (the ledger contract)."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"pgtest:sm:{uuid.uuid4().hex[:12]}"
        self.ledger, self.cleanup = type(self).make(self.prefix)
        self.now = START
        self.window = 0
        self.seq = 0
        self.settled: dict[str, int] = {}
        # What the last reserve each counter refused needed (0 once a reserve on it fits).
        self.refused: dict[str, int] = {}
        self.maxes: dict[str, int | None] = {}
        self.open: dict[str, Reservation] = {}
        # Committed or released ids: their charges and until when they are remembered.
        self.closed: dict[str, tuple[list[Charge], float]] = {}
        # Counters an honest caller could not have pushed past max: a late commit of an
        # expired reservation, an actual above its estimate or a manual record did.
        self.tainted: set[str] = set()

    # -- model ---------------------------------------------------------------------------

    def keys(self) -> list[str]:
        out = [f"{self.prefix}:{{u:{i}}}:w{self.window}" for i in range(len(MAXES))]
        for key, limit in zip(out, MAXES, strict=True):
            self.maxes.setdefault(key, limit)
            self.settled.setdefault(key, 0)
            self.refused.setdefault(key, 0)
        return out

    def pending(self, key: str) -> int:
        return sum(r.amounts.get(key, 0) for r in self.open.values() if r.deadline > self.now)

    def state(self, key: str) -> CounterState:
        return CounterState(self.settled[key], self.pending(key), self.refused[key])

    def reserved(self, charges: list[Charge], refused: int | None) -> None:
        """What a reserve that was not closed does to ``refused``."""
        if refused is not None:
            self.refused[charges[refused].key] = charges[refused].amount
        else:
            for charge in charges:
                self.refused[charge.key] = 0

    def new_id(self) -> str:
        self.seq += 1
        return f"r{self.seq}"

    def deadline(self, ttl: float) -> float:
        return math.inf if self.store_clock else self.now + ttl

    def ledger_ttl(self, ttl: float) -> float:
        # On the store's clock a run must never outlive a reservation, however slow.
        return 86_400.0 if self.store_clock else ttl

    def close(self, rid: str, charges: list[Charge]) -> None:
        until = math.inf if self.store_clock else self.now + CLOSED_TTL
        self.closed[rid] = (charges, until)

    # -- rules ---------------------------------------------------------------------------

    @initialize()
    def first_window(self) -> None:
        self.keys()

    @rule(
        picks=st.lists(
            st.tuples(st.integers(0, len(MAXES) - 1), st.integers(0, 450)),
            min_size=1,
            max_size=len(MAXES),
            unique_by=lambda pick: pick[0],
        ),
        ttl=st.sampled_from([30.0, 60.0, 300.0]),
    )
    def reserve(self, picks: list[tuple[int, int]], ttl: float) -> None:
        keys = self.keys()
        charges = [Charge(keys[i], amount, self.maxes[keys[i]], EXPIRES) for i, amount in picks]
        refused = None
        for index, charge in enumerate(charges):
            if charge.max is not None and self.state(charge.key).used + charge.amount > charge.max:
                refused = index
                break
        rid = self.new_id()
        result = self.ledger.reserve(rid, charges, now=self.now, ttl=self.ledger_ttl(ttl))
        assert result.refused == refused
        assert result.ok == (refused is None)
        assert not result.closed
        self.reserved(charges, refused)
        if result.ok:
            self.open[rid] = Reservation({c.key: c.amount for c in charges}, self.deadline(ttl))
        assert result.states == tuple(self.state(c.key) for c in charges)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), generous=st.booleans())
    def commit(self, data: st.DataObject, generous: bool) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        reservation = self.open.pop(rid)
        expired = reservation.deadline <= self.now
        charges = []
        for key, amount in reservation.amounts.items():
            # Mostly an upper-bound estimate (actual <= reserved); sometimes more.
            top = 2 * amount + 10 if generous else amount
            actual = data.draw(st.integers(0, top))
            if actual > amount or (expired and actual > 0):
                self.tainted.add(key)
            charges.append(Charge(key, actual, None, EXPIRES))
            self.settled[key] += actual
        states = self.ledger.commit(rid, charges, now=self.now)
        assert states == tuple(self.state(c.key) for c in charges)
        self.close(rid, charges)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        reservation = self.open.pop(rid)
        keys = list(reservation.amounts)
        states = self.ledger.release(rid, keys, now=self.now)
        assert states == tuple(self.state(k) for k in keys)
        self.close(rid, [Charge(k, 0, None, EXPIRES) for k in keys])

    @precondition(lambda self: bool(self.closed))
    @rule(data=st.data(), late_reserve=st.booleans())
    def retry_a_closed_id(self, data: st.DataObject, late_reserve: bool) -> None:
        """A commit retried after a lost reply, or a reserve that arrives late."""
        rid = data.draw(st.sampled_from(sorted(self.closed)))
        charges, until = self.closed[rid]
        remembered = until > self.now
        if late_reserve and self.closed_reserves:
            keys = [c.key for c in charges]
            limits = [Charge(k, 1, self.maxes.get(k), EXPIRES) for k in keys]
            before = tuple(self.state(k) for k in keys)
            result = self.ledger.reserve(rid, limits, now=self.now, ttl=self.ledger_ttl(30.0))
            if remembered:
                assert result.closed
                assert result.states == before
                return
            # Forgotten: an ordinary new reservation, admitted or refused.
            self.reserved(limits, result.refused)
            if result.ok:
                self.open[rid] = Reservation(dict.fromkeys(keys, 1), self.deadline(30.0))
                del self.closed[rid]
            assert result.states == tuple(self.state(k) for k in keys)
            return
        if not remembered:
            for charge in charges:
                self.settled[charge.key] += charge.amount
                if charge.amount:
                    self.tainted.add(charge.key)
            self.close(rid, charges)
        states = self.ledger.commit(rid, charges, now=self.now)
        assert states == tuple(self.state(c.key) for c in charges)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), ttl=st.sampled_from([30.0, 300.0]))
    def renew(self, data: st.DataObject, ttl: float) -> None:
        rid = data.draw(st.sampled_from(sorted(self.open)))
        reservation = self.open[rid]
        alive = reservation.deadline > self.now
        keys = list(reservation.amounts)
        assert self.ledger.renew(rid, keys, now=self.now, ttl=self.ledger_ttl(ttl)) == alive
        if alive:
            reservation.deadline = max(reservation.deadline, self.deadline(ttl))

    @rule(index=st.integers(0, len(MAXES) - 1), amount=st.integers(0, 300))
    def record(self, index: int, amount: int) -> None:
        key = self.keys()[index]
        if amount:
            self.tainted.add(key)
        self.settled[key] += amount
        rid = self.new_id()
        charges = [Charge(key, amount, None, EXPIRES)]
        states = self.ledger.commit(rid, charges, now=self.now)
        assert states == (self.state(key),)
        self.close(rid, charges)

    @rule(seconds=st.sampled_from([0.5, 1.0, 29.5, 30.0, 59.0, 60.0, 299.0, 300.0, 301.0]))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def roll_over(self) -> None:
        # Reservations of the old window stay open and still commit to its keys.
        self.window += 1
        self.keys()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def counters_match_the_model(self) -> None:
        keys = sorted(self.settled)
        assert self.ledger.read(keys, now=self.now) == tuple(self.state(k) for k in keys)

    @invariant()
    def limits_hold_for_honest_callers(self) -> None:
        keys = [k for k in sorted(self.settled) if self.maxes[k] is not None]
        for key, state in zip(keys, self.ledger.read(keys, now=self.now), strict=True):
            limit = self.maxes[key]
            assert limit is not None
            if key not in self.tainted:
                assert state.used <= limit, (key, state, limit)

    def teardown(self) -> None:
        self.cleanup()


def _run(
    make: Callable[[str], tuple[Ledger, Callable[[], None]]],
    examples: int,
    *,
    store_clock: bool = False,
    closed_reserves: bool = True,
) -> None:
    attributes = {
        "make": staticmethod(make),
        "store_clock": store_clock,
        "closed_reserves": closed_reserves,
    }
    machine = type("Machine", (LedgerMachine,), attributes)
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_memory_ledger_matches_the_model() -> None:
    def make(prefix: str) -> tuple[Ledger, Callable[[], None]]:
        return MemoryLedger(), lambda: None

    _run(make, examples=150)


def test_redis_ledger_matches_the_model(redis_url: str) -> None:
    raw = redis.Redis.from_url(redis_url)

    def make(prefix: str) -> tuple[Ledger, Callable[[], None]]:
        ledger = open_ledger(redis_url)

        def cleanup() -> None:
            ledger.close()
            delete_prefix(raw, prefix)

        return ledger, cleanup

    try:
        _run(make, examples=60, store_clock=True)
    finally:
        raw.close()
