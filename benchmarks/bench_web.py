"""Per-request overhead of GuardMiddleware next to slowapi, in-process (run by hand).

    python benchmarks/bench_web.py [--requests 20000] [--rounds 5] [--users 100]

Every row serves the same Starlette endpoint through direct ASGI calls (no sockets, no
HTTP parsing), so the differences are the middleware alone:

* bare: the endpoint only;
* auth: Starlette's AuthenticationMiddleware with a token backend;
* auth + guard: auth outside GuardMiddleware gating the path (memory storage, the
  design's example limits: daily, monthly and per-minute limits plus a global one);
* auth + guard*: the same without gating the path (attribution only: request scope,
  user, structlog binding, request id);
* auth + slowapi: auth and slowapi's ``@limiter.limit`` decorator on memory storage.

Requests rotate over ``--users`` users. The best of ``--rounds`` rounds is kept. Target:
the guard's overhead over auth is at most 25 % of slowapi's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from payi_guard.engine import Guard
from payi_guard.web import GuardMiddleware

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

CONFIG: dict[str, Any] = {
    "version": 1,
    "limits": {
        "daily": {"max": 1000.0, "per": "day"},
        "monthly": {"max": 20000.0, "per": "month", "warn_at": 0.8},
        "rpm": {"requests": 100_000_000, "per": "minute"},
    },
    "default": ["daily", "monthly", "rpm"],
    "global": [{"max": 100000.0, "per": "month"}],
}


class TokenBackend(AuthenticationBackend):
    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        token = conn.headers.get("authorization", "")
        if not token.startswith("Bearer "):
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(token[7:])


async def endpoint(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def bare_app() -> ASGI:
    return Starlette(routes=[Route("/api/chat", endpoint)])


def auth_app() -> ASGI:
    return Starlette(
        routes=[Route("/api/chat", endpoint)],
        middleware=[Middleware(AuthenticationMiddleware, backend=TokenBackend())],
    )


def guard_app(guarded_paths: list[str]) -> ASGI:
    guard = Guard(CONFIG, storage="memory://")
    # Starlette's ``middleware=`` list runs outside in: auth first, then the guard.
    return Starlette(
        routes=[Route("/api/chat", endpoint)],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=TokenBackend()),
            Middleware(GuardMiddleware, guard=guard, guarded_paths=guarded_paths),
        ],
    )


def slowapi_app() -> ASGI:
    limiter = Limiter(
        key_func=lambda request: request.user.display_name,
        storage_uri="memory://",
    )

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/api/chat", limited)],
        middleware=[Middleware(AuthenticationMiddleware, backend=TokenBackend())],
    )
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


def scopes(users: int) -> list[dict[str, Any]]:
    out = []
    for i in range(users):
        out.append(
            {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.4"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": "/api/chat",
                "raw_path": b"/api/chat",
                "root_path": "",
                "query_string": b"",
                "headers": [
                    (b"host", b"bench"),
                    (b"authorization", f"Bearer user-{i}".encode()),
                    (b"accept", b"*/*"),
                ],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 8000),
            }
        )
    return out


async def run(app: ASGI, templates: list[dict[str, Any]], requests: int) -> float:
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    n = len(templates)
    gc.collect()
    start = time.perf_counter()
    for i in range(requests):
        # A fresh scope per request: slowapi marks request.state (scope["state"]).
        await app({**templates[i % n], "state": {}}, receive, send)
    elapsed = time.perf_counter() - start
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"unexpected statuses: {bad[:5]}")
    return elapsed / requests


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--users", type=int, default=100)
    args = parser.parse_args()

    rows = {
        "bare": bare_app(),
        "auth": auth_app(),
        "auth + guard": guard_app(["/api/*"]),
        "auth + guard*": guard_app([]),
        "auth + slowapi": slowapi_app(),
    }
    templates = scopes(args.users)
    best: dict[str, float] = {name: float("inf") for name in rows}
    for app in rows.values():  # warm up: build middleware stacks, fill caches
        await run(app, templates, min(2000, args.requests))
    for _ in range(args.rounds):
        for name, app in rows.items():  # interleaved, so drift hits every row alike
            best[name] = min(best[name], await run(app, templates, args.requests))

    bare, auth = best["bare"], best["auth"]
    print(f"{args.requests} requests x {args.rounds} rounds, {args.users} users, best round\n")
    print(f"{'setup':<16}{'req/s':>10}{'us/req':>9}{'over bare':>11}{'over auth':>11}")
    for name, per in best.items():
        over_auth = f"{(per - auth) * 1e6:>9.1f}us" if name.startswith("auth +") else ""
        over_bare = f"{(per - bare) * 1e6:>9.1f}us"
        print(f"{name:<16}{1 / per:>10.0f}{per * 1e6:>9.1f}{over_bare}{over_auth}")
    guard_cost = best["auth + guard"] - auth
    slowapi_cost = best["auth + slowapi"] - auth
    ratio = guard_cost / slowapi_cost if slowapi_cost > 0 else float("inf")
    verdict = "met" if ratio <= 0.25 else "NOT met"
    print(
        f"\nguard overhead {guard_cost * 1e6:.1f}us = {ratio:.2f}x slowapi's "
        f"{slowapi_cost * 1e6:.1f}us (target <= 0.25x: {verdict})"
    )


if __name__ == "__main__":
    asyncio.run(main())
