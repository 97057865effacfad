"""Plain httpx and httpx2 clients aimed at an OpenAI-compatible base URL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from typing import Any

import httpx
import httpx2
import pytest
from structlog.testing import capture_logs

from meter._support import expected_cost, logged_usd, one_call, used, user_message
from payi_guard import track_context
from payi_guard.engine import Guard
from payi_guard.meter import is_guarded
from payi_guard.testing import FakeProvider, Scripted

MODULES = [pytest.param(httpx2, id="httpx2"), pytest.param(httpx, id="httpx")]
PROMPT = user_message("Name three colours")


def chunk(content: str | None, *, usage: dict[str, int] | None = None) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47}
# Unusual but valid framing the guard must pass through byte for byte.
EVENTS = [
    b": keep-alive comment\n\n",
    chunk("Red"),
    chunk(", green").replace(b"\n\n", b"\r\n\r\n"),
    chunk(" and blue"),
    chunk(None, usage=USAGE),
    b"data: [DONE]\n\n",
]
USAGE_COST = (Decimal(40 * 1) + Decimal(7 * 2)) / 1_000_000


@pytest.fixture(params=MODULES)
def module(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture
def http(guard: Guard, fake: FakeProvider, module: Any) -> Iterator[Any]:
    client = guard.wrap(module.Client(base_url=fake.openai_base_url))
    yield client
    client.close()


@pytest.fixture
async def ahttp(guard: Guard, fake: FakeProvider, module: Any) -> AsyncIterator[Any]:
    client = guard.wrap(module.AsyncClient(base_url=fake.openai_base_url))
    yield client
    await client.aclose()


def test_plain_json_call(guard: Guard, fake: FakeProvider, http: Any) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        response = http.post("/chat/completions", json={"model": "gpt-test", "messages": PROMPT})
    (record,) = fake.requests
    assert response.json()["usage"] == record.usage
    # The provider is asked for an identity body; the app's own request is left as built.
    assert record.headers["accept-encoding"] == "identity"
    assert response.request.headers["accept-encoding"] != "identity"
    event = one_call(logs)
    assert event["provider"] == "openai-compatible"
    assert logged_usd(event) == expected_cost(record, "gpt-test")


def test_stream_bytes_pass_through_minus_the_guards_usage_chunk(
    guard: Guard, fake: FakeProvider, http: Any
) -> None:
    fake.enqueue(Scripted(events=EVENTS))
    body = {"model": "gpt-test", "messages": PROMPT, "stream": True}
    with track_context(user_id="alice"), capture_logs() as logs:
        with http.stream("POST", "/chat/completions", json=body) as response:
            received = b"".join(response.iter_raw())
    assert received == b"".join(e for e in EVENTS if b'"usage"' not in e)
    assert "content-length" not in response.headers
    event = one_call(logs)
    assert (event["input_tokens"], event["output_tokens"]) == (40, 7)
    assert logged_usd(event) == USAGE_COST
    assert used(guard, "alice") == USAGE_COST


async def test_async_stream_keeps_the_callers_usage_chunk(
    guard: Guard, fake: FakeProvider, ahttp: Any
) -> None:
    fake.enqueue(Scripted(events=EVENTS))
    body = {
        "model": "gpt-test",
        "messages": PROMPT,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with track_context(user_id="alice"), capture_logs() as logs:
        async with ahttp.stream("POST", "/chat/completions", json=body) as response:
            received = b"".join([piece async for piece in response.aiter_raw()])
    assert received == b"".join(EVENTS)
    assert logged_usd(one_call(logs)) == USAGE_COST


async def test_async_stream_from_the_fake(guard: Guard, fake: FakeProvider, ahttp: Any) -> None:
    body = {"model": "gpt-test", "messages": PROMPT, "stream": True}
    with track_context(user_id="alice"), capture_logs() as logs:
        async with ahttp.stream("POST", "/chat/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines()]
    (record,) = fake.requests
    assert record.json["stream_options"] == {"include_usage": True}
    assert lines.count("data: [DONE]") == 1
    assert not any('"choices": []' in line for line in lines)
    assert logged_usd(one_call(logs)) == expected_cost(record, "gpt-test")


def test_anthropic_compatible_path(guard: Guard, fake: FakeProvider, module: Any) -> None:
    with guard.wrap(module.Client(base_url=fake.base_url)) as http:
        with track_context(user_id="alice"), capture_logs() as logs:
            http.post(
                "/v1/messages",
                json={"model": "claude-test", "max_tokens": 20, "messages": PROMPT},
                headers={"anthropic-version": "2023-06-01"},
            )
    (record,) = fake.requests
    event = one_call(logs)
    assert event["provider"] == "anthropic"
    assert logged_usd(event) == expected_cost(record, "claude-test")


def test_mounted_transports_are_guarded(guard: Guard, fake: FakeProvider, module: Any) -> None:
    mounted = module.HTTPTransport()
    client = module.Client(mounts={f"http://127.0.0.1:{fake.port}": mounted})
    guard.wrap(client)
    guard.wrap(client)  # twice: still metered once
    assert is_guarded(client)
    with client, track_context(user_id="alice"), capture_logs() as logs:
        client.post(
            f"{fake.openai_base_url}/chat/completions",
            json={"model": "gpt-test", "messages": PROMPT},
        )
    (record,) = fake.requests
    assert logged_usd(one_call(logs)) == expected_cost(record, "gpt-test")
    guarded = next(iter(client._mounts.values()))
    assert guarded.inner is mounted
