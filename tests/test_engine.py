"""The Guard engine on the in-memory store: limits, refusals, events, usage, reload; the
state users see, on every store."""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import Iterator, MutableMapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
from structlog.testing import capture_logs

from payi_guard import (
    BudgetExceeded,
    ConfigError,
    InvalidUserId,
    Pseudonymizer,
    StorageError,
    is_refusal,
    request_scope,
    track_context,
)
from payi_guard.clock import FakeClock
from payi_guard.context import Attribution, get_context
from payi_guard.engine import CallRequest, Guard, UnknownModelRefused, UserRequired
from payi_guard.pricing import TokenUsage
from payi_guard.usage import LimitUsage

# Prices are set explicitly so every expected number is computed by hand:
# $1 per million input tokens = 1,000 nano-USD per token; $2 per million output = 2,000.
PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}


def make_guard(clock: FakeClock, **config: Any) -> Guard:
    base: dict[str, Any] = {"prices": PRICES}
    base.update(config)
    return Guard(base, clock=clock)


def call(input_tokens: int = 1000, output_tokens: int = 1000, **kw: Any) -> CallRequest:
    return CallRequest(
        model=kw.pop("model", "test-model"),
        provider=kw.pop("provider", "openai"),
        input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        **kw,
    )


def spend(
    guard: Guard, user: str, inp: int, out: int, *, est: tuple[int, int] | None = None
) -> None:
    est_in, est_out = est if est is not None else (inp, out)
    with track_context(user_id=user):
        guard.begin(call(est_in, est_out)).settle(TokenUsage(inp, out))


def events_named(
    logs: Sequence[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


# --- reservation and refusal -------------------------------------------------------------


def test_reserve_then_settle_charges_actual_cost(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 1.0, "per": "day"}])
    with track_context(user_id="alice"), capture_logs() as logs:
        reservation = guard.begin(call(1000, 500))
        assert reservation.reserved_usd == Decimal("0.002")  # 1000*1000 + 500*2000 nano
        (usage,) = guard.usage("alice")
        assert usage.used == Decimal("0.002")  # pending counts
        record = reservation.settle(TokenUsage(400, 100))
    assert record is not None
    assert record.cost_nano == 400 * 1000 + 100 * 2000
    (usage,) = guard.usage("alice")
    assert usage.used == Decimal("0.0006")
    assert usage.remaining == Decimal("0.9994")
    (line,) = events_named(logs, "genai_call")
    assert line["cost_usd"] == 0.0006
    assert line["reserved_usd"] == 0.002
    assert (line["input_tokens"], line["output_tokens"]) == (400, 100)
    assert line["user_id"] == "alice"
    assert line["outcome"] == "ok"


def test_refusal_when_estimate_does_not_fit_and_nothing_is_consumed(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.01, "per": "day"}])
    spend(guard, "alice", 5000, 0)  # $0.005 used
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(BudgetExceeded) as info:
            guard.begin(call(3000, 2000))  # needs $0.007, $0.005 left
    exc = info.value
    assert is_refusal(exc)
    assert exc.user_id == "alice"
    assert exc.limit.name == "user:0"
    assert exc.limit.scope == "user"
    assert exc.limit.used == Decimal("0.005")
    assert exc.limit.max == Decimal("0.01")
    assert exc.retry_after == 12 * 3600  # clock is at 12:00 UTC, window ends at midnight
    (event,) = events_named(logs, "budget_exceeded")
    assert event["limit"] == "user:0"
    assert event["used"] == 0.005
    assert event["max"] == 0.01
    assert event["resets_at"] == "2026-11-28T00:00:00+00:00"
    (usage,) = guard.usage("alice")
    assert usage.used == Decimal("0.005")  # the refusal consumed nothing
    # A smaller call still fits.
    spend(guard, "alice", 5000, 0)
    assert guard.usage("alice")[0].state == "exceeded"


def test_a_refusal_names_the_limit_that_resets_last(clock: FakeClock) -> None:
    # Both the day and the month are spent: the call is refused until the month ends,
    # so the refusal (and its Retry-After) names the month, not the day the store met first.
    limits = {"daily": {"max": 0.005, "per": "day"}, "monthly": {"max": 0.005, "per": "month"}}
    guard = make_guard(clock, limits=limits, default=["daily", "monthly"])
    spend(guard, "alice", 5000, 0)  # $0.005: both spent
    for _ in range(2):  # from the store, then from this process's spent cache
        with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
            guard.begin(call(1000, 0))
        assert info.value.limit.name == "monthly"
        assert info.value.retry_after == 3 * 86_400 + 12 * 3600  # to 2026-12-01T00:00Z
    # Only the day is spent (the month has room): the day is named.
    guard = make_guard(
        clock,
        limits={**limits, "monthly": {"max": 1, "per": "month"}},
        default=["daily", "monthly"],
    )
    spend(guard, "bob", 5000, 0)
    with track_context(user_id="bob"), pytest.raises(BudgetExceeded) as info:
        guard.begin(call(1000, 0))
    assert (info.value.limit.name, info.value.retry_after) == ("daily", 12 * 3600)


def test_all_or_nothing_across_user_org_and_global(clock: FakeClock) -> None:
    guard = make_guard(
        clock,
        default=[{"max": 1, "per": "day"}],
        orgs={"acme": [{"max": 0.004, "per": "month"}]},
        **{"global": [{"max": 100, "per": "month"}]},
    )
    spend(guard, "acme:alice", 3000, 0)
    with track_context(user_id="acme:bob"), pytest.raises(BudgetExceeded) as info:
        guard.begin(call(2000, 0))
    assert info.value.limit.scope == "org"
    assert info.value.limit.counter == "acme"
    by_name = {u.name: u for u in guard.usage("acme:bob")}
    assert by_name["user:0"].used == 0  # bob's own counter untouched by the refusal
    assert by_name["global:0"].used == Decimal("0.003")
    assert by_name["org:0"].used == Decimal("0.003")


