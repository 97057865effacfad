"""Helpers for the web tests: real servers, a token backend, GenAI calls as the meter makes them."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from typing import Any

import uvicorn
from starlette.authentication import AuthCredentials, AuthenticationBackend, SimpleUser
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from werkzeug.serving import BaseWSGIServer, make_server

from payi_guard.config import NANO_USD
from payi_guard.engine import CallRecord, CallRequest, Guard
from payi_guard.pricing import TokenUsage

MODEL = "test-model"
"""A model priced at $1 per million input tokens and $2 per million output tokens."""

PRICES = {MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0}}


def config(**overrides: Any) -> dict[str, Any]:
    """A budgets dict: every user gets a $0.001 daily limit, anonymous a shared one."""
    base: dict[str, Any] = {
        "version": 1,
        "prices": PRICES,
        "limits": {"daily": {"max": 0.001, "per": "day"}},
        "default": ["daily"],
        "anonymous": {"strategy": "shared", "limits": [{"max": 0.001, "per": "day"}]},
    }
    base.update(overrides)
    return base


def cost_nano(input_tokens: int, output_tokens: int) -> int:
    """What a call of test-model costs, in nano-USD."""
    return input_tokens * 1_000 + output_tokens * 2_000


def usd(nano: int) -> Decimal:
    return Decimal(nano) / NANO_USD


def call(guard: Guard, input_tokens: int = 100, output_tokens: int = 50) -> CallRecord:
    """One sync GenAI call: reserve, then settle, as the meter does."""
    reservation = guard.begin(
        CallRequest(model=MODEL, input_tokens=input_tokens, max_output_tokens=output_tokens)
    )
    record = reservation.settle(TokenUsage(input_tokens, output_tokens))
    assert record is not None
    return record


async def acall(guard: Guard, input_tokens: int = 100, output_tokens: int = 50) -> CallRecord:
    """One async GenAI call: reserve, then settle, as the meter does."""
    reservation = await guard.abegin(
        CallRequest(model=MODEL, input_tokens=input_tokens, max_output_tokens=output_tokens)
    )
    record = await reservation.asettle(TokenUsage(input_tokens, output_tokens))
    assert record is not None
    return record


def used(guard: Guard, user_id: str) -> Decimal | int:
    """The used amount of the user's first limit."""
    return guard.usage(user_id)[0].used


def exhaust(guard: Guard, user_id: str) -> None:
    """Spend exactly the $0.001 daily limit of ``user_id`` (never refused)."""
    guard.record(user_id=user_id, model=MODEL, input_tokens=1000, output_tokens=0)


def spend_most(guard: Guard, user_id: str) -> None:
    """Spend $0.0009 of the $0.001 daily limit: the rest is too little for one call.

    The user is not spent (the gate lets them through), but every call, whose upper
    bound is $0.0002, is refused when it reserves: inside the app.
    """
    guard.record(user_id=user_id, model=MODEL, input_tokens=900, output_tokens=0)


def exhaust_anonymous(guard: Guard) -> None:
    """Spend the shared anonymous bucket's $0.001 with five anonymous calls."""
    for _ in range(5):
        call(guard)
    assert guard.usage(None)[0].state == "exceeded"


class TokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <user>`` authenticates ``<user>`` (a test double of real auth)."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        header = conn.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(header[len("Bearer ") :])


def bearer(user: str) -> dict[str, str]:
    return {"authorization": f"Bearer {user}"}


class MessageRecorder:
    """An outer ASGI middleware that records every message the app sends."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.messages: list[Message] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            self.messages.append(message)
            await send(message)

        await self.app(scope, receive, recording_send)

    def starts(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.start"]


def _wait_until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)


@contextmanager
def serve_asgi(app: ASGIApp) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a background thread."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False)
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="uvicorn-test", daemon=True
    )
    thread.start()
    try:
        _wait_until(lambda: server.started or not thread.is_alive(), "uvicorn to start")
        if not server.started:
            raise RuntimeError("uvicorn failed to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve_wsgi(app: Any, *, threaded: bool = True) -> Iterator[str]:
    """Serve ``app`` with werkzeug's WSGI server on a free 127.0.0.1 port."""
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=threaded)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, name="wsgi-test", daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def sse_of_sdk_stream(llm: Any, max_tokens: int) -> AsyncIterator[str]:
    """A real OpenAI SDK stream as an app forwards it: its text as server-sent events."""
    chunks = await llm.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count to three"}],
        max_tokens=max_tokens,
        stream=True,
    )
    async for chunk in chunks:
        if chunk.choices and chunk.choices[0].delta.content:
            yield f"data: {chunk.choices[0].delta.content}\n\n"
