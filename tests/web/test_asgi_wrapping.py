"""The ASGI middleware around a whole app, under a prefix, and with calls in task groups.

``app = GuardMiddleware(app, ...)`` puts Starlette's own ``ServerErrorMiddleware``
inside the guard: a refusal raised by an endpoint reaches the guard after that
middleware already sent a 500. ``root_path`` (a ``Mount``, a proxy's ``--root-path``)
prefixes ``scope["path"]``, while ``guarded_paths`` name the app's own routes.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from structlog.testing import capture_logs

from payi_guard import GuardMiddleware
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage

MODEL = "test-model"
USER = {"xProxy-User-ID": "carol"}


def make_guard() -> Guard:
    config = {
        "prices": {MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        "default": [{"max": 0.001, "per": "day"}],
    }
    guard = Guard(config, storage="memory://")
    # $0.0001 left: a call (100 in, 50 out: $0.0002) is refused when it reserves.
    guard.record(user_id="carol", model=MODEL, input_tokens=900)
    return guard


async def one_call(guard: Guard) -> None:
    reservation = await guard.abegin(
        CallRequest(model=MODEL, input_tokens=100, max_output_tokens=50)
    )
    await reservation.asettle(TokenUsage(100, 50))


def guarded(app: Any, guard: Guard, **options: Any) -> GuardMiddleware:
    return GuardMiddleware(app, guard=guard, trust_user_header=True, **options)


async def get(app: Any, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, **kwargs)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=USER)


@pytest.mark.parametrize("framework", ["starlette", "fastapi"])
@pytest.mark.parametrize("paths", [None, ["/api/*"]])
async def test_a_refusal_in_a_wrapped_app_is_a_429(framework: str, paths: list[str] | None) -> None:
    guard = make_guard()

    async def chat(request: Request) -> Response:
        await one_call(guard)
        return JSONResponse({"ok": True})

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug of the app")

    async def unavailable(request: Request) -> Response:
        return JSONResponse({"error": "maintenance"}, status_code=503)

    routes: list[BaseRoute] = [
        Route("/api/chat", chat),
        Route("/api/broken", broken),
        Route("/api/unavailable", unavailable),
    ]
    inner: Any = Starlette(routes=routes) if framework == "starlette" else FastAPI(routes=routes)
    app = guarded(inner, guard, guarded_paths=paths) if paths else guarded(inner, guard)
    with capture_logs() as logs:
        refused = await get(app, "/api/chat")
        bug = await get(app, "/api/broken")
        down = await get(app, "/api/unavailable")
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["limit"] == "user:0"
    assert "budget_exceeded_after_start" not in [e["event"] for e in logs]
    # The app's own server errors are its own, as sent.
    assert bug.status_code == 500
    assert (down.status_code, down.json()) == (503, {"error": "maintenance"})


async def test_guarded_paths_are_the_apps_own_under_a_prefix() -> None:
    guard = make_guard()
    guard.record(user_id="carol", model=MODEL, input_tokens=100)  # spent: the gate knows
    ran: list[str] = []

    async def chat(request: Request) -> Response:
        ran.append(request.url.path)

        async def body() -> Any:
            await one_call(guard)
            yield b"never"

        return StreamingResponse(body())

    app = Starlette(routes=[Route("/api/chat", chat)])
    behind_proxy = guarded(app, guard, guarded_paths=["/api/*"])
    mounted = Starlette(routes=[Mount("/v2", guarded(app, guard, guarded_paths=["/api/*"]))])
    prefixed = guarded(app, guard, guarded_paths=["/gw/api/*"])  # the prefix in the glob
    answers = [
        await get(behind_proxy, "/gw/api/chat", root_path="/gw"),
        await get(mounted, "/v2/api/chat"),
        await get(prefixed, "/gw/api/chat", root_path="/gw"),
    ]
    assert [a.status_code for a in answers] == [429, 429, 429]
    assert {a.headers["content-type"] for a in answers} == {"application/problem+json"}
    assert ran == []  # refused by the gate, before the endpoint ran


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.TaskGroup is Python 3.11+")
async def test_a_refusal_in_a_task_group_is_a_429() -> None:
    guard = make_guard()

    async def fan_out(request: Request) -> Response:
        async with asyncio.TaskGroup() as group:  # type: ignore[attr-defined,unused-ignore]
            for _ in range(3):
                group.create_task(one_call(guard))
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route("/api/fan-out", fan_out)])
    app.add_middleware(GuardMiddleware, guard=guard, trust_user_header=True)
    answer = await get(app, "/api/fan-out")
    assert answer.status_code == 429, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
