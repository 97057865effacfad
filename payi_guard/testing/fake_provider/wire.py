"""How one request is answered: the plan, the call, encodings, errors and API headers.

Shared by the OpenAI and Anthropic endpoints and by the request handler.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, Protocol

from payi_guard.testing.fake_provider.script import (
    ARGUMENT_PIECE,
    Scripted,
    ToolCall,
    count_input_tokens,
)

__all__ = [
    "Call",
    "Plan",
    "ProviderSettings",
    "api_headers",
    "argument_tokens",
    "body_bytes",
    "data_event",
    "dumps",
    "error_plan",
    "hex_id",
    "is_anthropic_path",
    "merge_headers",
    "pieces",
    "typed_event",
]


class ProviderSettings(Protocol):
    """The settings of the provider that the answers read."""

    @property
    def reply(self) -> str:
        """The reply text of every generated answer."""

    @property
    def reject_stream_options(self) -> bool:
        """Answer 400 to a request carrying ``stream_options``."""

    @property
    def embedding_dimensions(self) -> int:
        """The vector size when a request gives no ``dimensions``."""

    @property
    def anthropic_delta_usage(self) -> Literal["full", "output"]:
        """What Anthropic's ``message_delta`` usage carries by default."""

    @property
    def retry_after(self) -> float:
        """Seconds announced in ``retry-after`` on 429 answers."""


@dataclass
class Plan:
    """A response ready to write: a JSON body or a list of SSE events."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    events: list[bytes] | None = None
    usage: dict[str, Any] | None = None


@dataclass
class Call:
    """Everything an endpoint function needs to build its answer."""

    provider: ProviderSettings
    script: Scripted
    path: str
    body: dict[str, Any]
    request_id: str
    deployment: str | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        """The model named in the answer: scripted, requested, or the deployment."""
        if self.script.model:
            return self.script.model
        model = self.body.get("model")
        if isinstance(model, str) and model:
            return model
        return self.deployment or "fake-model"

    @property
    def stream(self) -> bool:
        """Whether the request asked for a stream."""
        return self.body.get("stream") is True

    @property
    def input_tokens(self) -> int:
        """The fake's input token count of the request body."""
        return count_input_tokens(self.body)

    def words(self, *cap_names: str) -> tuple[list[str], bool]:
        """The reply words after the request's output cap, and whether it capped them."""
        text = self.script.text if self.script.text is not None else self.provider.reply
        words = text.split()
        for name in cap_names:
            cap = self.body.get(name)
            if isinstance(cap, int) and not isinstance(cap, bool):
                return words[: max(cap, 0)], len(words) > cap
        return words, False

    def tool_calls(self) -> list[tuple[str, ToolCall]]:
        """The scripted tool calls, each with its (generated if needed) id."""
        return [(call.id or f"call_{hex_id(24)}", call) for call in self.script.tool_calls]

    def merge_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """``usage`` with the script's ``usage`` merged deeply over it."""
        return _deep_merge(usage, self.script.usage or {})


def hex_id(n: int) -> str:
    """``n`` random hex digits, for ids."""
    return uuid.uuid4().hex[:n]


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def pieces(text: str) -> list[str]:
    """``text`` cut into the pieces tool-call arguments stream in."""
    return [text[i : i + ARGUMENT_PIECE] for i in range(0, len(text), ARGUMENT_PIECE)]


def argument_tokens(call: ToolCall) -> int:
    """The output tokens a tool call's arguments count for."""
    return math.ceil(len(call.arguments) / ARGUMENT_PIECE)


def dumps(obj: object) -> bytes:
    """Compact JSON, UTF-8 encoded."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def data_event(obj: object) -> bytes:
    """One server-sent event: a ``data:`` line of JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


def typed_event(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event named after ``obj['type']``, with ``obj`` as JSON data."""
    return b"event: " + str(obj["type"]).encode() + b"\n" + data_event(obj)


def is_anthropic_path(path: str) -> bool:
    """Whether ``path`` is one of Anthropic's (``.../v1/messages...``)."""
    segments = [s for s in path.split("/") if s]
    return "messages" in segments[-2:] and "v1" in segments


# -- errors -------------------------------------------------------------------------------

_OPENAI_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: sk-fake. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for requests per min (RPM): Limit 3, Used 3, Requested 1. "
        "Please try again in 1s.",
    ),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: (
        "permission_error",
        "Your API key does not have permission to use the specified resource.",
    ),
    404: ("not_found_error", "Not found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out."),
    529: ("overloaded_error", "Overloaded"),
}


def _openai_error(status: int, script: Scripted, message: str | None = None) -> dict[str, Any]:
    kind, code, default = _OPENAI_ERRORS.get(
        status, _OPENAI_ERRORS[500] if status >= 500 else _OPENAI_ERRORS[400]
    )
    return {
        "error": {
            "message": script.error_message or message or default,
            "type": script.error_type or kind,
            "param": None,
            "code": code,
        }
    }


def _anthropic_error(
    status: int, script: Scripted, request_id: str, message: str | None = None
) -> dict[str, Any]:
    kind, default = _ANTHROPIC_ERRORS.get(
        status, _ANTHROPIC_ERRORS[500] if status >= 500 else _ANTHROPIC_ERRORS[400]
    )
    return {
        "type": "error",
        "error": {
            "type": script.error_type or kind,
            "message": script.error_message or message or default,
        },
        "request_id": request_id,
    }


def error_plan(call: Call, status: int, message: str | None = None) -> Plan:
    """The API's own error answer for ``status`` (or the scripted body)."""
    anthropic = is_anthropic_path(call.path)
    if call.script.body is not None:
        body = body_bytes(call.script.body)
    elif anthropic:
        body = dumps(_anthropic_error(status, call.script, call.request_id, message))
    else:
        body = dumps(_openai_error(status, call.script, message))
    headers = api_headers(call, status)
    return Plan(status=status, headers=headers, body=body)


def body_bytes(body: object) -> bytes:
    """A scripted body as bytes: bytes and str as they are, anything else as JSON."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return dumps(body)


def api_headers(call: Call, status: int) -> dict[str, str]:
    """The headers the real API sends next to a body: ids, versions, rate limits."""
    provider = call.provider
    if is_anthropic_path(call.path):
        reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))
        headers = {
            "request-id": call.request_id,
            "anthropic-organization-id": "00000000-0000-4000-8000-000000000000",
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "0" if status == 429 else "3999",
            "anthropic-ratelimit-requests-reset": reset,
            "anthropic-ratelimit-tokens-limit": "400000",
            "anthropic-ratelimit-tokens-remaining": "0" if status == 429 else "399000",
            "anthropic-ratelimit-tokens-reset": reset,
        }
        if status >= 400:
            # Anthropic tells its SDKs whether an error is worth retrying.
            retry = status in (408, 409, 429) or status >= 500
            headers["x-should-retry"] = "true" if retry else "false"
    else:
        headers = {
            "x-request-id": call.request_id,
            "openai-organization": "user-fake",
            "openai-processing-ms": "1",
            "openai-version": "2020-10-01",
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "0" if status == 429 else "9999",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-tokens": "0" if status == 429 else "1999000",
            "x-ratelimit-reset-tokens": "30ms",
        }
    if status == 429:
        seconds = provider.retry_after
        headers["retry-after"] = str(math.ceil(seconds))
        if not float(seconds).is_integer():
            headers["retry-after-ms"] = str(round(seconds * 1000))
    return headers


def merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated by ``extra``, header names compared without case."""
    names = {name.lower() for name in extra}
    merged = {name: value for name, value in base.items() if name.lower() not in names}
    merged.update(extra)
    return merged
