"""FastAPI: dependency-based users, per-route gates, handlers, streams, concurrency."""

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import httpx
import openai
import pytest
import structlog
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import StreamingResponse
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from structlog.testing import capture_logs

from payi_guard import track_context
from payi_guard.context import current_request, get_context, set_user
from payi_guard.engine import CallRequest, Guard, UnknownModelRefused
from payi_guard.fastapi import (
    BudgetHTTPException,
    guard_user,
    install_exception_handlers,
    require_budget,
)
from payi_guard.pricing import TokenUsage
from payi_guard.testing import FakeProvider
from payi_guard.web import GuardMiddleware
from web._support import (
    MODEL,
    MessageRecorder,
    TokenBackend,
    acall,
    bearer,
    call,
    config,
    cost_nano,
    exhaust,
    exhaust_anonymous,
    serve_asgi,
    spend_most,
    sse_of_sdk_stream,
    usd,
    used,
)

merge = structlog.contextvars.merge_contextvars


@dataclass
class User:
    id: str
    name: str


def _user_from(authorization: str | None) -> User | None:
    if authorization is None or not authorization.startswith("Bearer "):
        return None
    token = authorization[len("Bearer ") :]
    return User(id=token, name=token.title())


async def current_user_async(authorization: Annotated[str | None, Header()] = None) -> User | None:
    return _user_from(authorization)


def current_user_sync(authorization: Annotated[str | None, Header()] = None) -> User | None:
    return _user_from(authorization)


def app_with_dependencies(guard: Guard, seen: dict[str, Any]) -> FastAPI:
    app = FastAPI()
    async_user = guard_user(current_user_async, id=lambda u: u.id)
    sync_user = guard_user(current_user_sync, id=lambda u: u.id)

    def sets_user_itself(authorization: Annotated[str | None, Header()] = None) -> str | None:
        # A plain sync dependency: FastAPI runs it in its thread pool.
        seen["dependency_thread"] = threading.get_ident()
        user = _user_from(authorization)
        if user is not None:
            set_user(user.id)
        return None if user is None else user.id

    @app.get("/async-dep")
    async def with_async(user: Annotated[User | None, Depends(async_user)]) -> dict[str, Any]:
        structlog.get_logger("app").info("in_endpoint")
        record = await acall(guard)
        return {"user": record.user_id, "name": None if user is None else user.name}

    @app.get("/sync-dep")
    def with_sync(user: Annotated[User | None, Depends(sync_user)]) -> dict[str, Any]:
        record = call(guard)
        return {"user": record.user_id, "context": get_context().user_id}

    @app.get("/direct")
    async def direct(user_id: Annotated[str | None, Depends(sets_user_itself)]) -> dict[str, Any]:
        seen["endpoint_thread"] = threading.get_ident()
        seen["endpoint_user"] = get_context().user_id
        first = await acall(guard)
        second = await asyncio.to_thread(call, guard)  # a later call, in another thread
        return {"users": [first.user_id, second.user_id]}

    app.add_middleware(GuardMiddleware, guard=guard)
    return app


async def test_async_dependency_names_the_user(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(limits={"daily": {"max": 10, "per": "day"}}))
    app = app_with_dependencies(guard, {})
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        with capture_logs(processors=[merge]) as logs:
            response = await http.get("/async-dep", headers=bearer("acme:alice"))
            anonymous = await http.get("/async-dep")
    assert response.json() == {"user": "acme:alice", "name": "Acme:Alice"}
    assert anonymous.json() == {"user": "anonymous", "name": None}
    assert used(guard, "acme:alice") == usd(cost_nano(100, 50))
    # The user named by the dependency is bound for the app's own log lines too.
    endpoint_lines = [e for e in logs if e["event"] == "in_endpoint"]
    assert [e["user_id"] for e in endpoint_lines] == ["acme:alice", None]
    assert structlog.contextvars.get_contextvars() == {}


