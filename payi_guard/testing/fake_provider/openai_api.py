"""The OpenAI endpoints and the passthrough ones (transcriptions, uploads, the model list)."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from collections.abc import Mapping
from typing import Any

from payi_guard.testing.fake_provider.script import ResponseStatus, text_words
from payi_guard.testing.fake_provider.wire import (
    Call,
    Plan,
    api_headers,
    argument_tokens,
    data_event,
    dumps,
    hex_id,
    pieces,
    typed_event,
)

__all__ = [
    "chat",
    "completions",
    "embeddings",
    "file_upload",
    "models",
    "responses",
    "transcription",
]


def _chat_usage(call: Call, output: int) -> dict[str, Any] | None:
    if call.script.omit_usage:
        return None
    cached = call.script.cached_tokens
    reasoning = call.script.reasoning_tokens
    prompt = call.input_tokens + cached
    completion = output + reasoning
    return call.merge_usage(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": reasoning,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }
    )


def _choices(call: Call) -> int:
    n = call.body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def chat(call: Call) -> Plan:
    """Answer ``POST .../chat/completions``: plain or streamed, ``n`` choices, tool calls."""
    words, capped = call.words("max_completion_tokens", "max_tokens")
    tools = call.tool_calls()
    n = _choices(call)
    per_choice = len(words) + sum(argument_tokens(tool) for _, tool in tools)
    usage = _chat_usage(call, n * per_choice)
    finish = "length" if capped else ("tool_calls" if tools else "stop")
    content = " ".join(words) if words or not tools else None
    base = {
        "id": f"chatcmpl-{hex_id(29)}",
        "created": call.created,
        "model": call.model,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }
    if not call.stream:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": content,
            "refusal": None,
            "annotations": [],
        }
        if tools:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool.name, "arguments": tool.arguments},
                }
                for call_id, tool in tools
            ]
        body = {
            **base,
            "object": "chat.completion",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
        }
        if usage is not None:
            body["usage"] = usage
        return Plan(200, api_headers(call, 200), body=dumps(body), usage=usage)

    include_usage = _include_usage(call) and usage is not None
    chunk_base = {**base, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            **chunk_base,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return data_event(obj)

    events: list[bytes] = []
    for i in range(n):
        events.append(chunk(i, {"role": "assistant", "content": "", "refusal": None}))
        for k, word in enumerate(words):
            events.append(chunk(i, {"content": word if k == 0 else f" {word}"}))
        for position, (call_id, tool) in enumerate(tools):
            start = {
                "index": position,
                "id": call_id,
                "type": "function",
                "function": {"name": tool.name, "arguments": ""},
            }
            events.append(chunk(i, {"tool_calls": [start]}))
            for piece in pieces(tool.arguments):
                step = {"index": position, "function": {"arguments": piece}}
                events.append(chunk(i, {"tool_calls": [step]}))
        events.append(chunk(i, {}, finish))
    if include_usage:
        events.append(data_event({**chunk_base, "choices": [], "usage": usage}))
    if call.script.done:
        events.append(b"data: [DONE]\n\n")
    return Plan(200, api_headers(call, 200), events=events, usage=usage)


def _include_usage(call: Call) -> bool:
    options = call.body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


# -- OpenAI legacy completions ----------------------------------------------------------------


def completions(call: Call) -> Plan:
    """Answer the legacy ``POST .../completions``: plain or streamed."""
    words, capped = call.words("max_tokens")
    n = _choices(call)
    usage = _chat_usage(call, n * len(words))
    if usage is not None:
        # The legacy endpoint reports no token details.
        usage = {k: v for k, v in usage.items() if not k.endswith("_details")}
    finish = "length" if capped else "stop"
    base = {
        "id": f"cmpl-{hex_id(29)}",
        "object": "text_completion",
        "created": call.created,
        "model": call.model,
        "system_fingerprint": "fp_fake",
    }
    if not call.stream:
        text = " ".join(words)
        body: dict[str, Any] = {
            **base,
            "choices": [
                {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
        }
        if usage is not None:
            body["usage"] = usage
        return Plan(200, api_headers(call, 200), body=dumps(body), usage=usage)

    include_usage = _include_usage(call) and usage is not None

    def chunk(index: int, text: str, finish_reason: str | None = None) -> bytes:
        obj: dict[str, Any] = {
            **base,
            "choices": [
                {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            obj["usage"] = None
        return data_event(obj)

    events = [
        chunk(i, word if k == 0 else f" {word}") for i in range(n) for k, word in enumerate(words)
    ]
    events.extend(chunk(i, "", finish) for i in range(n))
    if include_usage:
        events.append(data_event({**base, "choices": [], "usage": usage}))
    if call.script.done:
        events.append(b"data: [DONE]\n\n")
    return Plan(200, api_headers(call, 200), events=events, usage=usage)


# -- OpenAI Responses -----------------------------------------------------------------------


def responses(call: Call) -> Plan:
    """Answer ``POST .../responses``: plain, or streamed as typed events."""
    words, capped = call.words("max_output_tokens")
    tools = call.tool_calls()
    cached = call.script.cached_tokens
    reasoning = call.script.reasoning_tokens
    output_tokens = len(words) + sum(argument_tokens(t) for _, t in tools) + reasoning
    input_tokens = call.input_tokens + cached
    usage: dict[str, Any] | None = None
    if not call.script.omit_usage:
        usage = call.merge_usage(
            {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning},
                "total_tokens": input_tokens + output_tokens,
            }
        )
    status: ResponseStatus = call.script.response_status or (
        "incomplete" if capped else "completed"
    )
    text = " ".join(words)
    message_id = f"msg_{hex_id(32)}"
    item_status = "completed" if status == "completed" else "incomplete"
    message_item = {
        "id": message_id,
        "type": "message",
        "status": item_status,
        "role": "assistant",
        "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": text}],
    }
    tool_items = [
        {
            "id": f"fc_{hex_id(32)}",
            "type": "function_call",
            "status": "completed",
            "call_id": call_id,
            "name": tool.name,
            "arguments": tool.arguments,
        }
        for call_id, tool in tools
    ]
    output = ([message_item] if words or not tools else []) + tool_items
    response: dict[str, Any] = {
        "id": f"resp_{hex_id(32)}",
        "object": "response",
        "created_at": call.created,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": call.body.get("instructions"),
        "max_output_tokens": call.body.get("max_output_tokens"),
        "model": call.model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": call.body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": call.body.get("tools") or [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }
    if status == "incomplete":
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    elif status == "failed":
        response["error"] = {
            "code": call.script.error_type or "server_error",
            "message": call.script.error_message or "The model failed to generate a response.",
        }
    if status == "completed":
        response["completed_at"] = call.created
    if not call.stream:
        return Plan(200, api_headers(call, 200), body=dumps(response), usage=usage)
    return Plan(
        200,
        api_headers(call, 200),
        events=_responses_events(response, message_item, words, tool_items),
        usage=usage,
    )


def _responses_events(
    response: dict[str, Any],
    message_item: dict[str, Any],
    words: list[str],
    tool_items: list[dict[str, Any]],
) -> list[bytes]:
    events: list[bytes] = []

    def emit(event_type: str, **fields: Any) -> None:
        events.append(typed_event({"type": event_type, "sequence_number": len(events), **fields}))

    in_progress = {**response, "status": "in_progress", "output": [], "usage": None}
    in_progress.pop("completed_at", None)
    in_progress.update(error=None, incomplete_details=None)
    emit("response.created", response=in_progress)
    emit("response.in_progress", response=in_progress)
    index = 0
    if response["output"] and response["output"][0] is message_item:
        item_id = message_item["id"]
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        emit(
            "response.output_item.added",
            output_index=0,
            item={**message_item, "status": "in_progress", "content": []},
        )
        emit(
            "response.content_part.added",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part=part,
        )
        for k, word in enumerate(words):
            emit(
                "response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=word if k == 0 else f" {word}",
                logprobs=[],
            )
        text = message_item["content"][0]["text"]
        emit(
            "response.output_text.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=[],
        )
        emit(
            "response.content_part.done",
            item_id=item_id,
            output_index=0,
            content_index=0,
            part={**part, "text": text},
        )
        emit("response.output_item.done", output_index=0, item=message_item)
        index = 1
    for offset, item in enumerate(tool_items):
        position = index + offset
        emit(
            "response.output_item.added",
            output_index=position,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        for piece in pieces(item["arguments"]):
            emit(
                "response.function_call_arguments.delta",
                item_id=item["id"],
                output_index=position,
                delta=piece,
            )
        emit(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=position,
            name=item["name"],
            arguments=item["arguments"],
        )
        emit("response.output_item.done", output_index=position, item=item)
    emit(f"response.{response['status']}", response=response)
    return events


# -- OpenAI embeddings ----------------------------------------------------------------------


def _embedding(text: str, dimensions: int) -> list[float]:
    """A deterministic vector whose values are exact in float32 (multiples of 1/64)."""
    seed = zlib.crc32(text.encode("utf-8"))
    return [((seed + 7 * j) % 64 - 32) / 64 for j in range(dimensions)]


def embeddings(call: Call) -> Plan:
    """Answer ``POST .../embeddings`` (``float`` or ``base64`` vectors)."""
    raw = call.body.get("input")
    items: list[Any]
    if isinstance(raw, list) and raw and not all(isinstance(x, int) for x in raw):
        items = raw
    else:
        items = [raw]
    dimensions = call.body.get("dimensions")
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
        dimensions = call.provider.embedding_dimensions
    as_base64 = call.body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(items):
        vector = _embedding(json.dumps(item), dimensions)
        value: Any = vector
        if as_base64:
            value = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": value})
    tokens = max(1, text_words(raw))
    usage = (
        None
        if call.script.omit_usage
        else call.merge_usage({"prompt_tokens": tokens, "total_tokens": tokens})
    )
    body: dict[str, Any] = {"object": "list", "data": data, "model": call.model}
    if usage is not None:
        body["usage"] = usage
    return Plan(200, api_headers(call, 200), body=dumps(body), usage=usage)


def transcription(call: Call) -> Plan:
    """Answer ``POST .../audio/transcriptions`` (multipart) with the reply text."""
    body = {"text": call.script.text if call.script.text is not None else call.provider.reply}
    return Plan(200, api_headers(call, 200), body=dumps(body))


def file_upload(call: Call, size: int) -> Plan:
    """Answer ``POST .../files`` (multipart) with a file object of ``size`` bytes."""
    body = {
        "id": f"file-{hex_id(24)}",
        "object": "file",
        "bytes": size,
        "created_at": call.created,
        "expires_at": None,
        "filename": "upload",
        "purpose": "assistants",
        "status": "processed",
        "status_details": None,
    }
    return Plan(200, api_headers(call, 200), body=dumps(body))


def models(call: Call) -> Plan:
    """Answer ``GET .../models`` with a short model list."""
    names = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    data = [
        {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
        for name in names
    ]
    return Plan(200, api_headers(call, 200), body=dumps({"object": "list", "data": data}))
