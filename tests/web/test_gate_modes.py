"""The two gate modes across processes: "cache" (local, no round trip) and "storage"."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from payi_guard.engine import Guard
from payi_guard.web import GuardMiddleware
from web._support import TokenBackend, acall, bearer, config, exhaust


def app_for(guard: Guard, gate: Literal["cache", "storage"], calls: list[str]) -> Starlette:
    async def chat(request: Request) -> JSONResponse:
        calls.append("ran")
        record = await acall(guard)  # raises BudgetExceeded: the middleware answers 429
        return JSONResponse({"user": record.user_id})

    app = Starlette(routes=[Route("/api/chat", chat)])
    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"], gate=gate)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    return app


@pytest.mark.redis
@pytest.mark.parametrize("gate", ["cache", "storage"])
async def test_a_user_spent_by_another_process(
    gate: Literal["cache", "storage"],
    redis_url: str,
    key_prefix: str,
    make_guard: Callable[..., Guard],
) -> None:
    # Two guards on one Redis: two processes of the same app.
    elsewhere = make_guard(config(), storage=redis_url, key_prefix=key_prefix)
    here = make_guard(config(), storage=redis_url, key_prefix=key_prefix)
    exhaust(elsewhere, "acme:alice")
    calls: list[str] = []
    transport = httpx.ASGITransport(app=app_for(here, gate, calls))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        first = await http.get("/api/chat", headers=bearer("acme:alice"))
        second = await http.get("/api/chat", headers=bearer("acme:alice"))
    # Either way the user is refused with the same 429 and the provider is never called.
    assert first.status_code == second.status_code == 429
    assert first.json()["limit"] == second.json()["limit"] == "daily"
    if gate == "storage":
        assert calls == []  # read from the store: refused before the app runs
    else:
        # The local cache did not know yet: the app ran and its call was refused at
        # the reserve, which taught the cache; the next request is refused up front.
        assert calls == ["ran"]
    await here.aclose()
    await elsewhere.aclose()
