"""GuardMiddleware on Starlette: user sources, gate, refusals, streams, pass-through scopes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.types import ASGIApp
from starlette.websockets import WebSocket
from structlog.testing import capture_logs

from payi_guard._ids import new_id
from payi_guard.context import current_request, get_context, set_user
from payi_guard.engine import ANONYMOUS_USER, Guard
from payi_guard.exceptions import InvalidUserId
from payi_guard.identity import normalize_user_id
from payi_guard.web import GuardMiddleware
from web._support import (
    MODEL,
    MessageRecorder,
    TokenBackend,
    acall,
    bearer,
    config,
    cost_nano,
    exhaust,
    free_port,
    serve_asgi,
    spend_most,
    usd,
    used,
)

merge = structlog.contextvars.merge_contextvars


class Probe:
    """What the endpoints saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.users: list[str | None] = []


def build_app(
    guard: Guard,
    probe: Probe,
    *,
    auth: str | None = "outside",
    **options: Any,
) -> Starlette:
    """A Starlette app whose endpoints make one GenAI call each."""

    async def chat(request: Request) -> JSONResponse:
        probe.calls += 1
        record = await acall(guard)
        probe.users.append(get_context().user_id)
        return JSONResponse(
            {
                "user": record.user_id,
                "request_id": get_context().request_id,
                "cost": str(record.cost_usd),
            }
        )

    async def rename(request: Request) -> JSONResponse:
        set_user(request.query_params["to"])
        record = await acall(guard)
        return JSONResponse({"user": record.user_id})

    routes = [
        Route("/api/chat", chat),
        Route("/open/chat", chat),
        Route("/open/rename", rename),
    ]
    app = Starlette(routes=routes)
    if auth == "inside":
        app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    app.add_middleware(GuardMiddleware, guard=guard, **options)
    if auth == "outside":
        app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    return app


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


# -- users from scope["user"], over a real server ----------------------------------------


def test_scope_user_is_charged_over_a_real_server(guard: Guard) -> None:
    probe = Probe()
    app = build_app(guard, probe, guarded_paths=["/api/*"])
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        response = http.get("/api/chat", headers=bearer("acme:alice"))
        other = http.get("/open/chat", headers=bearer("bob"))
    assert response.status_code == 200, response.text
    assert response.json()["user"] == "acme:alice"
    assert other.json()["user"] == "bob"
    assert used(guard, "acme:alice") == usd(cost_nano(100, 50))
    assert used(guard, "bob") == usd(cost_nano(100, 50))
    request_id = response.headers["x-request-id"]
    assert response.json()["request_id"] == request_id
    assert len(request_id) == 32


async def test_request_scope_closes_with_the_request(guard: Guard) -> None:
    probe = Probe()
    async with client(build_app(guard, probe)) as http:
        await http.get("/open/chat", headers=bearer("alice"))
    assert current_request() is None
    assert structlog.contextvars.get_contextvars() == {}
    assert probe.users == ["alice"]


# -- request ids -------------------------------------------------------------------------------


async def test_incoming_request_id_is_honoured_logged_and_echoed(guard: Guard) -> None:
    async with client(build_app(guard, Probe())) as http:
        with capture_logs() as logs:
            response = await http.get(
                "/open/chat", headers={**bearer("alice"), "X-Request-ID": "req-42.a"}
            )
    assert response.headers["x-request-id"] == "req-42.a"
    assert response.json()["request_id"] == "req-42.a"
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert [(e["request_id"], e["user_id"]) for e in calls] == [("req-42.a", "alice")]


@pytest.mark.parametrize("incoming", ["has space", "x" * 200, "semi;colon"])
async def test_unsafe_request_id_is_replaced(guard: Guard, incoming: str) -> None:
    async with client(build_app(guard, Probe())) as http:
        response = await http.get(
            "/open/chat", headers={**bearer("alice"), "X-Request-ID": incoming}
        )
    echoed = response.headers["x-request-id"]
    assert echoed != incoming
    assert len(echoed) == 32
    assert response.json()["request_id"] == echoed


async def test_app_request_id_header_is_not_duplicated(guard: Guard) -> None:
    async def own(request: Request) -> Response:
        return PlainTextResponse("x", headers={"X-Request-ID": "from-app"})

    app = GuardMiddleware(Starlette(routes=[Route("/", own)]), guard=guard)
    async with client(app) as http:
        response = await http.get("/")
    assert response.headers.get_list("x-request-id") == ["from-app"]


