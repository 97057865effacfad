"""Streams whose body is already read, or served with a JSON content type.

A transport that answers from memory (``httpx2.MockTransport``, respx) returns
``Response(content=bytes)``: the client hands the app those bytes and never iterates the
response stream. The guard meters such a body at once and settles before the app reads
it. A stream served as ``application/json`` is still a stream: the SDKs read it as
events because the request asked for one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import logged_usd, make_guard, one_call, used, user_message
from payi_guard import track_context
from payi_guard.engine import Guard

PROMPT = user_message("Say hello")
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


def _event(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(content: str, finish: str | None = None, *, usage: bool) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    extra = {"usage": None} if usage else {}
    return _event({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                   "model": "gpt-test", "choices": [choice], **extra})  # fmt: skip


def chat_stream(*, usage: bool) -> bytes:
    """A chat stream as sent with ``include_usage`` (``usage``) or without it."""
    body = _chunk("Hel", usage=usage) + _chunk("lo", "stop", usage=usage)
    if usage:
        body += _event({"id": "c1", "object": "chat.completion.chunk", "created": 1,
                        "model": "gpt-test", "choices": [], "usage": USAGE})  # fmt: skip
    return body + b"data: [DONE]\n\n"


Handler = Callable[[httpx2.Request], httpx2.Response]


def serve(content_type: str, *, loaded: bool, requests: list[bytes]) -> Handler:
    """A provider that answers with the chat stream its request asks for."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        requests.append(body)
        options = json.loads(body).get("stream_options") or {}
        data = chat_stream(usage=options.get("include_usage") is True)
        headers = {"content-type": content_type}
        if loaded:
            return httpx2.Response(200, headers=headers, content=data)
        return httpx2.Response(200, headers=headers, stream=httpx2.ByteStream(data))

    return handler


@pytest.fixture
def guard() -> Iterator[Guard]:
    guard = make_guard()
    yield guard
    guard.close()


def _client(guard: Guard, handler: Handler) -> Any:
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = openai.OpenAI(base_url="http://llm.test/v1", api_key="k", http_client=http)
    return guard.wrap(client)


def _expected_usd() -> Decimal:
    # gpt-test: $1 input, $2 output per million tokens (meter._support.PRICES).
    tokens = Decimal(USAGE["prompt_tokens"]) * 1 + Decimal(USAGE["completion_tokens"]) * 2
    return tokens / 1_000_000


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/json"])
def test_a_loaded_stream_is_settled_before_the_app_reads_it(
    guard: Guard, content_type: str
) -> None:
    requests: list[bytes] = []
    client = _client(guard, serve(content_type, loaded=True, requests=requests))
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        event = one_call(logs)  # settled already, from the usage in the body
        chunks = [chunk.to_json(indent=None) for chunk in stream]
    assert event["outcome"] == "ok"
    assert (event["input_tokens"], event["output_tokens"]) == (11, 3)
    assert logged_usd(event) == _expected_usd() == used(guard, "alice")
    # The app sees the stream as the provider sends it without include_usage.
    assert json.loads(requests[0])["stream_options"] == {"include_usage": True}
    assert len(chunks) == 2
    assert all('"usage"' not in chunk for chunk in chunks)


def test_a_loaded_stream_response_carries_the_bytes_the_app_reads(guard: Guard) -> None:
    requests: list[bytes] = []
    client = _client(guard, serve("text/event-stream", loaded=True, requests=requests))
    with track_context(user_id="alice"), capture_logs():
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        body = raw.http_response.read()
    assert body == chat_stream(usage=False)
    assert raw.headers["content-length"] == str(len(body))


def test_a_json_typed_stream_is_streamed_and_settled_at_its_end(guard: Guard) -> None:
    requests: list[bytes] = []
    client = _client(guard, serve("application/json", loaded=False, requests=requests))
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        first = next(iter(stream))
        assert not [e for e in logs if e["event"] == "genai_call"]  # not read whole first
        rest = list(stream)
    event = one_call(logs)
    assert first.choices[0].delta.content == "Hel"
    assert len(rest) == 1
    assert event["outcome"] == "ok"
    assert logged_usd(event) == _expected_usd() == used(guard, "alice")


async def test_an_async_loaded_stream_is_settled_at_once(guard: Guard) -> None:
    requests: list[bytes] = []
    handler = serve("text/event-stream", loaded=True, requests=requests)
    http = httpx2.AsyncClient(transport=httpx2.MockTransport(handler))
    client = guard.wrap(
        openai.AsyncOpenAI(base_url="http://llm.test/v1", api_key="k", http_client=http)
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        event = one_call(logs)
        chunks = [chunk async for chunk in stream]
    await client.close()
    assert event["outcome"] == "ok"
    assert logged_usd(event) == _expected_usd()
    assert [c.choices[0].delta.content for c in chunks] == ["Hel", "lo"]


def test_a_stream_in_an_encoding_the_guard_cannot_read_is_unverified(guard: Guard) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "text/event-stream", "content-encoding": "x-private"}
        stream = httpx2.ByteStream(chat_stream(usage=True))
        return httpx2.Response(200, headers=headers, stream=stream)

    client = _client(guard, handler)
    with track_context(user_id="alice"), capture_logs() as logs:
        for _ in client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True, max_tokens=20
        ):
            pass
    event = one_call(logs)
    (invalid,) = [e for e in logs if e["event"] == "usage_invalid"]
    assert event["outcome"] == "unverified"
    assert event["cost_usd"] == event["reserved_usd"] > 0
    assert "content-encoding" in invalid["reason"]