def test_request_and_token_limits(clock: FakeClock) -> None:
    guard = make_guard(
        clock, default=[{"requests": 2, "per": "minute"}, {"tokens": 5000, "per": "hour"}]
    )
    spend(guard, "alice", 100, 100)
    spend(guard, "alice", 100, 100)
    with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
        guard.begin(call(10, 10))
    assert info.value.limit.unit == "requests"
    assert info.value.retry_after == 60
    clock.advance(60)
    with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
        guard.begin(call(4000, 1000))  # 400 tokens used + 5000 estimated > 5000
    assert info.value.limit.unit == "tokens"
    usage = {u.unit: u for u in guard.usage("alice")}
    assert usage["requests"].used == 0  # new minute
    assert usage["tokens"].used == 400


def test_allow_limits_never_refuse_and_log_overrun_once(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.001, "per": "day", "type": "allow"}])
    with capture_logs() as logs:
        for _ in range(3):
            spend(guard, "alice", 600, 0)
    (overrun,) = events_named(logs, "budget_overrun")
    assert overrun["limit"] == "user:0"
    assert overrun["used"] == 0.0012
    assert overrun["max"] == 0.001
    assert overrun["type"] == "allow"
    (usage,) = guard.usage("alice")
    assert usage.used == Decimal("0.0018")
    assert usage.state == "exceeded"
    assert usage.remaining == 0


def test_warning_once_per_window(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.01, "per": "day", "warn_at": 0.5}])
    with capture_logs() as logs:
        for _ in range(8):
            spend(guard, "alice", 1000, 0)  # $0.001 each
    (warning,) = events_named(logs, "budget_warning")
    assert warning["used"] == 0.005
    assert warning["limit"] == "user:0"
    assert guard.usage("alice")[0].state == "warning"
    clock.advance(12 * 3600)  # next day
    with capture_logs() as logs:
        for _ in range(6):
            spend(guard, "alice", 1000, 0)
    assert len(events_named(logs, "budget_warning")) == 1


def test_under_estimate_is_the_only_overshoot_and_is_logged(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.002, "per": "day"}])
    with capture_logs() as logs:
        spend(guard, "alice", 3000, 0, est=(1000, 0))  # estimate $0.001, actual $0.003
    (overrun,) = events_named(logs, "budget_overrun")
    assert overrun["type"] == "block"
    (line,) = events_named(logs, "genai_call")
    assert line["under_estimated_usd"] == 0.002


def test_release_gives_the_reservation_back(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.003, "per": "day"}])
    with track_context(user_id="alice"):
        first = guard.begin(call(2000, 0))
        with pytest.raises(BudgetExceeded):
            guard.begin(call(2000, 0))
        with capture_logs() as logs:
            record = first.release(outcome="error")
        assert record is not None
        assert record.cost_nano == 0
        (released,) = events_named(logs, "genai_call")
        assert released["outcome"] == "error"
        assert "ledger" not in released  # the release itself succeeded
        guard.begin(call(2000, 0)).settle(TokenUsage(2000, 0))


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_unverified_usage_is_charged_exactly_the_reservation(
    clock: FakeClock, mode: str
) -> None:
    guard = make_guard(clock, default=[{"max": 1, "per": "day"}, {"tokens": 10**6, "per": "day"}])
    with track_context(user_id="alice"):
        reservation = guard.begin(call(1000, 500))
    untrusted = TokenUsage(3, 0)  # whatever the provider claimed, it is not charged
    with capture_logs() as logs:
        if mode == "async":
            record = await reservation.asettle(untrusted, outcome="unverified")
        else:
            record = reservation.settle(untrusted, outcome="unverified")
    assert record is not None
    assert record.cost_nano == record.reserved_nano == 1000 * 1000 + 500 * 2000
    assert record.usage == TokenUsage(1000, 500)
    (event,) = events_named(logs, "genai_call")
    assert event["outcome"] == "unverified"
    assert (event["input_tokens"], event["output_tokens"]) == (1000, 500)
    usd, tokens = guard.usage("alice")
    assert usd.used == Decimal("0.002")
    assert tokens.used == 1500


def test_settle_is_idempotent(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 1, "per": "day"}])
    with track_context(user_id="alice"):
        reservation = guard.begin(call(1000, 0))
    with capture_logs() as logs:
        first = reservation.settle(TokenUsage(1000, 0))
        again = reservation.settle(TokenUsage(9999, 0))
        released = reservation.release()
    assert first is again is released
    assert len(events_named(logs, "genai_call")) == 1
    assert guard.usage("alice")[0].used == Decimal("0.001")


PRICED_PAIR = {
    "test-model": {"input_per_mtok": 1, "output_per_mtok": 2},
    "test-model-2026-01-01": {"input_per_mtok": 3, "output_per_mtok": 4},
    "advisor-model": {"input_per_mtok": 10, "output_per_mtok": 20},
}


