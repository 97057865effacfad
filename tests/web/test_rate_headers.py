"""``budget_headers``: the ``RateLimit`` of a response counts what the request itself spent.

Real apps served by uvicorn, the real OpenAI SDK against the fake provider: each response's
``r`` is what the next request can still use, read as the response starts (for a stream,
at its first byte, with the stream's own reservation held).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
from fastapi import Depends, FastAPI
from fastapi.responses import StreamingResponse
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request

from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.fastapi import guard_user, require_budget
from payi_guard.testing import FakeProvider
from payi_guard.web import GuardMiddleware
from web._support import MODEL, TokenBackend, bearer, config, serve_asgi, sse_of_sdk_stream

THREE_A_DAY = config(limits={"calls": {"requests": 3, "per": "day"}}, default=["calls"])


def _app(guard: Guard, provider: FakeProvider, **middleware: Any) -> FastAPI:
    llm = guard.wrap(
        openai.AsyncOpenAI(base_url=provider.openai_base_url, api_key="k", max_retries=0)
    )
    app = FastAPI()

    @app.get("/api/chat")
    async def chat() -> dict[str, str]:
        answer = await llm.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=20
        )
        return {"text": answer.choices[0].message.content or ""}

    @app.get("/api/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(sse_of_sdk_stream(llm, 20), media_type="text/event-stream")

    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"], **middleware)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    return app


def _remaining(response: httpx.Response) -> str:
    return response.headers["ratelimit"].split(";")[1]


def test_each_response_counts_its_own_call(clock: FakeClock) -> None:
    guard = Guard(THREE_A_DAY, clock=clock)
    with FakeProvider() as provider:
        app = _app(guard, provider, budget_headers=True)
        with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
            answers = [http.get("/api/chat", headers=bearer("alice")) for _ in range(4)]
        assert len(provider.requests) == 3
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    # What the next request can use: after the third, nothing, and the fourth is refused.
    assert [_remaining(a) for a in answers] == ["r=2", "r=1", "r=0", "r=0"]
    assert [u.remaining for u in guard.usage("alice")] == [0]


def test_a_stream_counts_its_call_at_its_first_byte(clock: FakeClock) -> None:
    guard = Guard(THREE_A_DAY, clock=clock)
    with FakeProvider() as provider:
        app = _app(guard, provider, budget_headers=True)
        with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
            first = http.get("/api/stream", headers=bearer("bob"))
            second = http.get("/api/stream", headers=bearer("bob"))
    assert (first.status_code, second.status_code) == (200, 200)
    assert first.text.startswith("data: ")
    assert (_remaining(first), _remaining(second)) == ("r=2", "r=1")


def test_the_fastapi_dependency_under_the_middleware_counts_the_endpoints_call(
    clock: FakeClock,
) -> None:
    guard = Guard(THREE_A_DAY, clock=clock)

    def who(request: Request) -> str:
        return str(request.user.display_name)

    user = guard_user(who)
    budget: Callable[..., Any] = require_budget(guard, user=user, budget_headers=True)
    with FakeProvider() as provider:
        app = _app(guard, provider)
        llm = guard.wrap(
            openai.AsyncOpenAI(base_url=provider.openai_base_url, api_key="k", max_retries=0)
        )

        @app.get("/gated", dependencies=[Depends(budget)])
        async def gated(request: Request) -> dict[str, str]:
            await llm.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=20
            )
            return {"user": who(request)}

        with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
            answers = [http.get("/gated", headers=bearer("carol")) for _ in range(2)]
    assert [a.json() for a in answers] == [{"user": "carol"}] * 2
    assert [_remaining(a) for a in answers] == ["r=2", "r=1"]
