"""Pure parsing for the metering transport: endpoints, bodies, usage, SSE streams."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from meter._support import tracker_state
from openai._streaming import SSEDecoder as OpenAISSEDecoder

from payi_guard.meter.parse import (
    Endpoint,
    ParsedUsage,
    RequestInfo,
    classify,
    encode_body,
    inject_include_usage,
    usage_from_response,
    with_include_usage,
)
from payi_guard.meter.sse import (
    ESTIMATE_MARGIN_TOKENS,
    SSEDecoder,
    SSEEvent,
    StreamMeter,
    StreamUsageTracker,
)
from payi_guard.pricing import TokenUsage
from payi_guard.testing import DEFAULT_REPLY, FakeProvider, Scripted, ToolCall

CHAT = Endpoint("chat")
COMPLETIONS = Endpoint("completions")
RESPONSES = Endpoint("responses")
EMBEDDINGS = Endpoint("embeddings")
ANTHROPIC = Endpoint("anthropic_messages", provider="anthropic")
REPLY_WORDS = len(DEFAULT_REPLY.split())


# --- classify --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "host", "expected"),
    [
        ("/v1/chat/completions", "api.openai.com", Endpoint("chat")),
        ("/v1/responses", "api.openai.com", Endpoint("responses")),
        ("/v1/responses?beta=true", None, Endpoint("responses")),
        ("/v1/responses/compact", None, Endpoint("responses")),
        ("/v1/embeddings", None, Endpoint("embeddings")),
        ("/v1/completions", None, Endpoint("completions")),
        ("/v1/messages", "api.anthropic.com", ANTHROPIC),
        ("/v1/messages?beta=true", None, ANTHROPIC),
        ("/anthropic/v1/messages/", None, ANTHROPIC),
        # OpenAI-compatible servers behind any base_url
        ("/custom/v1/chat/completions", "llm.internal:8000", Endpoint("chat")),
        ("/api/openai/v1/embeddings", "localhost:11434", Endpoint("embeddings")),
        ("/chat/completions", "api.deepseek.com", Endpoint("chat")),
        # Azure: deployment paths with api-version, and the v1 path on an Azure host
        (
            "/openai/deployments/prod-gpt4o/chat/completions?api-version=2024-10-21",
            "acme.openai.azure.com",
            Endpoint("chat", provider="azure", deployment="prod-gpt4o"),
        ),
        (
            "/openai/deployments/my%20dep/embeddings",
            None,
            Endpoint("embeddings", provider="azure", deployment="my dep"),
        ),
        ("/openai/v1/responses", "acme.openai.azure.com:443", Endpoint("responses", "azure")),
        ("/openai/v1/chat/completions", "x.cognitiveservices.azure.com", Endpoint("chat", "azure")),
    ],
)
def test_classify_metered_paths(path: str, host: str | None, expected: Endpoint) -> None:
    assert classify("POST", path, host) == expected
    assert classify("post", path, host) == expected


@pytest.mark.parametrize(
    "path",
    [
        "/v1/messages/count_tokens",
        "/v1/messages/batches",
        "/v1/messages/batches/msgbatch_1/cancel",
        "/v1/threads/thread_1/messages",
        "/v1/chat/completions/chatcmpl-1",
        "/v1/responses/resp_1/cancel",
        "/v1/responses/input_tokens",
        "/v1/files",
        "/v1/audio/transcriptions",
        "/v1/models",
        "/v1/batches",
        "/",
        "",
    ],
)
def test_classify_passthrough_paths(path: str) -> None:
    assert classify("POST", path) is None


def test_classify_only_meters_post() -> None:
    assert classify("GET", "/v1/chat/completions") is None  # list stored completions
    assert classify("DELETE", "/v1/responses") is None


def test_endpoint_include_usage_support() -> None:
    assert CHAT.supports_include_usage
    assert COMPLETIONS.supports_include_usage
    assert not RESPONSES.supports_include_usage
    assert not ANTHROPIC.supports_include_usage


# --- RequestInfo -----------------------------------------------------------------------


def _body(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_request_info_for_a_streamed_chat() -> None:
    body = {
        "model": "gpt-4o",
        "messages": [],
        "stream": True,
        "n": 3,
        "max_completion_tokens": 50,
        "max_tokens": 999,
        "stream_options": {"include_usage": True},
    }
    info = RequestInfo.parse(CHAT, _body(body), "application/json")

    assert info is not None
    assert (info.model, info.stream, info.n, info.include_usage) == ("gpt-4o", True, 3, True)
    assert info.max_output_tokens == 50  # max_completion_tokens wins over the legacy name
    assert info.body == body


@pytest.mark.parametrize(
    ("endpoint", "body", "cap"),
    [
        (CHAT, {"max_tokens": 7}, 7),
        (RESPONSES, {"max_output_tokens": 8, "max_tokens": 1}, 8),
        (COMPLETIONS, {"max_tokens": 9}, 9),
        (ANTHROPIC, {"max_tokens": 10}, 10),
        (EMBEDDINGS, {"max_tokens": 11}, None),
        (CHAT, {"max_tokens": True}, None),
        (CHAT, {"max_tokens": -1}, None),
        (CHAT, {}, None),
    ],
)
def test_request_info_output_cap(endpoint: Endpoint, body: dict[str, Any], cap: int | None) -> None:
    info = RequestInfo.parse(endpoint, _body({"model": "m", **body}), None)
    assert info is not None
    assert info.max_output_tokens == cap


def test_request_info_defaults_and_invalid_values() -> None:
    info = RequestInfo.parse(CHAT, _body({"model": "m", "n": 0, "stream": "yes"}), None)
    assert info is not None
    assert (info.n, info.stream, info.include_usage) == (1, False, False)
    anthropic = RequestInfo.parse(ANTHROPIC, _body({"model": "c", "n": 4}), None)
    assert anthropic is not None
    assert anthropic.n == 1  # n means nothing to Anthropic


def test_request_info_takes_the_azure_deployment_when_the_body_has_no_model() -> None:
    endpoint = classify("POST", "/openai/deployments/prod-4o/chat/completions")
    assert endpoint is not None
    without = RequestInfo.parse(endpoint, _body({"messages": []}), "application/json")
    with_model = RequestInfo.parse(endpoint, _body({"model": "gpt-4o"}), "application/json")

    assert without is not None
    assert without.model == "prod-4o"
    assert with_model is not None
    assert with_model.model == "gpt-4o"
    assert RequestInfo.parse(CHAT, _body({"messages": []}), None).model is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"--boundary\r\ncontent-disposition: form-data", "multipart/form-data; boundary=x"),
        (b'{"model": "m"}', "application/octet-stream"),
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe\x00", None),
    ],
)
def test_request_info_is_none_for_bodies_that_pass_through(
    body: bytes, content_type: str | None
) -> None:
    assert RequestInfo.parse(CHAT, body, content_type) is None


def test_request_info_accepts_json_media_type_variants() -> None:
    for content_type in (
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.x+json",
    ):
        assert RequestInfo.parse(CHAT, b'{"model": "m"}', content_type) is not None


# --- inject_include_usage ---------------------------------------------------------------


def test_inject_include_usage_adds_the_option_without_mutating() -> None:
    body = {"model": "m", "stream": True, "stream_options": {"other": 1}}
    new, added = inject_include_usage(body)

    assert added is True
    assert new["stream_options"] == {"other": 1, "include_usage": True}
    assert body["stream_options"] == {"other": 1}
    assert json.loads(encode_body(new)) == new


@pytest.mark.parametrize(
    ("body", "added"),
    [
        ({"stream": True}, True),
        ({"stream": True, "stream_options": None}, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, True),
        ({"stream": True, "stream_options": {"include_usage": True}}, False),
        ({"stream": False}, False),
        ({}, False),
        ({"stream": True, "stream_options": "bogus"}, False),
    ],
)
def test_inject_include_usage_cases(body: dict[str, Any], added: bool) -> None:
    new, was_added = inject_include_usage(body)

    assert was_added is added
    if added:
        assert new["stream_options"]["include_usage"] is True
    else:
        assert new is body


def test_encode_body_is_compact_utf8() -> None:
    assert encode_body({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


# --- usage from plain responses ---------------------------------------------------------


def test_openai_chat_usage_excludes_cached_tokens_from_input() -> None:
    response = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "model": "gpt-4.1-2025-04-14",
        "choices": [],
        "usage": {
            "prompt_tokens": 2006,
            "completion_tokens": 300,
            "total_tokens": 2306,
            "prompt_tokens_details": {"cached_tokens": 1920, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 256,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
    }

    assert usage_from_response(CHAT, response) == ParsedUsage(
        input_tokens=86,
        output_tokens=300,
        cache_read_tokens=1920,
        reasoning_tokens=256,
        complete=True,
    )


@pytest.mark.parametrize(
    ("endpoint", "usage"),
    [
        (
            "chat",
            {
                "prompt_tokens": 2500,
                "completion_tokens": 10,
                "prompt_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 1200},
            },
        ),
        (
            "responses",
            {
                "input_tokens": 2500,
                "output_tokens": 10,
                "input_tokens_details": {"cached_tokens": 1024, "cache_write_tokens": 1200},
            },
        ),
    ],
)
def test_openai_cache_writes_are_split_out_of_the_input(
    endpoint: str, usage: dict[str, Any]
) -> None:
    parsed = usage_from_response(Endpoint(endpoint), {"usage": usage})  # type: ignore[arg-type]

    assert parsed == ParsedUsage(
        input_tokens=276,
        output_tokens=10,
        cache_read_tokens=1024,
        cache_write_tokens=1200,
        complete=True,
    )
    assert parsed.total_input_tokens == 2500


def test_openai_cache_counts_never_exceed_the_input() -> None:
    usage = {
        "prompt_tokens": 100,
        "prompt_tokens_details": {"cached_tokens": 60, "cache_write_tokens": 90},
    }
    parsed = usage_from_response(CHAT, {"usage": usage})
    assert (parsed.input_tokens, parsed.cache_read_tokens, parsed.cache_write_tokens) == (0, 60, 40)


def test_openai_usage_without_details_and_legacy_completions() -> None:
    usage = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    for endpoint in (CHAT, COMPLETIONS):
        parsed = usage_from_response(endpoint, {"usage": usage})
        assert (parsed.input_tokens, parsed.output_tokens, parsed.cache_read_tokens) == (5, 7, 0)
        assert parsed.complete


def test_embeddings_usage() -> None:
    parsed = usage_from_response(EMBEDDINGS, {"usage": {"prompt_tokens": 8, "total_tokens": 8}})
    assert parsed == ParsedUsage(input_tokens=8, output_tokens=0, complete=True)


def test_responses_usage() -> None:
    response = {
        "object": "response",
        "status": "completed",
        "usage": {
            "input_tokens": 328,
            "input_tokens_details": {"cached_tokens": 128, "cache_write_tokens": 0},
            "output_tokens": 52,
            "output_tokens_details": {"reasoning_tokens": 12},
            "total_tokens": 380,
        },
    }

    assert usage_from_response(RESPONSES, response) == ParsedUsage(
        input_tokens=200,
        output_tokens=52,
        cache_read_tokens=128,
        reasoning_tokens=12,
        complete=True,
    )


def test_anthropic_usage_keeps_cache_fields_apart() -> None:
    message = {
        "type": "message",
        "usage": {
            "input_tokens": 50,
            "cache_creation_input_tokens": 248,
            "cache_read_input_tokens": 1800,
            "cache_creation": {"ephemeral_5m_input_tokens": 248, "ephemeral_1h_input_tokens": 0},
            "output_tokens": 503,
            "output_tokens_details": {"thinking_tokens": 400},
            "service_tier": "standard",
        },
    }
    parsed = usage_from_response(ANTHROPIC, message)

    assert parsed == ParsedUsage(
        input_tokens=50,
        output_tokens=503,
        cache_read_tokens=1800,
        cache_write_tokens=248,
        reasoning_tokens=400,
        complete=True,
    )
    assert parsed.total_input_tokens == 2098


@pytest.mark.parametrize(
    "body",
    [{}, {"usage": None}, {"usage": "x"}, None, [1], {"choices": []}],
)
def test_missing_usage_is_incomplete(body: object) -> None:
    for endpoint in (CHAT, RESPONSES, ANTHROPIC, EMBEDDINGS):
        assert usage_from_response(endpoint, body) == ParsedUsage()


def test_malformed_counts_never_go_negative_or_crash() -> None:
    usage = {
        "prompt_tokens": 10,
        "completion_tokens": "12",
        "prompt_tokens_details": {"cached_tokens": 50},
        "completion_tokens_details": None,
    }
    parsed = usage_from_response(CHAT, {"usage": usage})
    assert (parsed.input_tokens, parsed.cache_read_tokens, parsed.output_tokens) == (0, 10, 0)
    assert parsed.problems == ("completion_tokens: '12'",)

    floats = usage_from_response(CHAT, {"usage": {"prompt_tokens": 3.0, "completion_tokens": -4}})
    assert (floats.input_tokens, floats.output_tokens) == (0, 0)
    assert floats.problems == ("prompt_tokens: 3.0", "completion_tokens: -4")
    bools = usage_from_response(ANTHROPIC, {"usage": {"input_tokens": True, "output_tokens": 2}})
    assert (bools.input_tokens, bools.output_tokens) == (0, 2)
    assert bools.problems == ("input_tokens: True",)


@pytest.mark.parametrize(
    ("endpoint", "usage", "problems"),
    [
        ("chat", {"prompt_tokens": 8, "completion_tokens": 9}, ()),
        ("chat", {"prompt_tokens": 8, "completion_tokens": None}, ("completion_tokens: missing",)),
        ("chat", {"completion_tokens": 9}, ("prompt_tokens: missing",)),
        ("embeddings", {"prompt_tokens": 8, "total_tokens": 8}, ()),
        ("embeddings", {"prompt_tokens": 8.5}, ("prompt_tokens: 8.5",)),
        (
            "chat",
            {
                "prompt_tokens": 8,
                "completion_tokens": 1,
                "prompt_tokens_details": {"cached_tokens": -1},
            },
            ("prompt_tokens_details.cached_tokens: -1",),
        ),
        ("responses", {"input_tokens": 8, "output_tokens": 9}, ()),
        ("responses", {"input_tokens": "8", "output_tokens": 9}, ("input_tokens: '8'",)),
        ("anthropic_messages", {"input_tokens": 8, "output_tokens": 9}, ()),
        ("anthropic_messages", {"output_tokens": 9}, ("input_tokens: missing",)),
        (
            "anthropic_messages",
            {"input_tokens": 8, "output_tokens": 9, "server_tool_use": {"web_search_requests": -2}},
            ("web_search_requests: -2",),
        ),
        (
            "anthropic_messages",
            {"input_tokens": 8, "output_tokens": 9, "iterations": [{"input_tokens": 8}]},
            ("iterations[0].output_tokens: missing",),
        ),
    ],
)
def test_untrustworthy_counts_are_named(
    endpoint: Any, usage: dict[str, Any], problems: tuple[str, ...]
) -> None:
    parsed = usage_from_response(Endpoint(endpoint), {"usage": usage})
    assert parsed.problems == problems
    assert parsed.complete


def test_anthropic_one_hour_cache_writes_are_split_out() -> None:
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 300,
        "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 200},
        "output_tokens": 5,
    }
    parsed = usage_from_response(ANTHROPIC, {"usage": usage})

    assert (parsed.cache_write_tokens, parsed.cache_write_1h_tokens) == (100, 200)
    assert parsed.total_input_tokens == 310


def test_to_token_usage() -> None:
    usage = ParsedUsage(
        input_tokens=1,
        output_tokens=2,
        cache_read_tokens=3,
        cache_write_tokens=4,
        cache_write_1h_tokens=5,
        reasoning_tokens=1,
        complete=True,
    )
    token_usage = usage.to_token_usage()

    assert token_usage == TokenUsage(1, 2, 3, 4, 5)
    assert token_usage.total_input_tokens == usage.total_input_tokens


# --- SSE decoder -----------------------------------------------------------------------


def _decode(data: bytes, cuts: list[int] | None = None) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    last = 0
    for cut in sorted(cuts or []):
        events += decoder.feed(data[last:cut])
        last = cut
    events += decoder.feed(data[last:])
    return events + decoder.finish()


def test_decoder_fields_and_raw_bytes() -> None:
    stream = (
        b": keep-alive\n\n"
        b'event: message_start\ndata: {"a": 1}\n\n'
        b"id: 7\nretry: 1500\ndata: line one\ndata:line two\n\n"
        b"data: after id\n\n"
    )
    comment, start, multi, after = _decode(stream)

    assert comment == SSEEvent(raw=b": keep-alive\n\n")
    assert not comment.has_data
    assert (start.event, start.json(), start.raw) == (
        "message_start",
        {"a": 1},
        b'event: message_start\ndata: {"a": 1}\n\n',
    )
    assert (multi.data, multi.id, multi.retry) == ("line one\nline two", "7", 1500)
    assert after.id == "7"  # the last event id persists
    assert after.event is None
    assert b"".join(e.raw for e in (comment, start, multi, after)) == stream


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_decoder_line_endings(newline: bytes) -> None:
    stream = newline.join([b"event: e", b"data: x", b"", b"data: y", b"", b""])
    events = _decode(stream)

    assert [(e.event, e.data) for e in events] == [("e", "x"), (None, "y")]
    assert b"".join(e.raw for e in events) == stream


def test_decoder_crlf_split_between_cr_and_lf() -> None:
    stream = b"data: a\r\n\r\ndata: b\r\n\r\n"
    for cut in range(1, len(stream)):
        events = _decode(stream, [cut])
        assert [e.raw for e in events] == [b"data: a\r\n\r\n", b"data: b\r\n\r\n"], cut


def test_decoder_holds_a_trailing_cr_until_the_next_byte() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r\r") == []  # a "\n" may still follow
    (event,) = decoder.feed(b"data: b")
    assert event.raw == b"data: a\r\r"
    (tail,) = decoder.finish()
    assert (tail.data, tail.complete) == ("b", False)


def test_decoder_utf8_split_inside_a_character() -> None:
    stream = 'data: {"text": "héllo 日本 🎉"}\n\n'.encode()
    for cut in range(1, len(stream)):
        (event,) = _decode(stream, [cut])
        assert event.json() == {"text": "héllo 日本 🎉"}


def test_decoder_strips_a_leading_bom_and_survives_invalid_utf8() -> None:
    first, second = _decode(b"\xef\xbb\xbfdata: a\n\ndata: \xff\n\n")
    assert first.data == "a"
    assert second.data == "\ufffd"


def test_decoder_finish_returns_an_unterminated_tail_and_resets() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: whole\n\ndata: partial\n") != []
    assert decoder.buffered == len(b"data: partial\n")
    (tail,) = decoder.finish()
    assert (tail.raw, tail.data, tail.has_data, tail.complete) == (
        b"data: partial\n",
        "partial",
        True,
        False,
    )
    assert decoder.buffered == 0
    assert decoder.finish() == []
    (fresh,) = decoder.feed(b"data: again\n\n")
    assert fresh.id is None


def test_decoder_returns_nothing_for_empty_chunks() -> None:
    assert SSEDecoder().feed(b"") == []


def _splits(data_len: int) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(min_value=0, max_value=data_len), max_size=12)


_SSE_TOKENS = [
    b"\r",
    b"\n",
    b"\r\n",
    b"data: x",
    b"data:",
    b"event: e",
    b"id: 1",
    b"retry: 5",
    b": c",
    b" ",
    "é日🎉".encode(),
    b"\xff",
    b"\xef\xbb\xbf",
]
_SSE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(_SSE_TOKENS), max_size=40).map(b"".join),
)


@settings(max_examples=500, deadline=None)
@given(data=_SSE_BYTES, draw=st.data())
def test_decoder_any_bytes_any_split_same_events_and_lossless(
    data: bytes, draw: st.DataObject
) -> None:
    cuts = draw.draw(st.lists(st.integers(0, len(data)), max_size=40))
    whole = _decode(data)
    split = _decode(data, cuts)

    assert split == whole
    assert b"".join(e.raw for e in whole) == data


_TEXT = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n\x00\ufeff"),
    max_size=20,
)
_LINE = st.one_of(
    st.tuples(st.just("data"), _TEXT),
    st.tuples(st.just("event"), _TEXT.filter(bool)),
    st.tuples(st.just("retry"), st.integers(0, 10_000).map(str)),
    st.tuples(st.just(""), _TEXT),  # a comment
    # any other line: unknown fields, bare "data", whitespace (ids left out: the SDK's
    # decoder dispatches every block once an id was seen, which is not what is compared)
    st.tuples(st.just(None), _TEXT.filter(lambda v: not v.startswith("id"))),
)


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """Well-formed streams (valid UTF-8, no ids) with mixed line endings."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        for name, value in draw(st.lists(_LINE, min_size=1, max_size=4)):
            newline = draw(st.sampled_from([b"\n", b"\r\n", b"\r"]))
            line = value if name is None else f"{name}: {value}"
            out += line.encode() + newline
        out += draw(st.sampled_from([b"\n", b"\r\n"]))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=sse_streams(), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_decoder_matches_the_openai_sdk_decoder(stream: bytes, cuts: list[int]) -> None:
    ours = [
        (e.event, e.data, e.retry)
        for e in _decode(stream, [c for c in cuts if c <= len(stream)])
        if e.complete and (e.has_data or e.event is not None or e.retry is not None)
    ]
    chunks = [stream[i : i + 7] for i in range(0, len(stream), 7)]
    theirs = [(e.event, e.data, e.retry) for e in OpenAISSEDecoder().iter_bytes(iter(chunks))]

    assert ours == theirs


