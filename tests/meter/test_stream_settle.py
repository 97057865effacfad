"""A stream's reservation is settled exactly once on every path it can end by."""

from __future__ import annotations

import asyncio
import gc
import json
import math
from collections.abc import AsyncIterator, MutableMapping, Sequence
from decimal import Decimal
from typing import Any

import anthropic
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import expected_cost, logged_usd, make_guard, one_call, used, user_message
from payi_guard import track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.meter import flush_abandoned_streams
from payi_guard.meter.parse import classify
from payi_guard.meter.streams import StreamState
from payi_guard.meter.tokens import estimate_input_tokens
from payi_guard.testing import FakeProvider

PROMPT = user_message("Count slowly from one to ten for me")


def chat_input_estimate(record_json: dict[str, Any]) -> int:
    body = {k: v for k, v in record_json.items() if k != "stream_options"}
    return estimate_input_tokens(body, endpoint="chat")


def assert_settled_once(
    guard: Guard, logs: Sequence[MutableMapping[str, Any]], outcome: str, rates: tuple[int, int]
) -> MutableMapping[str, Any]:
    """One ``genai_call``, with ``outcome``, whose cost is its tokens' price and is exactly
    what the ledger holds (nothing left pending)."""
    event = one_call(logs)
    assert event["outcome"] == outcome
    assert event["stream"] is True
    cost = Decimal(event["input_tokens"] * rates[0] + event["output_tokens"] * rates[1])
    cost += Decimal(event["cache_read_tokens"]) * Decimal("0.3") if rates == (3, 15) else 0
    assert logged_usd(event) == cost / 1_000_000
    assert used(guard, event["user_id"]) == logged_usd(event)
    return event


async def let_the_loop_close_generators(logs: Sequence[MutableMapping[str, Any]]) -> None:
    """Run the event loop until the abandoned stream was settled (bounded).

    An async generator the collector finds suspended is handed back to its event loop,
    which closes it on a task of its own: the SDK's generator then closes the response,
    which settles; otherwise the stream wrapper itself is collected and settled.
    """
    for _ in range(200):
        gc.collect()
        assert flush_abandoned_streams()
        if any(e["event"] == "genai_call" for e in logs):
            return
        await asyncio.sleep(0)


@pytest.fixture
def client(guard: Guard, fake: FakeProvider) -> Any:
    return guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0))


@pytest.fixture
async def aclient(guard: Guard, fake: FakeProvider) -> AsyncIterator[Any]:
    client = guard.wrap(
        openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    )
    yield client
    await client.close()


def test_end_of_stream(guard: Guard, fake: FakeProvider, client: Any) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        for _ in stream:
            pass
        stream.close()  # closing after the end settles nothing more
    (record,) = fake.requests
    event = assert_settled_once(guard, logs, "ok", (1, 2))
    assert logged_usd(event) == expected_cost(record, "gpt-test")


def test_break_inside_with(guard: Guard, fake: FakeProvider, client: Any) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        with client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        ) as stream:
            for chunk in stream:
                if chunk.choices[0].delta.content:
                    break
        assert len(logs) == 1  # settled when the block closed the stream
    (record,) = fake.requests
    event = assert_settled_once(guard, logs, "incomplete", (1, 2))
    assert event["input_tokens"] == chat_input_estimate(record.json)  # not reported yet
    assert event["output_tokens"] >= 17  # at least one word received, plus the margin


def test_a_cut_stream_is_never_charged_more_output_than_its_request_allowed(
    guard: Guard, fake: FakeProvider, client: Any
) -> None:
    # The estimate of a cut stream (bytes received / 2.5, plus a margin) is above the
    # few tokens max_tokens allows: the model cannot have sent more than those.
    with track_context(user_id="alice"), capture_logs() as logs:
        with client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True, max_tokens=5
        ) as stream:
            for index, _ in enumerate(stream):
                if index == 2:
                    break
    event = assert_settled_once(guard, logs, "incomplete", (1, 2))
    assert event["output_tokens"] == 5
    assert logged_usd(event) <= Decimal(str(event["reserved_usd"]))
    assert "under_estimated_usd" not in event