def test_a_call_is_priced_as_the_model_its_response_names(clock: FakeClock) -> None:
    guard = Guard(
        {"prices": PRICED_PAIR, "default": [{"max": 1, "per": "day"}], "unknown_model": "allow"},
        clock=clock,
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        # genai-prices: gpt-4o is $2.50 / $10, the 2024-05-13 snapshot $5 / $15.
        named = guard.begin(call(100, 10, model="gpt-4o")).settle(
            TokenUsage(100, 10), response_model="gpt-4o-2024-05-13"
        )
        # An Azure deployment: unknown, reserved nothing; priced by the response's model.
        deployment = guard.begin(call(100, 10, model="my-deployment"))
        assert deployment.reserved_usd == 0
        by_response = deployment.settle(TokenUsage(100, 10), response_model="test-model")
        # A response model without a price keeps the reservation's price.
        unknown = guard.begin(call(100, 10, model="gpt-4o")).settle(
            TokenUsage(100, 10), response_model="x"
        )
    assert named is not None
    assert by_response is not None
    assert unknown is not None
    assert named.cost_nano == 100 * 5_000 + 10 * 15_000
    assert (by_response.cost_nano, by_response.priced) == (100 * 1_000 + 10 * 2_000, True)
    assert unknown.cost_nano == 100 * 2_500 + 10 * 10_000
    assert named.response_model == "gpt-4o-2024-05-13"
    lines = events_named(logs, "genai_call")
    assert [(e["model"], e["response_model"]) for e in lines] == [
        ("gpt-4o", "gpt-4o-2024-05-13"),
        ("my-deployment", "test-model"),
        ("gpt-4o", "x"),
    ]
    assert "priced" not in lines[1]


def test_a_call_is_priced_at_the_tier_its_response_names(clock: FakeClock) -> None:
    # genai-prices, gpt-5: $1.25 / $10 a million tokens at the standard tier, $2.50 / $20
    # with service_tier "priority", $0.625 / $5 with "flex"; an override has no tiers.
    guard = Guard({"prices": PRICED_PAIR, "default": [{"max": 1, "per": "day"}]}, clock=clock)
    usage = TokenUsage(1000, 100)
    standard = 1000 * 1_250 + 100 * 10_000
    priority = 1000 * 2_500 + 100 * 20_000
    flex = 1000 * 625 + 100 * 5_000
    asked_priority = call(1000, 100, model="gpt-5", price_context={"service_tier": "priority"})
    with track_context(user_id="alice"), capture_logs() as logs:
        # A project whose default tier is priority: the request names none.
        by_project = guard.begin(call(1000, 100, model="gpt-5"))
        assert by_project.reserved_usd * 10**9 == standard
        by_project_record = by_project.settle(usage, price_context={"service_tier": "priority"})
        # Asked for priority, served at the standard tier (empty: no variant).
        asked = guard.begin(asked_priority)
        assert asked.reserved_usd * 10**9 == priority
        served_standard = asked.settle(usage, price_context={})
        # The response names no tier: the request's stands.
        silent = guard.begin(asked_priority).settle(usage)
        # Another model and another tier at once.
        dated_flex = guard.begin(call(1000, 100, model="gpt-5")).settle(
            usage, response_model="gpt-5-2025-08-07", price_context={"service_tier": "flex"}
        )
        # A model priced by an override keeps it at any tier.
        override = guard.begin(call(1000, 100)).settle(
            usage, price_context={"service_tier": "priority"}
        )
        # The response names a model without a price: the requested one, at its tier.
        unknown_at_priority = guard.begin(call(1000, 100, model="gpt-5")).settle(
            usage, response_model="zz-unknown", price_context={"service_tier": "priority"}
        )
        unknown_at_standard = guard.begin(asked_priority).settle(
            usage, response_model="zz-unknown", price_context={}
        )
    records = [
        by_project_record,
        served_standard,
        silent,
        dated_flex,
        override,
        unknown_at_priority,
        unknown_at_standard,
    ]
    assert [r.cost_nano if r else None for r in records] == [
        priority,
        standard,
        priority,
        flex,
        1000 * 1_000 + 100 * 2_000,
        priority,
        standard,
    ]
    lines = events_named(logs, "genai_call")
    assert [line.get("price_context") for line in lines] == [
        {"service_tier": "priority"},
        None,
        {"service_tier": "priority"},
        {"service_tier": "flex"},
        {"service_tier": "priority"},
        {"service_tier": "priority"},
        None,
    ]
    assert records[0] is not None
    assert records[0].price_context == (("service_tier", "priority"),)
    assert records[1] is not None
    assert records[1].price_context == ()
    hash(records[0])  # a record stays hashable, and can be pickled
    assert pickle.loads(pickle.dumps(records[0])) == records[0]
    assert lines[0]["under_estimated_usd"] == pytest.approx((priority - standard) / 1e9)


async def test_an_async_settle_is_priced_at_the_tier_its_response_names(
    clock: FakeClock,
) -> None:
    guard = Guard({"default": [{"max": 1, "per": "day"}]}, clock=clock)
    with track_context(user_id="alice"):
        reservation = await guard.abegin(call(1000, 100, model="gpt-5"))
        record = await reservation.asettle(
            TokenUsage(1000, 100), price_context={"service_tier": "priority"}
        )
    assert record is not None
    assert record.cost_nano == 1000 * 2_500 + 100 * 20_000
    assert record.price_context == (("service_tier", "priority"),)


def test_an_override_of_the_requested_model_is_kept(clock: FakeClock) -> None:
    guard = Guard({"prices": PRICED_PAIR}, clock=clock)
    with track_context(user_id="alice"):
        record = guard.begin(call(100, 10)).settle(
            TokenUsage(100, 10), response_model="test-model-2026-01-01"
        )
    assert record is not None
    assert record.cost_nano == 100 * 1_000 + 10 * 2_000  # not the dated name's override


def test_usage_of_other_models_is_priced_as_each_model(clock: FakeClock) -> None:
    guard = Guard(
        {
            "prices": PRICED_PAIR,
            "default": [{"max": 1, "per": "day"}, {"tokens": 10**6, "per": "day"}],
        },
        clock=clock,
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        reservation = guard.begin(call(1000, 100))
        record = reservation.settle(
            TokenUsage(200, 20),
            other_models=[
                ("advisor-model", TokenUsage(300, 30)),
                ("nobody-knows", TokenUsage(1, 1)),
            ],
        )
    assert record is not None
    assert record.cost_nano == (200 * 1_000 + 20 * 2_000) + (300 * 10_000 + 30 * 20_000)
    assert not record.priced  # one part had no price
    (line,) = events_named(logs, "genai_call")
    assert (line["input_tokens"], line["output_tokens"]) == (200, 20)  # the call's own model
    assert [p["model"] for p in line["other_models"]] == ["advisor-model", "nobody-knows"]
    usd, tokens = guard.usage("alice")
    assert usd.used == Decimal(record.cost_nano) / 10**9
    assert tokens.used == 200 + 20 + 300 + 30 + 1 + 1


@pytest.mark.parametrize("sync", [True, False])
async def test_untrusted_usage_is_charged_the_reservation(clock: FakeClock, sync: bool) -> None:
    guard = make_guard(clock, default=[{"max": 1, "per": "day"}])
    with request_scope(request_id="r1"), track_context(user_id="alice"), capture_logs() as logs:
        reservation = guard.begin(call(1000, 500))
        if sync:
            record = reservation.settle_unverified(["prompt_tokens: -8"], response_model="m")
        else:
            record = await reservation.asettle_unverified(["prompt_tokens: -8"])
        again = reservation.settle(TokenUsage(1, 1))
    assert record is not None
    assert again is record
    assert record.outcome == "unverified"
    assert record.cost_nano == record.reserved_nano == 1000 * 1_000 + 500 * 2_000
    (invalid,) = events_named(logs, "usage_invalid")
    assert invalid["reason"] == "prompt_tokens: -8"
    assert (invalid["user_id"], invalid["request_id"], invalid["reserved_usd"]) == (
        "alice",
        "r1",
        0.002,
    )
    (line,) = events_named(logs, "genai_call")
    assert line["outcome"] == "unverified"
    assert line["cost_usd"] == line["reserved_usd"] == 0.002
    assert (line["input_tokens"], line["output_tokens"]) == (1000, 500)
    assert guard.usage("alice")[0].used == Decimal("0.002")


@pytest.mark.parametrize("on_storage_error", ["block", "allow"])
@pytest.mark.parametrize(
    ("limit", "output_tokens"),
    [
        ({"max": 1000, "per": "day"}, 10**14),  # $1e9 in nano-USD: above 2**53
        ({"max": 1000, "per": "day", "type": "allow"}, 10**14),
        ({"tokens": 10**6, "per": "day"}, 10**16),
    ],
)
async def test_a_bound_above_a_counters_capacity_is_a_refusal(
    clock: FakeClock, on_storage_error: str, limit: dict[str, Any], output_tokens: int
) -> None:
    guard = make_guard(clock, default=[limit], on_storage_error=on_storage_error)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(BudgetExceeded) as sync_refusal:
            guard.begin(call(10, output_tokens))
        with pytest.raises(BudgetExceeded):
            await guard.abegin(call(10, output_tokens))
    assert is_refusal(sync_refusal.value)
    assert sync_refusal.value.limit.name == guard.usage("alice")[0].name
    refused = events_named(logs, "budget_exceeded")
    assert len(refused) == 2
    assert "more than a counter can hold" in refused[0]["detail"]
    assert not events_named(logs, "storage_error")
    assert guard.usage("alice")[0].used == 0


async def test_async_path_shares_counters_with_sync(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.005, "per": "day"}])
    async with track_context(user_id="alice"):
        reservation = await guard.abegin(call(2000, 0))
        await reservation.asettle(TokenUsage(2000, 0))
        spend(guard, "alice", 2000, 0)
        with pytest.raises(BudgetExceeded):
            await guard.abegin(call(2000, 0))
        released = await (await guard.abegin(call(500, 0))).arelease()
    assert released is not None
    usage = await guard.ausage("alice")
    assert usage[0].used == Decimal("0.004")