# --- stream usage: OpenAI chat ----------------------------------------------------------

CHUNK_BASE: dict[str, Any] = {
    "id": "chatcmpl-123",
    "object": "chat.completion.chunk",
    "created": 1694268190,
    "model": "gpt-4o-mini",
    "system_fingerprint": "fp_44709d6fcb",
}
DONE = b"data: [DONE]\n\n"


def _data(obj: object) -> bytes:
    """One ``data:`` event, compact JSON as OpenAI sends it."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _chunk(
    delta: dict[str, Any], finish_reason: str | None = None, index: int = 0, *, usage: bool = True
) -> bytes:
    """A chat chunk; with ``usage``, the ``"usage":null`` member ``include_usage`` adds."""
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return _data({**CHUNK_BASE, "choices": [choice], **({"usage": None} if usage else {})})


def _chat_stream(*, usage: bool = True) -> bytes:
    return (
        _chunk({"role": "assistant", "content": ""}, usage=usage)
        + _chunk({"content": "Hello"}, usage=usage)
        + _chunk({"content": " world!"}, usage=usage)
        + _chunk({}, "stop", usage=usage)
    )


CHAT_STREAM = _chat_stream()
CHAT_STREAM_AS_UNASKED = _chat_stream(usage=False)
"""The chunks of :data:`CHAT_STREAM` as OpenAI sends them without ``include_usage``."""
USAGE_CHUNK = _data(
    {
        **CHUNK_BASE,
        "choices": [],
        "usage": {
            "prompt_tokens": 109,
            "completion_tokens": 12,
            "total_tokens": 121,
            "prompt_tokens_details": {"cached_tokens": 100},
            "completion_tokens_details": {"reasoning_tokens": 0},
        },
    }
)


def _meter(
    endpoint: Endpoint, stream: bytes, *, added: bool = False
) -> tuple[bytes, StreamUsageTracker]:
    meter = StreamMeter(endpoint, added_include_usage=added)
    out = b"".join(meter.feed(stream[i : i + 50]) for i in range(0, len(stream), 50))
    return out + meter.finish(), meter.tracker


def test_chat_stream_usage_chunk_is_dropped_only_when_the_guard_added_it() -> None:
    stream = CHAT_STREAM + USAGE_CHUNK + DONE
    dropped, tracker = _meter(CHAT, stream, added=True)
    kept, kept_tracker = _meter(CHAT, stream, added=False)

    # The guard's option leaves no trace: no usage-only chunk, no "usage":null members.
    assert dropped == CHAT_STREAM_AS_UNASKED + DONE
    assert kept == stream
    for t in (tracker, kept_tracker):
        assert t.usage == ParsedUsage(
            input_tokens=9, output_tokens=12, cache_read_tokens=100, complete=True
        )
        assert t.usage_complete
        assert (t.model, t.response_id, t.status, t.finished) == (
            "gpt-4o-mini",
            "chatcmpl-123",
            "stop",
            True,
        )
    assert (tracker.dropped, kept_tracker.dropped) == (1, 0)


def test_chat_stream_counts_output_for_the_estimate() -> None:
    _, tracker = _meter(CHAT, CHAT_STREAM, added=True)

    assert tracker.usage is None
    assert not tracker.finished
    assert tracker.output_bytes == len("Hello world!")
    assert tracker.output_deltas == 2
    expected = math.ceil(12 / 2.5) + ESTIMATE_MARGIN_TOKENS
    assert tracker.estimated_output_tokens() == expected
    assert tracker.best_usage(fallback_input_tokens=40) == ParsedUsage(
        input_tokens=40, output_tokens=expected, complete=False
    )


def test_chat_stream_counts_tool_arguments_refusals_and_reasoning() -> None:
    first_call = {"index": 0, "id": "c", "function": {"name": "f", "arguments": ""}}
    stream = (
        _chunk({"tool_calls": [first_call]})
        + _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a": 1}'}}]})
        + _chunk({"reasoning_content": "thinking"})
        + _chunk({"refusal": "no"}, index=1)
        + _chunk({"function_call": {"arguments": "xy"}})
    )
    _, tracker = _meter(CHAT, stream)

    assert tracker.output_bytes == len('{"a": 1}') + len("thinking") + len("no") + len("xy")
    assert tracker.output_deltas == 4


def test_chat_stream_keeps_azure_filter_chunks_and_hides_usage_it_caused() -> None:
    azure_filter = _data(
        {
            "choices": [],
            "created": 0,
            "id": "",
            "model": "",
            "object": "",
            "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        }
    )
    running = _data(
        {
            "choices": [{"index": 0, "delta": {"content": "hi"}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1},
        }
    )
    final = _data(
        {
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 2},
        }
    )
    stream = azure_filter + running + final + DONE
    out, tracker = _meter(CHAT, stream, added=True)
    kept, _ = _meter(CHAT, stream, added=False)

    # Usage on chunks that carry choices is what the guard's include_usage caused: the
    # chunks are forwarded without it (re-encoded, compact), the usage is charged.
    assert kept == stream
    assert out == (
        azure_filter
        + _data({"choices": [{"index": 0, "delta": {"content": "hi"}}]})
        + _data({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        + DONE
    )
    assert tracker.usage == ParsedUsage(input_tokens=3, output_tokens=2, complete=True)


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (b'data: {"id":"c","usage":null}\n\n', b'data: {"id":"c"}\n\n'),
        (b'data: {"usage":null,"id":"c"}\n\n', b'data: {"id":"c"}\n\n'),
        (b'data: {"a":1,"usage":null,"b":2}\r\n\r\n', b'data: {"a":1,"b":2}\r\n\r\n'),
        (b'data: {"a": 1, "usage" : null }\n\n', b'data: {"a": 1 }\n\n'),
        # A string that mentions the member is text, not a member.
        (
            b'data: {"c":"say \\"usage\\":null","usage":null}\n\n',
            b'data: {"c":"say \\"usage\\":null"}\n\n',
        ),
        # The key twice (nested too): the chunk is re-encoded without the top-level one.
        (
            b'id: 7\ndata: {"usage":null,"x":{"usage":null}}\n\n',
            b'id: 7\ndata: {"x":{"usage":null}}\n\n',
        ),
        # The only member: re-encoded.
        (b'data: {"usage":null}\n\n', b"data: {}\n\n"),
    ],
)
def test_usage_null_member_is_cut_from_the_bytes(chunk: bytes, expected: bytes) -> None:
    out, tracker = _meter(CHAT, chunk, added=True)

    assert out == expected
    assert json.loads(expected.split(b"data: ", 1)[1]) == {
        k: v for k, v in json.loads(chunk.split(b"data: ", 1)[1]).items() if k != "usage"
    }
    assert tracker.dropped == 0


def test_chat_stream_error_chunk_with_usage_is_charged_and_forwarded() -> None:
    usage = {"prompt_tokens": 43, "completion_tokens": 0, "total_tokens": 43}
    choice = {"index": 0, "delta": {"content": ""}, "finish_reason": "error"}
    error = {"code": 502, "message": "Provider returned error"}
    base = {"id": "gen-1", "model": "m", "choices": [choice], "error": error}
    chunk = _data({**base, "usage": usage})

    kept, tracker = _meter(CHAT, chunk + DONE)
    hidden, hidden_tracker = _meter(CHAT, chunk + DONE, added=True)

    assert kept == chunk + DONE
    assert hidden == _data(base) + DONE
    for t in (tracker, hidden_tracker):
        assert [(e.type, e.message) for e in t.errors] == [(None, "Provider returned error")]
        assert t.usage == ParsedUsage(input_tokens=43, output_tokens=0, complete=True)


def test_chat_stream_error_chunk_is_recorded_and_forwarded() -> None:
    error = _data(
        {"error": {"message": "lost", "type": "server_error", "param": None, "code": None}}
    )
    out, tracker = _meter(CHAT, _chunk({"content": "Hel"}) + error)

    assert out.endswith(error)
    assert [(e.type, e.message, e.code) for e in tracker.errors] == [("server_error", "lost", None)]
    assert not tracker.usage_complete


def test_legacy_completions_stream() -> None:
    base = {"id": "cmpl-1", "object": "text_completion", "model": "gpt-3.5-turbo-instruct"}

    def choice(text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    stream = (
        _data({**base, "choices": [choice("Hi", None)], "usage": None})
        + _data({**base, "choices": [choice(" there", "stop")], "usage": None})
        + _data({**base, "choices": [], "usage": usage})
        + DONE
    )
    out, tracker = _meter(COMPLETIONS, stream, added=True)

    assert b'"choices":[]' not in out
    assert tracker.output_bytes == len("Hi there")
    assert tracker.usage == ParsedUsage(input_tokens=2, output_tokens=2, complete=True)
    assert tracker.status == "stop"


def test_non_json_and_non_object_data_are_forwarded() -> None:
    stream = b"data: not json\n\ndata: [1, 2]\n\n: comment\n\n"
    out, tracker = _meter(CHAT, stream, added=True)

    assert out == stream
    assert tracker.events == 2


@st.composite
def chat_streams(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A chat stream as sent with ``include_usage``, and as sent without it."""
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    words = draw(st.lists(_TEXT, max_size=5))

    def chunk(word: str, *, usage: bool) -> str:
        body: dict[str, Any] = {"choices": [{"index": 0, "delta": {"content": word}}]}
        if usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}{newline}{newline}"

    events = [chunk(w, usage=True) for w in words]
    unasked = [chunk(w, usage=False) for w in words]
    if draw(st.booleans()):
        events.insert(0, f": ping{newline}{newline}")
        unasked.insert(0, f": ping{newline}{newline}")
    usage = {"prompt_tokens": 5, "completion_tokens": len(words)}
    usage_event = f"data: {json.dumps({'choices': [], 'usage': usage})}{newline}{newline}"
    done = f"data: [DONE]{newline}{newline}"
    kept = "".join(events).encode()
    return kept + usage_event.encode() + done.encode(), "".join(unasked).encode() + done.encode()