def test_break_without_with_then_garbage_collection(
    guard: Guard, fake: FakeProvider, client: Any
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        for _ in stream:
            break
        del stream
        gc.collect()
        assert flush_abandoned_streams()
    assert_settled_once(guard, logs, "incomplete", (1, 2))


@pytest.mark.parametrize("iterate", [False, True])
def test_abandoned_sync_stream_is_settled_by_gc(
    guard: Guard, fake: FakeProvider, client: Any, iterate: bool
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        if iterate:
            next(iter(stream))
        assert used(guard, "alice") > 0  # reserved, pending
        del stream
        gc.collect()
        assert flush_abandoned_streams()
    (record,) = fake.requests
    event = assert_settled_once(guard, logs, "incomplete", (1, 2))
    if not iterate:
        # Nothing was received: the input estimate plus the output margin.
        assert event["input_tokens"] == chat_input_estimate(record.json)
        assert event["output_tokens"] == 16


async def test_async_end_of_stream(guard: Guard, fake: FakeProvider, aclient: Any) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await aclient.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        async for _ in stream:
            pass
    (record,) = fake.requests
    event = assert_settled_once(guard, logs, "ok", (1, 2))
    assert logged_usd(event) == expected_cost(record, "gpt-test")


async def test_async_break_inside_async_with(
    guard: Guard, fake: FakeProvider, aclient: Any
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await aclient.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        async with stream:
            async for _ in stream:
                break
        assert len(logs) == 1
    assert_settled_once(guard, logs, "incomplete", (1, 2))


async def test_async_break_without_with_then_garbage_collection(
    guard: Guard, fake: FakeProvider, aclient: Any
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await aclient.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        async for _ in stream:
            break
        del stream
        gc.collect()
        await let_the_loop_close_generators(logs)
        assert flush_abandoned_streams()
    assert_settled_once(guard, logs, "incomplete", (1, 2))


async def test_abandoned_async_stream_is_settled_without_the_loop(
    guard: Guard, fake: FakeProvider, aclient: Any
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await aclient.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        del stream  # never iterated: no generator, no aclose, nothing the loop would run
        gc.collect()
        assert flush_abandoned_streams()
        assert len(logs) == 1  # settled before the loop ran again
    event = assert_settled_once(guard, logs, "incomplete", (1, 2))
    assert event["output_tokens"] == 16


async def test_abandoned_async_anthropic_stream_keeps_the_reported_input(
    guard: Guard, fake: FakeProvider
) -> None:
    client: Any = guard.wrap(
        anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=0)
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await client.messages.create(
            model="claude-test", max_tokens=50, messages=PROMPT, stream=True
        )
        first = await stream.__anext__()
        assert first.type == "message_start"
        del stream, first
        gc.collect()
        await let_the_loop_close_generators(logs)
        assert flush_abandoned_streams()
    await client.close()
    (record,) = fake.requests
    event = assert_settled_once(guard, logs, "incomplete", (3, 15))
    assert record.usage is not None
    assert event["input_tokens"] == record.usage["input_tokens"]  # exact, from message_start


def test_with_streaming_response_closed_unread(
    guard: Guard, fake: FakeProvider, client: Any
) -> None:
    with track_context(user_id="alice"), capture_logs() as logs:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=PROMPT, stream=True
        ) as response:
            assert response.http_response.status_code == 200
    assert_settled_once(guard, logs, "incomplete", (1, 2))


def test_slow_stream_closed_early_settles_once(
    guard: Guard, fake: FakeProvider, client: Any
) -> None:
    fake.chunk_delay = 0.005
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        received = []
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
            if len(received) == 4:
                stream.close()
                break
        stream.close()
        del stream
        gc.collect()
        assert flush_abandoned_streams()
    event = assert_settled_once(guard, logs, "incomplete", (1, 2))
    text = "".join(received)
    assert event["output_tokens"] >= max(math.ceil(len(text.encode()) / 2.5), 3) + 16


@pytest.mark.redis
async def test_abandoned_async_stream_on_redis(
    clock: FakeClock, fake: FakeProvider, redis_url: str, key_prefix: str
) -> None:
    guard = make_guard(clock, storage_uri=redis_url, key_prefix=key_prefix)
    client: Any = guard.wrap(
        openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        async for _ in stream:
            pass
        abandoned = await client.chat.completions.create(
            model="gpt-test", messages=PROMPT, stream=True
        )
        del abandoned
        gc.collect()
        assert flush_abandoned_streams()
    await client.close()
    complete, gone = [e for e in logs if e["event"] == "genai_call"]
    assert (complete["outcome"], gone["outcome"]) == ("ok", "incomplete")
    assert logged_usd(complete) == expected_cost(fake.requests[0], "gpt-test")
    assert await guard.async_ledger.read([], now=clock.now()) == ()
    total = logged_usd(complete) + logged_usd(gone)
    assert used(guard, "alice") == total  # both settled: nothing pending in Redis
    guard.close()
    await guard.aclose()


def test_a_stream_closed_after_its_final_usage_is_ok(guard: Guard) -> None:
    # LiteLLM closes an Anthropic stream once message_delta brought the final usage,
    # before message_stop arrives: the call was read to its end as far as its bill goes.
    request = CallRequest(model="claude-sonnet-4-5", max_output_tokens=64, provider="anthropic")
    endpoint = classify("POST", "/v1/messages")
    assert endpoint is not None
    start = {
        "type": "message_start",
        "message": {
            "id": "m",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [],
            "usage": {"input_tokens": 12, "output_tokens": 1},
        },
    }
    text = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 9},
    }
    body = b"".join(
        f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode()
        for event in (start, text, delta)
    )
    results = []
    for closed_at in (len(body), body.index(b"event: message_delta")):
        with track_context(user_id="alice"):
            state = StreamState(
                guard.begin(request),
                endpoint,
                added_include_usage=False,
                fallback_input=100,
                max_output=64,
                inflater=None,
                raw=False,
            )
        state.feed(body[:closed_at])
        results.append(state.result("close"))
    final, cut = results
    assert (final.outcome, final.usage.input_tokens, final.usage.output_tokens) == ("ok", 12, 9)
    assert cut.outcome == "incomplete"