def test_settle_after_window_rollover_charges_the_old_window(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.01, "per": "minute"}])
    with track_context(user_id="alice"):
        reservation = guard.begin(call(5000, 0))
    clock.advance(90)  # the minute rolled over while the call ran
    reservation.settle(TokenUsage(1000, 0))
    (usage,) = guard.usage("alice")
    assert usage.used == 0  # new window: neither charged nor negative
    spend(guard, "alice", 10_000, 0)  # the whole new window is available
    assert guard.usage("alice")[0].state == "exceeded"


def test_reservation_of_a_dead_caller_expires_after_ttl(clock: FakeClock) -> None:
    guard = make_guard(clock, reservation_ttl=30, default=[{"max": 0.002, "per": "day"}])
    with track_context(user_id="alice"):
        guard.begin(call(2000, 0))  # never settled
        with pytest.raises(BudgetExceeded):
            guard.begin(call(1000, 0))
        clock.advance(31)
        guard.begin(call(2000, 0)).settle(TokenUsage(2000, 0))


# --- who is charged ------------------------------------------------------------------------


def test_tiers_users_and_default(clock: FakeClock) -> None:
    guard = make_guard(
        clock,
        limits={"daily": {"max": 1, "per": "day"}, "rpm": {"requests": 5, "per": "minute"}},
        default=["daily", "rpm"],
        tiers={"pro": [{"max": 10, "per": "day"}, "rpm"]},
        users={"acme:alice": "pro", "system_bot": []},
    )
    assert [(u.name, u.max) for u in guard.usage("bob")] == [("daily", Decimal(1)), ("rpm", 5)]
    assert [(u.name, u.max) for u in guard.usage("acme:alice")] == [
        ("user:0", Decimal(10)),
        ("rpm", 5),
    ]
    assert guard.usage("system_bot") == []
    for _ in range(20):
        spend(guard, "system_bot", 1, 1)  # no limits of its own


def test_limit_ids_charge_a_shared_counter(clock: FakeClock) -> None:
    guard = make_guard(clock, limits={"beta": {"max": 0.003, "per": "month"}}, default=[])
    with track_context(limit_ids=["beta"]):
        spend(guard, "alice", 2000, 0)
        with track_context(user_id="bob"), pytest.raises(BudgetExceeded) as info:
            guard.begin(call(2000, 0))
    assert info.value.limit.scope == "limit_id"
    assert info.value.limit.counter == "beta"
    assert guard.usage("carol", limit_ids=["beta"])[0].used == Decimal("0.002")
    with track_context(user_id="bob", limit_ids=["nope"]), pytest.raises(ConfigError, match="nope"):
        guard.begin(call())