@settings(max_examples=200, deadline=None)
@given(streams=chat_streams(), cuts=st.lists(st.integers(0, 2000), max_size=10))
def test_meter_output_is_the_stream_minus_the_dropped_chunk_for_any_split(
    streams: tuple[bytes, bytes], cuts: list[int]
) -> None:
    stream, expected = streams
    meter = StreamMeter(CHAT, added_include_usage=True)
    out = b""
    last = 0
    for cut in sorted(c for c in cuts if c <= len(stream)):
        out += meter.feed(stream[last:cut])
        last = cut
    out += meter.feed(stream[last:]) + meter.finish()

    assert out == expected
    assert meter.tracker.dropped == 1
    assert meter.tracker.usage_complete


# --- stream usage: Responses ------------------------------------------------------------


def _typed(obj: dict[str, Any]) -> bytes:
    """A typed event (``event:`` named after ``type``), as Responses and Anthropic send."""
    return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()


def _response_event(kind: str, number: int, **fields: Any) -> bytes:
    return _typed({"type": kind, "sequence_number": number, **fields})


def _response(status: str, usage: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "status": status,
        "usage": usage,
    }


RESPONSES_USAGE = {
    "input_tokens": 40,
    "input_tokens_details": {"cached_tokens": 30},
    "output_tokens": 25,
    "output_tokens_details": {"reasoning_tokens": 20},
    "total_tokens": 65,
}


