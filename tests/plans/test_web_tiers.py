"""The request's tier through every integration: the FastAPI dependency, the ASGI and WSGI
resolvers and the Flask extension's user callable (Django: ``tests/django``).

Each app charges a user whose default budget is spent: named with the ``pro`` tier the
call goes through, without it (or with a tier the file does not define) it is refused.
The early gates read the same tier.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any

import flask
import httpx
import pytest
from fastapi import Depends, FastAPI, Header
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from web._support import acall, call, config, exhaust
from werkzeug.test import EnvironBuilder

from payi_guard import Guard, get_context
from payi_guard.admin import users_app
from payi_guard.clock import FakeClock
from payi_guard.fastapi import guard_user, require_budget
from payi_guard.flask import PayiGuard
from payi_guard.testing import capture_events
from payi_guard.web import GuardMiddleware, WSGIGuardMiddleware

USER = "acme:7"
TIERS = {"pro": [{"max": 1, "per": "day"}]}


@pytest.fixture
def guard(store: str, key_prefix: str, clock: FakeClock) -> Guard:
    """A guard whose default $0.001 a day is spent for ``acme:7``; ``pro`` has $1."""
    guard = Guard(config(tiers=TIERS), storage=store, key_prefix=key_prefix, clock=clock)
    exhaust(guard, USER)
    return guard


def plan_headers(plan: str | None) -> dict[str, str]:
    headers = {"authorization": f"Bearer {USER}"}
    if plan is not None:
        headers["x-plan"] = plan
    return headers


# -- FastAPI ---------------------------------------------------------------------------------


@dataclass
class Customer:
    id: str
    plan: str | None


def current_customer(
    authorization: Annotated[str | None, Header()] = None,
    x_plan: Annotated[str | None, Header()] = None,
) -> Customer | None:
    if authorization is None:
        return None
    return Customer(authorization.removeprefix("Bearer "), x_plan)


async def test_the_fastapi_dependency_names_the_tier(guard: Guard) -> None:
    app = FastAPI()
    customer = guard_user(current_customer, id=lambda c: c.id, tier=lambda c: c.plan)
    budget = require_budget(guard, user=customer, budget_headers=True)

    @app.get("/chat", dependencies=[Depends(budget)])
    async def chat(who: Annotated[Customer | None, Depends(customer)]) -> dict[str, Any]:
        record = await acall(guard)
        return {"user": record.user_id, "tier": get_context().tier}

    app.add_middleware(GuardMiddleware, guard=guard)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        pro = await http.get("/chat", headers=plan_headers("pro"))
        plain = await http.get("/chat", headers=plan_headers(None))
        with capture_events() as events:
            unknown = await http.get("/chat", headers=plan_headers("gold"))
    assert pro.status_code == 200, pro.text
    assert pro.json() == {"user": USER, "tier": "pro"}
    # The gate read the pro limit too: its RateLimit fields are those of user:0 ($1).
    assert pro.headers["ratelimit-policy"] == '"user:0";q=1000000;w=86400'
    assert plain.status_code == unknown.status_code == 429
    assert plain.json()["limit"] == unknown.json()["limit"] == "daily"
    assert [e["tier"] for e in events.named("tier_unknown")] == ["gold"]


# -- ASGI and WSGI resolvers -------------------------------------------------------------------


async def test_an_asgi_resolver_may_return_the_user_and_the_tier(guard: Guard) -> None:
    async def resolver(request: Request) -> tuple[str, str | None] | None:
        return USER, request.headers.get("x-plan")

    async def chat(request: Request) -> JSONResponse:
        record = await acall(guard)
        return JSONResponse({"user": record.user_id, "tier": get_context().tier})

    app = GuardMiddleware(
        Starlette(routes=[Route("/api/chat", chat)]),
        guard=guard,
        user=resolver,
        guarded_paths=["/api/*"],
        gate="storage",
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        pro = await http.get("/api/chat", headers={"x-plan": "pro"})
        plain = await http.get("/api/chat")
    assert (pro.status_code, pro.json()) == (200, {"user": USER, "tier": "pro"})
    assert plain.status_code == 429  # refused by the early gate, which read storage


async def test_the_users_page_shows_the_tier_the_requests_named(guard: Guard) -> None:
    async def resolver(request: Request) -> tuple[str, str | None] | None:
        return USER, request.headers.get("x-plan")

    async def chat(request: Request) -> JSONResponse:
        await acall(guard)
        return JSONResponse({})

    token = "page-token-0123456789"
    app = Starlette(
        routes=[Route("/api/chat", chat), Mount("/guard", users_app(guard, token=token))]
    )
    served = GuardMiddleware(app, guard=guard, user=resolver, guarded_paths=["/api/*"])
    transport = httpx.ASGITransport(app=served)
    bearer = {"authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        before = (await http.get("/guard/api/users", headers=bearer)).json()["users"]
        assert (await http.get("/api/chat", headers={"x-plan": "pro"})).status_code == 200
        after = (await http.get("/guard/api/users", headers=bearer)).json()["users"]
    # Spent under default ($0.001 a day), the user is shown blocked until a request names
    # pro ($1 a day), under which every call of theirs is charged: then it shows that.
    assert [(u["tier"], u["state"], u["max_usd"]) for u in before] == [
        ("default", "exceeded", "0.001")
    ]
    assert [(u["tier"], u["state"], u["max_usd"]) for u in after] == [("pro", "ok", "1")]


def test_a_wsgi_resolver_may_return_the_user_and_the_tier(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        record = call(guard)
        start_response("200 OK", [("content-type", "text/plain")])
        return [f"{record.user_id} {get_context().tier}".encode()]

    def resolver(environ: dict[str, Any]) -> tuple[str, str | None]:
        return USER, environ.get("HTTP_X_PLAN")

    middleware = WSGIGuardMiddleware(app, guard=guard, user=resolver)
    statuses: list[str] = []

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    pro = EnvironBuilder(path="/", headers=[("X-Plan", "pro")]).get_environ()
    assert b"".join(middleware(pro, start)) == f"{USER} pro".encode()
    b"".join(middleware(EnvironBuilder(path="/").get_environ(), start))
    assert statuses == ["200 OK", "429 Too Many Requests"]


def test_a_resolver_returning_a_tuple_of_three_is_a_programming_error(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b""]

    middleware = WSGIGuardMiddleware(app, guard=guard, user=lambda environ: (USER, "pro", 1))
    with pytest.raises(TypeError, match=r"\(user_id, tier\) pair"):
        middleware(EnvironBuilder(path="/").get_environ(), lambda *a: lambda data: None)


# -- Flask ----------------------------------------------------------------------------------------


def test_the_flask_user_callable_may_return_the_user_and_the_tier(guard: Guard) -> None:
    app = flask.Flask("tiers")

    @app.route("/api/chat")
    def chat() -> dict[str, Any]:
        record = call(guard)
        return {"user": record.user_id, "tier": get_context().tier}

    def user() -> tuple[str, str | None]:
        return USER, flask.request.headers.get("X-Plan")

    PayiGuard(app, guard=guard, user=user, guarded_paths=["/api/*"], gate="storage")
    client = app.test_client()
    pro = client.get("/api/chat", headers={"X-Plan": "pro"})
    plain = client.get("/api/chat")
    assert (pro.status_code, pro.json) == (200, {"user": USER, "tier": "pro"})
    assert plain.status_code == 429