def test_anonymous_strategies(clock: FakeClock) -> None:
    shared = make_guard(
        clock, anonymous={"strategy": "shared", "limits": [{"requests": 2, "per": "day"}]}
    )
    shared.begin(call()).settle(TokenUsage(1, 1))
    with request_scope():
        shared.begin(call()).settle(TokenUsage(1, 1))
    with pytest.raises(BudgetExceeded) as info:
        shared.begin(call())
    assert info.value.user_id == "anonymous"
    assert info.value.limit.name == "anonymous:0"

    reject = make_guard(clock, anonymous="reject")
    with pytest.raises(UserRequired) as rejected:
        reject.begin(call())
    assert is_refusal(rejected.value)
    with track_context(user_id="alice"):
        reject.begin(call()).release()

    session = make_guard(
        clock, anonymous={"strategy": "session", "limits": [{"requests": 1, "per": "day"}]}
    )
    for sid in ("dev-1", "dev-2"):
        with request_scope() as scope:
            scope.extra["session_id"] = sid
            reservation = session.begin(call())
            assert reservation.user_id == f"anonymous:{sid}"
            reservation.settle(TokenUsage(1, 1))
            with pytest.raises(BudgetExceeded):
                session.begin(call())


def test_a_rejected_anonymous_call_retries_after_the_guards_day(clock: FakeClock) -> None:
    guard = make_guard(clock, anonymous="reject")
    with pytest.raises(UserRequired) as rejected:
        guard.begin(call())
    assert rejected.value.retry_after == 12 * 3600  # the fake clock is at noon UTC
    clock.advance(6 * 3600)
    with pytest.raises(UserRequired) as later:
        guard.exhausted_limit()
    assert later.value.retry_after == 6 * 3600
    assert later.value.limit.resets_at.isoformat() == "2026-11-28T00:00:00+00:00"


def test_default_user_applies_before_anonymous(clock: FakeClock) -> None:
    guard = make_guard(clock, anonymous="reject")
    guard.default_user_id = "service-account"
    reservation = guard.begin(call())
    assert reservation.user_id == "service-account"
    reservation.release()
    with track_context(user_id="alice"):
        assert guard.begin(call()).user_id == "alice"


def test_pseudonymised_ids_in_counters_and_logs(clock: FakeClock) -> None:
    pseudo = Pseudonymizer(b"a-long-enough-secret-key")
    guard = Guard(
        {
            "prices": PRICES,
            "users": {"acme:alice": [{"max": 0.001, "per": "day"}]},
            "orgs": {"acme": [{"max": 1, "per": "day"}]},
        },
        clock=clock,
        pseudonymizer=pseudo,
    )
    with capture_logs() as logs:
        spend(guard, "acme:alice", 1000, 0)
    (line,) = events_named(logs, "genai_call")
    assert line["user_id"] == pseudo("acme:alice")
    assert "alice" not in str(line)
    assert line["org_id"] == pseudo("acme:alice").split(":")[0]
    usage = guard.usage("acme:alice")
    assert [u.name for u in usage] == ["user:0", "org:0"]  # policy looked up by real id
    assert usage[0].state == "exceeded"


# --- prices ---------------------------------------------------------------------------------


def test_unknown_model_policies(clock: FakeClock) -> None:
    blocked = make_guard(clock)
    with track_context(user_id="alice"), pytest.raises(UnknownModelRefused, match="prices"):
        blocked.begin(call(model="no-such-model-xyz"))

    allowed = make_guard(clock, unknown_model="allow", default=[{"requests": 5, "per": "day"}])
    with track_context(user_id="acme:alice"), capture_logs() as logs:
        for _ in range(2):
            allowed.begin(call(model="no-such-model-xyz")).settle(TokenUsage(10, 10))
    lines = events_named(logs, "genai_call")
    assert [(e["priced"], e["cost_usd"]) for e in lines] == [(False, 0.0)] * 2
    assert allowed.usage("acme:alice")[0].used == 2
    # Said once per model: its calls are let through and charged nothing in money.
    (warned,) = events_named(logs, "unknown_model")
    assert (warned["outcome"], warned["unknown_model"], warned["model"]) == (
        "allowed",
        "allow",
        "no-such-model-xyz",
    )
    assert (warned["user_id"], warned["org_id"], warned["request_id"]) == (
        "acme:alice",
        "acme",
        None,
    )
    # Recorded without a cost: said for each record, with the same fields.
    with capture_logs() as logs:
        allowed.record(user_id="acme:bob", model="no-such-model-xyz", input_tokens=5)
    (recorded,) = events_named(logs, "unknown_model")
    assert (recorded["outcome"], recorded["org_id"], recorded["request_id"]) == (
        "recorded",
        "acme",
        None,
    )

    priced = make_guard(clock, unknown_model={"input_per_mtok": 10, "output_per_mtok": 30})
    with track_context(user_id="alice"):
        record = priced.begin(call(model="no-such-model-xyz")).settle(TokenUsage(100, 100))
    assert record is not None
    assert record.cost_nano == 100 * 10_000 + 100 * 30_000


def test_real_model_prices_from_bundled_data(clock: FakeClock) -> None:
    guard = Guard({"default": [{"max": 1, "per": "day"}]}, clock=clock)
    with track_context(user_id="alice"):
        record = guard.begin(call(model="gpt-4o", provider="openai")).settle(
            TokenUsage(1_000_000, 0)
        )
    assert record is not None
    assert record.cost_usd == Decimal("2.5")


# --- manual events ----------------------------------------------------------------------