@pytest.mark.parametrize("status", ["completed", "incomplete", "failed"])
def test_responses_terminal_event_gives_usage_and_state(status: str) -> None:
    text = {"item_id": "m", "output_index": 0, "content_index": 0, "logprobs": []}
    arguments = {"item_id": "f", "output_index": 1}
    stream = (
        _response_event("response.created", 0, response=_response("in_progress", None))
        + _response_event("response.output_text.delta", 1, delta="Hi", **text)
        + _response_event("response.function_call_arguments.delta", 2, delta="{}", **arguments)
        + _response_event("response.audio.delta", 3, delta="AAAA")
        + _response_event(f"response.{status}", 4, response=_response(status, RESPONSES_USAGE))
    )
    out, tracker = _meter(RESPONSES, stream, added=True)

    assert out == stream
    assert tracker.usage == ParsedUsage(
        input_tokens=10, output_tokens=25, cache_read_tokens=30, reasoning_tokens=20, complete=True
    )
    assert (tracker.status, tracker.finished, tracker.model) == (status, True, "gpt-4.1")
    assert tracker.output_bytes == 4  # "Hi" and "{}", not the audio
    assert len(tracker.errors) == (1 if status == "failed" else 0)


def test_responses_failed_without_usage_and_error_events() -> None:
    failed = _response("failed", None)
    failed["error"] = {"code": "server_error", "message": "oops"}
    error = {"code": "rate_limit_exceeded", "message": "slow down", "param": None}
    stream = _response_event("error", 1, **error) + _response_event(
        "response.failed", 2, response=failed
    )
    _, tracker = _meter(RESPONSES, stream)

    assert tracker.usage is None
    assert tracker.status == "failed"
    assert [(e.code, e.message) for e in tracker.errors] == [
        ("rate_limit_exceeded", "slow down"),
        ("server_error", "oops"),
    ]
    assert tracker.best_usage(7) == ParsedUsage(
        input_tokens=7, output_tokens=ESTIMATE_MARGIN_TOKENS, complete=False
    )


