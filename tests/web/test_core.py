"""The protocol-neutral core: options, globs, request ids, problems, RateLimit fields."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from starlette.authentication import BaseUser, SimpleUser, UnauthenticatedUser

from payi_guard.clock import FakeClock
from payi_guard.context import request_scope
from payi_guard.engine import Guard, UserRequired
from payi_guard.exceptions import BudgetExceeded, InvalidUserId, StorageError
from payi_guard.usage import LimitUsage
from payi_guard.web.core import WebCore
from payi_guard.web.identify import SESSION_KEY, user_of_scope
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE, Problem
from web._support import config, exhaust


def test_guarded_paths_are_fnmatch_globs_case_sensitive(guard: Guard) -> None:
    core = WebCore(guard, guarded_paths=["/api/*", "/chat", "/v?/complete"])
    assert core.guarded("/api/chat")
    assert core.guarded("/api/a/b")  # fnmatch: * crosses /
    assert core.guarded("/chat")
    assert core.guarded("/v1/complete")
    assert not core.guarded("/chat/x")
    assert not core.guarded("/API/chat")
    assert not core.guarded("/apix")
    assert not WebCore(guard).guarded("/api/chat")


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"guarded_paths": "/api/*"}, TypeError),
        ({"guarded_paths": [""]}, TypeError),
        ({"block_status": 200}, ValueError),
        ({"block_status": True}, TypeError),
        ({"on_invalid_user": "ignore"}, ValueError),
        ({"user": "alice"}, TypeError),
        ({"session_id": 3}, TypeError),
        ({"session_cookie": "session_id"}, TypeError),  # raw cookies are never read
        ({"user_header": "bad header"}, ValueError),
        ({"request_id_header": "x:y"}, ValueError),
    ],
)
def test_bad_options_are_refused(guard: Guard, options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        WebCore(guard, **options)


def test_guard_must_be_a_guard() -> None:
    with pytest.raises(TypeError, match="Guard"):
        WebCore(object())  # type: ignore[arg-type]


@pytest.mark.parametrize("incoming", ["abc", "req-1.2_3:4", "a" * 128, "dGVzdA==", "0c9f/trace+1"])
def test_safe_request_ids_are_honoured(incoming: str) -> None:
    assert WebCore.request_id(incoming) == incoming


@pytest.mark.parametrize("incoming", [None, "", "a" * 129, "has space", "ctl\x01", "é", "a;b"])
def test_unsafe_request_ids_are_replaced(incoming: str | None) -> None:
    generated = WebCore.request_id(incoming)
    assert generated != incoming
    assert len(generated) == 32
    int(generated, 16)
    assert WebCore.request_id(incoming) != generated


def test_user_of_scope_prefers_identity_then_display_name() -> None:
    class Identified(BaseUser):
        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return "Alice Smith"

        @property
        def identity(self) -> str:
            return "acme:alice"

    assert user_of_scope(Identified()) == "acme:alice"
    assert user_of_scope(SimpleUser("bob")) == "bob"
    assert user_of_scope(SimpleUser("bob")) == "bob"  # the per-class memo gives the same
    assert user_of_scope(UnauthenticatedUser()) is None
    assert user_of_scope(None) is None
    assert user_of_scope(SimpleUser("")) is None


def test_a_stored_session_id_is_kept_in_the_session_and_used_from_its_next_request() -> None:
    session: dict[str, Any] = {"cart": [1]}
    assert WebCore.stored_session(session) is None  # first seen: the shared bucket
    minted = session[SESSION_KEY]
    assert len(minted) == 32
    assert WebCore.stored_session(session) == minted
    assert WebCore.stored_session(dict(session)) == minted
    assert session["cart"] == [1]
    assert WebCore.stored_session(None) is None  # no session at all


@pytest.mark.parametrize("value", ["", "short", "Z" * 32, 42, None, ["x"]])
def test_a_stored_session_id_the_guard_did_not_write_is_replaced(value: object) -> None:
    session: dict[str, Any] = {SESSION_KEY: value}
    assert WebCore.stored_session(session) is None
    assert session[SESSION_KEY] != value
    assert WebCore.stored_session(session) == session[SESSION_KEY]


def _limit(**overrides: Any) -> LimitUsage:
    values: dict[str, Any] = {
        "name": "daily",
        "scope": "user",
        "unit": "usd",
        "used": Decimal("0.0012"),
        "max": Decimal("0.001"),
        "remaining": Decimal(0),
        "resets_at": datetime(2026, 11, 28, tzinfo=timezone.utc),
        "state": "exceeded",
    }
    values.update(overrides)
    return LimitUsage(**values)


def test_budget_problem_document_and_headers(guard: Guard) -> None:
    core = WebCore(guard)
    with request_scope(request_id="req-1"):
        problem = core.budget_problem(_limit())
    assert problem.status == 429
    assert json.loads(problem.body) == {
        "type": "urn:payi-guard:problem:budget-exceeded",
        "title": "Budget exceeded",
        "status": 429,
        "detail": "The user limit 'daily' is used up (0.0012 of 0.001 USD); it resets at "
        "2026-11-28T00:00:00+00:00.",
        "limit": "daily",
        "scope": "user",
        "unit": "usd",
        "used": "0.0012",
        "max": "0.001",
        "remaining": "0",
        "resets_at": "2026-11-28T00:00:00+00:00",
        "retry_after": 43200,
        "request_id": "req-1",
    }
    assert problem.all_headers() == [
        ("Content-Type", PROBLEM_CONTENT_TYPE),
        ("Content-Length", str(len(problem.body))),
        ("Retry-After", "43200"),
        ("RateLimit-Policy", '"daily";q=1000;w=86400'),
        ("RateLimit", '"daily";r=0;t=43200'),
    ]
    assert problem.wsgi_status() == "429 Too Many Requests"


def test_detail_of_a_call_that_does_not_fit(guard: Guard) -> None:
    limit = _limit(used=Decimal("0.0007"), remaining=Decimal("0.0003"), state="ok")
    problem = WebCore(guard).budget_problem(limit)
    assert problem.document["detail"] == (
        "The user limit 'daily' has 0.0003 USD left (0.0007 of 0.001 used), not enough for "
        "this call; it resets at 2026-11-28T00:00:00+00:00."
    )
    assert problem.document["remaining"] == "0.0003"
    assert dict(problem.headers)["RateLimit"] == '"daily";r=300;t=43200'


@pytest.mark.parametrize(
    ("amounts", "texts"),
    [
        # Quotients as the ledger makes them; str() of some is '6.3E-5' or '1E-9'.
        (("0.000063", "0.0001", "0.000037"), ("0.000063", "0.0001", "0.000037")),
        (("1E-9", "0.000001", "9.99E-7"), ("0.000000001", "0.000001", "0.000000999")),
        (("1E+3", "2E+3", "1E+3"), ("1000", "2000", "1000")),
    ],
    ids=["micro", "nano", "thousands"],
)
def test_money_in_problem_documents_is_a_decimal_string(
    guard: Guard, amounts: tuple[str, str, str], texts: tuple[str, str, str]
) -> None:
    used_, max_, remaining = (Decimal(a) for a in amounts)
    problem = WebCore(guard).budget_problem(
        _limit(used=used_, max=max_, remaining=remaining, state="ok")
    )
    document = json.loads(problem.body)
    assert (document["used"], document["max"], document["remaining"]) == texts
    assert (Decimal(texts[0]), Decimal(texts[1]), Decimal(texts[2])) == (used_, max_, remaining)
    assert re.search(r"\d[eE][+-]?\d", problem.body.decode()) is None
    assert f"{texts[2]} USD left ({texts[0]} of {texts[1]} used)" in document["detail"]


def test_counts_in_problem_documents_stay_integers(guard: Guard) -> None:
    limit = _limit(unit="requests", used=30, max=30, remaining=0)
    document = json.loads(WebCore(guard).budget_problem(limit).body)
    assert (document["used"], document["max"], document["remaining"]) == (30, 30, 0)
    assert "(30 of 30 requests)" in document["detail"]


def test_block_status_is_configurable(guard: Guard) -> None:
    problem = WebCore(guard, block_status=402).budget_problem(_limit())
    assert problem.status == 402
    assert problem.document["status"] == 402
    assert problem.wsgi_status() == "402 Payment Required"


def test_retry_after_is_at_least_one_second(guard: Guard, clock: FakeClock) -> None:
    core = WebCore(guard)
    clock.set(datetime(2026, 11, 27, 23, 59, 59, 500000, tzinfo=timezone.utc))
    assert core.retry_after(_limit()) == 1
    clock.set(datetime(2026, 11, 28, 0, 0, 5, tzinfo=timezone.utc))
    assert core.retry_after(_limit()) == 1


def test_ratelimit_units_money_in_micro_usd_rounded_down(guard: Guard) -> None:
    core = WebCore(guard)
    money = _limit(max=Decimal("1.0000019"), remaining=Decimal("0.2500009"), state="ok")
    assert dict(core.rate_limit_headers(money))["RateLimit"] == '"daily";r=250000;t=43200'
    policy = dict(core.rate_limit_headers(money))["RateLimit-Policy"]
    assert policy.startswith('"daily";q=1000001')


def test_ratelimit_window_from_the_limit_period(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(
        config(
            limits={
                "rpm": {"requests": 30, "per": "minute"},
                "monthly": {"max": 20, "per": "month"},
                "weekly": {"tokens": 1000, "per": "week"},
            },
            default=["rpm", "monthly", "weekly", {"max": 5, "per": "hour"}],
        )
    )
    core = WebCore(guard)
    minute = _limit(
        name="rpm",
        unit="requests",
        used=30,
        max=30,
        remaining=0,
        resets_at=datetime(2026, 11, 27, 12, 1, tzinfo=timezone.utc),
    )
    assert dict(core.rate_limit_headers(minute)) == {
        "RateLimit-Policy": '"rpm";q=30;w=60',
        "RateLimit": '"rpm";r=0;t=60',
    }
    month = _limit(
        name="monthly",
        max=Decimal(20),
        remaining=Decimal("19.5"),
        resets_at=datetime(2026, 12, 1, tzinfo=timezone.utc),
    )
    assert dict(core.rate_limit_headers(month))["RateLimit-Policy"] == (
        f'"monthly";q=20000000;w={30 * 86400}'
    )
    week = _limit(
        name="weekly",
        unit="tokens",
        max=1000,
        remaining=10,
        resets_at=datetime(2026, 11, 30, tzinfo=timezone.utc),
    )
    assert dict(core.rate_limit_headers(week))["RateLimit-Policy"] == '"weekly";q=1000;w=604800'
    inline = _limit(
        name="user:3",
        max=Decimal(5),
        remaining=Decimal(5),
        resets_at=datetime(2026, 11, 27, 13, tzinfo=timezone.utc),
    )
    assert dict(core.rate_limit_headers(inline))["RateLimit-Policy"] == '"user:3";q=5000000;w=3600'


def test_ratelimit_window_omitted_when_ambiguous(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(
        config(
            limits={},
            default=[{"max": 1, "per": "day"}],
            tiers={"pro": [{"max": 1, "per": "week"}]},
        )
    )
    core = WebCore(guard)
    policy = dict(core.rate_limit_headers(_limit(name="user:0", max=Decimal(1))))
    assert policy["RateLimit-Policy"] == '"user:0";q=1000000'


def test_ratelimit_name_is_a_quoted_structured_field_string(guard: Guard) -> None:
    headers = dict(WebCore(guard).rate_limit_headers(_limit(name='we"ird\\')))
    assert headers["RateLimit"].startswith('"we\\"ird\\\\";r=0')


def test_problem_for_each_exception(guard: Guard) -> None:
    core = WebCore(guard, www_authenticate='Bearer realm="api"')
    refusal = core.problem_for(BudgetExceeded("alice", _limit(), 10))
    assert refusal is not None
    assert refusal.status == 429
    required = core.problem_for(UserRequired("anonymous", _limit(), 10))
    assert required is not None
    assert required.status == 401
    assert ("WWW-Authenticate", 'Bearer realm="api"') in required.headers
    invalid = core.problem_for(InvalidUserId("it contains whitespace (U+0020) at position 3"))
    assert invalid is not None
    assert invalid.status == 400
    assert "whitespace" in invalid.document["detail"]
    storage = core.problem_for(StorageError("down"))
    assert storage is not None
    assert storage.status == 503
    assert "down" not in storage.body.decode()
    assert core.problem_for(ValueError("other")) is None


def test_problem_build_encodes_once() -> None:
    problem = Problem.build(400, {"title": "x", "n": 1}, [("a", "b")])
    assert json.loads(problem.body) == {"title": "x", "n": 1}
    assert problem.headers == (("a", "b"),)


def test_check_passes_then_refuses_an_exhausted_user(guard: Guard) -> None:
    core = WebCore(guard)
    with request_scope("alice"):
        assert core.check().problem is None
        exhaust(guard, "alice")
        problem = core.check().problem
    assert problem is not None
    assert problem.status == 429
    assert problem.document["limit"] == "daily"


async def test_acheck_budget_headers_name_the_tightest_limit(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(
        config(
            limits={"daily": {"max": 0.001, "per": "day"}, "rpm": {"requests": 4, "per": "minute"}},
            default=["daily", "rpm"],
        )
    )
    core = WebCore(guard, budget_headers=True)
    with request_scope("alice"):
        first = await core.acheck()
        assert first.problem is None
        # Both untouched: the tie goes to the limit that resets first.
        assert dict(first.headers) == {
            "RateLimit-Policy": '"rpm";q=4;w=60',
            "RateLimit": '"rpm";r=4;t=60',
        }
        guard.record(user_id="alice", model="test-model", input_tokens=900, output_tokens=0)
        # daily: 10% left; rpm: 3 of 4 left, so daily is the tightest now.
        second = await core.acheck()
        assert dict(second.headers) == {
            "RateLimit-Policy": '"daily";q=1000;w=86400',
            "RateLimit": '"daily";r=100;t=43200',
        }


def test_check_reject_strategy_answers_401(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(anonymous={"strategy": "reject"}))
    with request_scope():
        result = WebCore(guard).check()
    assert result.problem is not None
    assert result.problem.status == 401


def test_path_decisions_are_remembered_within_a_bound(guard: Guard) -> None:
    from payi_guard.web import gate as gate_module

    core = WebCore(guard, guarded_paths=["/api/*"])
    for i in range(gate_module._DECIDED_MAX + 10):
        assert core.guarded(f"/api/{i}")
        assert not core.guarded(f"/other/{i}")
    assert len(core.gate.decided) <= gate_module._DECIDED_MAX
    assert core.guarded("/api/chat")
    assert core.guarded("/api/chat")  # remembered
    assert not core.guarded("/API/chat")


def test_bind_request_sets_structlog_context_and_undoes_it_exactly() -> None:
    import structlog

    from payi_guard.web.identify import bind_request, mark_bound, rebind_user, unbind_request

    structlog.contextvars.bind_contextvars(user_id="outer")
    try:
        with request_scope(request_id="r-1") as rs:
            mark_bound(rs)
            tokens = bind_request("alice", "r-1")
            assert structlog.contextvars.get_contextvars() == {
                "user_id": "alice",
                "request_id": "r-1",
            }
            rebind_user("bob")
            assert structlog.contextvars.get_contextvars()["user_id"] == "bob"
            unbind_request(tokens)
        assert structlog.contextvars.get_contextvars() == {"user_id": "outer"}
    finally:
        structlog.contextvars.clear_contextvars()
