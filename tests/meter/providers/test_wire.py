"""The provider wire formats, pure: endpoints, bounds, checked usage, the AWS event stream."""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import pytest

from meter.providers._support import served
from payi_guard.meter.providers.bedrock_usage import converse_usage, family_usage, header_report
from payi_guard.meter.providers.bedrock_wire import BedrockDialect, base_model
from payi_guard.meter.providers.chat import chat_usage
from payi_guard.meter.providers.eventstream import EventStreamDecoder
from payi_guard.meter.providers.gemini import DIALECT as GEMINI
from payi_guard.meter.providers.gemini import gemini_usage
from payi_guard.meter.providers.gemini_wire import GeminiStream
from payi_guard.meter.providers.groq import DIALECT as GROQ
from payi_guard.meter.providers.meter import split_path
from payi_guard.meter.providers.mistral import DIALECT as MISTRAL
from payi_guard.meter.providers.wire import UntrustedUsage, count

# -- checked counts ----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (7, 7), (6.0, 6), (None, 3)])
def test_count_accepts_whole_numbers(value: Any, expected: int) -> None:
    assert count({"n": value}, "n", default=3) == expected


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({}, "n is missing"),
        ({"n": None}, "n is missing"),
        ({"n": -1}, "n is negative"),
        ({"n": 1.5}, "not a whole number"),
        ({"n": float("nan")}, "not a whole number"),
        ({"n": "12"}, "not a number"),
        ({"n": True}, "not a number"),
    ],
)
def test_count_refuses_what_cannot_be_trusted(obj: dict[str, Any], message: str) -> None:
    with pytest.raises(UntrustedUsage, match=message):
        count(obj, "n")


# -- Gemini --------------------------------------------------------------------------------


def test_gemini_usage_charges_thoughts_and_cache_reads() -> None:
    usage = gemini_usage(
        {
            "promptTokenCount": 17713,
            "cachedContentTokenCount": 17379,
            "candidatesTokenCount": 68,
            "thoughtsTokenCount": 821,
            "totalTokenCount": 18602,
        }
    )
    assert (usage.input_tokens, usage.cache_read_tokens) == (334, 17379)
    assert (usage.output_tokens, usage.reasoning_tokens) == (889, 821)


def test_gemini_usage_counts_tool_prompts_as_input_and_reads_snake_case() -> None:
    usage = gemini_usage(
        {
            "prompt_token_count": 10,
            "tool_use_prompt_token_count": 5,
            "candidates_token_count": 3,
            "total_token_count": 18,
        }
    )
    assert (usage.input_tokens, usage.output_tokens) == (15, 3)


def test_gemini_usage_without_a_total_adds_candidates_and_thoughts() -> None:
    usage = gemini_usage(
        {"promptTokenCount": 4, "candidatesTokenCount": 3, "thoughtsTokenCount": 2}
    )
    assert usage.output_tokens == 5


def test_gemini_usage_refuses_more_cache_than_prompt() -> None:
    with pytest.raises(UntrustedUsage, match="cachedContentTokenCount"):
        gemini_usage({"promptTokenCount": 4, "cachedContentTokenCount": 5, "totalTokenCount": 9})


def _sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"


def _gemini_chunk(candidates: list[dict[str, Any]], output: int) -> bytes:
    usage = {"promptTokenCount": 10, "candidatesTokenCount": output, "totalTokenCount": 10 + output}
    return _sse(
        {"candidates": candidates, "usageMetadata": usage, "modelVersion": "gemini-2.5-flash"}
    )


def _state(stream: GeminiStream) -> tuple[bool, int | None]:
    """Whether the stream is finished, and the output its usage report says (if any)."""
    report = stream.report
    usage = None if report is None else report.usage
    return stream.finished, None if usage is None else usage.output_tokens