def test_record_charges_never_refuses_and_logs_overrun(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.001, "per": "day"}])
    with capture_logs() as logs:
        guard.record(user_id="alice", model="test-model", input_tokens=800)
        record = guard.record(user_id="alice", model="test-model", input_tokens=800)
        guard.record(user_id="alice", model="whatever", cost_usd="0.0001")
    assert record.outcome == "recorded"
    assert [e["outcome"] for e in events_named(logs, "genai_call")] == ["recorded"] * 3
    assert len(events_named(logs, "budget_overrun")) == 1
    assert guard.usage("alice")[0].used == Decimal("0.0017")
    with pytest.raises(InvalidUserId):
        guard.record(user_id="bad id", model="test-model")
    with pytest.raises(ValueError, match=">= 0"):
        guard.record(user_id="alice", model="test-model", input_tokens=-1)
    with pytest.raises(ValueError, match="cost_usd"):
        guard.record(user_id="alice", model="test-model", cost_usd="-1")
    # A positive cost is charged at least a nano-dollar, however small (rounded up), even
    # one so small that multiplying it by a billion underflows.
    for tiny in ("0.0000000004", "1e-999999999"):
        assert guard.record(user_id="carol", model="x", cost_usd=tiny).cost_nano == 1


async def test_arecord(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 1, "per": "day"}])
    record = await guard.arecord(user_id="alice", model="test-model", output_tokens=1000)
    assert record.cost_nano == 2_000_000
    assert (await guard.ausage("alice"))[0].used == Decimal("0.002")


# --- gate -------------------------------------------------------------------------------------


def test_exhausted_limit_for_gates(clock: FakeClock) -> None:
    guard = make_guard(
        clock, default=[{"max": 0.001, "per": "day"}, {"requests": 10, "per": "minute"}]
    )
    with track_context(user_id="alice"):
        assert guard.exhausted_limit() is None
        guard.begin(call(1000, 0)).settle(TokenUsage(1000, 0))
        limit = guard.exhausted_limit()
    assert limit is not None
    assert limit.name == "user:0"


def _gate_answer(guard: Guard, attribution: Attribution | None) -> object:
    """What a gate reads: the exhausted limit, or the refusal of an unknown user."""
    try:
        return guard.exhausted_limit(attribution)
    except UserRequired as exc:
        return ("UserRequired", exc.limit)


@pytest.mark.parametrize("strategy", ["shared", "reject", "session"])
def test_a_requests_gate_reads_what_its_attribution_would(clock: FakeClock, strategy: str) -> None:
    # In a request scope with no track_context layer, exhausted_limit() reads the user and
    # tier without building the attribution snapshot; it must answer exactly as the
    # snapshot would, for every user, tier and anonymous strategy.
    guard = make_guard(
        clock,
        limits={"daily": {"max": 0.001, "per": "day"}},
        default=["daily"],
        tiers={"pro": [{"max": 0.002, "per": "day"}]},
        orgs={"acme": [{"max": 0.003, "per": "day"}]},
        anonymous={"strategy": strategy, "limits": [{"requests": 1, "per": "day"}]}
        if strategy != "reject"
        else "reject",
    )
    spend(guard, "alice", 1000, 0)  # her daily limit is spent
    for member in ("acme:bob", "acme:bob2", "acme:bob3"):
        spend(guard, member, 1000, 0)  # each one's daily limit is spent, then acme's
    with request_scope() as scope:
        scope.set_user("dave", tier="pro")
        guard.begin(call(1500, 0)).settle(TokenUsage(1500, 0))  # past default, within pro
    if strategy != "reject":
        with request_scope() as scope:
            scope.extra["session_id"] = "dev-1"
            guard.begin(call(1, 1)).settle(TokenUsage(1, 1))  # the anonymous bucket spent

    cases: list[tuple[str | None, str | None]] = [
        ("alice", None),
        ("alice", "pro"),
        ("acme:bob", None),
        ("acme:carol", None),
        ("dave", None),
        ("dave", "pro"),
        ("erin", None),
        ("anonymous", None),
        (None, None),
    ]
    answers = []
    sessions: tuple[str | None, ...] = (None, "dev-1")
    for user, tier in cases:
        for session in sessions:
            with request_scope() as scope:
                if session is not None:
                    scope.extra["session_id"] = session
                if user is not None:
                    scope.set_user(user, tier=tier)
                quick = _gate_answer(guard, None)
                assert quick == _gate_answer(guard, get_context()), (user, tier, session)
                with track_context(use_case_name="x"):  # a layer: the general path
                    assert _gate_answer(guard, None) == quick, (user, tier, session)
                answers.append(quick)
    # The cases differ: the comparison above saw spent and unspent users alike.
    assert any(a is None for a in answers)
    assert any(isinstance(a, LimitUsage) for a in answers)
    assert (strategy == "reject") == any(isinstance(a, tuple) for a in answers)


# --- concurrency ----------------------------------------------------------------------------


def test_32_threads_never_overshoot_a_hard_limit(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"max": 0.05, "per": "day"}])
    spent: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(32)

    def worker(i: int) -> None:
        barrier.wait(timeout=10)
        with track_context(user_id="shared-user"):
            for j in range(50):
                try:
                    reservation = guard.begin(call(300 + (i * j) % 500, 0))
                except BudgetExceeded:
                    continue
                record = reservation.settle(TokenUsage(200 + (i + j) % 100, 0))
                assert record is not None
                with lock:
                    spent.append(record.cost_nano)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    (usage,) = guard.usage("shared-user")
    assert usage.used == Decimal(sum(spent)) / 10**9
    assert usage.used <= Decimal("0.05")
    assert usage.used > Decimal("0.049")  # the budget was actually used up


async def test_concurrent_tasks_attribute_exactly(clock: FakeClock) -> None:
    guard = make_guard(clock)

    async def one(i: int) -> None:
        async with track_context(user_id=f"user{i % 20}"):
            reservation = await guard.abegin(call(1000, 0))
            await asyncio.sleep(0)
            await reservation.asettle(TokenUsage(1000 + i % 20, 0))

    with capture_logs() as logs:
        await asyncio.gather(*(one(i) for i in range(400)))
    lines = events_named(logs, "genai_call")
    assert len(lines) == 400
    for line in lines:
        assert line["input_tokens"] == 1000 + int(line["user_id"][4:])


