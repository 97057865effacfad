"""A Flask app whose GenAI calls are charged to the user of the session, offline.

Run it (no network, no API key: the fake provider answers like OpenAI)::

    python examples/flask_app.py

then, in another shell (``-c``/``-b`` keep the session cookie)::

    curl -s -c jar -b jar localhost:8001/login/acme:alice
    curl -s -c jar -b jar -X POST localhost:8001/api/chat \
         -H 'Content-Type: application/json' -d '{"prompt": "Say hello"}'
    curl -sN -c jar -b jar 'localhost:8001/api/stream?prompt=Count+to+three'
    curl -s -c jar -b jar localhost:8001/usage

The session's ``user_id`` names the user (flask-login's ``current_user`` would too);
repeat the chat call as a default-tier user and the daily limit answers 429, and so
does the stream (``/api/*`` is guarded: its response waits for the first body byte).
"""

from __future__ import annotations

import argparse
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import flask
import openai

from payi_guard import Guard
from payi_guard.flask import PayiGuard
from payi_guard.log import configure_json
from payi_guard.testing import FakeProvider

BUDGETS = pathlib.Path(__file__).with_name("budgets.yaml")


def create_app(guard: Guard, provider_url: str) -> flask.Flask:
    """Build the app; every OpenAI call it makes goes through the guard."""
    llm = guard.wrap(openai.OpenAI(base_url=provider_url, api_key="test", max_retries=0))
    app = flask.Flask(__name__)
    app.secret_key = "example-only-secret-key"  # load a real one from the environment

    @app.get("/login/<user_id>")
    def login(user_id: str) -> dict[str, str]:
        # Stand-in for a real login form: whoever is in the session is charged.
        flask.session["user_id"] = user_id
        return {"signed_in": user_id}

    @app.post("/api/chat")
    def chat() -> dict[str, Any]:
        prompt = (flask.request.get_json(silent=True) or {}).get("prompt", "Hello")
        reply = llm.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=50,
        )
        return {"reply": reply.choices[0].message.content}

    @app.get("/api/stream")
    def stream() -> flask.Response:
        prompt = flask.request.args.get("prompt", "Hello")

        def events() -> Iterator[str]:
            chunks = llm.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=50,
                stream=True,
            )
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield f"data: {chunk.choices[0].delta.content}\n\n"
            yield "data: [DONE]\n\n"

        return flask.Response(flask.stream_with_context(events()), mimetype="text/event-stream")

    @app.get("/usage")
    def usage() -> list[dict[str, object]]:
        return [limit.as_dict() for limit in guard.usage(flask.session.get("user_id"))]

    PayiGuard(app, guard=guard, guarded_paths=["/api/*"], budget_headers=True)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="payi_guard Flask example")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    configure_json()
    # The budgets file's store (sqlite:///budgets.db, beside it: every worker process
    # shares it), unless the environment names another (redis://... for several hosts).
    guard = Guard.from_yaml(BUDGETS, storage=os.environ.get("PAYI_GUARD_STORAGE"))
    with FakeProvider() as provider:
        app = create_app(guard, provider.openai_base_url)
        app.run(host="127.0.0.1", port=args.port, threaded=True)


if __name__ == "__main__":
    main()