def test_a_gemini_stream_is_finished_when_every_candidate_is() -> None:
    # candidateCount 2: the first candidate finishes early, the second goes on.
    text = {"content": {"parts": [{"text": "word "}], "role": "model"}}
    stream = GeminiStream()
    stream.feed(_gemini_chunk([{**text, "index": 0}, {**text, "index": 1}], 4))
    stream.feed(_gemini_chunk([{**text, "finishReason": "STOP", "index": 0}], 6))
    assert _state(stream) == (False, None)  # cut here: incomplete, not a final report
    stream.feed(_gemini_chunk([{**text, "index": 1}], 306))
    assert _state(stream) == (False, None)
    stream.feed(_gemini_chunk([{**text, "finishReason": "STOP", "index": 1}], 606))
    assert _state(stream) == (True, 606)
    # One candidate (no index written): finished with its finish reason, as before.
    single = GeminiStream()
    single.feed(_gemini_chunk([text], 3))
    assert _state(single) == (False, None)
    single.feed(_gemini_chunk([{**text, "finishReason": "STOP"}], 5))
    assert _state(single) == (True, 5)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1beta/models/gemini-2.5-flash:generateContent", ("chat", "gemini-2.5-flash", False)),
        (
            "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
            ("chat", "gemini-2.5-flash", True),
        ),
        (
            "/v1beta1/projects/p/locations/global/publishers/google/models/gemini-3-flash-preview:generateContent",
            ("chat", "gemini-3-flash-preview", False),
        ),
        (
            "/v1beta/models/text-embedding-004:embedContent",
            ("embeddings", "text-embedding-004", False),
        ),
        (
            "/v1beta/models/gemini-embedding-001:batchEmbedContents",
            ("embeddings", "gemini-embedding-001", False),
        ),
        (
            "/v1/projects/p/locations/l/publishers/google/models/text-embedding-005:predict",
            ("embeddings", "text-embedding-005", False),
        ),
        ("/v1beta/models/gemini-2.5-flash:countTokens", None),
        ("/v1/projects/p/locations/l/publishers/google/models/imagen-4.0:predict", None),
        ("/v1beta/files", None),
        ("/v1beta/cachedContents", None),
    ],
)
def test_gemini_endpoints(path: str, expected: tuple[str, str, bool] | None) -> None:
    endpoint = GEMINI.classify("POST", "generativelanguage.googleapis.com", split_path(path))
    found = None if endpoint is None else (endpoint.kind, endpoint.model, endpoint.stream)
    assert found == expected


def test_gemini_output_bound_is_the_cap_times_candidates_else_the_models() -> None:
    path = split_path("/v1beta/models/gemini-2.0-flash:generateContent")
    endpoint = GEMINI.classify("POST", "h", path)
    assert endpoint is not None
    config = {"generationConfig": {"maxOutputTokens": 100, "candidateCount": 3}}
    assert GEMINI.describe(endpoint, config, "ratio").output_tokens == 300
    assert (
        GEMINI.describe(
            endpoint, {"generation_config": {"max_output_tokens": 7}}, "ratio"
        ).output_tokens
        == 7
    )
    assert GEMINI.describe(endpoint, {}, "ratio").output_tokens == 8_192


def test_gemini_input_bound_counts_an_allowance_per_media_part() -> None:
    endpoint = GEMINI.classify(
        "POST", "h", split_path("/v1beta/models/gemini-2.5-flash:generateContent")
    )
    assert endpoint is not None
    text = {"contents": [{"role": "user", "parts": [{"text": "Describe"}]}]}
    image = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Describe"},
                    {"inlineData": {"mimeType": "image/png", "data": "A" * 400_000}},
                ],
            }
        ]
    }
    bare = GEMINI.describe(endpoint, text, "ratio").input_tokens
    with_image = GEMINI.describe(endpoint, image, "ratio").input_tokens
    assert 1_000 < with_image - bare < 2_000  # the image allowance, not its base64 bytes


# -- Mistral and Groq ----------------------------------------------------------------------


