"""groq through the guard: refusals, streams left early, untrusted usage, instrument."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from conformance.providers.server import ReplayServer
from structlog.testing import capture_logs

from meter.providers._support import (
    TIGHT,
    USER,
    assert_settled_early,
    assert_unverified,
    events,
    made_up,
    make_guard,
    one_call,
    served,
)
from payi_guard import BudgetExceeded, is_refusal
from payi_guard.meter import guarded_by

groq = pytest.importorskip("groq")

CREATE = "groq/pydantic-ai/test_extra_headers"
STREAM = "groq/openllmetry/test_chat_streaming_with_events_with_no_content"
MESSAGES: Any = [{"role": "user", "content": "Hi"}]


def client_for(server: ReplayServer, mode: str = "sync", retries: int = 0) -> Any:
    cls = groq.AsyncGroq if mode == "async" else groq.Groq
    return cls(api_key="k", base_url=server.url, max_retries=retries)


async def call(client: Any, mode: str, stream: bool) -> Any:
    result = client.chat.completions.create(
        model="llama-3.3-70b-versatile", messages=MESSAGES, stream=stream
    )
    if mode == "async":
        result = await result
        return [chunk async for chunk in result] if stream else result
    return list(result) if stream else result


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True])
async def test_refusal_is_one_rate_limit_error_never_retried(
    server: ReplayServer, mode: str, stream: bool
) -> None:
    server.load(served(STREAM if stream else CREATE))
    guard = make_guard(TIGHT)
    client = guard.wrap(client_for(server, mode, retries=5))
    with capture_logs() as logs, pytest.raises(groq.RateLimitError) as info:
        await call(client, mode, stream)
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert is_refusal(exc)
    assert exc.user_id == USER
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1  # max_retries=5 did not retry it
    assert not events(logs, "genai_call")


def test_a_plain_answer_lost_after_its_headers_is_charged_its_input_and_cap() -> None:
    # A plain answer is generated whole before its headers: the provider billed it. The
    # connection drops halfway through the body, with the usage: the input's bound and
    # the output cap are charged, as for an OpenAI or Anthropic plain answer.
    body = served(CREATE)[0].body

    class Cut(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            yield body[: len(body) // 2]
            raise httpx.ReadError("connection lost")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Cut())

    http = httpx.Client(transport=httpx.MockTransport(answer))
    guard = make_guard()
    client = guard.wrap(groq.Groq(api_key="k", http_client=http, max_retries=0))
    with capture_logs() as logs, pytest.raises(groq.APIConnectionError):
        client.chat.completions.create(
            model="llama-3.3-70b-versatile", messages=MESSAGES, max_tokens=50
        )
    line = one_call(logs)
    assert (line["outcome"], line["output_tokens"]) == ("error", 50)
    assert line["cost_usd"] == line["reserved_usd"] > 0


async def test_a_plain_answer_cancelled_while_its_body_is_read_is_an_error() -> None:
    # The app's task is cancelled after the headers, halfway through the body: charged as
    # a body lost after its headers, outcome "error" as on OpenAI and Anthropic.
    body = served(CREATE)[0].body
    halfway, never = asyncio.Event(), asyncio.Event()

    class Stalled(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield body[: len(body) // 2]
            halfway.set()  # the first half was read
            await never.wait()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=Stalled())

    http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    guard = make_guard()
    client = guard.wrap(groq.AsyncGroq(api_key="k", http_client=http, max_retries=0))
    with capture_logs() as logs:
        task = asyncio.create_task(
            client.chat.completions.create(
                model="llama-3.3-70b-versatile", messages=MESSAGES, max_tokens=50
            )
        )
        await halfway.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await http.aclose()
    line = one_call(logs)
    assert (line["outcome"], line["output_tokens"]) == ("error", 50)
    assert line["cost_usd"] == line["reserved_usd"] > 0


def test_stream_closed_early_is_settled_once(server: ReplayServer) -> None:
    server.load(served(STREAM))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        stream = client.chat.completions.create(
            model="llama3-8b-8192", messages=MESSAGES, stream=True
        )
        next(iter(stream))
        stream.close()
    assert_settled_early(guard, logs)


def test_stream_closed_early_is_charged_no_more_output_than_it_allowed(
    server: ReplayServer,
) -> None:
    server.load(served(STREAM))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        stream = client.chat.completions.create(
            model="llama3-8b-8192", messages=MESSAGES, stream=True, max_tokens=2
        )
        next(iter(stream))
        stream.close()
    assert_settled_early(guard, logs)
    # The first chunk's bytes over 2.5, plus the margin, are more than the 2 allowed.
    assert one_call(logs)["output_tokens"] == 2


def test_stream_that_never_reports_usage_is_charged_its_reservation(server: ReplayServer) -> None:
    chunk = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"llama3-8b-8192",'
        b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n"
    )
    uri = "https://api.groq.com/openai/v1/chat/completions"
    server.load([made_up(uri, chunk, content_type="text/event-stream")])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        list(client.chat.completions.create(model="llama3-8b-8192", messages=MESSAGES, stream=True))
    assert_unverified(guard, logs, "no usage reported")


def test_instrument_guards_clients_made_before_and_after(server: ReplayServer) -> None:
    guard = make_guard()
    before = client_for(server)
    guard.instrument()
    try:
        after = client_for(server)
        with capture_logs() as logs:
            for client in (before, after):
                server.load(served(CREATE))
                client.chat.completions.create(model="llama-3.3-70b-versatile", messages=MESSAGES)
        assert guarded_by(before) is guarded_by(after) is guard
    finally:
        guard.uninstrument()
    assert guarded_by(before) is None
    calls = events(logs, "genai_call")
    assert [(c["provider"], c["input_tokens"]) for c in calls] == [("groq", 48)] * 2
    server.load(served(CREATE))
    with capture_logs() as logs:
        before.chat.completions.create(model="llama-3.3-70b-versatile", messages=MESSAGES)
    assert not events(logs, "genai_call")


def test_instrument_can_be_limited_to_some_sdks(server: ReplayServer) -> None:
    mistral_sdk = pytest.importorskip("mistralai.client")
    guard = make_guard()
    with pytest.raises(ValueError, match="unknown SDK"):
        guard.instrument(sdks=["groq", "cohere"])
    guard.instrument(sdks=["groq"])
    try:
        mistral = mistral_sdk.Mistral(api_key="k", server_url=server.url)
        with capture_logs() as logs:
            server.load(served("mistral/openllmetry/test_mistralai_chat_legacy"))
            mistral.chat.complete(model="mistral-tiny", messages=MESSAGES)
            server.load(served(CREATE))
            client_for(server).chat.completions.create(
                model="llama-3.3-70b-versatile", messages=MESSAGES
            )
    finally:
        guard.uninstrument()
    assert [c["provider"] for c in events(logs, "genai_call")] == ["groq"]