@pytest.mark.parametrize(
    ("extra", "searches"),
    [
        ({"tool_usage": {"web_search": {"num_requests": 3}}}, 3),
        ({"output": [{"type": "web_search_call"}, {"type": "message"}] * 2}, 2),
        # The reported count wins over the items.
        (
            {
                "tool_usage": {"web_search": {"num_requests": 1}},
                "output": [{"type": "web_search_call"}] * 2,
            },
            1,
        ),
        ({"output": "not a list"}, 0),
    ],
)
def test_responses_web_searches(extra: dict[str, Any], searches: int) -> None:
    """Web searches; file searches (``file_search``) are read the same way."""
    response = {**_response("completed", RESPONSES_USAGE), **extra}
    plain = usage_from_response(RESPONSES, response)
    _, tracker = _meter(RESPONSES, _response_event("response.completed", 1, response=response))

    assert plain.web_searches == searches
    assert tracker.usage == plain
    assert plain.to_token_usage().web_searches == searches
    as_files = json.loads(
        json.dumps(extra)
        .replace("web_search_call", "file_search_call")
        .replace('"web_search"', '"file_search"')
    )
    files = usage_from_response(RESPONSES, {**_response("completed", RESPONSES_USAGE), **as_files})
    assert (files.file_searches, files.web_searches) == (searches, 0)
    assert files.to_token_usage().file_searches == searches


