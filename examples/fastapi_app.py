"""A FastAPI app whose GenAI calls are charged to the signed-in user, offline.

Run it (no network, no API key: the fake provider answers like OpenAI)::

    python examples/fastapi_app.py

then, in another shell::

    curl -s -X POST localhost:8000/api/chat -H 'Authorization: Bearer alice-token' \
         -H 'Content-Type: application/json' -d '{"prompt": "Say hello"}'
    curl -sN 'localhost:8000/api/stream?prompt=Count+to+three' -H 'Authorization: Bearer bob-token'
    curl -s localhost:8000/usage -H 'Authorization: Bearer bob-token'

Repeat the chat call as bob (default tier) and the daily limit answers 429 with
``application/problem+json``, ``Retry-After`` and ``RateLimit`` headers; so does the
stream (``/api/*`` is guarded: the response start waits for the first body byte, so a
refused stream is never an empty 200). Every call is logged as one JSON ``genai_call``
line naming the user.
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import openai
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    SimpleUser,
)
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection

from payi_guard import Guard
from payi_guard.log import configure_json
from payi_guard.testing import FakeProvider
from payi_guard.web import GuardMiddleware

BUDGETS = pathlib.Path(__file__).with_name("budgets.yaml")

# Stand-in for real authentication (sessions, JWTs, an identity provider...).
TOKENS = {"alice-token": "acme:alice", "bob-token": "acme:bob", "carol-token": "carol"}


class TokenBackend(AuthenticationBackend):
    """``Authorization: Bearer <token>`` signs in the token's user."""

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, SimpleUser] | None:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        user = TOKENS.get(token) if scheme.lower() == "bearer" else None
        if user is None:
            return None
        return AuthCredentials(["authenticated"]), SimpleUser(user)


class ChatIn(BaseModel):
    prompt: str


def create_app(guard: Guard, provider_url: str) -> FastAPI:
    """Build the app; every OpenAI call it makes goes through the guard."""
    llm = guard.wrap(openai.AsyncOpenAI(base_url=provider_url, api_key="test", max_retries=0))
    app = FastAPI(title="payi_guard FastAPI example")

    @app.post("/api/chat")
    async def chat(body: ChatIn) -> dict[str, Any]:
        reply = await llm.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": body.prompt}],
            max_tokens=50,
        )
        return {"reply": reply.choices[0].message.content}

    @app.get("/api/stream")
    async def stream(prompt: str) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            chunks = await llm.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=50,
                stream=True,
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield f"data: {chunk.choices[0].delta.content}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/usage")
    async def usage(request: Request) -> list[dict[str, object]]:
        user = request.user.display_name if request.user.is_authenticated else None
        return [limit.as_dict() for limit in await guard.ausage(user)]

    # Order matters: add the guard first, then authentication, so authentication runs
    # outside (before) the guard and scope["user"] is known when the guard reads it.
    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"], budget_headers=True)
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="payi_guard FastAPI example")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    configure_json()
    # The budgets file's store (sqlite:///budgets.db, beside it: every worker process
    # shares it), unless the environment names another (redis://... for several hosts).
    guard = Guard.from_yaml(BUDGETS, storage=os.environ.get("PAYI_GUARD_STORAGE"))
    with FakeProvider() as provider:
        app = create_app(guard, provider.openai_base_url)
        uvicorn.run(app, host="127.0.0.1", port=args.port)


if __name__ == "__main__":
    main()