def test_chat_usage_separates_cache_reads_and_keeps_reasoning_in_output() -> None:
    usage = chat_usage(
        {
            "prompt_tokens": 100,
            "completion_tokens": 40,
            "prompt_tokens_details": {"cached_tokens": 60},
            "completion_tokens_details": {"reasoning_tokens": 30},
        }
    )
    assert (usage.input_tokens, usage.cache_read_tokens) == (40, 60)
    assert (usage.output_tokens, usage.reasoning_tokens) == (40, 30)


def test_chat_usage_of_embeddings_needs_no_completion() -> None:
    assert chat_usage({"prompt_tokens": 10}, kind="embeddings").output_tokens == 0
    with pytest.raises(UntrustedUsage, match="completion_tokens is missing"):
        chat_usage({"prompt_tokens": 10})


@pytest.mark.parametrize(
    ("dialect", "path", "kind"),
    [
        (MISTRAL, "/v1/chat/completions", "chat"),
        (MISTRAL, "/v1/fim/completions", "completions"),
        (MISTRAL, "/v1/agents/completions", "chat"),
        (MISTRAL, "/v1/embeddings", "embeddings"),
        (MISTRAL, "/v1/ocr", None),
        (GROQ, "/openai/v1/chat/completions", "chat"),
        (GROQ, "/openai/v1/audio/transcriptions", None),
    ],
)
def test_chat_endpoints(dialect: Any, path: str, kind: str | None) -> None:
    endpoint = dialect.classify("POST", "h", split_path(path))
    assert (endpoint.kind if endpoint else None) == kind


def test_chat_dialects_for_shared_clients_answer_only_for_their_hosts() -> None:
    path = split_path("/v1/chat/completions")
    only_mistral = MISTRAL.for_hosts(["api.mistral.ai"])
    assert only_mistral.classify("POST", "api.mistral.ai", path) is not None
    assert only_mistral.classify("POST", "api.openai.com", path) is None


# -- Bedrock -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_id", "base"),
    [
        ("anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku-20241022-v1:0"),
        ("us.anthropic.claude-3-5-haiku-20241022-v1:0", "claude-3-5-haiku-20241022-v1:0"),
        ("global.anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5-20250929-v1:0"),
        (
            "arn:aws:bedrock:us-east-1:012345678901:inference-profile/us.meta.llama3-2-1b-instruct-v1:0",
            "llama3-2-1b-instruct-v1:0",
        ),
        ("amazon.nova-micro-v1:0", "nova-micro-v1:0"),
    ],
)
def test_base_model(model_id: str, base: str) -> None:
    assert base_model(model_id) == base


def test_bedrock_endpoints_keep_an_encoded_arn_whole() -> None:
    arn = "arn%3Aaws%3Abedrock%3Aus-east-1%3A012345678901%3Ainference-profile%2Fus.x-v1%3A0"
    endpoint = BedrockDialect().classify("POST", "h", split_path(f"/model/{arn}/converse-stream"))
    assert endpoint is not None
    assert endpoint.model == "arn:aws:bedrock:us-east-1:012345678901:inference-profile/us.x-v1:0"
    assert (endpoint.operation, endpoint.stream) == ("converse-stream", True)
    assert BedrockDialect().classify("POST", "h", split_path("/model/x/count-tokens")) is None
    assert BedrockDialect().classify("GET", "h", split_path("/model/x/converse")) is None


def test_bedrock_on_shared_clients_needs_its_host_or_its_signature() -> None:
    dialect = BedrockDialect(any_host=False)
    path = split_path("/model/amazon.nova-micro-v1:0/converse")
    assert dialect.classify("POST", "bedrock-runtime.us-east-1.amazonaws.com", path)
    assert dialect.classify("POST", "127.0.0.1", path) is None
    signed = {
        "authorization": "AWS4-HMAC-SHA256 Credential=AKID/20260601/us-east-1/bedrock/aws4_request"
    }
    assert dialect.classify("POST", "vpce.example", path, signed)