# --- stream usage: Anthropic ------------------------------------------------------------

ANTHROPIC_START: dict[str, Any] = {
    "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY",
    "type": "message",
    "role": "assistant",
    "content": [],
    "model": "claude-opus-4-6",
    "stop_reason": None,
    "stop_sequence": None,
    "usage": {
        "input_tokens": 25,
        "cache_creation_input_tokens": 100,
        "cache_read_input_tokens": 2000,
        "output_tokens": 1,
    },
}


def _block_delta(delta: dict[str, Any], index: int = 0) -> bytes:
    return _typed({"type": "content_block_delta", "index": index, "delta": delta})


ANTHROPIC_STREAM = (
    _typed({"type": "message_start", "message": ANTHROPIC_START})
    + _typed(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    )
    + b'event: ping\ndata: {"type": "ping"}\n\n'
    + _block_delta({"type": "text_delta", "text": "Hello"})
    + _block_delta({"type": "text_delta", "text": "!"})
    + _typed({"type": "content_block_stop", "index": 0})
)
ANTHROPIC_END = _typed(
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 15},
    }
) + _typed({"type": "message_stop"})


def test_anthropic_merges_start_and_delta_usage_keeping_cache_fields() -> None:
    out, tracker = _meter(ANTHROPIC, ANTHROPIC_STREAM + ANTHROPIC_END, added=True)

    assert out == ANTHROPIC_STREAM + ANTHROPIC_END
    assert tracker.usage == ParsedUsage(
        input_tokens=25,
        output_tokens=15,
        cache_read_tokens=2000,
        cache_write_tokens=100,
        complete=True,
    )
    assert (tracker.status, tracker.finished) == ("end_turn", True)
    assert tracker.model == "claude-opus-4-6"
    assert tracker.response_id == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY"


def test_anthropic_web_searches_are_counted() -> None:
    usage = {
        "input_tokens": 22397,
        "output_tokens": 637,
        "server_tool_use": {"web_search_requests": 2, "web_fetch_requests": 1},
    }
    delta = _typed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage})
    _, tracker = _meter(ANTHROPIC, ANTHROPIC_STREAM + delta)

    assert usage_from_response(ANTHROPIC, {"usage": usage}).web_searches == 2
    assert tracker.usage is not None
    assert tracker.usage.web_searches == 2


def _iteration(kind: str, inp: int, out: int, write: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "input_tokens": inp,
        "output_tokens": out,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": write,
        **extra,
    }


def test_anthropic_iterations_are_what_is_billed() -> None:
    # Compaction: the top level reports only the last iteration.
    compaction = {
        "model": "claude-sonnet-4-6",
        "usage": {
            "input_tokens": 180,
            "output_tokens": 8,
            "iterations": [
                _iteration("compaction", 100, 82, write=55096),
                _iteration("message", 180, 8),
            ],
        },
    }
    assert usage_from_response(ANTHROPIC, compaction) == ParsedUsage(
        input_tokens=280, output_tokens=90, cache_write_tokens=55096, complete=True
    )
    # The advisor tool: its iteration names another model and is priced as that one.
    advisor = {
        "model": "claude-sonnet-5",
        "usage": {
            "input_tokens": 2390,
            "output_tokens": 121,
            "iterations": [
                _iteration("message", 1128, 110),
                _iteration("advisor_message", 2518, 22, model="claude-opus-4-8"),
                _iteration("message", 1262, 11, model="claude-sonnet-5"),
            ],
        },
    }
    parsed = usage_from_response(ANTHROPIC, advisor)
    assert (parsed.input_tokens, parsed.output_tokens) == (2390, 121)
    assert parsed.other_models == (("claude-opus-4-8", TokenUsage(2518, 22)),)


def test_anthropic_stream_iterations_arrive_with_message_delta() -> None:
    usage = {
        "input_tokens": 2411,
        "output_tokens": 145,
        "iterations": [
            _iteration("message", 1128, 135),
            _iteration("advisor_message", 2543, 18, model="claude-opus-4-8"),
            _iteration("message", 1283, 10),
        ],
    }
    delta = _typed({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage})
    _, tracker = _meter(ANTHROPIC, ANTHROPIC_STREAM + delta)

    assert tracker.usage is not None
    assert (tracker.usage.input_tokens, tracker.usage.output_tokens) == (2411, 145)
    # The cache counts of message_start were the first iteration's: the iterations win.
    assert tracker.usage.cache_read_tokens == 0
    assert tracker.usage.other_models == (("claude-opus-4-8", TokenUsage(2543, 18)),)


