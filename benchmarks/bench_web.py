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

Then the same for WSGI (Flask and Django apps run under it), with direct WSGI calls:

* bare: a plain WSGI app;
* auth: a middleware that sets ``REMOTE_USER`` from the bearer token;
* auth + guard: ``WSGIGuardMiddleware`` gating the path, the user from ``REMOTE_USER``;
* auth + guard*: the same without gating the path;
* auth + limits: a middleware calling ``limits``' ``FixedWindowRateLimiter.hit`` per
  user on its memory storage (the library under slowapi and Flask-Limiter).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from limits import RateLimitItemPerMinute
from limits.storage import MemoryStorage
from limits.strategies import FixedWindowRateLimiter
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
from payi_guard.web import GuardMiddleware, WSGIGuardMiddleware

ASGI = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
WSGI = Callable[[dict[str, Any], Any], Iterable[bytes]]

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


async def receive() -> dict[str, Any]:
    """The request body of every benchmark request: empty."""
    return {"type": "http.request", "body": b"", "more_body": False}


async def run(app: ASGI, templates: list[dict[str, Any]], requests: int) -> float:
    statuses: list[int] = []

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


def wsgi_bare(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
    return [b"ok"]


class WSGIAuth:
    """Sets ``REMOTE_USER`` from the bearer token, as an authenticating layer does."""

    def __init__(self, app: WSGI) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        token = environ.get("HTTP_AUTHORIZATION", "")
        if token.startswith("Bearer "):
            environ["REMOTE_USER"] = token[7:]
        return self.app(environ, start_response)


class WSGILimits:
    """One ``limits`` fixed-window hit per request, keyed by the user (429 when over)."""

    def __init__(self, app: WSGI) -> None:
        self.app = app
        self.limiter = FixedWindowRateLimiter(MemoryStorage())
        self.item = RateLimitItemPerMinute(100_000_000)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if not self.limiter.hit(self.item, environ.get("REMOTE_USER", "")):
            start_response("429 Too Many Requests", [("Content-Length", "0")])
            return [b""]
        return self.app(environ, start_response)


def wsgi_guard(guarded_paths: list[str]) -> WSGI:
    guard = Guard(CONFIG, storage="memory://")
    middleware = WSGIGuardMiddleware(
        wsgi_bare,
        guard=guard,
        guarded_paths=guarded_paths,
        user=lambda environ: environ.get("REMOTE_USER"),
    )
    return WSGIAuth(middleware)


def environs(users: int) -> list[dict[str, Any]]:
    return [
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/api/chat",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "HTTP_HOST": "bench",
            "HTTP_AUTHORIZATION": f"Bearer user-{i}",
            "HTTP_ACCEPT": "*/*",
            "wsgi.url_scheme": "http",
        }
        for i in range(users)
    ]


def run_wsgi(app: WSGI, templates: list[dict[str, Any]], requests: int) -> float:
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    n = len(templates)
    gc.collect()
    start = time.perf_counter()
    for i in range(requests):
        body = app(dict(templates[i % n]), start_response)  # a server builds each environ
        for _ in body:
            pass
        close = getattr(body, "close", None)
        if close is not None:
            close()
    elapsed = time.perf_counter() - start
    bad = [s for s in statuses if not s.startswith("200")]
    if bad:
        raise SystemExit(f"unexpected statuses: {bad[:5]}")
    return elapsed / requests


def wsgi_table(requests: int, rounds: int, users: int) -> None:
    rows: dict[str, WSGI] = {
        "bare": wsgi_bare,
        "auth": WSGIAuth(wsgi_bare),
        "auth + guard": wsgi_guard(["/api/*"]),
        "auth + guard*": wsgi_guard([]),
        "auth + limits": WSGIAuth(WSGILimits(wsgi_bare)),
    }
    templates = environs(users)
    best: dict[str, float] = {name: float("inf") for name in rows}
    for app in rows.values():
        run_wsgi(app, templates, min(2000, requests))
    for _ in range(rounds):
        for name, app in rows.items():
            best[name] = min(best[name], run_wsgi(app, templates, requests))
    print_table("WSGI", best, requests, rounds, users)
    guard_cost = best["auth + guard"] - best["auth"]
    limits_cost = best["auth + limits"] - best["auth"]
    print(
        f"\nWSGI guard overhead {guard_cost * 1e6:.1f}us; one limits hit "
        f"{limits_cost * 1e6:.1f}us ({guard_cost / limits_cost:.2f}x)"
    )


def print_table(title: str, best: dict[str, float], requests: int, rounds: int, users: int) -> None:
    bare, auth = best["bare"], best["auth"]
    print(f"{title}: {requests} requests x {rounds} rounds, {users} users, best round\n")
    print(f"{'setup':<16}{'req/s':>10}{'us/req':>9}{'over bare':>11}{'over auth':>11}")
    for name, per in best.items():
        over_auth = f"{(per - auth) * 1e6:>9.1f}us" if name.startswith("auth +") else ""
        over_bare = f"{(per - bare) * 1e6:>9.1f}us"
        print(f"{name:<16}{1 / per:>10.0f}{per * 1e6:>9.1f}{over_bare}{over_auth}")


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

    auth = best["auth"]
    print_table("ASGI", best, args.requests, args.rounds, args.users)
    guard_cost = best["auth + guard"] - auth
    slowapi_cost = best["auth + slowapi"] - auth
    ratio = guard_cost / slowapi_cost if slowapi_cost > 0 else float("inf")
    verdict = "met" if ratio <= 0.25 else "NOT met"
    print(
        f"\nguard overhead {guard_cost * 1e6:.1f}us = {ratio:.2f}x slowapi's "
        f"{slowapi_cost * 1e6:.1f}us (target <= 0.25x: {verdict})\n"
    )
    wsgi_table(args.requests, args.rounds, args.users)


if __name__ == "__main__":
    asyncio.run(main())
