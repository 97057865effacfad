"""With a pseudonymizer, every log line of a request shows the pseudonym, never the raw id.

The middleware binds ``user_id`` in structlog's context for the whole request, so a line
with no ``user_id`` of its own (the app's, or the guard's own warnings) shows what was
bound: the pseudonym the ``genai_call`` lines show too, ASGI and WSGI, for a user named
when the request enters and for one a dependency names later.
"""

from __future__ import annotations

from typing import Annotated, Any

import flask
import httpx
import structlog
from fastapi import Depends, FastAPI, Header
from starlette.requests import Request
from starlette.responses import JSONResponse

from payi_guard import Guard
from payi_guard.fastapi import guard_user
from payi_guard.flask import PayiGuard
from payi_guard.identity import Pseudonymizer
from payi_guard.web import GuardMiddleware
from web._support import config

PSEUDONYMS = Pseudonymizer(b"a-long-enough-secret-key-for-tests")
RAW = "acme:alice"


def _guard() -> Guard:
    return Guard(config(), pseudonymizer=PSEUDONYMS)


def named(x_user: Annotated[str, Header()]) -> str:
    """The user a header names, as an app's own authentication would."""
    return x_user


NAMED = guard_user(named)


def _bound() -> Any:
    return structlog.contextvars.get_contextvars().get("user_id")


async def test_asgi_binds_the_pseudonym_also_for_a_user_named_later() -> None:
    app = FastAPI()

    @app.get("/header")
    async def header(request: Request) -> JSONResponse:
        return JSONResponse({"bound": _bound()})

    @app.get("/dependency")
    async def dependency(who: Annotated[str, Depends(NAMED)]) -> dict[str, Any]:
        return {"bound": _bound()}

    app.add_middleware(GuardMiddleware, guard=_guard(), trust_user_header=True)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        first = await http.get("/header", headers={"xProxy-User-ID": RAW})
        later = await http.get("/dependency", headers={"x-user": RAW})
        anonymous = await http.get("/header", headers={"xProxy-User-ID": "anonymous"})
    assert first.json()["bound"] == later.json()["bound"] == PSEUDONYMS(RAW)
    assert anonymous.json()["bound"] == "anonymous"  # the bucket is never pseudonymised


def test_wsgi_binds_the_pseudonym() -> None:
    app = flask.Flask(__name__)
    app.secret_key = "test"

    @app.get("/chat")
    def chat() -> dict[str, Any]:
        return {"bound": _bound()}

    PayiGuard(app, guard=_guard(), user=lambda: flask.request.headers.get("x-user"))
    answer = app.test_client().get("/chat", headers={"x-user": RAW})
    assert answer.json == {"bound": PSEUDONYMS(RAW)}