def test_anthropic_later_fields_win() -> None:
    later = {
        "input_tokens": 30,
        "cache_creation_input_tokens": None,
        "cache_read_input_tokens": 1990,
        "output_tokens": 40,
    }
    delta = _typed({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": later})
    _, tracker = _meter(ANTHROPIC, ANTHROPIC_STREAM + delta)

    assert tracker.usage == ParsedUsage(
        input_tokens=30,
        output_tokens=40,
        cache_read_tokens=1990,
        cache_write_tokens=100,
        complete=True,
    )
    assert tracker.status == "tool_use"
    assert not tracker.finished


def test_anthropic_cut_before_message_delta_keeps_reported_input() -> None:
    _, tracker = _meter(ANTHROPIC, ANTHROPIC_STREAM)

    assert tracker.usage is not None
    assert not tracker.usage_complete
    assert tracker.output_deltas == 2
    estimate = math.ceil(len("Hello!") / 2.5) + ESTIMATE_MARGIN_TOKENS
    assert tracker.estimated_output_tokens() == estimate
    assert tracker.best_usage(fallback_input_tokens=999) == ParsedUsage(
        input_tokens=25,
        output_tokens=estimate,
        cache_read_tokens=2000,
        cache_write_tokens=100,
        complete=False,
    )


def test_anthropic_error_event_and_tool_and_thinking_deltas() -> None:
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    stream = (
        ANTHROPIC_STREAM
        + _block_delta({"type": "input_json_delta", "partial_json": '{"a"'}, index=1)
        + _block_delta({"type": "thinking_delta", "thinking": "hmm"}, index=2)
        + _block_delta({"type": "signature_delta", "signature": "EqQBCgIYAhIM"}, index=2)
        + _typed(error)
    )
    _, tracker = _meter(ANTHROPIC, stream)

    assert tracker.output_bytes == len("Hello!") + len('{"a"') + len("hmm")
    assert [(e.type, e.message) for e in tracker.errors] == [("overloaded_error", "Overloaded")]
    assert not tracker.usage_complete


def test_estimate_never_undercuts_reported_output() -> None:
    tracker = StreamUsageTracker(ANTHROPIC)
    delta = {"type": "message_delta", "usage": {"output_tokens": 500}}
    assert tracker.observe(SSEEvent(raw=b"", data=json.dumps(delta), has_data=True))

    assert tracker.estimated_output_tokens() == 500
    assert not tracker.usage_complete  # no message_start: input never reported


def _observe_all(endpoint: Endpoint, events: list[dict[str, Any]]) -> StreamUsageTracker:
    tracker = StreamUsageTracker(endpoint)
    for event in events:
        tracker.observe(SSEEvent(raw=b"", data=json.dumps(event), has_data=True))
    return tracker


def test_a_stream_reports_the_tier_that_served_it() -> None:
    chunk: dict[str, Any] = {
        "id": "c",
        "model": "gpt-5",
        "choices": [{"index": 0, "delta": {"content": "a"}}],
    }
    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    chat: list[dict[str, Any]] = [
        {**chunk, "service_tier": "priority"},
        {**chunk, "choices": [], "usage": usage, "service_tier": "priority"},
    ]
    assert _observe_all(CHAT, chat).price_context == {"service_tier": "priority"}
    # The usage chunk has the last word.
    moved = [chat[0], {**chat[1], "service_tier": "flex"}]
    assert _observe_all(CHAT, moved).price_context == {"service_tier": "flex"}
    # Cut before its usage chunk: the first chunk already said which tier.
    assert _observe_all(CHAT, chat[:1]).price_context == {"service_tier": "priority"}
    standard = [{**event, "service_tier": "default"} for event in chat]
    assert _observe_all(CHAT, standard).price_context == {}  # no variant
    assert _observe_all(CHAT, [{**chunk}]).price_context is None  # says nothing

    def response(kind: str, tier: str) -> dict[str, Any]:
        body: dict[str, Any] = {"id": "r", "model": "gpt-5", "status": "completed"}
        body["service_tier"] = tier
        if kind == "response.completed":
            body["usage"] = {"input_tokens": 3, "output_tokens": 1}
        return {"type": kind, "response": body}

    # Its first events say "auto" (not yet known); the terminal one names the tier.
    responses = [response("response.created", "auto"), response("response.completed", "flex")]
    assert _observe_all(RESPONSES, responses[:1]).price_context is None
    assert _observe_all(RESPONSES, responses).price_context == {"service_tier": "flex"}

    def start(**usage: Any) -> dict[str, Any]:
        message = {"id": "m", "model": "claude-opus-5", "usage": {"input_tokens": 3, **usage}}
        return {"type": "message_start", "message": message}

    end = {"type": "message_delta", "usage": {"output_tokens": 2}}
    fast = _observe_all(ANTHROPIC, [start(speed="fast"), end])
    assert fast.price_context == {"speed": "fast"}
    assert fast.usage == ParsedUsage(input_tokens=3, output_tokens=2, complete=True)
    assert _observe_all(ANTHROPIC, [start(speed="standard"), end]).price_context == {}
    assert _observe_all(ANTHROPIC, [start(), end]).price_context is None


def test_a_plain_response_reports_the_tier_that_served_it() -> None:
    from payi_guard.meter.plain import plain_result

    usage = {"prompt_tokens": 3, "completion_tokens": 1}
    cases: list[tuple[object, object]] = [
        ("priority", {"service_tier": "priority"}),
        ("default", {}),
        ("on_demand", {}),  # Groq's standard tier
        ("auto", None),
        (3, None),
    ]
    for tier, expected in cases:
        body = {"model": "gpt-5", "usage": usage, "service_tier": tier}
        found = plain_result(CHAT, json.dumps(body).encode())
        assert found.price_context == expected, tier
        # A Responses body takes the full parse.
        responses = {**body, "usage": {"input_tokens": 3, "output_tokens": 1}}
        found = plain_result(RESPONSES, json.dumps(responses).encode())
        assert (found.price_context, found.problems) == (expected, ())
    message = {
        "model": "claude-opus-5",
        "usage": {"input_tokens": 3, "output_tokens": 1, "speed": "fast"},
    }
    found = plain_result(ANTHROPIC, json.dumps(message).encode())
    assert found.price_context == {"speed": "fast"}


# --- the fake provider's streams, metered ------------------------------------------------


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider(gzip=False) as provider:
        yield provider


def _stream_through_meter(
    url: str, body: dict[str, Any], endpoint: Endpoint, added: bool
) -> tuple[bytes, bytes, StreamUsageTracker]:
    meter = StreamMeter(endpoint, added_include_usage=added)
    raw = out = b""
    headers = {"accept-encoding": "identity"}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=10) as response:
        for chunk in response.iter_raw():
            raw += chunk
            out += meter.feed(chunk)
    return raw, out + meter.finish(), meter.tracker


def test_metering_the_fakes_chat_stream(fake: FakeProvider) -> None:
    messages = [{"role": "user", "content": "a b c"}]
    body, added = inject_include_usage({"model": "gpt-4o", "stream": True, "messages": messages})
    fake.enqueue(Scripted(cached_tokens=2, tool_calls=[ToolCall("f", '{"x": 1}')]))
    url = f"{fake.openai_base_url}/chat/completions"
    raw, out, tracker = _stream_through_meter(url, body, CHAT, added)

    assert added
    assert tracker.usage == ParsedUsage(
        input_tokens=3, output_tokens=REPLY_WORDS + 2, cache_read_tokens=2, complete=True
    )
    assert tracker.status == "tool_calls"
    assert tracker.output_bytes == len(DEFAULT_REPLY) + len('{"x": 1}')
    events = _decode(raw)
    # What the client gets is the stream minus the usage chunk, and minus the
    # ``"usage":null`` member the option added to every other chunk.
    expected = [
        e.raw.replace(b',"usage":null}', b"}") for e in events if b'"choices":[]' not in e.raw
    ]
    assert expected == [e.raw for e in _decode(out)]
    assert b'"usage":null' in raw
    assert b'"usage"' not in out
    assert len(_decode(out)) == len(events) - 1


def test_metering_the_fakes_responses_and_anthropic_streams(fake: FakeProvider) -> None:
    fake.enqueue(Scripted(reasoning_tokens=5, cached_tokens=1))
    _, _, responses = _stream_through_meter(
        f"{fake.openai_base_url}/responses",
        {"model": "m", "input": "one two", "stream": True},
        RESPONSES,
        False,
    )
    fake.enqueue(Scripted(cached_tokens=4, cache_write_tokens=6, anthropic_delta_usage="output"))
    messages = [{"role": "user", "content": "x y"}]
    _, _, claude = _stream_through_meter(
        f"{fake.base_url}/v1/messages",
        {"model": "c", "max_tokens": 3, "stream": True, "messages": messages},
        ANTHROPIC,
        False,
    )

    assert responses.usage == ParsedUsage(
        input_tokens=2,
        output_tokens=REPLY_WORDS + 5,
        cache_read_tokens=1,
        reasoning_tokens=5,
        complete=True,
    )
    assert responses.status == "completed"
    assert claude.usage == ParsedUsage(
        input_tokens=2, output_tokens=3, cache_read_tokens=4, cache_write_tokens=6, complete=True
    )
    assert claude.status == "max_tokens"


def test_metering_plain_fake_responses(fake: FakeProvider) -> None:
    fake.enqueue(Scripted(cached_tokens=3, reasoning_tokens=2))
    response = httpx.post(
        f"{fake.openai_base_url}/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "a b"}], "n": 2},
    )

    assert usage_from_response(CHAT, response.json()) == ParsedUsage(
        input_tokens=2,
        output_tokens=2 * REPLY_WORDS + 2,
        cache_read_tokens=3,
        reasoning_tokens=2,
        complete=True,
    )


def test_best_usage_is_the_report_once_complete() -> None:
    _, tracker = _meter(CHAT, CHAT_STREAM + USAGE_CHUNK + DONE, added=True)

    assert tracker.best_usage(fallback_input_tokens=10_000) is tracker.usage


def test_odd_payloads_are_tolerated() -> None:
    stream = (
        _data({"error": "plain string error"})
        + _data({"choices": "not a list", "usage": [1]})
        + _data({"choices": [1, {"delta": "x"}, {"text": "ok"}]})
    )
    out, chat = _meter(CHAT, stream, added=True)
    _, responses = _meter(RESPONSES, _data({"type": 5}) + _data({"no": "type"}))
    anthropic_stream = _typed({"type": "message_start", "message": {"usage": "bad"}}) + _typed(
        {"type": "error", "message": "no error object"}
    )
    _, claude = _meter(ANTHROPIC, anthropic_stream)

    assert out == stream
    assert [(e.type, e.message) for e in chat.errors] == [(None, "plain string error")]
    assert chat.usage is None
    assert chat.output_bytes == 2
    assert responses.usage is None
    assert responses.events == 2
    assert claude.usage is None
    assert [(e.type, e.message) for e in claude.errors] == [("error", "no error object")]


# --- whole events (the decoder's fast path) and any split meter alike ----------------


def _by_events(stream: bytes, per_chunk: int) -> list[bytes]:
    """``stream`` cut at its blank lines, ``per_chunk`` events to a chunk."""
    events = [e + b"\n\n" for e in stream.split(b"\n\n")[:-1]]
    chunks = [b"".join(events[i : i + per_chunk]) for i in range(0, len(events), per_chunk)]
    tail = stream[sum(len(c) for c in chunks) :]
    return chunks + ([tail] if tail else [])


_WHOLE_EVENT_STREAMS: dict[str, tuple[Endpoint, bool, bytes]] = {
    "chat, guard's usage": (CHAT, True, CHAT_STREAM + USAGE_CHUNK + DONE),
    "chat, app's usage": (CHAT, False, CHAT_STREAM + USAGE_CHUNK + DONE),
    "chat, bom and comment": (
        CHAT,
        True,
        b"\xef\xbb\xbf" + CHAT_STREAM + b": ping\n\n" + USAGE_CHUNK + DONE,
    ),
    "anthropic": (ANTHROPIC, False, ANTHROPIC_STREAM + ANTHROPIC_END),
}


@pytest.mark.parametrize("name", sorted(_WHOLE_EVENT_STREAMS))
@pytest.mark.parametrize("per_chunk", [1, 2, 3])
def test_whole_events_and_byte_by_byte_meter_the_same(name: str, per_chunk: int) -> None:
    endpoint, added, stream = _WHOLE_EVENT_STREAMS[name]
    whole = StreamMeter(endpoint, added_include_usage=added)
    whole_out = b"".join(whole.feed(c) for c in _by_events(stream, per_chunk)) + whole.finish()
    single = StreamMeter(endpoint, added_include_usage=added)
    single_out = b"".join(single.feed(stream[i : i + 1]) for i in range(len(stream)))
    single_out += single.finish()

    assert whole_out == single_out
    assert tracker_state(whole.tracker) == tracker_state(single.tracker)
    assert whole.tracker.events > 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=sse_streams(), per_chunk=st.integers(1, 3), added=st.booleans())
