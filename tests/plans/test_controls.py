"""Operator controls: ``adjust``, ``reset`` and the history, on memory, SQLite and Redis."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest

from payi_guard import BudgetExceeded, Guard, Pseudonymizer, track_context
from payi_guard.clock import FakeClock
from payi_guard.context import Attribution
from payi_guard.engine import CallRequest
from payi_guard.pricing import TokenUsage
from payi_guard.testing import capture_events

PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
CONFIG: dict[str, Any] = {
    "prices": PRICES,
    "limits": {
        "daily": {"max": 0.01, "per": "day"},
        "monthly": {"max": 1, "per": "month"},
        "rpm": {"requests": 100, "per": "minute"},
    },
    "default": ["daily", "monthly", "rpm"],
    "tiers": {"pro": [{"max": 0.1, "per": "day"}, "monthly"]},
    "users": {"bot": []},
    "orgs": {"acme": [{"max": 5, "per": "month"}]},
    "global": [{"max": 100, "per": "month"}],
    "anonymous": {"strategy": "shared", "limits": [{"max": 0.01, "per": "day"}]},
}
ALICE = "acme:alice"
MILLI = Decimal("0.001")


def build(store: str, key_prefix: str, clock: FakeClock, **kwargs: Any) -> Guard:
    return Guard(CONFIG, storage=store, key_prefix=key_prefix, clock=clock, **kwargs)


def spend(guard: Guard, user: str, dollars: str) -> None:
    tokens = int(Decimal(dollars) * 1_000_000)  # $1 per million input tokens
    with track_context(user_id=user):
        call = CallRequest(model="test-model", input_tokens=tokens, max_output_tokens=0)
        guard.begin(call).settle(TokenUsage(tokens, 0))


def used(guard: Guard, user: str) -> dict[str, Decimal | int]:
    return {u.name: u.used for u in guard.usage(user)}


def admitted(guard: Guard, user: str, dollars: str = "0.001") -> bool:
    tokens = int(Decimal(dollars) * 1_000_000)
    try:
        with track_context(user_id=user):
            guard.begin(CallRequest(model="test-model", input_tokens=tokens)).release()
    except BudgetExceeded:
        return False
    return True


def test_adjust_adds_to_the_current_window_of_one_limit(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.003")
    with capture_events() as events:
        after = guard.adjust(ALICE, "daily", "0.005", "incident 42: double charge", by="ops:kim")
    assert (after.name, after.used, after.remaining, after.state) == (
        "daily",
        Decimal("0.008"),
        Decimal("0.002"),
        "ok",
    )
    assert used(guard, ALICE) == {
        "daily": Decimal("0.008"),
        "monthly": Decimal("0.003"),  # another period: another counter, untouched
        "rpm": 1,
        "org:0": Decimal("0.003"),  # the org's and the global limits never move
        "global:0": Decimal("0.003"),
    }
    (line,) = events.named("budget_adjusted")
    assert {k: line[k] for k in ("user_id", "limit", "amount", "used", "max", "reason")} == {
        "user_id": ALICE,
        "limit": "daily",
        "amount": 0.005,
        "used": 0.008,
        "max": 0.01,
        "reason": "incident 42: double charge",
    }
    assert (line["by"], line["op"], line["unit"], line["scope"]) == (
        "ops:kim",
        "adjust",
        "usd",
        "user",
    )
    guard.close()


def test_a_negative_amount_gives_budget_back_at_once(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.01")
    assert not admitted(guard, ALICE)
    assert guard.exhausted_limit(Attribution(user_id=ALICE)) is not None
    guard.adjust(ALICE, "daily", Decimal("-0.005"))
    # This process forgot the spent counter: the gate and the call both see the credit.
    assert guard.exhausted_limit(Attribution(user_id=ALICE)) is None
    assert admitted(guard, ALICE, "0.005")
    assert not admitted(guard, ALICE, "0.006")
    # Below zero is a credit for the rest of the window.
    assert guard.adjust(ALICE, "daily", -1).used == Decimal("-0.995")
    assert admitted(guard, ALICE, "0.9")
    guard.close()


def test_an_adjustment_past_max_refuses_the_user(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    after = guard.adjust(ALICE, "daily", "0.02", "abuse")
    assert (after.used, after.remaining, after.state) == (Decimal("0.02"), 0, "exceeded")
    with track_context(user_id=ALICE), pytest.raises(BudgetExceeded) as refused:
        guard.begin(CallRequest(model="test-model", input_tokens=1))
    assert refused.value.limit.name == "daily"
    guard.close()


def test_reset_zeroes_the_users_own_limits_only(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.004")
    spend(guard, "acme:bob", "0.002")
    with capture_events() as events:
        after = guard.reset(ALICE, limit="rpm", reason="retry storm")
    assert [(u.name, u.used) for u in after] == [("rpm", 0)]
    assert used(guard, ALICE)["daily"] == Decimal("0.004")
    with capture_events() as more:
        after = guard.reset(ALICE, reason="incident 7")
    assert [(u.name, u.used) for u in after] == [
        ("daily", 0),
        ("monthly", 0),
        ("rpm", 0),
    ]
    assert used(guard, ALICE) == {
        "daily": 0,
        "monthly": 0,
        "rpm": 0,
        "org:0": Decimal("0.006"),
        "global:0": Decimal("0.006"),
    }
    assert used(guard, "acme:bob")["daily"] == Decimal("0.002")
    assert [(e["limit"], e["amount"]) for e in events.named("budget_adjusted")] == [("rpm", -1)]
    lines = more.named("budget_adjusted")
    assert [(e["limit"], e["amount"], e["op"]) for e in lines] == [
        ("daily", -0.004, "reset"),
        ("monthly", -0.004, "reset"),
        ("rpm", 0, "reset"),
    ]
    assert len({e["adjustment_id"] for e in lines}) == 1
    assert guard.reset("bot") == []  # no limits of its own: nothing to reset
    guard.close()


def test_calls_in_flight_keep_their_reservations_through_a_reset(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.006")
    with track_context(user_id=ALICE):
        flying = guard.begin(CallRequest(model="test-model", input_tokens=3000))
    (daily,) = guard.reset(ALICE, "daily")
    assert daily.used == Decimal("0.003")  # nothing settled, the reservation still held
    flying.settle(TokenUsage(2000, 0))
    assert used(guard, ALICE)["daily"] == Decimal("0.002")
    guard.close()


def test_amounts_and_limits_are_checked(store: str, key_prefix: str, clock: FakeClock) -> None:
    guard = build(store, key_prefix, clock)
    assert guard.adjust(ALICE, "rpm", 2).used == 2
    assert guard.adjust(ALICE, "rpm", "-1").used == 1
    cases: list[tuple[str, object, str]] = [
        ("rpm", "1.5", "whole number"),
        ("rpm", True, "whole number"),
        ("daily", "0.0000000001", "finer than a nano-dollar"),
        ("daily", "lots", "must be a number"),
        ("daily", None, "must be a number"),
        ("daily", "NaN", "finite"),
        ("daily", "\u0665", "must be a number"),  # an Arabic-Indic five is not $5
        ("daily", "1_000", "must be a number"),
        ("org:0", 1, "not one of acme:alice's own limits"),
        ("global:0", 1, "not one of"),
        ("weekly", 1, "has no limit 'weekly'; their limits: daily, monthly, rpm"),
    ]
    for limit, amount, message in cases:
        with pytest.raises(ValueError, match=message):
            guard.adjust(ALICE, limit, amount)
    with pytest.raises(ValueError, match="one printable line"):
        guard.adjust(ALICE, "daily", 1, "two\nlines")
    with pytest.raises(ValueError, match="one printable line"):
        guard.reset(ALICE, by="x" * 201)
    with pytest.raises(TypeError, match="reason must be a string"):
        guard.adjust(ALICE, "daily", 1, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than a counter holds"):
        guard.adjust(ALICE, "rpm", 2**53)
    with pytest.raises(ValueError, match="nothing was changed") as beyond:
        guard.adjust(ALICE, "rpm", 2**53 - 1)  # 1 + that is more than a counter holds
    assert "adjust rpm: a counter would go beyond what it can hold" in str(beyond.value)
    assert "($9,007,199.254740991 for money, 9,007,199,254,740,991 tokens" in str(beyond.value)
    assert used(guard, ALICE)["rpm"] == 1  # none of the refusals changed anything
    guard.close()


def test_the_history_keeps_every_adjustment_newest_first(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.002")
    guard.adjust(ALICE, "daily", "-0.001", "goodwill", by="support:ana")
    clock.advance(60)
    guard.reset(ALICE, "monthly", reason="migration")
    history = guard.adjustments(ALICE)
    assert [(h.op, h.limits, h.amount, h.used) for h in history] == [
        ("reset", ("monthly",), Decimal("-0.002"), 0),
        ("adjust", ("daily",), Decimal("-0.001"), Decimal("0.001")),
    ]
    newest, oldest = history
    assert newest.at == datetime.fromtimestamp(clock.now(), tz=timezone.utc)
    assert (oldest.reason, oldest.by, oldest.unit, oldest.per) == (
        "goodwill",
        "support:ana",
        "usd",
        "day",
    )
    assert oldest.window_start == datetime(2026, 11, 27, tzinfo=timezone.utc)
    assert newest.adjustment_id
    assert newest.adjustment_id != oldest.adjustment_id
    document = oldest.as_dict()
    assert document["amount"] == "-0.001"
    assert document["limits"] == ["daily"]
    json.dumps(document)
    assert guard.adjustments("acme:bob") == []
    assert len(guard.adjustments(ALICE, limit=1)) == 1
    guard.close()


def _states(limits: Any) -> dict[str, str]:
    return {u.name: u.state for u in limits}


async def test_what_an_adjustment_returns_is_what_usage_reads_after_it(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    # A refused call leaves its mark on the limit that refused it: the limit is
    # exceeded while a call that size would be refused. An adjustment or reset that
    # leaves it so says so, as usage() and the next 429 do.
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.004")
    assert not admitted(guard, ALICE, "0.009")  # $0.006 left of the daily $0.01
    assert _states(guard.usage(ALICE))["daily"] == "exceeded"
    given = guard.adjust(ALICE, "daily", "-0.001")  # $0.007 left: still short
    assert given.state == "exceeded" == _states(guard.usage(ALICE))["daily"]
    enough = guard.adjust(ALICE, "daily", "-0.002")  # $0.009 left: that call fits
    assert enough.state == "ok" == _states(guard.usage(ALICE))["daily"]
    assert not admitted(guard, ALICE, "0.02")  # more than the daily max
    assert _states(guard.reset(ALICE, "daily")) == {"daily": "exceeded"}
    assert _states(guard.usage(ALICE))["daily"] == "exceeded"
    assert _states(await guard.areset(ALICE, "daily")) == {"daily": "exceeded"}
    assert admitted(guard, ALICE)  # a call that fits clears the mark
    assert _states(await guard.areset(ALICE, "daily")) == {"daily": "ok"}
    await guard.aclose()


async def test_the_async_twins(store: str, key_prefix: str, clock: FakeClock) -> None:
    guard = build(store, key_prefix, clock)
    spend(guard, ALICE, "0.004")
    assert (await guard.aadjust(ALICE, "daily", "0.001", by="ops")).used == Decimal("0.005")
    assert [u.used for u in await guard.areset(ALICE, "daily")] == [0]
    history = await guard.aadjustments(ALICE)
    assert [h.op for h in history] == ["reset", "adjust"]
    assert guard.adjustments(ALICE) == history  # one journal, both faces
    await guard.aclose()


def test_a_tier_users_limits_are_adjusted_by_their_names(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock, tier_of=lambda uid: "pro")
    assert guard.adjust(ALICE, "user:0", "0.05").max == Decimal("0.1")
    with pytest.raises(ValueError, match="their limits: user:0, monthly"):
        guard.adjust(ALICE, "daily", "0.05")
    guard.close()


def test_the_anonymous_bucket_and_pseudonyms(store: str, key_prefix: str, clock: FakeClock) -> None:
    guard = build(store, key_prefix, clock)
    assert guard.adjust("anonymous", "anonymous:0", "0.004").used == Decimal("0.004")
    assert guard.usage("anonymous")[0].used == Decimal("0.004")
    guard.close()
    hidden = build(store, key_prefix + "p", clock, pseudonymizer=Pseudonymizer(b"s" * 32))
    with capture_events() as events:
        hidden.adjust(ALICE, "daily", "0.001")
    (line,) = events.named("budget_adjusted")
    assert line["user_id"] != ALICE
    assert "alice" not in line["user_id"]
    assert [h.user_id for h in hidden.adjustments(ALICE)] == [line["user_id"]]
    hidden.close()


def test_another_process_adjustment_is_seen_within_the_spent_cache_ttl(
    shared_store: str, key_prefix: str, clock: FakeClock
) -> None:
    app = build(shared_store, key_prefix, clock)  # the app's worker
    cli = build(shared_store, key_prefix, clock)  # the operator's CLI, another process
    spend(app, ALICE, "0.01")
    assert not admitted(app, ALICE)  # and remembered as spent in the app's process
    cli.reset(ALICE, "daily")
    clock.advance(4.9)
    assert app.exhausted_limit(Attribution(user_id=ALICE)) is not None
    assert not admitted(app, ALICE)  # refused from the app's cache, as documented
    clock.advance(5.1)  # exhausted_cache_ttl (5 s) after the app last learnt it
    assert app.exhausted_limit(Attribution(user_id=ALICE)) is None
    assert admitted(app, ALICE)
    app.close()
    cli.close()


def test_adjustments_and_calls_racing_lose_nothing_and_logs_reconcile(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    config = {**CONFIG, "limits": {**CONFIG["limits"], "daily": {"max": 100, "per": "day"}}}
    assert guard.reload(config)
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def work(index: int) -> None:
        try:
            barrier.wait()
            for step in range(15):
                if (index + step) % 3 == 0:
                    guard.adjust(ALICE, "daily", "-0.001" if step % 2 else "0.002", by=f"t{index}")
                else:
                    spend(guard, ALICE, "0.001")
        except BaseException as exc:
            errors.append(exc)

    with capture_events() as events:
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    calls = sum(Decimal(str(e["cost_usd"])) for e in events.named("genai_call"))
    adjusted = sum(Decimal(str(e["amount"])) for e in events.named("budget_adjusted"))
    assert calls == Decimal("0.001") * len(events.named("genai_call"))
    # No lost update: the counter is exactly what the logs say was spent and adjusted.
    assert used(guard, ALICE)["daily"] == calls + adjusted
    assert used(guard, ALICE)["monthly"] == calls
    assert len(guard.adjustments(ALICE)) == len(events.named("budget_adjusted"))
    guard.close()
