"""The fake provider, checked through the real openai and anthropic SDKs.

If the SDKs parse every answer (plain, streamed, errors, retries, resets, gzip) the way
they parse the real APIs, the fake is faithful enough to test the metering transport.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import json
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest

from payi_guard.testing import (
    DEFAULT_REPLY,
    FakeProvider,
    Scripted,
    ToolCall,
    count_input_tokens,
    count_words,
)

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello to me"}]  # 4 words
INPUT_TOKENS = 4
REPLY_WORDS = count_words(DEFAULT_REPLY)
CLAUDE = "claude-haiku-4-5"


@pytest.fixture
def fp() -> Iterator[FakeProvider]:
    with FakeProvider(retry_after=0.001) as provider:
        yield provider


@pytest.fixture
def oai(fp: FakeProvider) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=fp.openai_base_url, api_key="sk-test", max_retries=0)
    yield client
    client.close()


@pytest.fixture
def ant(fp: FakeProvider) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(base_url=fp.anthropic_base_url, api_key="sk-ant", max_retries=0)
    yield client
    client.close()


def _consume(stream: Iterable[Any], into: list[Any]) -> None:
    into.extend(stream)


def _raw_post(
    url: str, body: Any, *, accept_encoding: str = "identity", content: bytes | None = None
) -> httpx.Response:
    headers = {"accept-encoding": accept_encoding, "content-type": "application/json"}
    data = content if content is not None else json.dumps(body).encode()
    return httpx.post(url, content=data, headers=headers, timeout=10)


# --- token counting --------------------------------------------------------------------


def test_input_tokens_are_the_words_of_the_text_fields() -> None:
    body = {
        "model": "m",
        "system": "be brief",
        "messages": [
            {"role": "user", "content": "one two three"},
            {"role": "user", "content": [{"type": "text", "text": "four five"}]},
            {"role": "assistant", "tool_calls": [{"function": {"arguments": '{"a": 1}'}}]},
        ],
        "temperature": 0.5,
    }
    # 2 (system) + 3 + 2 + 2 ('{"a":' and '1}'); roles, types and the model do not count
    assert count_input_tokens(body) == 9


def test_input_tokens_count_token_arrays_and_are_never_zero() -> None:
    assert count_input_tokens({"input": [1, 2, 3]}) == 3
    assert count_input_tokens({"prompt": "a b", "instructions": "c"}) == 3
    assert count_input_tokens({"messages": []}) == 1


# --- OpenAI chat completions ------------------------------------------------------------


def test_chat_plain_usage_reply_and_recorded_request(fp: FakeProvider, oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    reply = raw.parse()

    assert reply.model == "gpt-4o-mini"
    assert reply.choices[0].message.content == DEFAULT_REPLY
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == INPUT_TOKENS
    assert reply.usage.completion_tokens == REPLY_WORDS
    assert reply.usage.total_tokens == INPUT_TOKENS + REPLY_WORDS
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 0

    (record,) = fp.requests
    assert record.method == "POST"
    assert record.path == "/v1/chat/completions"
    assert record.json["messages"] == MESSAGES
    assert record.header("Authorization") == "Bearer sk-test"
    assert record.status == 200
    assert record.stream is False
    assert record.usage == reply.usage.model_dump(exclude_none=True)
    assert raw.headers["x-request-id"] == record.request_id
    assert reply._request_id == record.request_id


def test_chat_cached_and_reasoning_tokens(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(cached_tokens=100, reasoning_tokens=7))
    reply = oai.chat.completions.create(model="o4-mini", messages=MESSAGES)

    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens == INPUT_TOKENS + 100
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 100
    assert usage.completion_tokens == REPLY_WORDS + 7
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7


def test_chat_usage_override_is_merged_deeply(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(
        Scripted(usage={"prompt_tokens": 1000, "prompt_tokens_details": {"cached_tokens": 1}})
    )
    usage = oai.chat.completions.create(model="m", messages=MESSAGES).usage

    assert usage is not None
    assert usage.prompt_tokens == 1000
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 1
    assert usage.prompt_tokens_details.audio_tokens == 0  # untouched sibling kept
    assert usage.completion_tokens == REPLY_WORDS


def test_chat_n_choices_multiply_output(oai: openai.OpenAI) -> None:
    reply = oai.chat.completions.create(model="m", messages=MESSAGES, n=3)

    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3 * REPLY_WORDS


@pytest.mark.parametrize("cap", ["max_tokens", "max_completion_tokens"])
def test_chat_output_is_capped_by_the_request(oai: openai.OpenAI, cap: str) -> None:
    reply = oai.chat.completions.create(model="m", messages=MESSAGES, **{cap: 3})  # type: ignore[call-overload]

    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == " ".join(DEFAULT_REPLY.split()[:3])
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3


def test_chat_stream_without_include_usage_has_no_usage(oai: openai.OpenAI) -> None:
    chunks = list(oai.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_REPLY
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "stop"
    # one content delta per word (plus the role chunk and the finish chunk)
    assert len(chunks) == REPLY_WORDS + 2


def test_chat_stream_with_include_usage_ends_with_a_usage_only_chunk(
    oai: openai.OpenAI, fp: FakeProvider
) -> None:
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, n=2
        )
    )

    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.prompt_tokens == INPUT_TOKENS
    assert last.usage.completion_tokens == 2 * REPLY_WORDS
    assert all(chunk.usage is None for chunk in body)
    assert {c.choices[0].index for c in body} == {0, 1}
    assert fp.requests[0].usage == last.usage.model_dump(exclude_none=True)


def test_chat_stream_wire_format(fp: FakeProvider) -> None:
    body = {
        "model": "m",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = _raw_post(f"{fp.openai_base_url}/chat/completions", body)

    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["transfer-encoding"] == "chunked"
    blocks = response.content.split(b"\n\n")
    assert blocks[-1] == b""
    assert blocks[-2] == b"data: [DONE]"
    assert all(block.startswith(b"data: ") for block in blocks[:-1])
    usage_chunk = json.loads(blocks[-3][len(b"data: ") :])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["total_tokens"] == INPUT_TOKENS + REPLY_WORDS
    assert json.loads(blocks[0][len(b"data: ") :])["usage"] is None


def test_chat_stream_can_omit_usage_like_servers_that_ignore_stream_options(
    oai: openai.OpenAI, fp: FakeProvider
) -> None:
    fp.enqueue(Scripted(omit_usage=True))
    chunks = list(
        oai.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )

    assert all(chunk.usage is None and chunk.choices for chunk in chunks)


def test_chat_stream_tool_call_deltas(oai: openai.OpenAI, fp: FakeProvider) -> None:
    arguments = '{"city": "Paris", "unit": "C"}'
    fp.enqueue(Scripted(text="", tool_calls=[ToolCall("get_weather", arguments, id="call_1")]))
    with oai.chat.completions.stream(
        model="m", messages=MESSAGES, stream_options={"include_usage": True}
    ) as stream:
        pieces = [
            event.arguments_delta
            for event in stream
            if event.type == "tool_calls.function.arguments.delta" and event.arguments_delta
        ]
        final = stream.get_final_completion()

    (call,) = final.choices[0].message.tool_calls or []
    assert call.id == "call_1"
    assert call.function.name == "get_weather"
    assert call.function.arguments == arguments
    assert "".join(pieces) == arguments
    assert len(pieces) == 8  # 31 characters in 4-character pieces
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.usage is not None
    assert final.usage.completion_tokens == 8


def test_chat_plain_tool_calls(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(text="", tool_calls=[ToolCall("lookup", '{"q": 1}')]))
    message = oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message

    assert message.content is None
    (call,) = message.tool_calls or []
    assert call.function.arguments == '{"q": 1}'  # type: ignore[union-attr]


# --- OpenAI Responses ------------------------------------------------------------------


def test_responses_plain(oai: openai.OpenAI) -> None:
    response = oai.responses.create(
        model="gpt-4.1", input="Tell me a joke please", instructions="Be fun"
    )

    assert response.status == "completed"
    assert response.output_text == DEFAULT_REPLY
    assert response.usage is not None
    assert response.usage.input_tokens == 7  # 5 words of input, 2 of instructions
    assert response.usage.output_tokens == REPLY_WORDS
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.model == "gpt-4.1"


def test_responses_capped_is_incomplete(oai: openai.OpenAI) -> None:
    response = oai.responses.create(model="m", input="hi", max_output_tokens=2)

    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.usage is not None
    assert response.usage.output_tokens == 2


def test_responses_stream_events_and_final_usage(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(cached_tokens=3, reasoning_tokens=4))
    with oai.responses.stream(model="m", input="one two") as stream:
        types = [event.type for event in stream]
        final = stream.get_final_response()

    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types.count("response.output_text.delta") == REPLY_WORDS
    assert types[-1] == "response.completed"
    assert final.output_text == DEFAULT_REPLY
    assert final.usage is not None
    assert final.usage.input_tokens == 2 + 3
    assert final.usage.input_tokens_details.cached_tokens == 3
    assert final.usage.output_tokens == REPLY_WORDS + 4
    assert final.usage.output_tokens_details.reasoning_tokens == 4


def test_responses_stream_wire_format_has_typed_events(fp: FakeProvider) -> None:
    response = _raw_post(
        f"{fp.openai_base_url}/responses", {"model": "m", "input": "x", "stream": True}
    )
    blocks = [b for b in response.content.split(b"\n\n") if b]

    for number, block in enumerate(blocks):
        event_line, data_line = block.split(b"\n")
        data = json.loads(data_line[len(b"data: ") :])
        assert event_line == b"event: " + data["type"].encode()
        assert data["sequence_number"] == number
    assert b"[DONE]" not in response.content


@pytest.mark.parametrize("status", ["incomplete", "failed"])
def test_responses_stream_terminal_states(
    oai: openai.OpenAI, fp: FakeProvider, status: str
) -> None:
    fp.enqueue(Scripted(response_status=status))  # type: ignore[arg-type]
    events = list(oai.responses.create(model="m", input="x", stream=True))

    last = events[-1]
    assert last.type == f"response.{status}"
    assert last.response.status == status  # type: ignore[union-attr]
    assert last.response.usage is not None  # type: ignore[union-attr]
    assert last.response.usage.output_tokens == REPLY_WORDS  # type: ignore[union-attr]
    if status == "failed":
        assert last.response.error is not None  # type: ignore[union-attr]
        assert last.response.error.code == "server_error"  # type: ignore[union-attr]


def test_responses_stream_function_call(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(text="", tool_calls=[ToolCall("search", '{"q": "cats"}')]))
    with oai.responses.stream(model="m", input="x") as stream:
        final = stream.get_final_response()

    (item,) = final.output
    assert item.type == "function_call"
    assert item.name == "search"
    assert item.arguments == '{"q": "cats"}'
    assert final.usage is not None
    assert final.usage.output_tokens == 4


def test_responses_mid_stream_error_event(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(error_after=3, error_message="boom"))
    events = list(oai.responses.create(model="m", input="x", stream=True))

    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "error",
    ]
    assert events[-1].message == "boom"  # type: ignore[union-attr]
    assert events[-1].sequence_number == 3


# --- OpenAI embeddings and legacy completions ---------------------------------------------


def test_embeddings_float_and_base64_agree(oai: openai.OpenAI, fp: FakeProvider) -> None:
    as_base64 = oai.embeddings.create(model="text-embedding-3-small", input=["a b c", "d"])
    as_float = oai.embeddings.create(
        model="text-embedding-3-small", input=["a b c", "d"], encoding_format="float"
    )

    assert [d.embedding for d in as_base64.data] == [d.embedding for d in as_float.data]
    assert len(as_float.data) == 2
    assert len(as_float.data[0].embedding) == 8
    assert as_float.data[0].embedding != as_float.data[1].embedding
    assert as_float.usage.prompt_tokens == 4
    assert as_float.usage.total_tokens == 4
    first, second = fp.requests
    assert first.json["encoding_format"] == "base64"  # the SDK's default request
    assert second.json["encoding_format"] == "float"


def test_embeddings_base64_is_little_endian_float32(fp: FakeProvider) -> None:
    body = {"model": "e", "input": "hello", "encoding_format": "base64", "dimensions": 4}
    data = _raw_post(f"{fp.openai_base_url}/embeddings", body).json()

    packed = base64.b64decode(data["data"][0]["embedding"])
    assert len(packed) == 16
    floats = list(struct.unpack("<4f", packed))
    body["encoding_format"] = "float"
    assert (
        floats == _raw_post(f"{fp.openai_base_url}/embeddings", body).json()["data"][0]["embedding"]
    )


def test_legacy_completions_plain_and_streamed(oai: openai.OpenAI) -> None:
    plain = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=4)
    chunks = list(
        oai.completions.create(
            model="gpt-3.5-turbo-instruct",
            prompt="Say hi",
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    assert plain.choices[0].text == " ".join(DEFAULT_REPLY.split()[:4])
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (2, 4)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == DEFAULT_REPLY
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == REPLY_WORDS


# --- multipart passthrough -------------------------------------------------------------


def test_multipart_uploads_are_recorded_raw(oai: openai.OpenAI, fp: FakeProvider) -> None:
    uploaded = oai.files.create(file=("data.jsonl", io.BytesIO(b'{"x": 1}\n')), purpose="batch")
    text = oai.audio.transcriptions.create(
        model="whisper-1", file=("a.wav", io.BytesIO(b"RIFFfake"))
    )

    assert uploaded.id.startswith("file-")
    assert text.text == DEFAULT_REPLY
    files, audio = fp.requests
    assert files.path == "/v1/files"
    assert audio.path == "/v1/audio/transcriptions"
    for record, payload in ((files, b'{"x": 1}\n'), (audio, b"RIFFfake")):
        content_type = record.header("content-type")
        assert content_type is not None
        assert content_type.startswith("multipart/form-data; boundary=")
        assert record.json is None
        assert payload in record.body
        assert record.usage is None


# --- Anthropic messages ----------------------------------------------------------------


def test_anthropic_plain_usage_with_cache_fields(
    ant: anthropic.Anthropic, fp: FakeProvider
) -> None:
    fp.enqueue(Scripted(cached_tokens=50, cache_write_tokens=20))
    raw = ant.messages.with_raw_response.create(
        model=CLAUDE, max_tokens=100, system="Be nice", messages=MESSAGES
    )
    message = raw.parse()

    assert message.content[0].type == "text"
    assert message.content[0].text == DEFAULT_REPLY
    assert message.stop_reason == "end_turn"
    assert message.model == CLAUDE
    assert message.usage.input_tokens == INPUT_TOKENS + 2
    assert message.usage.cache_read_input_tokens == 50
    assert message.usage.cache_creation_input_tokens == 20
    assert message.usage.output_tokens == REPLY_WORDS
    (record,) = fp.requests
    assert raw.headers["request-id"] == record.request_id
    credentials = (record.header("x-api-key"), record.header("authorization"))
    assert credentials in (("sk-ant", None), (None, "Bearer sk-ant"))
    assert record.header("anthropic-version") is not None


def test_anthropic_stream_event_sequence(fp: FakeProvider) -> None:
    body = {"model": CLAUDE, "max_tokens": 3, "messages": MESSAGES, "stream": True}
    response = _raw_post(f"{fp.base_url}/v1/messages", body)
    names = [b.split(b"\n")[0] for b in response.content.split(b"\n\n") if b]

    assert names == [
        b"event: message_start",
        b"event: content_block_start",
        b"event: ping",
        *[b"event: content_block_delta"] * 3,
        b"event: content_block_stop",
        b"event: message_delta",
        b"event: message_stop",
    ]


@pytest.mark.parametrize("delta_usage", ["full", "output"])
def test_anthropic_stream_usage_is_split_across_start_and_delta(
    fp: FakeProvider, ant: anthropic.Anthropic, delta_usage: str
) -> None:
    fp.enqueue(Scripted(cached_tokens=9, anthropic_delta_usage=delta_usage))  # type: ignore[arg-type]
    events = list(ant.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True))

    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == INPUT_TOKENS
    assert start.message.usage.cache_read_input_tokens == 9
    assert start.message.usage.output_tokens == 1
    delta = next(e for e in events if e.type == "message_delta")
    assert delta.usage.output_tokens == REPLY_WORDS
    if delta_usage == "full":
        assert delta.usage.input_tokens == INPUT_TOKENS
        assert delta.usage.cache_read_input_tokens == 9
    else:
        assert delta.usage.input_tokens is None
        assert delta.usage.cache_read_input_tokens is None
    assert delta.delta.stop_reason == "end_turn"


def test_anthropic_stream_helper_accumulates_text_and_tool_use(
    fp: FakeProvider, ant: anthropic.Anthropic
) -> None:
    fp.enqueue(Scripted(tool_calls=[ToolCall("get_weather", '{"city": "Oslo"}', id="toolu_1")]))
    with ant.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
        message = stream.get_final_message()

    text, tool = message.content
    assert text.type == "text"
    assert text.text == DEFAULT_REPLY
    assert tool.type == "tool_use"
    assert (tool.id, tool.name, tool.input) == ("toolu_1", "get_weather", {"city": "Oslo"})
    assert message.stop_reason == "tool_use"
    assert message.usage.output_tokens == REPLY_WORDS + 4  # 16 characters of arguments


def test_anthropic_overloaded_error_mid_stream(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    fp.enqueue(Scripted(error_after=4))
    stream = ant.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True)
    seen: list[Any] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        _consume(stream, seen)

    # the fourth event was the ping, which the SDK skips
    assert [e.type for e in seen] == ["message_start", "content_block_start", "content_block_delta"]
    assert caught.value.type == "overloaded_error"
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


def test_anthropic_count_tokens_is_answered(ant: anthropic.Anthropic) -> None:
    assert ant.messages.count_tokens(model=CLAUDE, messages=MESSAGES).input_tokens == INPUT_TOKENS


# --- errors ----------------------------------------------------------------------------

OPENAI_ERRORS = {
    400: (openai.BadRequestError, "invalid_request_error"),
    401: (openai.AuthenticationError, "invalid_request_error"),
    429: (openai.RateLimitError, "requests"),
    500: (openai.InternalServerError, "server_error"),
    529: (openai.InternalServerError, "server_error"),
}
ANTHROPIC_ERRORS = {
    400: (anthropic.BadRequestError, "invalid_request_error"),
    401: (anthropic.AuthenticationError, "authentication_error"),
    429: (anthropic.RateLimitError, "rate_limit_error"),
    500: (anthropic.InternalServerError, "api_error"),
    529: (anthropic.OverloadedError, "overloaded_error"),
}


@pytest.mark.parametrize("status", sorted(OPENAI_ERRORS))
def test_openai_error_statuses(fp: FakeProvider, oai: openai.OpenAI, status: int) -> None:
    fp.enqueue(Scripted(status=status))
    error_class, error_type = OPENAI_ERRORS[status]
    with pytest.raises(error_class) as caught:
        oai.chat.completions.create(model="m", messages=MESSAGES)

    error = caught.value
    assert error.status_code == status
    assert error.type == error_type
    assert isinstance(error.body, dict)
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.request_id == fp.requests[0].request_id
    headers = error.response.headers
    if status == 429:
        assert error.code == "rate_limit_exceeded"
        assert headers["retry-after"] == "1"
        assert headers["retry-after-ms"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
    else:
        assert "retry-after" not in headers


@pytest.mark.parametrize("status", sorted(ANTHROPIC_ERRORS))
def test_anthropic_error_statuses(fp: FakeProvider, ant: anthropic.Anthropic, status: int) -> None:
    fp.enqueue(Scripted(status=status))
    error_class, error_type = ANTHROPIC_ERRORS[status]
    with pytest.raises(error_class) as caught:
        ant.messages.create(model=CLAUDE, max_tokens=10, messages=MESSAGES)

    error = caught.value
    assert type(error) is error_class
    assert error.type == error_type
    assert error.body == {
        "type": "error",
        "error": {"type": error_type, "message": error.api_message},
        "request_id": fp.requests[0].request_id,
    }
    assert error.request_id == fp.requests[0].request_id
    headers = error.response.headers
    assert headers["x-should-retry"] == ("false" if status < 429 else "true")
    assert ("retry-after" in headers) is (status == 429)


def test_scripted_error_type_and_message(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(Scripted(status=429, error_type="insufficient_quota", error_message="pay up"))
    with pytest.raises(openai.RateLimitError) as caught:
        oai.chat.completions.create(model="m", messages=MESSAGES)

    assert caught.value.type == "insufficient_quota"
    assert caught.value.message.endswith("pay up")


def test_sdks_retry_429_and_5xx_then_succeed(fp: FakeProvider) -> None:
    fast = {"retry-after-ms": "1"}
    fp.enqueue(Scripted(status=429), Scripted(status=500, headers=fast))
    fp.enqueue(Scripted(status=529, headers=fast, path="/v1/messages"))
    with openai.OpenAI(base_url=fp.openai_base_url, api_key="k", max_retries=2) as client:
        assert client.chat.completions.create(model="m", messages=MESSAGES).usage is not None
    with anthropic.Anthropic(base_url=fp.anthropic_base_url, api_key="k", max_retries=2) as aclient:
        assert aclient.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES).usage

    statuses = [(r.path, r.status, r.header("x-stainless-retry-count")) for r in fp.requests]
    assert statuses == [
        ("/v1/chat/completions", 429, "0"),
        ("/v1/chat/completions", 500, "1"),
        ("/v1/chat/completions", 200, "2"),
        ("/v1/messages", 529, "0"),
        ("/v1/messages", 200, "1"),
    ]


def test_sdks_obey_x_should_retry_false(fp: FakeProvider) -> None:
    fp.enqueue(Scripted(status=429, headers={"x-should-retry": "false"}))
    with openai.OpenAI(base_url=fp.openai_base_url, api_key="k", max_retries=3) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=MESSAGES)
    fp.enqueue(Scripted(status=400))
    with anthropic.Anthropic(base_url=fp.anthropic_base_url, api_key="k", max_retries=3) as aclient:
        with pytest.raises(anthropic.BadRequestError):
            aclient.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES)

    assert len(fp.requests) == 2


def test_openai_mid_stream_error_chunk(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(Scripted(error_after=2, error_type="server_error", error_message="lost"))
    stream = oai.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    seen: list[Any] = []
    with pytest.raises(openai.APIError) as caught:
        _consume(stream, seen)

    assert len(seen) == 2
    assert caught.value.message == "lost"


def test_connection_reset_mid_stream(
    fp: FakeProvider, oai: openai.OpenAI, ant: anthropic.Anthropic
) -> None:
    fp.enqueue(Scripted(reset_after=3), Scripted(reset_after=2))
    received: list[Any] = []
    chat_stream = oai.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIConnectionError):
        _consume(chat_stream, received)
    claude_stream = ant.messages.create(
        model=CLAUDE, max_tokens=100, messages=MESSAGES, stream=True
    )
    # The anthropic SDK lets the transport's read error through unwrapped.
    with pytest.raises((anthropic.APIConnectionError, httpx2.ReadError)):
        _consume(claude_stream, [])

    assert len(received) == 3
    records = fp.wait_for(2, answered=True)
    assert [r.outcome for r in records] == ["reset", "reset"]


def test_connection_reset_before_a_plain_answer(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(Scripted(reset_after=0))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=MESSAGES)

    assert fp.wait_for(1, answered=True)[0].outcome == "reset"


def test_validation_errors_like_the_real_apis(fp: FakeProvider) -> None:
    no_max_tokens = _raw_post(f"{fp.base_url}/v1/messages", {"model": CLAUDE, "messages": MESSAGES})
    bad_json = _raw_post(f"{fp.openai_base_url}/chat/completions", None, content=b"{nope")
    no_model = _raw_post(f"{fp.openai_base_url}/chat/completions", {"messages": MESSAGES})
    options_without_stream = _raw_post(
        f"{fp.openai_base_url}/chat/completions",
        {"model": "m", "messages": MESSAGES, "stream_options": {"include_usage": True}},
    )
    unknown = _raw_post(f"{fp.openai_base_url}/nope", {})

    assert no_max_tokens.status_code == 400
    assert no_max_tokens.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens: Field required",
    }
    assert bad_json.status_code == 400
    assert "could not parse the JSON body" in bad_json.json()["error"]["message"]
    assert no_model.json()["error"]["message"] == "you must provide a model parameter"
    assert options_without_stream.status_code == 400
    assert "stream_options" in options_without_stream.json()["error"]["message"]
    assert unknown.status_code == 404
    assert unknown.json()["error"]["message"] == "Invalid URL (POST /v1/nope)"


def test_reject_stream_options_mode(oai: openai.OpenAI) -> None:
    with FakeProvider(reject_stream_options=True) as strict:
        client = openai.OpenAI(base_url=strict.openai_base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
        client.close()

    assert "stream_options" in caught.value.message
    assert chunks[-1].choices[0].finish_reason == "stop"


# --- gzip ------------------------------------------------------------------------------


def test_gzip_when_the_client_accepts_it(fp: FakeProvider) -> None:
    url = f"{fp.openai_base_url}/chat/completions"
    body = {"model": "m", "messages": MESSAGES}
    with httpx.Client() as client:
        zipped = client.post(url, json=body, headers={"accept-encoding": "gzip"})
        with client.stream(
            "POST", url, json={**body, "stream": True}, headers={"accept-encoding": "gzip"}
        ) as streamed:
            raw_stream = b"".join(streamed.iter_raw())
        plain = client.post(url, json=body, headers={"accept-encoding": "identity"})
        refused = client.post(url, json=body, headers={"accept-encoding": "gzip;q=0"})

    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.json()["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert streamed.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw_stream).endswith(b"data: [DONE]\n\n")
    assert "content-encoding" not in plain.headers
    assert plain.json()["usage"]["prompt_tokens"] == INPUT_TOKENS
    assert "content-encoding" not in refused.headers


def test_gzip_is_decoded_by_the_sdks_and_can_be_turned_off(oai: openai.OpenAI) -> None:
    response = oai.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
    assert response.headers["content-encoding"] == "gzip"
    assert response.parse().choices[0].message.content == DEFAULT_REPLY

    with FakeProvider(gzip=False) as plain:
        client = openai.OpenAI(base_url=plain.openai_base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        client.close()
    assert "content-encoding" not in raw.headers

    forced = Scripted(gzip=True)
    with FakeProvider() as fake:
        fake.enqueue(forced)
        data = _raw_post(
            f"{fake.openai_base_url}/chat/completions", {"model": "m", "messages": MESSAGES}
        )
    assert data.headers["content-encoding"] == "gzip"


# --- slow mode -------------------------------------------------------------------------


def test_chunk_delay_spaces_stream_events(oai: openai.OpenAI, fp: FakeProvider) -> None:
    fp.enqueue(Scripted(text="a b c", delay=0.03))
    started = time.perf_counter()
    arrivals = []
    for _ in oai.chat.completions.create(model="m", messages=MESSAGES, stream=True):
        arrivals.append(time.perf_counter() - started)

    # role chunk, 3 words, finish chunk, [DONE]: 6 events, each 30 ms apart
    assert len(arrivals) == 5
    assert arrivals[-1] >= 5 * 0.03
    assert arrivals[0] >= 0.03


# --- control API -----------------------------------------------------------------------


def test_scripts_are_taken_in_order_and_by_path(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(
        Scripted(text="for messages", path="/v1/messages"),
        Scripted(text="first"),
        Scripted(text="second"),
    )
    assert fp.pending == 3

    first = oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    second = oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
    third = oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content

    assert (first, second, third) == ("first", "second", DEFAULT_REPLY)
    assert fp.pending == 1


def test_path_defaults_and_clear(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.set_default("/chat/completions", Scripted(text="always this"))
    fp.enqueue(Scripted(text="once"))
    texts = [
        oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        for _ in range(3)
    ]
    embedding = oai.embeddings.create(model="e", input="x")

    assert texts == ["once", "always this", "always this"]
    assert embedding.usage.prompt_tokens == 1
    fp.set_default("/chat/completions", None)
    assert (
        oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        == DEFAULT_REPLY
    )

    fp.set_default("/chat/completions", Scripted(text="again"))
    fp.enqueue(Scripted(text="queued"))
    fp.clear()
    assert fp.requests == []
    assert fp.pending == 0
    assert (
        oai.chat.completions.create(model="m", messages=MESSAGES).choices[0].message.content
        == DEFAULT_REPLY
    )


def test_requests_is_a_snapshot(fp: FakeProvider, oai: openai.OpenAI) -> None:
    oai.chat.completions.create(model="m", messages=MESSAGES)
    snapshot = fp.requests
    snapshot[0].status = 999
    snapshot.clear()

    assert fp.requests[0].status == 200


def test_wait_for_times_out_with_a_clear_message(fp: FakeProvider) -> None:
    with pytest.raises(TimeoutError, match=r"for 1 request\(s\), got 0"):
        fp.wait_for(1, timeout=0.05)


def test_model_is_echoed_on_every_route_unless_scripted(
    oai: openai.OpenAI, ant: anthropic.Anthropic, fp: FakeProvider
) -> None:
    assert oai.chat.completions.create(model="my-model", messages=MESSAGES).model == "my-model"
    assert oai.responses.create(model="my-model", input="x").model == "my-model"
    assert oai.embeddings.create(model="my-model", input="x").model == "my-model"
    assert oai.completions.create(model="my-model", prompt="x").model == "my-model"
    assert (
        ant.messages.create(model="my-model", max_tokens=5, messages=MESSAGES).model == "my-model"
    )
    fp.enqueue(Scripted(model="gpt-4o-2024-08-06"))
    assert (
        oai.chat.completions.create(model="gpt-4o", messages=MESSAGES).model == "gpt-4o-2024-08-06"
    )


def test_scripted_raw_events(fp: FakeProvider, ant: anthropic.Anthropic) -> None:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": CLAUDE,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 1},
        },
    }
    fp.enqueue(
        Scripted(
            events=[
                start,
                b": a comment line\n\n",
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 2},
                    },
                ),
                {"type": "message_stop"},
            ]
        )
    )
    events = list(ant.messages.create(model=CLAUDE, max_tokens=5, messages=MESSAGES, stream=True))

    assert [e.type for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1].usage.output_tokens == 2  # type: ignore[union-attr]


def test_scripted_body_is_sent_verbatim(fp: FakeProvider) -> None:
    fp.enqueue(Scripted(body={"anything": True}), Scripted(status=503, body=b"upstream down"))
    ok = _raw_post(f"{fp.openai_base_url}/chat/completions", {"model": "m"})
    down = _raw_post(f"{fp.openai_base_url}/chat/completions", {"model": "m"})

    assert ok.json() == {"anything": True}
    assert (down.status_code, down.content) == (503, b"upstream down")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": 42}, "HTTP status"),
        ({"reset_after": -1}, "reset_after must not be negative"),
        ({"cached_tokens": -5}, "cached_tokens must not be negative"),
        ({"delay": -0.1}, "delay must not be negative"),
    ],
)
def test_scripted_validates_its_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scripted(**fields)


def test_provider_lifecycle() -> None:
    provider = FakeProvider()
    with pytest.raises(RuntimeError, match="not running"):
        _ = provider.base_url
    with provider:
        assert provider.openai_base_url == f"http://127.0.0.1:{provider.port}/v1"
        assert provider.anthropic_base_url == provider.base_url
        with pytest.raises(RuntimeError, match="already running"):
            provider.start()
    provider.stop()  # idempotent
    with pytest.raises(ValueError, match="chunk_delay"):
        FakeProvider(chunk_delay=-1)


def test_stop_closes_idle_keep_alive_connections() -> None:
    with FakeProvider() as provider, httpx.Client() as client:
        client.post(f"{provider.openai_base_url}/embeddings", json={"model": "e", "input": "x"})
        url = provider.openai_base_url
        provider.stop()
        with pytest.raises(httpx.TransportError):
            client.post(f"{url}/embeddings", json={"model": "e", "input": "x"})


# --- URL shapes: Azure and OpenAI-compatible prefixes ------------------------------------


def test_azure_deployment_paths(fp: FakeProvider) -> None:
    client = openai.AzureOpenAI(
        azure_endpoint=fp.base_url,
        api_key="azure-key",
        api_version="2024-10-21",
        azure_deployment="prod-gpt4o",
        max_retries=0,
    )
    reply = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client.close()

    (record,) = fp.requests
    assert record.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert record.query == {"api-version": ["2024-10-21"]}
    assert record.header("api-key") == "azure-key"
    assert reply.model == "gpt-4o"


def test_openai_compatible_base_url_with_a_custom_prefix(fp: FakeProvider) -> None:
    client = openai.OpenAI(base_url=f"{fp.base_url}/custom/v1", api_key="k", max_retries=0)
    chunks = list(
        client.chat.completions.create(
            model="llama", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
    )
    client.close()

    assert fp.requests[0].path == "/custom/v1/chat/completions"
    assert chunks[-1].usage is not None


# --- async clients, concurrent requests ------------------------------------------------


async def test_async_clients_stream_concurrently(fp: FakeProvider) -> None:
    oai = openai.AsyncOpenAI(base_url=fp.openai_base_url, api_key="k", max_retries=0)
    ant = anthropic.AsyncAnthropic(base_url=fp.anthropic_base_url, api_key="k", max_retries=0)
    fp.set_default("/chat/completions", Scripted(delay=0.01))

    async def chat(i: int) -> str:
        stream = await oai.chat.completions.create(
            model=f"m{i}", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        text = ""
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
        return text

    async def claude() -> int:
        async with ant.messages.stream(model=CLAUDE, max_tokens=100, messages=MESSAGES) as stream:
            message = await stream.get_final_message()
        return message.usage.output_tokens

    results = await asyncio.gather(*(chat(i) for i in range(5)), claude())
    await oai.close()
    await ant.close()

    assert results[:5] == [DEFAULT_REPLY] * 5
    assert results[5] == REPLY_WORDS
    models = sorted(r.json["model"] for r in fp.requests)
    assert models == [CLAUDE, "m0", "m1", "m2", "m3", "m4"]


# --- less common paths -------------------------------------------------------------------


def test_models_list_and_chunked_request_bodies(fp: FakeProvider, oai: openai.OpenAI) -> None:
    models = [model.id for model in oai.models.list()]

    def body() -> Iterator[bytes]:
        yield b'{"model": "m", '
        yield b'"input": "streamed request body"}'

    response = httpx.post(
        f"{fp.openai_base_url}/embeddings",
        content=body(),
        headers={"content-type": "application/json"},
    )

    assert "gpt-4o-mini" in models
    assert fp.requests[0].method == "GET"
    assert fp.requests[1].header("transfer-encoding") == "chunked"
    assert fp.requests[1].json == {"model": "m", "input": "streamed request body"}
    assert response.json()["usage"]["prompt_tokens"] == 3


def test_reset_part_way_through_a_plain_body(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(Scripted(reset_after=10))
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(model="m", messages=MESSAGES)

    assert fp.wait_for(1, answered=True)[0].outcome == "reset"


def test_reset_after_every_event_leaves_the_body_unterminated(fp: FakeProvider) -> None:
    fp.enqueue(Scripted(reset_after=1000))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    url = f"{fp.openai_base_url}/chat/completions"
    received: list[bytes] = []
    headers = {"accept-encoding": "identity"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        with pytest.raises(httpx.TransportError):
            _consume(response.iter_raw(), received)

    assert b"".join(received).endswith(b"data: [DONE]\n\n")


def test_plain_answers_honour_the_delay(fp: FakeProvider, oai: openai.OpenAI) -> None:
    fp.enqueue(Scripted(delay=0.1))
    started = time.perf_counter()
    oai.embeddings.create(model="e", input="x")

    assert time.perf_counter() - started >= 0.1


def test_a_client_hanging_up_mid_stream_is_recorded(fp: FakeProvider) -> None:
    fp.enqueue(Scripted(delay=0.02))
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", f"{fp.openai_base_url}/chat/completions", json=body) as response:
        next(response.iter_raw())

    assert fp.wait_for(1, answered=True)[0].outcome == "client_gone"


def test_scripted_string_and_untyped_events(fp: FakeProvider, oai: openai.OpenAI) -> None:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": "hey"}, "finish_reason": "stop"}],
    }
    fp.enqueue(Scripted(events=[chunk, json.dumps({**chunk, "id": "c2"}), "[DONE]"]))
    chunks = list(oai.chat.completions.create(model="m", messages=MESSAGES, stream=True))

    assert [c.id for c in chunks] == ["c1", "c2"]
    assert fp.requests[0].stream is True


def test_anthropic_thinking_tokens_and_unparsable_body(
    fp: FakeProvider, ant: anthropic.Anthropic
) -> None:
    fp.enqueue(Scripted(reasoning_tokens=30))
    usage = ant.messages.create(model=CLAUDE, max_tokens=100, messages=MESSAGES).usage
    bad = _raw_post(f"{fp.base_url}/v1/messages", None, content=b"{")

    assert usage.output_tokens == REPLY_WORDS + 30
    assert usage.output_tokens_details is not None
    assert usage.output_tokens_details.thinking_tokens == 30
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
