"""GuardMiddleware in process: Django's test clients drive the sync and the async handler.

The views make GenAI calls the way the meter does (reserve, then settle) on the guard
``get_guard()`` returns; a small middleware stands in for a login middleware that sets
``request.user`` (the served tests use Django's own sessions and ``login()``).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import django
import pytest
import structlog
from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import AsyncClient, Client, override_settings
from django.urls import path
from structlog.testing import capture_logs
from web._support import acall, call, config, exhaust

from payi_guard import set_user
from payi_guard.clock import FakeClock
from payi_guard.context import current_request, get_context
from payi_guard.django import GuardMiddleware, get_guard
from payi_guard.django.body import run_in_context
from payi_guard.engine import Guard
from payi_guard.testing import capture_events
from payi_guard.web.identify import session_digest

NOW = 1_795_780_800.0  # 2026-11-27T12:00:00Z

USER_MIDDLEWARE = f"{__name__}.HeaderUserMiddleware"
GUARD_MIDDLEWARE = "payi_guard.django.GuardMiddleware"

if not settings.configured:
    settings.configure(
        SECRET_KEY="tests-only",
        ALLOWED_HOSTS=["testserver"],
        ROOT_URLCONF=__name__,
        MIDDLEWARE=[USER_MIDDLEWARE, GUARD_MIDDLEWARE],
        INSTALLED_APPS=[],
        LOGGING_CONFIG=None,
        PAYI_GUARD={"config": config()},
    )
    django.setup()


@dataclass
class LoggedIn:
    """What a login middleware leaves in ``request.user``."""

    pk: int
    username: str
    is_authenticated: bool = True


class HeaderUserMiddleware:
    """``X-Test-User: <pk>`` logs user ``<pk>`` in (username ``user<pk>@example.com``)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        pk = request.headers.get("X-Test-User")
        user = LoggedIn(int(pk), f"user{pk}@example.com") if pk else LoggedIn(0, "", False)
        request.user = cast(Any, user)
        return self.get_response(request)


# -- views ------------------------------------------------------------------------------


def _seen() -> dict[str, Any]:
    return {"context": get_context().user_id, "scope": current_request() is not None}


def chat(request: HttpRequest) -> HttpResponse:
    record = call(get_guard())
    return JsonResponse({"charged": record.user_id, **_seen()})


async def achat(request: HttpRequest) -> HttpResponse:
    record = await acall(get_guard())
    return JsonResponse({"charged": record.user_id, **_seen()})


def set_bad_user(request: HttpRequest) -> HttpResponse:
    set_user("not a valid id!")
    return HttpResponse("unreachable")


closed: list[dict[str, Any]] = []