async def test_an_app_that_sends_one_headers_list_twice_gets_each_request_id(
    guard: Guard,
) -> None:
    # The guard adds its header to a copy: the app's own list (and message) never change.
    shared_headers = [(b"content-type", b"text/plain"), (b"Content-Length", b"1")]

    async def raw(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": shared_headers})
        await send({"type": "http.response.body", "body": b"x"})

    app = GuardMiddleware(raw, guard=guard)
    async with client(app) as http:
        first = await http.get("/", headers={"X-Request-ID": "req-1"})
        second = await http.get("/", headers={"X-Request-ID": "req-2"})
    assert first.headers.get_list("x-request-id") == ["req-1"]
    assert second.headers.get_list("x-request-id") == ["req-2"]
    assert shared_headers == [(b"content-type", b"text/plain"), (b"Content-Length", b"1")]


async def test_an_app_header_named_in_capitals_is_not_duplicated(guard: Guard) -> None:
    async def raw(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"X-Request-ID", b"from-app")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x"})

    app = GuardMiddleware(raw, guard=guard)
    async with client(app) as http:
        response = await http.get("/")
    assert response.headers.get_list("x-request-id") == ["from-app"]


# -- the user header ---------------------------------------------------------------------------


async def test_spoofed_user_header_is_ignored_when_untrusted(guard: Guard) -> None:
    probe = Probe()
    async with client(build_app(guard, probe, auth=None)) as http:
        with capture_logs() as logs:
            response = await http.get("/open/chat", headers={"xProxy-User-ID": "victim"})
    assert response.status_code == 200
    assert response.json()["user"] == ANONYMOUS_USER
    assert used(guard, "victim") == 0
    ignored = [e for e in logs if e["event"] == "untrusted_user_header"]
    assert len(ignored) == 1
    assert ignored[0]["log_level"] == "debug"
    assert "victim" not in repr(logs)


async def test_user_header_is_honoured_when_trusted(guard: Guard) -> None:
    probe = Probe()
    app = build_app(guard, probe, auth=None, trust_user_header=True)
    async with client(app) as http:
        response = await http.get("/open/chat", headers={"xproxy-user-id": "acme:carol"})
    assert response.json()["user"] == "acme:carol"
    assert used(guard, "acme:carol") == usd(cost_nano(100, 50))


async def test_sources_in_order_resolver_scope_header(guard: Guard) -> None:
    def resolver(request: Request) -> str | None:
        assert isinstance(request, Request)
        return request.headers.get("x-app-user")

    app = build_app(guard, Probe(), user=resolver, trust_user_header=True)
    headers = {**bearer("from-scope"), "xProxy-User-ID": "from-header"}
    async with client(app) as http:
        first = await http.get("/open/chat", headers={**headers, "x-app-user": "from-resolver"})
        second = await http.get("/open/chat", headers=headers)
        third = await http.get("/open/chat", headers={"xProxy-User-ID": "from-header"})
    assert first.json()["user"] == "from-resolver"
    assert second.json()["user"] == "from-scope"
    assert third.json()["user"] == "from-header"


TWO_USERS = [("xProxy-User-ID", "alice"), ("xProxy-User-ID", "bob")]
"""The user header twice: a proxy that appends instead of replacing, or a smuggling try."""


@pytest.mark.parametrize("on_invalid_user", ["reject", "anonymous"])
def test_duplicate_user_headers_are_a_400_over_a_real_server(
    guard: Guard, on_invalid_user: str
) -> None:
    probe = Probe()
    app = build_app(guard, probe, trust_user_header=True, on_invalid_user=on_invalid_user)
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            twice = http.get("/open/chat", headers=TWO_USERS)
            signed_in = http.get("/open/chat", headers=[*TWO_USERS, *bearer("carol").items()])
            listed = http.get("/open/chat", headers={"xProxy-User-ID": "alice,bob"})
    for response in (twice, signed_in, listed):
        assert response.status_code == 400, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert "names more than one user" in response.json()["detail"]
        assert "alice" not in response.text
    assert probe.calls == 0
    refused = [e for e in logs if e["event"] == "invalid_user_id"]
    assert [e["source"] for e in refused] == ["header"] * 3


async def test_duplicate_untrusted_user_headers_are_ignored(guard: Guard) -> None:
    async with client(build_app(guard, Probe())) as http:
        response = await http.get("/open/chat", headers=[*TWO_USERS, *bearer("carol").items()])
    assert response.json()["user"] == "carol"


async def test_the_authenticated_user_wins_over_a_trusted_header(guard: Guard) -> None:
    app = build_app(guard, Probe(), trust_user_header=True, guarded_paths=["/api/*"])
    exhaust(guard, "victim")
    async with client(app) as http:
        response = await http.get(
            "/api/chat", headers={**bearer("carol"), "xProxy-User-ID": "victim"}
        )
    assert response.status_code == 200  # gated as carol, not as the spent header user
    assert response.json()["user"] == "carol"
    assert used(guard, "carol") == usd(cost_nano(100, 50))


async def test_async_resolver(guard: Guard) -> None:
    async def resolver(request: Request) -> str:
        return "async-user"

    async with client(build_app(guard, Probe(), auth=None, user=resolver)) as http:
        response = await http.get("/open/chat")
    assert response.json()["user"] == "async-user"


async def test_set_user_inside_the_request_overrides(guard: Guard) -> None:
    async with client(build_app(guard, Probe())) as http:
        response = await http.get("/open/rename?to=acme:dave", headers=bearer("alice"))
    assert response.json()["user"] == "acme:dave"
    assert used(guard, "alice") == 0


# -- middleware order --------------------------------------------------------------------------


async def test_auth_inside_the_guard_is_detected_and_still_charged(guard: Guard) -> None:
    probe = Probe()
    app = build_app(guard, probe, auth="inside")
    async with client(app) as http:
        with capture_logs(processors=[merge]) as logs:
            first = await http.get("/open/chat", headers=bearer("alice"))
            second = await http.get("/open/chat", headers=bearer("bob"))
    assert first.json()["user"] == "alice"
    assert second.json()["user"] == "bob"
    warnings = [e for e in logs if e["event"] == "auth_middleware_order"]
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "app.add_middleware(AuthenticationMiddleware" in warnings[0]["detail"]
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert [e["user_id"] for e in calls] == ["alice", "bob"]


async def test_auth_inside_the_guard_still_wins_over_a_trusted_header(guard: Guard) -> None:
    # The guard read the header before the app's authentication ran (wrong order): the
    # authenticated user, once known, replaces it, as in the right order.
    app = build_app(guard, Probe(), auth="inside", trust_user_header=True)
    async with client(app) as http:
        with capture_logs(processors=[merge]) as logs:
            signed_in = await http.get(
                "/open/chat", headers={**bearer("alice"), "xProxy-User-ID": "acme:bob"}
            )
            header_only = await http.get("/open/chat", headers={"xProxy-User-ID": "acme:bob"})
    assert (signed_in.json()["user"], header_only.json()["user"]) == ("alice", "acme:bob")
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert [e["user_id"] for e in calls] == ["alice", "acme:bob"]


async def test_scope_writes_inside_reach_outer_middleware(guard: Guard) -> None:
    seen: dict[str, Any] = {}

    class Outer:
        def __init__(self, app: ASGIApp) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            await self.app(scope, receive, send)
            seen.update(user=scope.get("user"), endpoint=scope.get("endpoint"))

    app = build_app(guard, Probe(), auth="inside")
    async with client(Outer(app)) as http:
        await http.get("/open/chat", headers=bearer("alice"))
    assert seen["user"].display_name == "alice"
    assert seen["endpoint"] is not None


async def test_correct_order_does_not_warn(guard: Guard) -> None:
    async with client(build_app(guard, Probe())) as http:
        with capture_logs() as logs:
            await http.get("/open/chat", headers=bearer("alice"))
    assert not [e for e in logs if e["event"] == "auth_middleware_order"]


# -- the gate -------------------------------------------------------------------------------


def test_exhausted_user_gets_the_exact_429_before_the_app(guard: Guard) -> None:
    probe = Probe()
    exhaust(guard, "acme:alice")
    app = build_app(guard, probe, guarded_paths=["/api/*"])
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            response = http.get(
                "/api/chat", headers={**bearer("acme:alice"), "X-Request-ID": "r-429"}
            )
    assert probe.calls == 0
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "43200"
    assert response.headers["ratelimit-policy"] == '"daily";q=1000;w=86400'
    assert response.headers["ratelimit"] == '"daily";r=0;t=43200'
    assert response.headers["x-request-id"] == "r-429"
    assert response.json() == {
        "type": "urn:payi-guard:problem:budget-exceeded",
        "title": "Budget exceeded",
        "status": 429,
        "detail": "The user limit 'daily' is used up (0.001 of 0.001 USD); it resets at "
        "2026-11-28T00:00:00+00:00.",
        "limit": "daily",
        "scope": "user",
        "unit": "usd",
        "used": "0.001",
        "max": "0.001",
        "remaining": "0",
        "resets_at": "2026-11-28T00:00:00+00:00",
        "retry_after": 43200,
        "request_id": "r-429",
    }
    refused = [e for e in logs if e["event"] == "budget_exceeded"]
    assert refused[0]["user_id"] == "acme:alice"
    assert refused[0]["source"] == "gate"
    assert used(guard, "acme:alice") == Decimal("0.001")


async def test_unguarded_paths_are_not_gated(guard: Guard) -> None:
    probe = Probe()
    exhaust(guard, "alice")
    async with client(build_app(guard, probe, guarded_paths=["/api/*"])) as http:
        response = await http.get("/open/chat", headers=bearer("alice"))
    # The app ran; the GenAI call itself was refused and became the same answer.
    assert probe.calls == 1
    assert response.status_code == 429
    assert response.json()["limit"] == "daily"
    assert response.headers["retry-after"] == "43200"


async def test_block_status_is_configurable(guard: Guard) -> None:
    exhaust(guard, "alice")
    app = build_app(guard, Probe(), guarded_paths=["/api/*"], block_status=402)
    async with client(app) as http:
        response = await http.get("/api/chat", headers=bearer("alice"))
    assert response.status_code == 402
    assert response.json()["status"] == 402


async def test_budget_headers_on_success_are_opt_in(guard: Guard) -> None:
    plain = build_app(guard, Probe(), guarded_paths=["/api/*"])
    opted = build_app(guard, Probe(), guarded_paths=["/api/*"], budget_headers=True)
    async with client(plain) as http:
        response = await http.get("/api/chat", headers=bearer("alice"))
        assert "ratelimit" not in response.headers
    async with client(opted) as http:
        response = await http.get("/api/chat", headers=bearer("alice"))
        unguarded = await http.get("/open/chat", headers=bearer("alice"))
    # Read as the response started: the request's own call (200 micro-USD) counted,
    # after the one made through the plain app.
    assert response.headers["ratelimit"] == '"daily";r=600;t=43200'
    assert response.headers["ratelimit-policy"] == '"daily";q=1000;w=86400'
    assert "ratelimit" not in unguarded.headers


@pytest.mark.parametrize(("policy", "status"), [("block", 503), ("allow", 200)])
async def test_storage_failure_in_the_gate_follows_the_policy(
    make_guard: Callable[..., Guard], policy: str, status: int
) -> None:
    guard = make_guard(
        config(on_storage_error=policy), storage=f"redis://127.0.0.1:{free_port()}/0"
    )

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ran")

    app = GuardMiddleware(
        Starlette(routes=[Route("/api/x", ok)]),
        guard=guard,
        guarded_paths=["/api/*"],
        gate="storage",
    )
    async with client(app) as http:
        with capture_logs() as logs:
            response = await http.get("/api/x", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == status
    if status == 503:
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["type"] == "urn:payi-guard:problem:storage-unavailable"
    else:
        assert response.text == "ran"
    errors = [e for e in logs if e["event"] == "storage_error"]
    assert errors[0]["op"] == "gate"
    assert errors[0]["policy"] == policy


async def test_the_storage_gate_lets_a_smaller_call_through_after_a_big_one_was_refused(
    guard: Guard,
) -> None:
    # One request asks for more than the $0.001 day holds: refused at the call. The limit
    # then reads "exceeded" (the last call needed more than remains), but a smaller call
    # fits: the gate must let it reach the call, or the user is locked out all day.
    async def chat(request: Request) -> Response:
        await acall(guard, output_tokens=int(request.query_params["out"]))
        return PlainTextResponse("ran")

    app = GuardMiddleware(
        Starlette(routes=[Route("/api/chat", chat)]),
        guard=guard,
        guarded_paths=["/api/*"],
        gate="storage",
        trust_user_header=True,
    )
    async with client(app) as http:
        big = await http.get("/api/chat?out=100000", headers={"xProxy-User-ID": "alice"})
        assert big.status_code == 429
        assert guard.usage("alice")[0].state == "exceeded"
        small = await http.get("/api/chat?out=10", headers={"xProxy-User-ID": "alice"})
        assert (small.status_code, small.text) == (200, "ran")
    assert guard.usage("alice")[0].state == "ok"
    # Spent to the last nano-dollar, the gate refuses before the endpoint runs.
    exhaust(guard, "bob")
    async with client(app) as http:
        spent = await http.get("/api/chat?out=10", headers={"xProxy-User-ID": "bob"})
    assert spent.status_code == 429


# -- invalid ids and anonymous strategies -------------------------------------------------------


async def test_invalid_user_id_gets_400_without_echo(guard: Guard) -> None:
    probe = Probe()
    async with client(build_app(guard, probe)) as http:
        with capture_logs(processors=[merge]) as logs:
            response = await http.get("/open/chat", headers=bearer("evil user<script>"))
    assert response.status_code == 400
    # The warning carries the request id the 400 answered with.
    (warned,) = [e for e in logs if e["event"] == "invalid_user_id"]
    assert warned["request_id"] == response.json()["request_id"]
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["type"] == "urn:payi-guard:problem:invalid-user-id"
    assert "whitespace" in body["detail"]
    assert "evil" not in response.text
    assert "evil" not in repr(logs)
    assert probe.calls == 0


async def test_a_user_seen_before_is_still_checked_on_every_request(guard: Guard) -> None:
    # A valid id is remembered; an id validated elsewhere with a larger max_length is
    # not, so the middleware's quick path for known users never lets it through.
    long_id = "u" * 129
    assert normalize_user_id(long_id, max_length=200) == long_id
    probe = Probe()
    async with client(build_app(guard, probe)) as http:
        assert (await http.get("/open/chat", headers=bearer("alice"))).status_code == 200
        assert (await http.get("/open/chat", headers=bearer("alice"))).status_code == 200
        response = await http.get("/open/chat", headers=bearer(long_id))
        assert response.status_code == 400
        assert "long" in response.json()["detail"]
    assert probe.calls == 2
    assert probe.users == ["alice", "alice"]


async def test_the_user_object_is_read_once_per_request(guard: Guard) -> None:
    # An app's user object may compute its id (a lookup, a join): the middleware reads
    # it once a request, for a user it has not seen before as for one it has.
    reads: list[str] = []

    class CountingUser(SimpleUser):
        @property
        def identity(self) -> str:
            reads.append(self.username)
            if self.username == "bad":
                raise InvalidUserId("the app's lookup refused this user")
            return f"acme:{self.username}"

    class CountingBackend(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, SimpleUser] | None:
            header = conn.headers.get("authorization", "")
            return AuthCredentials(["authenticated"]), CountingUser(header[len("Bearer ") :])

    probe = Probe()
    app = build_app(guard, probe, auth=None)
    app.add_middleware(AuthenticationMiddleware, backend=CountingBackend())
    first_seen = f"first-{new_id()}"
    async with client(app) as http:
        for _ in range(2):
            response = await http.get("/open/chat", headers=bearer(first_seen))
            assert response.status_code == 200, response.text
            assert response.json()["user"] == f"acme:{first_seen}"
            assert reads == [first_seen]
            reads.clear()
        refused = await http.get("/open/chat", headers=bearer("bad"))
        assert refused.status_code == 400
        assert reads == ["bad"]  # an id the user object refuses is read once too
    assert probe.calls == 2


async def test_invalid_id_from_a_resolver_or_set_user(guard: Guard) -> None:
    app = build_app(guard, Probe(), auth=None, user=lambda request: "no spaces allowed")
    async with client(app) as http:
        assert (await http.get("/open/chat")).status_code == 400
    async with client(build_app(guard, Probe())) as http:
        response = await http.get("/open/rename?to=bad%20id", headers=bearer("alice"))
    assert response.status_code == 400
    assert "bad id" not in response.text


async def test_invalid_user_fallback_anonymous(guard: Guard) -> None:
    app = build_app(guard, Probe(), on_invalid_user="anonymous")
    async with client(app) as http:
        response = await http.get("/open/chat", headers=bearer("evil user"))
    assert response.status_code == 200
    assert response.json()["user"] == ANONYMOUS_USER


async def test_anonymous_reject_answers_401(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(anonymous={"strategy": "reject"}))
    probe = Probe()
    app = build_app(guard, probe, guarded_paths=["/api/*"], www_authenticate="Bearer")
    async with client(app) as http:
        gated = await http.get("/api/chat")
        assert probe.calls == 0
        preflight = await http.options("/api/chat")
        assert preflight.status_code == 405  # the app answered: preflights are not gated
        escaped = await http.get("/open/chat")
        assert probe.calls == 1
        authenticated = await http.get("/api/chat", headers=bearer("alice"))
    for response in (gated, escaped):
        assert response.status_code == 401
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["type"] == "urn:payi-guard:problem:user-required"
    assert authenticated.status_code == 200


SESSION = config(anonymous={"strategy": "session", "limits": [{"max": 0.001, "per": "day"}]})
"""Anonymous calls get $0.001 a day per session: five calls of $0.0002."""


async def test_fresh_raw_session_cookies_share_one_bucket(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(SESSION)
    statuses = []
    async with client(build_app(guard, Probe(), auth=None)) as http:
        with capture_logs() as logs:
            for i in range(40):
                cookie = f"session_id=fresh-{i}; session=fresh-{i}"
                response = await http.get("/open/chat", headers={"cookie": cookie})
                statuses.append(response.status_code)
    assert statuses == [200] * 5 + [429] * 35
    charged = {e["user_id"] for e in logs if e["event"] == "genai_call"}
    assert charged == {ANONYMOUS_USER}
    assert guard.usage(ANONYMOUS_USER)[0].state == "exceeded"


def _session_app(guard: Guard) -> Starlette:
    app = build_app(guard, Probe(), auth=None)
    app.add_middleware(SessionMiddleware, secret_key="test-secret-not-for-production")
    return app


async def test_a_signed_starlette_session_gets_its_own_bucket_from_its_second_request(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(SESSION)
    app = _session_app(guard)
    async with client(app) as http:
        first = await http.get("/open/chat")
        second = await http.get("/open/chat")
        third = await http.get("/open/chat")
    # A session the guard had not seen yet is charged to the shared bucket: a client that
    # drops its cookie gets nothing more than anyone else.
    assert first.json()["user"] == ANONYMOUS_USER
    bucket = second.json()["user"]
    assert bucket.startswith("anonymous:")
    assert third.json()["user"] == bucket
    assert used(guard, bucket) == usd(2 * cost_nano(100, 50))
    assert used(guard, ANONYMOUS_USER) == usd(cost_nano(100, 50))
    async with client(app) as other:  # another visitor, another session
        await other.get("/open/chat")
        assert (await other.get("/open/chat")).json()["user"] not in (bucket, ANONYMOUS_USER)


async def test_a_forged_session_cookie_is_the_shared_bucket(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(SESSION)
    async with client(_session_app(guard)) as http:
        await http.get("/open/chat")
        forged = {"cookie": "session=eyJwYXlpX2d1YXJkLnNlc3Npb24iOiAiZm9yZ2VkIn0="}
        http.cookies.clear()
        response = await http.get("/open/chat", headers=forged)
    assert response.json()["user"] == ANONYMOUS_USER


@pytest.mark.parametrize("named", ["anonymous", "anonymous:kiosk-1"])
async def test_a_user_named_anonymous_is_the_anonymous_bucket(guard: Guard, named: str) -> None:
    # config(): users get $0.001 a day under "daily"; the anonymous bucket has its own
    # $0.001 as "anonymous:0". Four calls through the middleware, one recorded elsewhere.
    app = build_app(guard, Probe(), auth=None, trust_user_header=True)
    guard.record(user_id=named, model=MODEL, input_tokens=200, output_tokens=0)
    async with client(app) as http:
        statuses = [
            (await http.get("/open/chat", headers={"xProxy-User-ID": named})).status_code
            for _ in range(5)
        ]
        refused = await http.get("/open/chat", headers={"xProxy-User-ID": named})
    assert statuses == [200, 200, 200, 200, 429]
    problem = refused.json()
    assert (problem["limit"], problem["scope"]) == ("anonymous:0", "anonymous")
    (usage,) = guard.usage(named)
    assert (usage.scope, usage.state) == ("anonymous", "exceeded")


async def test_session_id_option(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(
        config(anonymous={"strategy": "session", "limits": [{"max": 0.001, "per": "day"}]})
    )

    async def device(request: Request) -> str | None:
        return request.headers.get("x-device-id")

    app = build_app(guard, Probe(), auth=None, session_id=device)
    async with client(app) as http:
        response = await http.get("/open/chat", headers={"x-device-id": "dev42"})
    assert response.json()["user"] == "anonymous:dev42"


# -- refusals escaping the app, streams ------------------------------------------------------------


def _stream_app(guard: Guard, after_first_chunk: Callable[[], Any]) -> Starlette:
    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await after_first_chunk()
            yield b"data: two\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/stream", stream)])


async def test_refusal_mid_stream_is_logged_and_closes_the_response(guard: Guard) -> None:
    exhaust(guard, "alice")

    async def spend() -> None:
        await acall(guard)

    recorder = MessageRecorder(
        GuardMiddleware(_stream_app(guard, spend), guard=guard, trust_user_header=True)
    )
    async with client(recorder) as http:
        with capture_logs() as logs:
            response = await http.get("/stream", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 200
    assert response.text == "data: one\n\n"
    assert len(recorder.starts()) == 1
    assert recorder.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    after = [e for e in logs if e["event"] == "budget_exceeded_after_start"]
    assert [(e["user_id"], e["limit"]) for e in after] == [("alice", "daily")]


def test_refusal_mid_stream_over_a_real_server(guard: Guard) -> None:
    exhaust(guard, "alice")

    async def spend() -> None:
        await acall(guard)

    app = GuardMiddleware(_stream_app(guard, spend), guard=guard, trust_user_header=True)
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            response = http.get("/stream", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 200
    assert response.text == "data: one\n\n"
    after = [e for e in logs if e["event"] == "budget_exceeded_after_start"]
    assert [(e["user_id"], e["limit"]) for e in after] == [("alice", "daily")]


async def test_other_errors_mid_stream_propagate(guard: Guard) -> None:
    async def boom() -> None:
        raise RuntimeError("app bug")

    app = GuardMiddleware(_stream_app(guard, boom), guard=guard)
    async with client(app) as http:
        with pytest.raises(RuntimeError, match="app bug"):
            await http.get("/stream")


async def test_non_guard_errors_before_start_propagate(guard: Guard) -> None:
    async def broken(request: Request) -> Response:
        raise KeyError("nope")

    app = GuardMiddleware(Starlette(routes=[Route("/", broken)]), guard=guard)
    async with client(app) as http:
        with pytest.raises(KeyError):
            await http.get("/")


# -- a refusal before the first body byte is a 429, never an empty 200 -----------------------


class Gauge:
    """An app's view of what reached the server: the recorder outside the guard."""

    def __init__(self) -> None:
        self.recorder: MessageRecorder | None = None
        self.seen: list[list[str]] = []

    def snapshot(self) -> None:
        assert self.recorder is not None
        self.seen.append([m["type"] for m in self.recorder.messages])


def _refused_stream_app(guard: Guard, probe: Probe, *, first: bytes | None) -> Starlette:
    """``/api/stream`` and ``/open/stream``: a stream whose GenAI call is refused at once.

    ``first`` is sent before the call (``b""``: an empty chunk, which carries no byte).
    """

    async def stream(request: Request) -> StreamingResponse:
        probe.calls += 1

        async def body() -> AsyncIterator[bytes]:
            if first is not None:
                yield first
            await acall(guard)
            yield b"data: never\n\n"

        return StreamingResponse(body(), media_type="text/event-stream")

    return Starlette(routes=[Route("/api/stream", stream), Route("/open/stream", stream)])


@pytest.mark.parametrize("first", [None, b""], ids=["no-chunk", "empty-chunk"])
def test_refused_stream_before_its_first_byte_is_a_429_over_a_real_server(
    guard: Guard, first: bytes | None
) -> None:
    probe = Probe()
    spend_most(guard, "alice")
    app = GuardMiddleware(
        _refused_stream_app(guard, probe, first=first),
        guard=guard,
        trust_user_header=True,
        guarded_paths=["/api/*"],
    )
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            response = http.get("/api/stream", headers={"xProxy-User-ID": "alice"})
    assert probe.calls == 1  # the app ran: the refusal came from inside the stream
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "43200"
    assert response.json()["limit"] == "daily"
    assert response.json()["remaining"] == "0.0001"
    assert not [e for e in logs if e["event"] == "budget_exceeded_after_start"]


async def test_a_guarded_start_waits_for_the_first_body_chunk_and_is_sent_once(
    guard: Guard,
) -> None:
    gauge = Gauge()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        gauge.snapshot()
        await send({"type": "http.response.body", "body": b"", "more_body": True})
        gauge.snapshot()
        await send({"type": "http.response.body", "body": b"one", "more_body": True})
        gauge.snapshot()  # the first chunk went out at once: nothing more is buffered
        await send({"type": "http.response.body", "body": b"two", "more_body": False})

    recorder = MessageRecorder(GuardMiddleware(app, guard=guard, guarded_paths=["/api/*"]))
    gauge.recorder = recorder
    async with client(recorder) as http:
        response = await http.get("/api/x")
    assert response.text == "onetwo"
    assert gauge.seen == [
        [],
        [],
        ["http.response.start", "http.response.body"],
    ]
    assert len(recorder.starts()) == 1
    assert [m.get("body") for m in recorder.messages[1:]] == [b"one", b"two"]


async def test_a_guarded_empty_response_is_sent_at_its_end(guard: Guard) -> None:
    async def no_content(request: Request) -> Response:
        return Response(status_code=204)

    app = GuardMiddleware(
        Starlette(routes=[Route("/api/x", no_content)]), guard=guard, guarded_paths=["/api/*"]
    )
    async with client(app) as http:
        response = await http.get("/api/x")
    assert response.status_code == 204
    assert response.content == b""


async def test_unguarded_paths_send_the_start_untouched(guard: Guard) -> None:
    gauge = Gauge()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        gauge.snapshot()
        await send({"type": "http.response.body", "body": b"ok"})

    recorder = MessageRecorder(GuardMiddleware(app, guard=guard, guarded_paths=["/api/*"]))
    gauge.recorder = recorder
    async with client(recorder) as http:
        response = await http.get("/open/x")
    assert response.text == "ok"
    assert gauge.seen == [["http.response.start"]]


async def test_a_guarded_stream_refused_after_its_first_chunk_is_closed_and_logged(
    guard: Guard,
) -> None:
    spend_most(guard, "alice")
    recorder = MessageRecorder(
        GuardMiddleware(
            _refused_stream_app(guard, Probe(), first=b"data: one\n\n"),
            guard=guard,
            trust_user_header=True,
            guarded_paths=["/api/*"],
        )
    )
    async with client(recorder) as http:
        with capture_logs() as logs:
            response = await http.get("/api/stream", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 200
    assert response.text == "data: one\n\n"
    assert len(recorder.starts()) == 1
    after = [e for e in logs if e["event"] == "budget_exceeded_after_start"]
    assert [(e["user_id"], e["limit"]) for e in after] == [("alice", "daily")]


async def test_a_guarded_non_guard_error_before_the_first_byte_propagates(guard: Guard) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("app bug")

    recorder = MessageRecorder(GuardMiddleware(app, guard=guard, guarded_paths=["/api/*"]))
    async with client(recorder) as http:
        with pytest.raises(RuntimeError, match="app bug"):
            await http.get("/api/x")
    assert recorder.starts() == []  # the server, not a half-sent 200, answers it


# -- hostile input is never shown raw --------------------------------------------------------


HOSTILE = "<script>alert('x')</script>\"; drop"


@pytest.mark.parametrize("field", ["user-header", "scope-user", "request-id", "cookie"])
def test_hostile_values_are_never_shown_raw_over_a_real_server(
    make_guard: Callable[..., Guard], field: str
) -> None:
    guard = make_guard(SESSION)
    app = build_app(guard, Probe(), trust_user_header=True, guarded_paths=["/api/*"])
    headers = {
        "user-header": {"xProxy-User-ID": HOSTILE},
        "scope-user": bearer(HOSTILE),
        "request-id": {"X-Request-ID": HOSTILE},
        "cookie": {"cookie": f"session={HOSTILE}; session_id={HOSTILE}"},
    }[field]
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        with capture_logs(processors=[merge]) as logs:
            response = http.get("/api/chat", headers=headers)
    shown = response.text + repr(response.headers) + repr(logs)
    for piece in ("<script", "alert(", "drop"):
        assert piece not in shown
    assert response.status_code in (200, 400)


# -- scopes that are not http ---------------------------------------------------------------


def test_websocket_and_lifespan_pass_through_untouched(guard: Guard) -> None:
    seen: dict[str, Any] = {}

    async def echo(websocket: WebSocket) -> None:
        seen["request"] = current_request()
        seen["scope_keys"] = set(websocket.scope)
        await websocket.accept()
        text = await websocket.receive_text()
        await websocket.send_text(f"echo {text}")
        await websocket.close()

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        seen["started"] = True
        yield
        seen["stopped"] = True

    from contextlib import asynccontextmanager

    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(GuardMiddleware, guard=guard)],
        lifespan=asynccontextmanager(lifespan),
    )
    with TestClient(app) as test_client:
        with test_client.websocket_connect("/ws") as websocket:
            websocket.send_text("hi")
            assert websocket.receive_text() == "echo hi"
        assert seen["started"] is True
    assert seen["stopped"] is True
    assert seen["request"] is None
    assert "user" not in seen["scope_keys"]


def test_problem_body_is_json_for_every_status(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(anonymous={"strategy": "reject"}))
    app = build_app(guard, Probe(), guarded_paths=["/api/*"])
    with TestClient(app) as test_client:
        response = test_client.get("/api/chat")
    assert response.status_code == 401
    assert json.loads(response.content)["status"] == 401
    assert int(response.headers["content-length"]) == len(response.content)
