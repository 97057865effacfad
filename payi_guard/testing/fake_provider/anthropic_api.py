"""The Anthropic endpoints: messages (plain and streamed) and ``count_tokens``."""

from __future__ import annotations

import json
from typing import Any

from payi_guard.testing.fake_provider.wire import (
    Call,
    Plan,
    api_headers,
    argument_tokens,
    dumps,
    hex_id,
    pieces,
    typed_event,
)

__all__ = ["count_tokens", "messages"]


def messages(call: Call) -> Plan:
    """Answer ``POST .../v1/messages``: a message, plain or as the full event stream."""
    words, capped = call.words("max_tokens")
    tools = [
        (f"toolu_{hex_id(24)}" if tool.id is None else tool.id, tool)
        for _, tool in call.tool_calls()
    ]
    reasoning = call.script.reasoning_tokens
    output_tokens = len(words) + sum(argument_tokens(t) for _, t in tools) + reasoning
    cache_write = call.script.cache_write_tokens
    usage: dict[str, Any] | None = None
    if not call.script.omit_usage:
        base_usage: dict[str, Any] = {
            "input_tokens": call.input_tokens,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": call.script.cached_tokens,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache_write,
                "ephemeral_1h_input_tokens": 0,
            },
            "output_tokens": output_tokens,
            "service_tier": "standard",
        }
        if reasoning:
            base_usage["output_tokens_details"] = {"thinking_tokens": reasoning}
        usage = call.merge_usage(base_usage)
    stop_reason = "max_tokens" if capped else ("tool_use" if tools else "end_turn")
    blocks: list[dict[str, Any]] = []
    if words or not tools:
        blocks.append({"type": "text", "text": " ".join(words)})
    for tool_id, tool in tools:
        try:
            tool_input = json.loads(tool.arguments)
        except ValueError:
            tool_input = {}
        blocks.append({"type": "tool_use", "id": tool_id, "name": tool.name, "input": tool_input})
    message: dict[str, Any] = {
        "id": f"msg_{hex_id(24)}",
        "type": "message",
        "role": "assistant",
        "model": call.model,
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
    }
    if usage is not None:
        message["usage"] = usage
    if not call.stream:
        return Plan(200, api_headers(call, 200), body=dumps(message), usage=usage)

    events: list[bytes] = []
    start_usage = None if usage is None else {**usage, "output_tokens": min(1, output_tokens)}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    if start_usage is not None:
        start["usage"] = start_usage
    events.append(typed_event({"type": "message_start", "message": start}))
    tool_by_id = dict(tools)
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            events.append(
                typed_event(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {"type": "text", "text": ""},
                    }
                )
            )
            if index == 0:
                events.append(b'event: ping\ndata: {"type": "ping"}\n\n')
            for k, word in enumerate(words):
                delta = {"type": "text_delta", "text": word if k == 0 else f" {word}"}
                events.append(
                    typed_event({"type": "content_block_delta", "index": index, "delta": delta})
                )
        else:
            tool = tool_by_id[block["id"]]
            events.append(
                typed_event(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {**block, "input": {}},
                    }
                )
            )
            for piece in pieces(tool.arguments):
                delta = {"type": "input_json_delta", "partial_json": piece}
                events.append(
                    typed_event({"type": "content_block_delta", "index": index, "delta": delta})
                )
        events.append(typed_event({"type": "content_block_stop", "index": index}))
    delta_usage: dict[str, Any] | None = None
    if usage is not None:
        mode = call.script.anthropic_delta_usage or call.provider.anthropic_delta_usage
        keys = ["output_tokens"]
        if mode == "full":
            keys = ["input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", *keys]
        delta_usage = {key: usage[key] for key in keys if key in usage}
    message_delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
    }
    if delta_usage is not None:
        message_delta["usage"] = delta_usage
    events.append(typed_event(message_delta))
    events.append(typed_event({"type": "message_stop"}))
    return Plan(200, api_headers(call, 200), events=events, usage=usage)


def count_tokens(call: Call) -> Plan:
    """Answer ``POST .../v1/messages/count_tokens``."""
    body = {"input_tokens": call.input_tokens}
    return Plan(200, api_headers(call, 200), body=dumps(body))