def stream(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[str]:
        try:
            yield json.dumps(_seen()) + "\n"
            record = call(get_guard())
            yield json.dumps({"charged": record.user_id, **_seen()}) + "\n"
        finally:
            closed.append(_seen())

    return StreamingHttpResponse(body())


async def astream(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[str]:
        try:
            yield json.dumps(_seen()) + "\n"
            record = await acall(get_guard())
            yield json.dumps({"charged": record.user_id, **_seen()}) + "\n"
        finally:
            closed.append(_seen())

    return StreamingHttpResponse(body())


waiting: list[bool] = []


async def astream_waits(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[str]:
        try:
            yield json.dumps(_seen()) + "\n"
            waiting.append(True)
            await asyncio.Event().wait()  # until cancelled
            yield "never sent"
        finally:
            closed.append(_seen())

    return StreamingHttpResponse(body())


def visit(request: HttpRequest) -> HttpResponse:
    request.session["visited"] = True
    return HttpResponse("ok")


def ping(request: HttpRequest) -> HttpResponse:
    return HttpResponse("pong")


def stream_call_first(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[str]:
        record = call(get_guard())  # before the first chunk
        yield f"charged {record.user_id}\n"

    return StreamingHttpResponse(body())


async def astream_call_first(request: HttpRequest) -> StreamingHttpResponse:
    async def body() -> AsyncIterator[str]:
        record = await acall(get_guard())
        yield f"charged {record.user_id}\n"

    return StreamingHttpResponse(body())


def stream_call_late(request: HttpRequest) -> StreamingHttpResponse:
    def body() -> Iterator[str]:
        yield "started\n"
        call(get_guard())
        yield "never sent\n"

    return StreamingHttpResponse(body())


urlpatterns = [
    path("chat", chat),
    path("achat", achat),
    path("api/chat", chat),
    path("api/achat", achat),
    path("bad-user", set_bad_user),
    path("stream", stream),
    path("astream", astream),
    path("astream-waits", astream_waits),
    path("api/ping", ping),
    path("visit", visit),
    path("stream-call-first", stream_call_first),
    path("astream-call-first", astream_call_first),
    path("stream-call-late", stream_call_late),
]


# -- helpers -----------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines()]


def fetch(handler: str, path: str, cookies: dict[str, str] | None = None, **headers: str) -> Answer:
    """GET ``path`` through Django's sync (``Client``) or async (``AsyncClient``) handler.

    Header names are keywords: ``X_Test_User`` is sent as ``X-Test-User``.
    """
    headers = {name.replace("_", "-"): value for name, value in headers.items()}
    if handler == "sync":
        client = Client()
        client.cookies.load(cookies or {})
        response: Any = client.get(path, headers=headers)
        body = b"".join(response.streaming_content) if response.streaming else response.content
        return Answer(response.status_code, dict(response.headers), body)

    async def get() -> Answer:
        client = AsyncClient()
        client.cookies.load(cookies or {})
        response: Any = await client.get(path, headers=headers)
        if response.streaming:
            if response.is_async:
                body = b"".join([chunk async for chunk in response.streaming_content])
            else:
                body = b"".join(response.streaming_content)
        else:
            body = response.content
        return Answer(response.status_code, dict(response.headers), body)

    return asyncio.run(get())


@pytest.fixture
def guard() -> Iterator[Guard]:
    """A memory guard on a fake clock, installed as ``PAYI_GUARD = {"guard": ...}``."""
    guard = Guard(config(), clock=FakeClock(NOW))
    with override_settings(PAYI_GUARD={"guard": guard}):
        yield guard


handlers = pytest.mark.parametrize("handler", ["sync", "async"])


# -- settings and get_guard --------------------------------------------------------------


def test_get_guard_is_built_once_from_the_settings() -> None:
    first = get_guard()
    assert get_guard() is first
    assert first.config.limits["daily"].unit == "usd"  # from config() in settings
    replacement = Guard(config(), clock=FakeClock(NOW))
    with override_settings(PAYI_GUARD={"guard": replacement}):
        assert get_guard() is replacement
    assert get_guard() is not replacement


def test_guard_from_a_dotted_path_or_a_yaml_file(tmp_path: Any) -> None:
    with override_settings(PAYI_GUARD={"guard": f"{__name__}.make_guard"}):
        assert get_guard().clock.now() == NOW
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("version: 1\nlimits:\n  tiny: {max: 0.5, per: day}\ndefault: [tiny]\n")
    with override_settings(PAYI_GUARD={"config": budgets}):
        assert list(get_guard().config.limits) == ["tiny"]
    store = f"sqlite:///{tmp_path / 'other.db'}"
    with override_settings(PAYI_GUARD={"config": budgets, "storage": store}):
        assert get_guard().storage_uri == store  # the environment's store wins


def make_guard() -> Guard:
    return Guard(config(), clock=FakeClock(NOW))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "is missing"),
        ([], "must be a dict"),
        ({}, "exactly one of 'config'"),
        ({"config": config(), "guard": "x.y"}, "exactly one of 'config'"),
        ({"config": config(), "guarded_path": ["/api/*"]}, "unknown key(s) 'guarded_path'"),
        ({"config": config(), "session_cookie": "sid"}, "Django's own session"),
        ({"config": config(), "block_status": 200}, "block_status must be a 4xx or 5xx"),
        ({"config": config(), "user": "no.such.module.fn"}, "cannot be imported"),
        ({"config": config(), "user": 42}, "'user' must be the dotted path of a callable"),
        ({"config": 42}, "'config' must be a path or a dict"),
        ({"guard": f"{__name__}.NOW"}, "'guard' must name a payi_guard Guard"),
        ({"guard": f"{__name__}.make_guard", "storage": "memory://"}, "goes with 'config'"),
        ({"config": config(), "storage": 42}, "'storage' must be a storage URI"),
    ],
)
def test_invalid_settings_are_refused_when_the_middleware_is_built(
    value: Any, message: str
) -> None:
    with override_settings(PAYI_GUARD=value), pytest.raises(ImproperlyConfigured) as info:
        GuardMiddleware(lambda request: HttpResponse())
    assert message in str(info.value)
    assert str(info.value).startswith("settings.PAYI_GUARD: ")


# -- who is charged ----------------------------------------------------------------------


@handlers
@pytest.mark.parametrize("view", ["/chat", "/achat"])
def test_sync_and_async_views_are_charged_to_the_users_pk(
    guard: Guard, handler: str, view: str
) -> None:
    with capture_events() as events:
        answer = fetch(handler, view, X_Test_User="42", X_Request_ID="req-1")
    assert answer.status == 200
    assert answer.json() == {"charged": "42", "context": "42", "scope": True}
    assert answer.headers["X-Request-ID"] == "req-1"
    (logged,) = events.named("genai_call")
    assert (logged["user_id"], logged["request_id"]) == ("42", "req-1")
    assert "user42@example.com" not in str(logged)


def resolve_user(request: HttpRequest) -> object:
    return request.headers.get("X-Account")


async def aresolve_user(request: HttpRequest) -> object:
    return request.headers.get("X-Account")


@handlers
@pytest.mark.parametrize("resolver", ["resolve_user", "aresolve_user"])
def test_user_setting_names_another_id(guard: Guard, handler: str, resolver: str) -> None:
    options = {"guard": guard, "user": f"{__name__}.{resolver}"}
    with override_settings(PAYI_GUARD=options):
        named = fetch(handler, "/chat", X_Test_User="42", X_Account="acme:7")
        fallback = fetch(handler, "/chat", X_Test_User="42")
    assert named.json()["charged"] == "acme:7"
    assert fallback.json()["charged"] == "42"  # the resolver said None: request.user.pk
    # A repeated trusted header is a 400 whoever the resolver names.
    with override_settings(PAYI_GUARD={**options, "trust_user_header": True}):
        repeated = fetch(handler, "/chat", X_Account="acme:7", xProxy_User_ID="acme:9,acme:10")
    assert repeated.status == 400
    assert repeated.headers["Content-Type"] == "application/problem+json"


def resolve_with_tier(request: HttpRequest) -> object:
    return (request.headers.get("X-Account"), request.headers.get("X-Plan"))


async def aresolve_with_tier(request: HttpRequest) -> object:
    return (request.headers.get("X-Account"), request.headers.get("X-Plan"))


@handlers
@pytest.mark.parametrize("resolver", ["resolve_with_tier", "aresolve_with_tier"])
def test_user_setting_may_name_the_users_tier(handler: str, resolver: str) -> None:
    guard = Guard(config(tiers={"pro": [{"max": 1, "per": "day"}]}), clock=FakeClock(NOW))
    exhaust(guard, "acme:7")  # the default $0.001 is spent
    with override_settings(PAYI_GUARD={"guard": guard, "user": f"{__name__}.{resolver}"}):
        pro = fetch(handler, "/chat", X_Account="acme:7", X_Plan="pro")
        plain = fetch(handler, "/chat", X_Account="acme:7")  # (id, None): no tier
        unknown = fetch(handler, "/chat", X_Account="acme:7", X_Plan="platinum")
    assert (pro.status, pro.json()["charged"]) == (200, "acme:7")
    assert plain.status == unknown.status == 429  # default limits, never "no limits"


def resolve_triple(request: HttpRequest) -> object:
    return ("42", "pro", "extra")


def test_user_setting_returns_an_id_or_a_pair(guard: Guard) -> None:
    with (
        override_settings(PAYI_GUARD={"guard": guard, "user": f"{__name__}.resolve_triple"}),
        pytest.raises(TypeError, match=r"\(user_id, tier\) pair"),
    ):
        fetch("sync", "/chat")


def resolve_invalid(request: HttpRequest) -> object:
    return "alice smith"


@handlers
def test_invalid_id_is_a_400_or_anonymous(guard: Guard, handler: str) -> None:
    with (
        override_settings(PAYI_GUARD={"guard": guard, "user": f"{__name__}.resolve_invalid"}),
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs,
    ):
        refused = fetch(handler, "/chat")
        in_view = fetch(handler, "/bad-user")
    assert refused.status == in_view.status == 400
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:payi-guard:problem:invalid-user-id"
    assert "alice smith" not in refused.body.decode()
    # The warning carries the request id the 400 answered with.
    warned = [e for e in logs if e["event"] == "invalid_user_id"]
    assert warned
    assert warned[0].get("request_id") == refused.json()["request_id"]
    options = {
        "guard": guard,
        "user": f"{__name__}.resolve_invalid",
        "on_invalid_user": "anonymous",
    }
    with override_settings(PAYI_GUARD=options):
        assert fetch(handler, "/chat").json()["charged"] == "anonymous"


@handlers
def test_anonymous_requests_follow_the_yaml_strategy(handler: str) -> None:
    shared = Guard(config(), clock=FakeClock(NOW))
    with override_settings(PAYI_GUARD={"guard": shared}):
        assert fetch(handler, "/chat").json() == {
            "charged": "anonymous",
            "context": None,
            "scope": True,
        }
    reject = Guard(config(anonymous={"strategy": "reject"}), clock=FakeClock(NOW))
    options = {"guard": reject, "guarded_paths": ["/api/*"], "www_authenticate": "Bearer"}
    with override_settings(PAYI_GUARD=options):
        gated = fetch(handler, "/api/chat")
        in_view = fetch(handler, "/chat")
        signed_in = fetch(handler, "/chat", X_Test_User="7")
    for refused in (gated, in_view):
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        assert refused.json()["type"] == "urn:payi-guard:problem:user-required"
    assert signed_in.json()["charged"] == "7"


def test_a_missing_request_user_is_logged_once(guard: Guard) -> None:
    with (
        override_settings(MIDDLEWARE=[GUARD_MIDDLEWARE], PAYI_GUARD={"guard": guard}),
        capture_events() as events,
    ):
        client = Client()
        first = client.get("/chat", headers={"X-Test-User": "42"})
        client.get("/chat")
    assert first.json()["charged"] == "anonymous"
    (warning,) = events.named("auth_middleware_order")
    assert "after 'django.contrib.auth.middleware.AuthenticationMiddleware'" in warning["detail"]


@handlers
def test_session_strategy_uses_the_session_the_backend_knows(handler: str) -> None:
    guard = Guard(config(anonymous={"strategy": "session"}), clock=FakeClock(NOW))
    options = {
        "MIDDLEWARE": ["django.contrib.sessions.middleware.SessionMiddleware", GUARD_MIDDLEWARE],
        "SESSION_ENGINE": "django.contrib.sessions.backends.cache",
        "PAYI_GUARD": {"guard": guard},
    }
    with override_settings(**options), capture_events() as events:
        key = Client().get("/visit").cookies["sessionid"].value
        known = fetch(handler, "/chat", cookies={"sessionid": key})
        forged = fetch(handler, "/chat", cookies={"sessionid": "made-up-by-the-client"})
        none = fetch(handler, "/chat")
    assert [a.json()["charged"] for a in (known, forged, none)] == [
        f"anonymous:{session_digest(key)}",
        "anonymous",
        "anonymous",
    ]
    assert key not in str(list(events))


def test_authentication_listed_after_the_guard_is_refused_at_start_up(guard: Guard) -> None:
    wrong = [GUARD_MIDDLEWARE, "django.contrib.auth.middleware.AuthenticationMiddleware"]
    with override_settings(MIDDLEWARE=wrong), pytest.raises(ImproperlyConfigured) as info:
        GuardMiddleware(lambda request: HttpResponse())
    assert "move the guard after it" in str(info.value)
    resolver = {"guard": guard, "user": f"{__name__}.resolve_user"}
    with override_settings(MIDDLEWARE=wrong, PAYI_GUARD=resolver):
        GuardMiddleware(lambda request: HttpResponse())  # the callable names the user


def test_trusted_user_header(guard: Guard) -> None:
    with override_settings(PAYI_GUARD={"guard": guard, "trust_user_header": True}):
        trusted = fetch("sync", "/chat", xProxy_User_ID="acme:9")
    with override_settings(PAYI_GUARD={"guard": guard}):
        ignored = fetch("sync", "/chat", xProxy_User_ID="acme:9")
    assert (trusted.json()["charged"], ignored.json()["charged"]) == ("acme:9", "anonymous")


@handlers
def test_the_signed_in_user_wins_over_a_trusted_header_and_repeats_are_a_400(
    guard: Guard, handler: str
) -> None:
    with override_settings(PAYI_GUARD={"guard": guard, "trust_user_header": True}):
        signed_in = fetch(handler, "/chat", X_Test_User="42", xProxy_User_ID="acme:9")
        # Servers join a repeated header with ",": one rule, whoever is signed in.
        repeated = fetch(handler, "/chat", X_Test_User="42", xProxy_User_ID="acme:9,acme:10")
    assert signed_in.json()["charged"] == "42"
    assert repeated.status == 400
    assert repeated.headers["Content-Type"] == "application/problem+json"


# -- refusals ----------------------------------------------------------------------------


@handlers
def test_guarded_path_refuses_a_spent_user_before_the_view(guard: Guard, handler: str) -> None:
    exhaust(guard, "42")
    with (
        override_settings(PAYI_GUARD={"guard": guard, "guarded_paths": ["/api/*"]}),
        capture_events() as events,
    ):
        refused = fetch(handler, "/api/achat", X_Test_User="42", X_Request_ID="r-429")
        options = fetch(handler, "/api/chat", X_Test_User="42") if handler == "sync" else None
    assert refused.status == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.headers["Retry-After"] == "43200"
    assert refused.headers["RateLimit-Policy"] == '"daily";q=1000;w=86400'
    assert refused.headers["RateLimit"] == '"daily";r=0;t=43200'
    assert refused.headers["X-Request-ID"] == "r-429"
    body = refused.json()
    assert (body["limit"], body["scope"], body["request_id"]) == ("daily", "user", "r-429")
    assert [e.get("source") for e in events.named("budget_exceeded")] == ["gate"] * (
        2 if options else 1
    )
    assert events.named("genai_call") == []


def test_options_requests_and_unguarded_paths_are_not_gated(guard: Guard) -> None:
    exhaust(guard, "42")
    with override_settings(PAYI_GUARD={"guard": guard, "guarded_paths": ["/api/*"]}):
        client = Client(headers={"X-Test-User": "42"})
        gated, preflight = client.get("/api/ping"), client.options("/api/ping")
        in_view = fetch("sync", "/chat", X_Test_User="42")
    assert (gated.status_code, preflight.status_code) == (429, 200)
    # Not gated: the view's own call is refused, and answered the same way.
    assert in_view.status == 429
    assert in_view.json()["limit"] == "daily"


@handlers
def test_budget_headers_on_success(guard: Guard, handler: str) -> None:
    options = {"guard": guard, "guarded_paths": ["/api/*"], "budget_headers": True}
    with override_settings(PAYI_GUARD=options):
        answer = fetch(handler, "/api/chat", X_Test_User="42")
        unguarded = fetch(handler, "/chat", X_Test_User="42")
    assert answer.status == 200
    assert answer.headers["RateLimit-Policy"] == '"daily";q=1000;w=86400'
    assert answer.headers["RateLimit"] == '"daily";r=800;t=43200'  # its own call counted
    assert "RateLimit" not in unguarded.headers


# -- streamed bodies ---------------------------------------------------------------------


@handlers
@pytest.mark.parametrize("view", ["/stream", "/astream"])
def test_streamed_body_runs_in_the_request_context(guard: Guard, handler: str, view: str) -> None:
    closed.clear()
    mismatched = (handler == "sync") == (view == "/astream")
    with warnings.catch_warnings(), capture_events() as events:
        # Django consumes a body of the other kind whole, with a warning.
        warnings.simplefilter("ignore" if mismatched else "error")
        answer = fetch(handler, view, X_Test_User="42", X_Request_ID="s-1")
    assert answer.status == 200
    assert answer.headers["X-Request-ID"] == "s-1"
    assert answer.lines() == [
        {"context": "42", "scope": True},
        {"charged": "42", "context": "42", "scope": True},
    ]
    assert closed == [{"context": "42", "scope": True}]
    (logged,) = events.named("genai_call")
    assert (logged["user_id"], logged["request_id"]) == ("42", "s-1")
    assert current_request() is None


@handlers
@pytest.mark.parametrize("view", ["/stream-call-first", "/astream-call-first"])
def test_stream_refused_before_its_first_chunk_is_the_problem_response(
    guard: Guard, handler: str, view: str
) -> None:
    exhaust(guard, "42")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refused = fetch(handler, view, X_Test_User="42")
        allowed = fetch(handler, view, X_Test_User="43")
    assert refused.status == 429
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert refused.json()["limit"] == "daily"
    assert (allowed.status, allowed.body) == (200, b"charged 43\n")


def test_refusal_after_the_body_started_ends_it_and_is_logged(guard: Guard) -> None:
    exhaust(guard, "42")
    with capture_events() as events:
        answer = fetch("sync", "/stream-call-late", X_Test_User="42", X_Request_ID="late")
    assert (answer.status, answer.body) == (200, b"started\n")
    (after,) = events.named("budget_exceeded_after_start")
    assert (after["user_id"], after["limit"], after["request_id"]) == ("42", "daily", "late")


def test_closing_a_stream_early_closes_its_generator_in_the_request_context(
    guard: Guard,
) -> None:
    closed.clear()
    response: Any = Client().get("/stream", headers={"X-Test-User": "42"})
    first = next(iter(response.streaming_content))
    assert json.loads(first) == {"context": "42", "scope": True}
    assert closed == []
    response.close()
    response.close()
    assert closed == [{"context": "42", "scope": True}]
    assert guard.usage("42")[0].used == 0  # the call after the first chunk never ran


async def test_async_stream_cancelled_mid_body_ends_in_the_request_context(guard: Guard) -> None:
    closed.clear()
    waiting.clear()
    response: Any = await AsyncClient().get("/astream-waits", headers={"X-Test-User": "42"})
    content = response.streaming_content
    assert json.loads(await anext(content)) == {"context": "42", "scope": True}
    # What Django does when the client goes away: cancel the task sending the body.
    task = asyncio.ensure_future(anext(content))
    for _ in range(1000):
        if waiting:
            break
        await asyncio.sleep(0)
    assert waiting == [True]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert closed == [{"context": "42", "scope": True}]
    assert current_request() is None


# -- run_in_context ----------------------------------------------------------------------

_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="outer")


async def test_run_in_context_runs_every_step_in_the_given_context() -> None:
    context = contextvars.copy_context()
    context.run(_probe.set, "inner")
    seen: list[str] = []

    async def steps() -> str:
        for _ in range(3):
            seen.append(_probe.get())
            await asyncio.sleep(0)
        _probe.set("changed")
        await asyncio.sleep(0)
        return _probe.get()

    assert await run_in_context(context, steps()) == "changed"
    assert seen == ["inner"] * 3
    assert _probe.get() == "outer"
    assert context[_probe] == "changed"


async def test_run_in_context_passes_errors_and_cancellation_through() -> None:
    context = contextvars.copy_context()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise LookupError("inner")

    with pytest.raises(LookupError, match="inner"):
        await run_in_context(context, fails())

    started = asyncio.Event()
    cleaned: list[str] = []

    async def waits() -> None:
        _probe.set("waiting")
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(_probe.get())

    task = asyncio.ensure_future(run_in_context(context, waits()))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned == ["waiting"]
    assert _probe.get() == "outer"