def test_bedrock_output_bounds_per_family() -> None:
    dialect = BedrockDialect()

    def bound(model: str, operation: str, body: dict[str, Any]) -> int:
        endpoint = dialect.classify("POST", "h", ["model", model, operation])
        assert endpoint is not None
        return dialect.describe(endpoint, body, "ratio").output_tokens

    assert bound("amazon.nova-micro-v1:0", "converse", {"inferenceConfig": {"maxTokens": 9}}) == 9
    assert bound("amazon.nova-micro-v1:0", "converse", {}) == 10_000
    assert bound("meta.llama3-70b-instruct-v1:0", "invoke", {"max_gen_len": 128}) == 128
    assert (
        bound(
            "amazon.titan-text-express-v1",
            "invoke",
            {"textGenerationConfig": {"maxTokenCount": 50}},
        )
        == 50
    )
    assert bound("anthropic.claude-3-5-sonnet-20241022-v2:0", "invoke", {}) == 8_192
    assert bound("amazon.titan-embed-text-v2:0", "invoke", {"inputText": "x"}) == 0


def test_bedrock_usage_readers() -> None:
    converse = converse_usage(
        {"inputTokens": 4, "outputTokens": 50, "cacheWriteInputTokens": 18131}
    )
    assert (converse.input_tokens, converse.cache_write_tokens) == (4, 18131)
    titan = family_usage({"inputTextTokenCount": 30, "results": [{"tokenCount": 29}]})
    assert (titan.input_tokens, titan.output_tokens) == (30, 29)
    meta = family_usage({"prompt_token_count": 8, "generation_token_count": 35})
    assert (meta.input_tokens, meta.output_tokens) == (8, 35)
    with pytest.raises(UntrustedUsage, match="no token counts"):
        family_usage({"outputs": [{"text": "hi"}]})


def test_bedrock_headers_are_checked() -> None:
    report = header_report(
        {"x-amzn-bedrock-input-token-count": "16", "x-amzn-bedrock-output-token-count": "19"}
    )
    assert report is not None
    assert report.usage is not None
    assert (report.usage.input_tokens, report.usage.output_tokens) == (16, 19)
    bad = header_report(
        {"x-amzn-bedrock-input-token-count": "-3", "x-amzn-bedrock-output-token-count": "1"}
    )
    assert bad is not None
    assert bad.invalid is not None
    assert header_report({"content-type": "application/json"}) is None


# -- the AWS event stream --------------------------------------------------------------------


def test_event_stream_decodes_the_same_whatever_the_chunking() -> None:
    body = served("bedrock/openllmetry/test_titan_converse_stream")[0].body
    whole = EventStreamDecoder().feed(body)
    decoder = EventStreamDecoder()
    one_by_one = [m for i in range(len(body)) for m in decoder.feed(body[i : i + 1])]
    assert one_by_one == whole
    assert [m.event_type for m in whole] == [
        "messageStart",
        "contentBlockDelta",
        "contentBlockDelta",
        "contentBlockStop",
        "messageStop",
        "metadata",
    ]
    assert decoder.pending == 0
    assert decoder.broken is None


def _frame(headers: bytes, payload: bytes) -> bytes:
    total = 16 + len(headers) + len(payload)
    prelude = struct.pack(">II", total, len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + headers + payload
    return body + struct.pack(">I", zlib.crc32(body))


def test_event_stream_reads_typed_headers() -> None:
    name = b":event-type"
    headers = bytes([len(name)]) + name + b"\x07" + struct.pack(">H", 5) + b"chunk"
    headers += b"\x04flag\x00" + b"\x05count\x04" + struct.pack(">i", -2)
    (message,) = EventStreamDecoder().feed(_frame(headers, b"{}"))
    assert message.headers == {":event-type": "chunk", "flag": True, "count": -2}
    assert message.payload == b"{}"


def test_event_stream_stops_on_corruption_without_raising() -> None:
    frame = bytearray(_frame(b"", b'{"a":1}'))
    frame[-1] ^= 0xFF
    decoder = EventStreamDecoder()
    assert decoder.feed(bytes(frame)) == []
    assert decoder.broken == "message checksum mismatch"
    assert decoder.feed(_frame(b"", b"{}")) == []  # nothing after a break is trusted