# --- storage errors -------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["block", "allow"])
def test_storage_error_policy(clock: FakeClock, policy: str) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}], "on_storage_error": policy},
        storage="redis://127.0.0.1:1/0",  # nothing listens on port 1
        clock=clock,
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        if policy == "block":
            with pytest.raises(StorageError):
                guard.begin(call())
        else:
            record = guard.begin(call()).settle(TokenUsage(10, 10))
            assert record is not None
    errors = events_named(logs, "storage_error")
    assert errors
    assert errors[0]["policy"] == policy
    guard.close()


def test_repr_and_storage_errors_mask_a_token_given_as_the_user(clock: FakeClock) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}], "on_storage_error": "allow"},
        storage="redis://sekrit-token@127.0.0.1:1/0",  # nothing listens on port 1
        clock=clock,
    )
    assert "sekrit" not in repr(guard)
    with track_context(user_id="alice"), capture_logs() as logs:
        guard.begin(call()).release()
    errors = events_named(logs, "storage_error")
    assert errors
    assert errors[0]["storage"] == "redis://***@127.0.0.1:1/0"
    guard.close()


# --- reload -----------------------------------------------------------------------------------


def test_reload_swaps_atomically_and_bad_file_keeps_old(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("default: [{max: 1.00, per: day}]\n")
    guard = Guard.from_yaml(path, clock=clock)
    assert guard.usage("alice")[0].max == Decimal(1)
    path.write_text("default: [{max: 2.00, per: day}]\n")
    assert guard.reload() is True
    assert guard.usage("alice")[0].max == Decimal(2)
    path.write_text("default: [{max: 3.00, per: dya}]\n")
    with capture_logs() as logs:
        assert guard.reload() is False
    (failure,) = events_named(logs, "config_reload_failed")
    assert "did you mean 'day'" in failure["error"]
    assert guard.usage("alice")[0].max == Decimal(2)


def test_a_reload_naming_another_store_keeps_the_one_in_use_and_says_so_once(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("storage: memory://\ndefault: [{max: 1.00, per: day}]\n")
    guard = Guard.from_yaml(path, clock=clock)
    path.write_text("storage: sqlite:///other.db\ndefault: [{max: 2.00, per: day}]\n")
    with capture_logs() as logs:
        assert guard.reload() is True
    (reloaded,) = events_named(logs, "config_reloaded")
    assert reloaded["log_level"] == "warning"
    assert reloaded["source"] == str(path)
    assert "after a restart" in reloaded["detail"]
    assert guard.config.storage == guard.storage_uri == "memory://"  # what is in use
    assert guard.usage("alice")[0].max == Decimal(2)  # the rest is in effect
    assert not (tmp_path / "other.db").exists()


def test_watch_reloads_on_change(tmp_path: Path, clock: FakeClock) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("default: [{max: 1.00, per: day}]\n")
    guard = Guard.from_yaml(path, clock=clock)
    guard.watch(interval=0.02)
    try:
        path.write_text("default: [{max: 5.00, per: day}]  # changed\n")
        for _ in range(250):
            if guard.usage("alice")[0].max == Decimal(5):
                break
            threading.Event().wait(0.02)
        assert guard.usage("alice")[0].max == Decimal(5)
    finally:
        guard.stop_watching()


def test_construction_has_no_side_effects() -> None:
    structlog.reset_defaults()
    guard = Guard(storage="redis://127.0.0.1:1/0")  # nothing is connected yet
    assert guard.storage_uri == "redis://127.0.0.1:1/0"
    assert "127.0.0.1" in repr(guard)
    with pytest.raises(ValueError, match="key_prefix"):
        Guard(key_prefix="a{b}")


def test_record_for_anonymous_charges_the_anonymous_bucket(clock: FakeClock) -> None:
    guard = make_guard(
        clock, anonymous={"strategy": "shared", "limits": [{"requests": 2, "per": "day"}]}
    )
    guard.record(user_id="anonymous", model="test-model", input_tokens=10)
    (usage,) = guard.usage("anonymous")
    assert usage.scope == "anonymous"
    assert usage.used == 1
    guard.begin(call()).settle(TokenUsage(1, 1))  # a real anonymous call: same bucket
    with pytest.raises(BudgetExceeded):
        guard.begin(call())


def test_anonymous_ids_have_one_meaning_calls_usage_and_record(clock: FakeClock) -> None:
    guard = make_guard(
        clock,
        default=[{"requests": 100, "per": "day"}],
        anonymous={"strategy": "shared", "limits": [{"requests": 2, "per": "day"}]},
    )
    # An app (or its trusted proxy) naming "anonymous" names the anonymous bucket.
    with track_context(user_id="anonymous"):
        reservation = guard.begin(call())
        assert reservation.user_id == "anonymous"
        reservation.settle(TokenUsage(1, 1))
    guard.record(user_id="anonymous", model="test-model", input_tokens=1)
    (usage,) = guard.usage("anonymous")
    assert (usage.name, usage.scope, usage.used, usage.max) == ("anonymous:0", "anonymous", 2, 2)
    assert guard.usage(None) == [usage]
    with track_context(user_id="anonymous"), pytest.raises(BudgetExceeded) as info:
        guard.begin(call())
    assert info.value.limit.scope == "anonymous"
    with pytest.raises(BudgetExceeded):
        guard.begin(call())  # a call with no user at all: the same bucket

    # Under strategy: shared, anonymous:<anything> is that one bucket too: naming a new
    # id opens no bucket of its own.
    for name in ("anonymous:kiosk-1", "anonymous:kiosk-2"):
        with track_context(user_id=name), pytest.raises(BudgetExceeded) as info:
            guard.begin(call())
        assert info.value.user_id == "anonymous"
        assert guard.usage(name) == [usage]
    # Under strategy: session, anonymous:<session> is that session's bucket, read and
    # charged the same way.
    sessions = make_guard(
        clock,
        default=[{"requests": 100, "per": "day"}],
        anonymous={"strategy": "session", "limits": [{"requests": 2, "per": "day"}]},
    )
    with track_context(user_id="anonymous:kiosk-1"):
        sessions.begin(call()).settle(TokenUsage(1, 1))
    sessions.record(user_id="anonymous:kiosk-1", model="test-model", input_tokens=1)
    (kiosk,) = sessions.usage("anonymous:kiosk-1")
    assert (kiosk.scope, kiosk.used, kiosk.counter) == ("anonymous", 2, "anonymous:kiosk-1")
    assert sessions.usage("anonymous")[0].used == 0


def test_naming_anonymous_is_refused_when_anonymous_calls_are(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"requests": 100, "per": "day"}], anonymous="reject")
    for name in ("anonymous", "anonymous:kiosk-1"):
        with track_context(user_id=name), pytest.raises(UserRequired):
            guard.begin(call())
    guard.default_user_id = "anonymous"
    with pytest.raises(UserRequired):
        guard.begin(call())
    with track_context(user_id="anonymously"):  # only the exact id and its sessions
        guard.begin(call()).release()