async def test_sync_dependency_in_the_thread_pool(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(limits={"daily": {"max": 10, "per": "day"}}))
    seen: dict[str, Any] = {}
    app = app_with_dependencies(guard, seen)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        wrapped = await http.get("/sync-dep", headers=bearer("bob"))
        direct = await http.get("/direct", headers=bearer("carol"))
    assert wrapped.json() == {"user": "bob", "context": "bob"}
    assert direct.json() == {"users": ["carol", "carol"]}
    assert seen["dependency_thread"] != seen["endpoint_thread"]
    assert seen["endpoint_user"] == "carol"
    assert used(guard, "carol") == usd(2 * cost_nano(100, 50))


def test_sse_stream_settles_after_the_last_chunk(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(limits={"daily": {"max": 10, "per": "day"}}))
    seen: dict[str, Any] = {}
    app = FastAPI()

    @app.get("/sse")
    async def sse(request: Request) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            reservation = await guard.abegin(
                CallRequest(model=MODEL, input_tokens=30, max_output_tokens=20, stream=True)
            )
            for i in range(3):
                yield f"data: token {i}\n\n"
            # Resumed only after the last chunk went out.
            seen["messages_before_settle"] = len(recorder.messages)
            seen["scope"] = current_request()
            seen["scope_user"] = None if seen["scope"] is None else seen["scope"].user_id
            structlog.get_logger("app").info("stream_done")
            record = await reservation.asettle(TokenUsage(30, 20))
            seen["record"] = record

        return StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(GuardMiddleware, guard=guard)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    recorder = MessageRecorder(app)

    with serve_asgi(recorder) as url, httpx.Client(base_url=url) as http:
        with capture_logs(processors=[merge]) as logs:
            with http.stream(
                "GET", "/sse", headers={**bearer("acme:erin"), "X-Request-ID": "sse-1"}
            ) as response:
                body = "".join(response.iter_text())
    assert response.status_code == 200
    assert body == "data: token 0\n\ndata: token 1\n\ndata: token 2\n\n"
    # start + three data chunks were sent before the settle; the end of body after it.
    assert seen["messages_before_settle"] == 4
    assert recorder.messages[-1]["more_body"] is False
    assert seen["scope"] is not None
    assert seen["scope_user"] == "acme:erin"
    assert seen["record"].user_id == "acme:erin"
    assert used(guard, "acme:erin") == usd(cost_nano(30, 20))
    done = [e for e in logs if e["event"] == "stream_done"]
    assert [(e["user_id"], e["request_id"]) for e in done] == [("acme:erin", "sse-1")]
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert [(e["user_id"], e["request_id"], e["stream"]) for e in calls] == [
        ("acme:erin", "sse-1", True)
    ]


