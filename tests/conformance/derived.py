"""Synthetic cases built in code from real recordings, for what no public recording shows.

Each function takes one copied recording and changes exactly what its name says; the
rest of the interaction (headers, ids, the other fields of the body) stays as recorded.
Their ids start with ``synthetic/`` and name the recording they come from.
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import replace
from typing import Any

from conformance.corpus import Interaction, corpus, sse_events

CHAT = "pydantic-ai/test_openai/test_max_completion_tokens[gpt-4o-mini]"
"""A plain OpenAI chat completion (gpt-4o-mini, 8 + 9 tokens)."""

CHAT_STREAM = "pydantic-ai/test_openai/test_run_stream_sync_streams_real_model#1"
"""An OpenAI chat stream recorded with ``include_usage`` (78 + 9 tokens)."""

OPENAI_ERROR = "pydantic-ai/test_openai/test_openai_o1_mini_system_role[system]"
"""An OpenAI 400 response."""

ANTHROPIC = "pydantic-ai/test_anthropic/test_anthropic_model_instructions"
"""A plain Anthropic message (claude-3-opus)."""

EMBEDDING = "pydantic-ai/test_embeddings/TestOpenAI.test_instrumentation"
"""An OpenAI embedding recorded as base64 (128 dimensions)."""

RESPONSES = (
    "pydantic-ai/test_openai_responses/"
    "test_openai_responses_gpt_5_5_drops_sampling_params_by_default"
)
"""A Responses call that reports ``input_tokens_details.cache_write_tokens`` (as 0)."""


def recorded(interaction_id: str) -> Interaction:
    """The copied recording with this id."""
    for interaction in corpus():
        if interaction.id == interaction_id:
            return interaction
    raise LookupError(interaction_id)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _derived(source: Interaction, name: str, **changes: Any) -> Interaction:
    return replace(source, file=f"synthetic/{name}.yaml", index=0, multiple=False, **changes)


def _with_header(source: Interaction, name: str, value: str) -> tuple[tuple[str, str], ...]:
    kept = [(k, v) for k, v in source.headers if k != name]
    return tuple(sorted([*kept, (name, value)]))


def float_embedding() -> Interaction:
    """The base64 embedding as OpenAI sends it for ``encoding_format: float``."""
    source = recorded(EMBEDDING)
    body = json.loads(source.body)
    for item in body["data"]:
        raw = base64.b64decode(item["embedding"])
        item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    request = {**source.request, "encoding_format": "float"}
    return _derived(source, "embeddings_float", request=request, body=_json(body))


def server_error_openai() -> Interaction:
    """An OpenAI 500, with the body OpenAI sends for one, in place of the recorded 400."""
    source = recorded(OPENAI_ERROR)
    body = {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    return _derived(source, "openai_500", status=500, body=_json(body))


def overloaded_anthropic() -> Interaction:
    """An Anthropic 529 ``overloaded_error`` for the recorded request."""
    source = recorded(ANTHROPIC)
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return _derived(source, "anthropic_529", status=529, body=_json(body))


def event_stream_as_json() -> Interaction:
    """The recorded chat stream, served with ``content-type: application/json``."""
    source = recorded(CHAT_STREAM)
    headers = _with_header(source, "content-type", "application/json")
    return _derived(source, "chat_stream_json_content_type", headers=headers)


INVALID_USAGE: dict[str, Any] = {
    "negative": -8,
    "string": "8",
    "float": 8.5,
}
"""``prompt_tokens`` values that cannot be trusted, by name."""


def invalid_usage(kind: str, *, stream: bool = False) -> Interaction:
    """The recorded chat (or chat stream) with an untrustworthy ``prompt_tokens``."""
    value = INVALID_USAGE[kind]
    if not stream:
        source = recorded(CHAT)
        body = json.loads(source.body)
        body["usage"]["prompt_tokens"] = value
        return _derived(source, f"usage_{kind}", body=_json(body))
    source = recorded(CHAT_STREAM)
    out: list[bytes] = []
    for _, data, raw in sse_events(source.body):
        if isinstance(data, dict) and isinstance(data.get("usage"), dict):
            data["usage"]["prompt_tokens"] = value
            raw = b"data: " + _json(data) + b"\n\n"
        out.append(raw)
    return _derived(source, f"stream_usage_{kind}", body=b"".join(out))


def responses_cache_write() -> Interaction:
    """The recorded Responses call with a 1,024-token prefix written to the cache."""
    source = recorded(RESPONSES)
    body = json.loads(source.body)
    usage = body["usage"]
    usage["input_tokens"] += 1024
    usage["input_tokens_details"]["cache_write_tokens"] = 1024
    usage["total_tokens"] += 1024
    return _derived(source, "responses_cache_write", body=_json(body))


def oversized_output_cap() -> Interaction:
    """The recorded chat asking for ``max_completion_tokens: 10**14``."""
    source = recorded(CHAT)
    request = {**source.request, "max_completion_tokens": 10**14}
    return _derived(source, "max_tokens_overflow", request=request)


RESPONSES_STREAM = "logfire/test_openai/test_responses_stream"
"""A Responses stream (gpt-4.1) whose ``response.completed`` names ``service_tier``."""

ANTHROPIC_STREAM = "openllmetry/test_messages/test_anthropic_sync_streaming_helper_methods_legacy"
"""An Anthropic message stream (claude-3-5-haiku)."""

FAST_MODEL = "claude-opus-5"
"""An Anthropic model genai-prices prices at another rate with ``speed: fast``."""


def _sse_with(source: Interaction, change: Any) -> bytes:
    """The recorded stream with ``change(data)`` applied to each event's JSON data.

    ``change`` returns true when it changed the data; that event is written again as
    compact JSON (its ``event:`` line kept), every other one is kept byte for byte.
    """
    out: list[bytes] = []
    for name, data, raw in sse_events(source.body):
        if isinstance(data, dict) and change(data):
            head = b"" if name is None else b"event: " + name.encode() + b"\n"
            raw = head + b"data: " + _json(data) + b"\n\n"
        out.append(raw)
    return b"".join(out)


def chat_tier_by_project() -> Interaction:
    """The recorded chat served at the ``priority`` tier the project set as its default.

    The request names no tier (as recorded); the response says ``priority``.
    """
    source = recorded(CHAT)
    body = json.loads(source.body)
    body["service_tier"] = "priority"
    return _derived(source, "chat_priority_by_project", body=_json(body))


def chat_tier_not_granted() -> Interaction:
    """The recorded chat asking for ``priority``, served at the standard tier."""
    source = recorded(CHAT)
    request = {**source.request, "service_tier": "priority"}
    return _derived(source, "chat_priority_served_default", request=request)


def chat_stream_tier_by_project() -> Interaction:
    """The recorded chat stream with every chunk naming ``service_tier: priority``."""
    source = recorded(CHAT_STREAM)

    def change(data: dict[str, Any]) -> bool:
        data["service_tier"] = "priority"
        return True

    return _derived(source, "chat_stream_priority_by_project", body=_sse_with(source, change))


def responses_flex() -> Interaction:
    """The recorded Responses call asked for and served at the ``flex`` tier."""
    source = recorded(RESPONSES)
    body = json.loads(source.body)
    body["service_tier"] = "flex"
    request = {**source.request, "service_tier": "flex"}
    return _derived(source, "responses_flex", request=request, body=_json(body))


def responses_stream_tier_by_project() -> Interaction:
    """The recorded Responses stream whose ``response.completed`` says ``priority``."""
    source = recorded(RESPONSES_STREAM)

    def change(data: dict[str, Any]) -> bool:
        if data.get("type") != "response.completed":
            return False
        data["response"]["service_tier"] = "priority"
        return True

    return _derived(source, "responses_stream_priority_by_project", body=_sse_with(source, change))


def anthropic_fast() -> Interaction:
    """The recorded Anthropic message, made to ``claude-opus-5`` with ``speed: fast``."""
    source = recorded(ANTHROPIC)
    body = json.loads(source.body)
    body["model"] = FAST_MODEL
    body["usage"]["speed"] = "fast"
    request = {**source.request, "model": FAST_MODEL, "speed": "fast"}
    return _derived(source, "anthropic_fast", request=request, body=_json(body))


def anthropic_stream_fast() -> Interaction:
    """The recorded Anthropic stream, made to ``claude-opus-5`` with ``speed: fast``.

    ``message_start`` names the model and the speed, as Anthropic's usage object does.
    """
    source = recorded(ANTHROPIC_STREAM)

    def change(data: dict[str, Any]) -> bool:
        if data.get("type") != "message_start":
            return False
        data["message"]["model"] = FAST_MODEL
        data["message"]["usage"]["speed"] = "fast"
        return True

    request = {**source.request, "model": FAST_MODEL, "speed": "fast"}
    return _derived(
        source, "anthropic_stream_fast", request=request, body=_sse_with(source, change)
    )


AUDIO_MODEL = "gpt-audio"
"""An OpenAI model genai-prices prices apart for audio tokens (in and out)."""


def _audio_usage(usage: dict[str, Any]) -> None:
    """Add 40 audio input and 120 audio output tokens to a chat ``usage`` object."""
    usage["prompt_tokens"] += 40
    usage["completion_tokens"] += 120
    usage["total_tokens"] += 160
    usage["prompt_tokens_details"] = {"cached_tokens": 0, "audio_tokens": 40}
    usage["completion_tokens_details"] = {
        "reasoning_tokens": 0,
        "audio_tokens": 120,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    }


def _silence_wav(seconds: int) -> str:
    """Base64 of a WAV file of ``seconds`` of silence (16 kHz, 16-bit mono)."""
    frames = 16_000 * seconds
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + 2 * frames,
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        16_000,
        32_000,
        2,
        16,
        b"data",
        2 * frames,
    )
    return base64.b64encode(header + bytes(2 * frames)).decode()


_AUDIO_REQUEST: dict[str, Any] = {
    "model": AUDIO_MODEL,
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    # What the usage below reports: a clip in (40 audio tokens), speech out (120 audio
    # tokens beyond the recorded text), which the output cap must allow.
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hello"},
                {"type": "input_audio", "input_audio": {"data": _silence_wav(2), "format": "wav"}},
            ],
        }
    ],
    "max_completion_tokens": 400,
}


def chat_audio() -> Interaction:
    """The recorded chat as ``gpt-audio`` answering with audio: audio tokens each way."""
    source = recorded(CHAT)
    body = json.loads(source.body)
    body["model"] = AUDIO_MODEL
    _audio_usage(body["usage"])
    request = {**source.request, **_AUDIO_REQUEST}
    return _derived(source, "chat_audio", request=request, body=_json(body))


def chat_stream_audio() -> Interaction:
    """The recorded chat stream as ``gpt-audio``, its usage chunk counting audio tokens."""
    source = recorded(CHAT_STREAM)

    def change(data: dict[str, Any]) -> bool:
        data["model"] = AUDIO_MODEL
        if isinstance(data.get("usage"), dict):
            _audio_usage(data["usage"])
        return True

    request = {**source.request, **_AUDIO_REQUEST}
    return _derived(source, "chat_stream_audio", request=request, body=_sse_with(source, change))


def replayable() -> tuple[Interaction, ...]:
    """The derived cases that the ordinary replay checks apply to."""
    return (
        float_embedding(),
        server_error_openai(),
        overloaded_anthropic(),
        event_stream_as_json(),
        responses_cache_write(),
        chat_tier_by_project(),
        chat_tier_not_granted(),
        chat_stream_tier_by_project(),
        responses_flex(),
        responses_stream_tier_by_project(),
        anthropic_fast(),
        anthropic_stream_fast(),
        chat_audio(),
    )
