"""An SDK client given an HTTP client the app also uses for its own requests."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import calls, make_guard, user_message
from payi_guard import track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.testing import FakeProvider

PROMPT = user_message("Name three colours")


class _Service(BaseHTTPRequestHandler):
    """The app's own service: answers every POST with 200 and notes its path."""

    paths: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.paths.append(self.path)
        body = json.dumps({"ok": True}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[str, list[str]]]:
    """The app's service on a loopback port of its own: its base URL and the paths seen."""
    seen: list[str] = []
    handler = type("Service", (_Service,), {"paths": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_the_apps_own_requests_on_a_shared_http_client_are_not_metered(
    guard: Guard, fake: FakeProvider, service: tuple[str, list[str]]
) -> None:
    url, seen = service
    shared = httpx2.Client()
    llm = guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k", http_client=shared))
    with track_context(user_id="alice"), capture_logs() as logs:
        # Paths the guard meters on an LLM's host; here the app's own API (and a JSON
        # body without a known model, which unknown_model: block would refuse).
        for path in ("/api/v1/messages", "/v2/responses", "/search/completions"):
            answer = shared.post(url + path, json={"model": "crm", "text": "hi"})
            assert (answer.status_code, answer.json()) == (200, {"ok": True})
        llm.chat.completions.create(model="gpt-test", messages=PROMPT)
        # A copy of the SDK client aimed elsewhere keeps the same HTTP client: metered.
        other = llm.with_options(base_url=fake.openai_base_url.replace("127.0.0.1", "localhost"))
        other.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert seen == ["/api/v1/messages", "/v2/responses", "/search/completions"]
    assert [line["model"] for line in calls(logs)] == ["gpt-test", "gpt-test"]
    assert len(fake.requests) == 2
    shared.close()


def test_a_second_guard_cannot_take_a_shared_http_client(
    guard: Guard, fake: FakeProvider, clock: FakeClock
) -> None:
    shared = httpx2.Client()
    first = guard.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k", http_client=shared)
    )
    other = make_guard(clock)
    second = openai.OpenAI(base_url=fake.openai_base_url, api_key="k", http_client=shared)
    with pytest.raises(ValueError, match="already guarded by another Guard"):
        other.wrap(second)
    with track_context(user_id="alice"):
        first.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert guard.usage("alice")[0].used > 0
    assert other.usage("alice")[0].used == 0
    shared.close()
