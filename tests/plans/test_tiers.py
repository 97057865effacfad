"""Plans from the app: ``tier_of`` and the request's tier, their precedence and caching."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from payi_guard import (
    BudgetExceeded,
    ConfigError,
    Guard,
    get_context,
    request_scope,
    set_user,
    track_context,
)
from payi_guard.clock import FakeClock
from payi_guard.config import parse_config
from payi_guard.context import Attribution
from payi_guard.engine import CallRequest
from payi_guard.pricing import TokenUsage
from payi_guard.testing import capture_events

PRICES = {"test-model": {"input_per_mtok": 1, "output_per_mtok": 2}}
CONFIG: dict[str, Any] = {
    "prices": PRICES,
    "tier_cache_ttl": 30,
    "limits": {"daily": {"max": 0.001, "per": "day"}},
    "default": ["daily"],
    "tiers": {
        "pro": [{"max": 0.01, "per": "day"}],
        "max": [{"max": 0.1, "per": "day"}],
    },
    "users": {"listed": [{"max": 0.002, "per": "day"}]},
}
DEFAULT, LISTED, PRO, MAX = (Decimal(x) for x in ("0.001", "0.002", "0.01", "0.1"))
BIG = CallRequest(model="test-model", input_tokens=5000, max_output_tokens=0)  # $0.005


def build(store: str, key_prefix: str, clock: FakeClock, **kwargs: Any) -> Guard:
    config = {**CONFIG, **kwargs.pop("config", {})}
    return Guard(config, storage=store, key_prefix=key_prefix, clock=clock, **kwargs)


def own_max(guard: Guard, user: str, tier: str | None = None) -> Decimal | int:
    return guard.usage(user, tier=tier)[0].max


def refused_at(guard: Guard, user: str) -> Decimal | int | None:
    """The max of the limit that refuses a $0.005 call of ``user``, or None if admitted."""
    try:
        with track_context(user_id=user):
            guard.begin(BIG).release()
    except BudgetExceeded as exc:
        return exc.limit.max
    return None


class Plans:
    """A ``tier_of`` over a dict that counts how often it is asked."""

    def __init__(self, plans: dict[str, str | None]) -> None:
        self.plans = plans
        self.asked: list[str] = []
        self.threads: list[int] = []

    def __call__(self, user_id: str) -> str | None:
        self.asked.append(user_id)
        self.threads.append(threading.get_ident())
        return self.plans.get(user_id)


# -- tier_of ------------------------------------------------------------------------------


def test_tier_of_gives_a_user_the_limits_of_their_plan(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"alice": "pro", "max-user": "max"})
    guard = build(store, key_prefix, clock, tier_of=plans)
    assert own_max(guard, "alice") == PRO
    assert own_max(guard, "max-user") == MAX
    assert own_max(guard, "bob") == DEFAULT
    assert refused_at(guard, "alice") is None
    assert refused_at(guard, "bob") == DEFAULT
    guard.close()


async def test_an_async_tier_of_serves_the_async_and_the_sync_paths(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    asked: list[str] = []

    async def tier_of(user_id: str) -> str | None:
        await asyncio.sleep(0)
        asked.append(user_id)
        return "pro" if user_id.startswith("pro-") else None

    guard = build(store, key_prefix, clock, tier_of=tier_of)
    async with track_context(user_id="pro-a"):
        reservation = await guard.abegin(BIG)
        await reservation.asettle(TokenUsage(5000, 0))
    assert (await guard.ausage("pro-a"))[0].used == Decimal("0.005")
    # From sync code (a sync SDK client in a worker thread), the same async function.
    assert await asyncio.to_thread(refused_at, guard, "pro-b") is None
    assert await asyncio.to_thread(refused_at, guard, "plain") == DEFAULT
    assert asked == ["pro-a", "pro-b", "plain"]
    guard.close()


async def test_a_sync_tier_of_never_runs_on_the_event_loop(
    key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"alice": "pro"})
    guard = build("memory://", key_prefix, clock, tier_of=plans)
    async with track_context(user_id="alice"):
        (await guard.abegin(BIG)).release()
    assert plans.asked == ["alice"]
    assert plans.threads[0] != threading.get_ident()  # a worker thread, not the loop's


# -- the request's tier and the precedence ------------------------------------------------


def test_precedence_users_entry_then_request_then_tier_of_then_default(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"listed": "max", "carol": "max", "dave": None})
    guard = build(store, key_prefix, clock, tier_of=plans)
    assert own_max(guard, "listed", tier="pro") == LISTED  # the user's own entry
    assert own_max(guard, "listed") == LISTED
    assert own_max(guard, "carol", tier="pro") == PRO  # the request's tier
    assert own_max(guard, "carol") == MAX  # tier_of
    assert own_max(guard, "dave") == DEFAULT  # neither
    assert "listed" not in plans.asked  # a listed user's plan is never asked
    # The same order for calls made in a request.
    for user, tier, expected in [
        ("listed", "pro", LISTED),
        ("carol", "pro", None),
        ("dave", "max", None),
        ("dave", None, DEFAULT),
    ]:
        with request_scope():
            set_user(user, tier=tier)
            assert get_context().tier == tier
            try:
                guard.begin(BIG).release()
                refused = None
            except BudgetExceeded as exc:
                refused = exc.limit.max
        assert refused == expected, (user, tier)
    guard.close()


def test_a_track_context_user_never_inherits_the_requests_tier(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock)
    with request_scope():
        set_user("carol", tier="pro")
        guard.begin(BIG).release()  # carol is pro
        with track_context(user_id="eve"):
            assert get_context().tier is None
            with pytest.raises(BudgetExceeded) as refused:
                guard.begin(BIG)
        assert refused.value.limit.max == DEFAULT
        set_user("carol")  # a later set_user without a tier drops it
        with pytest.raises(BudgetExceeded):
            guard.begin(BIG)


async def test_reads_show_the_tier_the_users_requests_named(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock, tier_of=Plans({"carol": "max"}))
    assert (guard.tier("dave"), own_max(guard, "dave")) == ("default", DEFAULT)
    assert (guard.tier("carol"), own_max(guard, "carol")) == ("max", MAX)
    for user in ("dave", "carol"):
        with request_scope():
            set_user(user, tier="pro")
            guard.begin(BIG).release()
    with request_scope():
        set_user("listed", tier="pro")
        with pytest.raises(BudgetExceeded):  # charged under its own entry's $0.002
            guard.begin(BIG)
    # What reads a user's plan without a request (the users page, the CLI in this
    # process) shows the tier the user's requests named, as their calls are charged.
    for user in ("dave", "carol"):
        assert (guard.tier(user), own_max(guard, user)) == ("pro", PRO)
        assert await guard.atier(user) == "pro"
        assert (await guard.ausage(user))[0].max == PRO
        assert own_max(guard, user, tier="max") == MAX  # a tier given to usage() wins
    assert (guard.tier("listed"), own_max(guard, "listed")) == ("custom", LISTED)
    assert (guard.tier("erin"), own_max(guard, "erin")) == ("default", DEFAULT)
    with request_scope():
        set_user("dave", tier="max")  # the latest request's tier
        guard.begin(BIG).release()
    assert (guard.tier("dave"), own_max(guard, "dave")) == ("max", MAX)
    assert guard.adjust("dave", "user:0", "0.001").max == MAX  # the limit the page shows
    with track_context(user_id="dave"):  # a call with no request's tier: tier_of, default
        with pytest.raises(BudgetExceeded) as refused:
            guard.begin(BIG)
    assert refused.value.limit.max == DEFAULT
    guard.close()


def test_set_user_refuses_a_tier_that_is_not_a_name() -> None:
    with request_scope() as scope:
        for bad in (["pro"], 3, {"name": "pro"}):
            with pytest.raises(TypeError, match="tier"):
                set_user("alice", tier=bad)  # type: ignore[arg-type]
        set_user("alice", tier="")  # an empty plan column is no tier
        assert scope.tier is None


# -- caching --------------------------------------------------------------------------------


def test_tier_of_answers_are_cached_for_tier_cache_ttl(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"alice": "pro"})
    guard = build(store, key_prefix, clock, tier_of=plans)
    for _ in range(3):
        assert refused_at(guard, "alice") is None
    assert own_max(guard, "alice") == PRO
    assert plans.asked == ["alice"]
    plans.plans["alice"] = None  # downgraded in the app's database
    clock.advance(29.9)
    assert own_max(guard, "alice") == PRO  # still cached
    clock.advance(0.2)
    assert own_max(guard, "alice") == DEFAULT
    assert refused_at(guard, "alice") == DEFAULT
    assert plans.asked == ["alice", "alice"]
    guard.close()


def test_a_ttl_of_zero_asks_every_time_and_a_reload_forgets(
    key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"alice": "pro"})
    guard = build("memory://", key_prefix, clock, tier_of=plans, config={"tier_cache_ttl": 0})
    own_max(guard, "alice")
    own_max(guard, "alice")
    assert len(plans.asked) == 2
    assert guard.reload({**CONFIG, "tier_cache_ttl": 600})
    own_max(guard, "alice")
    own_max(guard, "alice")
    assert len(plans.asked) == 3
    assert guard.reload({**CONFIG, "tier_cache_ttl": 600})  # a new policy: asked afresh
    own_max(guard, "alice")
    assert len(plans.asked) == 4


def test_tier_cache_ttl_is_a_top_level_yaml_key() -> None:
    assert parse_config("version: 1\n").tier_cache_ttl == 60
    assert parse_config("tier_cache_ttl: 2.5\n").tier_cache_ttl == 2.5
    for bad, message in (("-1", "0 seconds or more"), ("soon", "number of seconds")):
        with pytest.raises(ConfigError, match=message) as error:
            parse_config(f"version: 1\ntier_cache_ttl: {bad}\n")
        assert error.value.line == 2


def test_the_cache_only_gate_never_asks_the_app(
    shared_store: str, key_prefix: str, clock: FakeClock
) -> None:
    plans = Plans({"bob": None})
    guard = build(shared_store, key_prefix, clock, tier_of=plans, exhausted_cache_ttl=3600)
    bob = Attribution(user_id="bob")
    with track_context(user_id="bob"):
        guard.begin(CallRequest(model="test-model", input_tokens=1000)).settle(
            TokenUsage(1000, 0)
        )  # bob's $0.001 default budget is spent
    assert guard.exhausted_limit(bob) is not None  # known spent, tier known: refused
    plans.plans["bob"] = "pro"  # bob upgrades
    clock.advance(31)  # the tier answer expired; the spent entry did not
    asked = len(plans.asked)
    assert guard.exhausted_limit(bob) is None  # tier unknown here: the call decides
    assert len(plans.asked) == asked
    assert refused_at(guard, "bob") is None  # the call asks, and bob is pro now
    guard.close()


# -- failures and unknown tiers --------------------------------------------------------------


@pytest.mark.parametrize(
    "tier_of",
    [
        pytest.param(lambda uid: 1 / 0, id="raises"),
        pytest.param(lambda uid: 42, id="not-a-name"),
    ],
)
def test_a_failing_tier_of_is_logged_and_gives_default(
    store: str, key_prefix: str, clock: FakeClock, tier_of: Callable[[str], Any]
) -> None:
    guard = build(store, key_prefix, clock, tier_of=tier_of)
    with capture_events() as events:
        assert refused_at(guard, "alice") == DEFAULT
        assert refused_at(guard, "alice") == DEFAULT
    failed = events.named("tier_lookup_failed")
    assert len(failed) == 2  # not cached: asked again
    assert failed[0]["user_id"] == "alice"
    assert failed[0]["error_type"] in ("ZeroDivisionError", "TypeError")
    assert failed[0]["log_level"] == "error"
    guard.close()


async def test_a_failing_async_tier_of_gives_default(key_prefix: str, clock: FakeClock) -> None:
    async def tier_of(user_id: str) -> str | None:
        raise ConnectionError("the plans database is down")

    guard = build("memory://", key_prefix, clock, tier_of=tier_of)
    with capture_events() as events:
        assert (await guard.ausage("alice"))[0].max == DEFAULT
    assert events.named("tier_lookup_failed")[0]["error"] == "the plans database is down"


def test_an_unknown_tier_is_logged_and_gets_default_never_unlimited(
    store: str, key_prefix: str, clock: FakeClock
) -> None:
    guard = build(store, key_prefix, clock, tier_of=Plans({"alice": "platinum"}))
    with capture_events() as events:
        assert refused_at(guard, "alice") == DEFAULT
        with request_scope():
            set_user("bob", tier="Gold Plan\x1b[31m")
            with pytest.raises(BudgetExceeded):
                guard.begin(BIG)
    unknown = events.named("tier_unknown")
    assert [(e["user_id"], e["tier"]) for e in unknown] == [
        ("alice", "platinum"),
        ("bob", "'Gold Plan\\x1b[31m'"),  # shown escaped: never raw control characters
    ]
    assert unknown[0]["tiers"] == ["max", "pro"]
    guard.close()


def test_pseudonymised_users_are_looked_up_by_their_real_id(
    key_prefix: str, clock: FakeClock
) -> None:
    from payi_guard import Pseudonymizer

    plans = Plans({"alice": "pro"})
    guard = build(
        "memory://",
        key_prefix,
        clock,
        tier_of=plans,
        pseudonymizer=Pseudonymizer(b"k" * 32),
    )
    assert refused_at(guard, "alice") is None
    assert plans.asked == ["alice"]


def test_close_stops_the_private_loop_of_an_async_tier_of(
    key_prefix: str, clock: FakeClock
) -> None:
    async def tier_of(user_id: str) -> str | None:
        return "pro"

    before = {t.name for t in threading.enumerate()}
    guard = build("memory://", key_prefix, clock, tier_of=tier_of)
    assert "payi-guard-tier-of" not in before
    assert refused_at(guard, "alice") is None
    assert "payi-guard-tier-of" in {t.name for t in threading.enumerate()}
    guard.close()
    assert "payi-guard-tier-of" not in {t.name for t in threading.enumerate()}