def test_200_parallel_requests_over_20_users_are_attributed_exactly(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(config(limits={"daily": {"max": 100, "per": "day"}}))
    app = FastAPI()

    @app.get("/api/async/{n}")
    async def async_chat(n: int) -> dict[str, Any]:
        await asyncio.sleep(0)
        record = await acall(guard, input_tokens=n, output_tokens=n % 7)
        return {"user": record.user_id}

    @app.get("/api/sync/{n}")
    def sync_chat(n: int) -> dict[str, Any]:
        record = call(guard, input_tokens=n, output_tokens=n % 7)
        return {"user": record.user_id}

    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"])
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())

    users = [f"org{i % 4}:user{i}" for i in range(20)]
    plan = [(i, users[i % 20], "async" if i % 2 else "sync") for i in range(200)]

    async def run(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
            return await asyncio.gather(
                *(
                    http.get(
                        f"/api/{kind}/{100 + i}",
                        headers={**bearer(user), "X-Request-ID": f"req-{i}"},
                    )
                    for i, user, kind in plan
                )
            )

    with serve_asgi(app) as url, capture_logs() as logs:
        responses = asyncio.run(run(url))
    assert [r.status_code for r in responses] == [200] * 200
    assert [r.json()["user"] for r in responses] == [user for _, user, _ in plan]
    for user in users:
        expected = sum(cost_nano(100 + i, (100 + i) % 7) for i, u, _ in plan if u == user)
        assert used(guard, user) == usd(expected), user
    user_of_request = {f"req-{i}": user for i, user, _ in plan}
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert len(calls) == 200
    assert {e["request_id"]: e["user_id"] for e in calls} == user_of_request


# -- require_budget and the exception handlers -----------------------------------------------------


async def test_require_budget_under_the_middleware(guard: Guard) -> None:
    app = FastAPI()
    calls = []
    current_user = guard_user(current_user_async, id=lambda u: u.id)
    budget = require_budget(guard, user=current_user)

    @app.get("/chat", dependencies=[Depends(budget)])
    async def chat(user: Annotated[User | None, Depends(current_user)]) -> dict[str, Any]:
        calls.append(user)
        record = await acall(guard)
        return {"user": record.user_id}

    app.add_middleware(GuardMiddleware, guard=guard)
    exhaust(guard, "alice")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        refused = await http.get("/chat", headers=bearer("alice"))
        allowed = await http.get("/chat", headers=bearer("bob"))
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "43200"
    assert refused.headers["ratelimit"] == '"daily";r=0;t=43200'
    assert refused.json()["limit"] == "daily"
    assert refused.json()["request_id"] == refused.headers["x-request-id"]
    assert allowed.json() == {"user": "bob"}
    assert [u.id for u in calls if u is not None] == ["bob"]


def _anonymous_app(guard: Guard, *, handlers: bool, budget_headers: bool = False) -> FastAPI:
    app = FastAPI()

    @app.get("/gated", dependencies=[Depends(require_budget(guard, budget_headers=budget_headers))])
    async def gated() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/spend")
    async def spend() -> dict[str, str]:
        record = await acall(guard)
        return {"user": record.user_id}

    if handlers:
        install_exception_handlers(app, guard)
    return app


async def test_require_budget_without_middleware_with_handlers(guard: Guard) -> None:
    exhaust_anonymous(guard)
    transport = httpx.ASGITransport(app=_anonymous_app(guard, handlers=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        gated = await http.get("/gated")
        spent = await http.get("/spend")
    for response in (gated, spent):
        assert response.status_code == 429
        assert response.headers["content-type"] == "application/problem+json"
        assert response.headers["retry-after"] == "43200"
        body = response.json()
        assert (body["limit"], body["scope"], body["retry_after"]) == (
            "anonymous:0",
            "anonymous",
            43200,
        )
        assert "request_id" not in body


async def test_require_budget_without_handlers_is_an_http_exception(guard: Guard) -> None:
    exhaust_anonymous(guard)
    transport = httpx.ASGITransport(app=_anonymous_app(guard, handlers=False))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.get("/gated")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "43200"
    assert response.headers["ratelimit-policy"] == '"anonymous:0";q=1000;w=86400'
    assert response.json()["detail"]["type"] == "urn:payi-guard:problem:budget-exceeded"
    assert issubclass(BudgetHTTPException, HTTPException)


async def test_require_budget_headers_on_success(guard: Guard) -> None:
    app = _anonymous_app(guard, handlers=True, budget_headers=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        response = await http.get("/gated")
    assert response.status_code == 200
    assert response.headers["ratelimit"] == '"anonymous:0";r=1000;t=43200'


async def test_reject_strategy_through_require_budget_and_handlers(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(config(anonymous={"strategy": "reject"}))
    transport = httpx.ASGITransport(app=_anonymous_app(guard, handlers=True))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        gated = await http.get("/gated")
        spent = await http.get("/spend")
    assert gated.status_code == spent.status_code == 401
    assert gated.json()["type"] == spent.json()["type"] == "urn:payi-guard:problem:user-required"


async def test_handlers_and_middleware_mid_stream(guard: Guard) -> None:
    """With handlers installed, Starlette wraps a late refusal; the middleware still closes."""
    exhaust(guard, "alice")
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b"first"
            await acall(guard)
            yield b"second"

        return StreamingResponse(body())

    install_exception_handlers(app, guard)
    app.add_middleware(GuardMiddleware, guard=guard, trust_user_header=True)
    recorder = MessageRecorder(app)
    transport = httpx.ASGITransport(app=recorder)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        with capture_logs() as logs:
            response = await http.get("/stream", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 200
    assert response.text == "first"
    assert len(recorder.starts()) == 1
    assert [e["event"] for e in logs if e["event"] == "budget_exceeded_after_start"] == [
        "budget_exceeded_after_start"
    ]


def test_guard_user_validates_its_arguments() -> None:
    with pytest.raises(TypeError):
        guard_user("not callable")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        guard_user(current_user_sync, id="id")  # type: ignore[arg-type]


def _sdk_stream_app(guard: Guard, provider: FakeProvider, *, handlers: bool) -> FastAPI:
    """``/api/stream`` streams a real OpenAI SDK call, as an app would write it."""
    llm = guard.wrap(
        openai.AsyncOpenAI(base_url=provider.openai_base_url, api_key="k", max_retries=0)
    )
    app = FastAPI()

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(sse_of_sdk_stream(llm, 50), media_type="text/event-stream")

    if handlers:
        install_exception_handlers(app, guard)
    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"])
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    return app


@pytest.mark.parametrize("handlers", [False, True], ids=["plain", "with-handlers"])
def test_a_refused_sdk_stream_is_a_429_over_a_real_server(guard: Guard, handlers: bool) -> None:
    spend_most(guard, "alice")
    with FakeProvider() as provider:
        app = _sdk_stream_app(guard, provider, handlers=handlers)
        with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
            with capture_logs() as logs:
                response = http.get("/api/stream", headers=bearer("alice"))
                fresh = http.get("/api/stream", headers=bearer("bob"))
        assert len(provider.requests) == 1  # bob's; alice's call was refused before sending
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["limit"] == "daily"
    assert fresh.status_code == 200
    assert fresh.text.startswith("data: ")
    refused = [e for e in logs if e["event"] == "budget_exceeded"]
    assert [e["user_id"] for e in refused] == ["alice"]
    assert not [e for e in logs if e["event"] == "budget_exceeded_after_start"]


def test_the_dependency_user_wins_over_a_trusted_header_and_duplicates_are_a_400(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(config(limits={"daily": {"max": 10, "per": "day"}}))
    app = FastAPI()
    user = guard_user(current_user_async, id=lambda u: u.id)

    @app.get("/chat")
    async def chat(_: Annotated[User | None, Depends(user)]) -> dict[str, Any]:
        record = await acall(guard)
        return {"user": record.user_id}

    app.add_middleware(GuardMiddleware, guard=guard, trust_user_header=True)
    two = [("xProxy-User-ID", "alice"), ("xProxy-User-ID", "bob")]
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        signed_in = http.get("/chat", headers={**bearer("carol"), "xProxy-User-ID": "dave"})
        header_only = http.get("/chat", headers={"xProxy-User-ID": "dave"})
        twice = http.get("/chat", headers=[*two, *bearer("carol").items()])
    assert signed_in.json() == {"user": "carol"}
    assert header_only.json() == {"user": "dave"}
    assert twice.status_code == 400
    assert "names more than one user" in twice.json()["detail"]
    assert used(guard, "carol") == usd(cost_nano(100, 50))


def test_an_unknown_model_refusal_is_logged_once_through_the_middleware_and_directly(
    guard: Guard,
) -> None:
    with FakeProvider() as provider:
        llm = guard.wrap(
            openai.OpenAI(base_url=provider.openai_base_url, api_key="k", max_retries=3)
        )

        def ask() -> None:
            llm.chat.completions.create(
                model="no-such-model",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=5,
            )

        app = FastAPI()

        @app.get("/api/chat")
        def chat() -> dict[str, str]:
            ask()
            return {"reply": "never"}

        app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"])
        app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
        with capture_logs() as logs:
            with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
                response = http.get(
                    "/api/chat", headers={**bearer("acme:alice"), "X-Request-ID": "u-1"}
                )
            with track_context(user_id="bob"), pytest.raises(UnknownModelRefused):
                ask()  # a direct metered call, outside any request
        assert provider.requests == []
    assert response.status_code == 500  # the app did not handle the SDK's 403 error
    lines = [e for e in logs if e["event"] == "unknown_model"]
    # The fake provider is not api.openai.com: an OpenAI-compatible endpoint.
    assert [(e["user_id"], e["model"], e["provider"]) for e in lines] == [
        ("acme:alice", "no-such-model", "openai-compatible"),
        ("bob", "no-such-model", "openai-compatible"),
    ]
    assert [e["unknown_model"] for e in lines] == ["block", "block"]
    assert [e["request_id"] for e in lines] == ["u-1", None]
