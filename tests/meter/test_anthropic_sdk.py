"""The real anthropic SDK (2.x, httpx2), sync and async, through a guarded client."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import anthropic
import pytest
from structlog.testing import capture_logs

from meter._support import assert_charged, expected_cost, logged_usd, one_call, used, user_message
from payi_guard import track_context
from payi_guard.engine import Guard
from payi_guard.testing import DEFAULT_REPLY, FakeProvider, Scripted, ToolCall

MODEL = "claude-test"
PROMPT = user_message("Write one line about the sea")


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def drain(stream: Any) -> list[Any]:
    if hasattr(stream, "__aiter__"):
        return [item async for item in stream]
    return list(stream)


async def collect_into(stream: Any, items: list[Any]) -> None:
    """Append every item of a sync or async stream to ``items`` (until it raises)."""
    if hasattr(stream, "__aiter__"):
        async for item in stream:
            items.append(item)
    else:
        items.extend(stream)


_open: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        await maybe(_open.pop().close())


def client_for(guard: Guard, fake: FakeProvider, mode: str, **kwargs: Any) -> Any:
    cls = anthropic.Anthropic if mode == "sync" else anthropic.AsyncAnthropic
    kwargs.setdefault("max_retries", 0)
    client = cls(base_url=fake.anthropic_base_url, api_key="sk-ant-test", **kwargs)
    _open.append(client)
    return guard.wrap(client)


async def test_messages_plain_with_cache_fields(
    guard: Guard, fake: FakeProvider, mode: str
) -> None:
    fake.enqueue(Scripted(cached_tokens=2048, cache_write_tokens=512))
    client = client_for(guard, fake, mode)
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    with track_context(user_id="alice"), capture_logs() as logs:
        message = await maybe(
            client.messages.create(model=MODEL, max_tokens=64, system=system, messages=PROMPT)
        )
    (record,) = fake.requests
    assert message.content[0].text == DEFAULT_REPLY
    assert message.usage.cache_read_input_tokens == 2048
    event = assert_charged(guard, "alice", logs, record, MODEL, stream=False, provider="anthropic")
    # input_tokens excludes the cache tokens, which are priced at their own rates.
    assert event["input_tokens"] == record.usage["input_tokens"]  # type: ignore[index]
    assert (event["cache_read_tokens"], event["cache_write_tokens"]) == (2048, 512)
    assert event["endpoint"] == "anthropic_messages"
    assert (
        logged_usd(event)
        == (
            Decimal(event["input_tokens"] * 3 + 2048 * Decimal("0.3") + 512 * Decimal("3.75"))
            + Decimal(10 * 15)
        )
        / 1_000_000
    )


async def test_full_event_stream(guard: Guard, fake: FakeProvider, mode: str) -> None:
    fake.enqueue(Scripted(cached_tokens=100, cache_write_tokens=50))
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await maybe(
            client.messages.create(model=MODEL, max_tokens=64, messages=PROMPT, stream=True)
        )
        events = await drain(stream)
    (record,) = fake.requests
    kinds = [event.type for event in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    text = "".join(
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == DEFAULT_REPLY
    assert "stream_options" not in record.json
    event = assert_charged(guard, "alice", logs, record, MODEL, stream=True, provider="anthropic")
    assert (event["cache_read_tokens"], event["cache_write_tokens"]) == (100, 50)


async def test_stream_whose_delta_reports_output_only(
    guard: Guard, fake: FakeProvider, mode: str
) -> None:
    # Older API versions: message_delta carries only output_tokens; the input and cache
    # counts of message_start must be kept.
    fake.enqueue(Scripted(cached_tokens=10, anthropic_delta_usage="output"))
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await maybe(
            client.messages.create(model=MODEL, max_tokens=64, messages=PROMPT, stream=True)
        )
        await drain(stream)
    (record,) = fake.requests
    assert_charged(guard, "alice", logs, record, MODEL, stream=True, provider="anthropic")


async def test_tool_use_stream_and_stream_helper(
    guard: Guard, fake: FakeProvider, mode: str
) -> None:
    fake.enqueue(Scripted(text="", tool_calls=[ToolCall("lookup", '{"q": "tides today"}')]))
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        if mode == "sync":
            with client.messages.stream(model=MODEL, max_tokens=64, messages=PROMPT) as stream:
                final = stream.get_final_message()
        else:
            async with client.messages.stream(
                model=MODEL, max_tokens=64, messages=PROMPT
            ) as stream:
                final = await stream.get_final_message()
    (record,) = fake.requests
    assert final.content[0].type == "tool_use"
    assert final.content[0].input == {"q": "tides today"}
    assert_charged(guard, "alice", logs, record, MODEL, stream=True, provider="anthropic")


async def test_overloaded_error_mid_stream(guard: Guard, fake: FakeProvider, mode: str) -> None:
    fake.enqueue(Scripted(error_after=5, error_type="overloaded_error"))
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = await maybe(
            client.messages.create(model=MODEL, max_tokens=64, messages=PROMPT, stream=True)
        )
        received: list[Any] = []
        with pytest.raises(anthropic.APIStatusError) as info:
            await collect_into(stream, received)
    assert info.value.type == "overloaded_error"
    (record,) = fake.requests
    event = one_call(logs)
    assert event["outcome"] == "error"
    assert event["stream"] is True
    # message_start reported the exact input; the output is what arrived plus a margin.
    usage = record.usage
    assert usage is not None
    assert event["input_tokens"] == usage["input_tokens"]
    deltas = [e for e in received if e.type == "content_block_delta"]
    words = sum(len(e.delta.text.encode()) for e in deltas)
    assert event["output_tokens"] == max(-(-words * 2 // 5), len(deltas)) + 16
    cost = (Decimal(event["input_tokens"] * 3) + Decimal(event["output_tokens"] * 15)) / 1_000_000
    assert logged_usd(event) == cost
    assert used(guard, "alice") == cost


async def test_beta_messages_and_count_tokens_passthrough(
    guard: Guard, fake: FakeProvider, mode: str
) -> None:
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        message = await maybe(
            client.beta.messages.create(model=MODEL, max_tokens=64, messages=PROMPT)
        )
        counted = await maybe(client.messages.count_tokens(model=MODEL, messages=PROMPT))
    beta_record, count_record = fake.requests
    assert beta_record.path == "/v1/messages"
    assert message.content[0].text == DEFAULT_REPLY
    assert counted.input_tokens == 6
    assert count_record.path == "/v1/messages/count_tokens"
    event = one_call(logs)  # count_tokens is not a metered call
    assert logged_usd(event) == expected_cost(beta_record, MODEL)


async def test_with_raw_and_streaming_response(guard: Guard, fake: FakeProvider, mode: str) -> None:
    client = client_for(guard, fake, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        raw = await maybe(
            client.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=PROMPT)
        )
        parsed = await maybe(raw.parse())
        if mode == "sync":
            with client.messages.with_streaming_response.create(
                model=MODEL, max_tokens=64, messages=PROMPT, stream=True
            ) as response:
                lines = list(response.iter_lines())
        else:
            async with client.messages.with_streaming_response.create(
                model=MODEL, max_tokens=64, messages=PROMPT, stream=True
            ) as response:
                lines = [line async for line in response.iter_lines()]
    plain, streamed = fake.requests
    assert raw.headers["request-id"] == plain.request_id
    assert parsed.usage.output_tokens == 10
    assert "event: message_stop" in lines
    first, second = [e for e in logs if e["event"] == "genai_call"]
    assert logged_usd(first) == expected_cost(plain, MODEL)
    assert logged_usd(second) == expected_cost(streamed, MODEL)
    assert used(guard, "alice") == logged_usd(first) + logged_usd(second)