def test_any_stream_metered_whole_or_byte_by_byte_alike(
    stream: bytes, per_chunk: int, added: bool
) -> None:
    whole = StreamMeter(CHAT, added_include_usage=added)
    whole_out = b"".join(whole.feed(c) for c in _by_events(stream, per_chunk)) + whole.finish()
    single = StreamMeter(CHAT, added_include_usage=added)
    single_out = b"".join(single.feed(stream[i : i + 1]) for i in range(len(stream)))

    assert whole_out == single_out + single.finish()
    assert tracker_state(whole.tracker) == tracker_state(single.tracker)


def test_output_counts_of_a_long_stream_past_the_deferred_limit() -> None:
    text = "ab ćd " * 20  # 2-byte characters count as 2 bytes
    chunks = [_chunk({"content": text}, usage=False) for _ in range(3000)]
    stream = _chunk({"role": "assistant", "content": ""}, usage=False) + b"".join(chunks)
    stream += _chunk({}, "length", usage=False)
    meter = StreamMeter(CHAT)
    out = b"".join(meter.feed(c) for c in _by_events(stream, 1)) + meter.finish()

    assert out == stream
    assert len(stream) > 256 * 1024  # some chunks were counted before the end
    assert meter.tracker.output_bytes == 3000 * len(text.encode())
    assert meter.tracker.output_deltas == 3000
    assert meter.tracker.status == "length"
    assert meter.tracker.usage is None


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model":"m","stream":true,"messages":[]}',
        b'{ "model": "m", "stream": true }',
        b'{"stream_options":{"x":1},"stream":true}',
        b' {"stream":true}',
        b'{"stream":true,"stream_options":{"include_usage":false}}',
    ],
)
def test_include_usage_added_to_the_bytes_means_the_same_body(raw: bytes) -> None:
    body = json.loads(raw)
    new_body, added = inject_include_usage(body)
    sent = with_include_usage(raw, body, new_body)

    assert added
    assert json.loads(sent) == new_body
    assert json.loads(sent)["stream_options"]["include_usage"] is True
    if "stream_options" not in body and raw.startswith(b"{"):
        assert sent.endswith(raw[1:])  # the SDK's bytes, untouched


def test_a_usage_key_spelled_with_escapes_is_still_read() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    chunk = _data({**CHUNK_BASE, "choices": [], "usage": usage})
    chunk = chunk.replace(b'"usage"', b'"\\u0075sage"')
    meter = StreamMeter(CHAT, added_include_usage=True)
    out = meter.feed(_chunk({"content": "hi"}, usage=False)) + meter.feed(chunk)

    assert meter.tracker.usage == ParsedUsage(input_tokens=3, output_tokens=4, complete=True)
    assert out == _chunk({"content": "hi"}, usage=False)  # the guard's usage chunk dropped