def test_anonymous_is_never_pseudonymised(clock: FakeClock) -> None:
    pseudo = Pseudonymizer(b"a-long-enough-secret-key")
    guard = Guard(
        {
            "prices": PRICES,
            "anonymous": {"strategy": "shared", "limits": [{"requests": 5, "per": "day"}]},
        },
        clock=clock,
        pseudonymizer=pseudo,
    )
    with track_context(user_id="anonymous"):
        assert guard.begin(call()).user_id == "anonymous"


async def test_an_unknown_model_refusal_is_logged_once(clock: FakeClock) -> None:
    guard = make_guard(clock, default=[{"requests": 100, "per": "day"}])
    with capture_logs() as logs:
        with request_scope(request_id="r-7"), track_context(user_id="acme:alice"):
            with pytest.raises(UnknownModelRefused):
                guard.begin(call(model="no-such-model-xyz", provider="openai"))
        with track_context(user_id="bob"), pytest.raises(UnknownModelRefused):
            await guard.abegin(call(model="other-unknown", provider="anthropic"))
    lines = events_named(logs, "unknown_model")
    assert [(e["user_id"], e["model"], e["provider"]) for e in lines] == [
        ("acme:alice", "no-such-model-xyz", "openai"),
        ("bob", "other-unknown", "anthropic"),
    ]
    for line in lines:
        assert line["log_level"] == "warning"
        assert line["outcome"] == "refused"
        assert line["unknown_model"] == "block"  # the policy that refused it
    assert lines[0]["org_id"] == "acme"
    assert lines[0]["request_id"] == "r-7"
    assert not events_named(logs, "genai_call")
    assert guard.usage("acme:alice")[0].used == 0


# --- what users see is true, on every store ------------------------------------------------


@pytest.fixture(params=["memory", "sqlite", "redis"])
def on_store(
    request: pytest.FixtureRequest, tmp_path: Path, key_prefix: str
) -> Iterator[dict[str, Any]]:
    """Guard keyword arguments for each store: memory, an SQLite file, the shared Redis."""
    if request.param == "memory":
        yield {}
    elif request.param == "sqlite":
        yield {"storage": f"sqlite:///{tmp_path / 'budgets.db'}"}
    else:
        url: str = request.getfixturevalue("redis_url")
        yield {"storage": url, "key_prefix": key_prefix}
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def test_a_user_whose_calls_are_refused_is_shown_exceeded_until_one_fits(
    clock: FakeClock, on_store: dict[str, Any]
) -> None:
    # Each call reserves $0.00007 (30 tokens in, up to 20 out) and costs $0.00004.
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 0.000434, "per": "day", "warn_at": 0.99}]},
        clock=clock,
        **on_store,
    )
    try:
        for _ in range(10):
            spend(guard, "alice", 30, 5, est=(30, 20))
        (usage,) = guard.usage("alice")
        assert (usage.used, usage.remaining, usage.state) == (
            Decimal("0.0004"),
            Decimal("0.000034"),
            "ok",  # no call was refused: nothing says the next one needs more
        )
        for _ in range(3):  # every call now: "0.000034 left, not enough for this call"
            with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
                guard.begin(call(30, 20))
            assert info.value.limit.state == "exceeded"  # the 429 says so
        (usage,) = guard.usage("alice")
        assert (usage.used, usage.remaining, usage.state) == (
            Decimal("0.0004"),
            Decimal("0.000034"),
            "exceeded",
        )
        # Not exhausted: a smaller call may fit, so a gate must let the request reach it
        # (refusing there would keep the state until the window ends).
        assert guard.exhausted_limit(Attribution(user_id="alice"), read_storage=True) is None
        # Another user on the same limit is not blocked by alice's refusals.
        spend(guard, "bob", 30, 5, est=(30, 20))
        assert guard.usage("bob")[0].state == "ok"
        # A smaller call fits: the limit admits calls again, and says so.
        spend(guard, "alice", 10, 5, est=(10, 10))
        (usage,) = guard.usage("alice")
        assert (usage.used, usage.state) == (Decimal("0.00042"), "ok")
        # Refused again, then the window rolls over: a new window owes nothing.
        with track_context(user_id="alice"), pytest.raises(BudgetExceeded):
            guard.begin(call(30, 20))
        assert guard.usage("alice")[0].state == "exceeded"
        clock.advance(86_400)
        assert guard.usage("alice")[0].state == "ok"
    finally:
        guard.close()


async def test_a_reservation_given_back_unblocks_a_user_async(
    clock: FakeClock, on_store: dict[str, Any]
) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 0.01, "per": "day"}]}, clock=clock, **on_store
    )
    try:
        with track_context(user_id="alice"):
            held = await guard.abegin(call(3000, 2000))  # $0.007 reserved
            with pytest.raises(BudgetExceeded):
                await guard.abegin(call(3000, 2000))  # $0.003 left
            assert [u.state for u in await guard.ausage("alice")] == ["exceeded"]
            await held.arelease()  # the budget comes back: the next call fits again
            assert [u.state for u in await guard.ausage("alice")] == ["ok"]
    finally:
        await guard.aclose()
