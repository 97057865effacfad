"""What a test scripts and reads: scripts, tool calls, recorded requests, token counts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias

__all__ = [
    "ARGUMENT_PIECE",
    "DEFAULT_REPLY",
    "RawEvent",
    "RecordedRequest",
    "ResponseStatus",
    "Scripted",
    "ToolCall",
    "count_input_tokens",
    "count_words",
    "text_words",
]

DEFAULT_REPLY: Final = "Hello from the fake provider, a deterministic reply for tests."
"""The reply text when none is configured: 10 words, so 10 output tokens per choice."""

RawEvent: TypeAlias = bytes | str | Mapping[str, Any] | tuple[str, Any]
"""A scripted stream event: raw ``bytes`` written as they are; a ``str`` sent as one
``data:`` line; a mapping sent as JSON data (with an ``event:`` line named after its
``type`` on Responses and Anthropic paths); or an ``(event, data)`` pair."""

ARGUMENT_PIECE: Final = 4
"""Characters of tool-call arguments per streamed piece (and per output token)."""

_TEXT_FIELDS: Final = ("system", "instructions", "messages", "input", "prompt")
_TEXT_KEYS: Final = ("content", "text", "input", "output", "tool_calls", "function", "arguments")

ResponseStatus = Literal["completed", "incomplete", "failed"]


@dataclass(frozen=True)
class ToolCall:
    """A tool (function) call the fake model makes.

    Attributes:
        name: the function name.
        arguments: the arguments as JSON text (streamed in 4-character pieces).
        id: the call id; generated when ``None``.
    """

    name: str
    arguments: str = "{}"
    id: str | None = None


@dataclass(frozen=True)
class Scripted:
    """How the fake answers one request (or every request of a path, as a default).

    Every field has a default that means "behave like the real API", so a script states
    only what differs.

    Attributes:
        status: the HTTP status. Anything but 200 answers with the API's own error body
            (OpenAI ``{"error": {...}}`` or Anthropic ``{"type": "error", ...}``) unless
            ``body`` is given; 429 adds ``retry-after``.
        body: a response body to send instead of the generated one: bytes or str as
            they are, anything else as JSON.
        headers: extra response headers (they win over generated ones).
        events: stream events to send instead of the generated ones (see
            :data:`RawEvent`); the response is then a stream whatever the request asked.
        text: the reply text instead of the provider's ``reply``.
        tool_calls: tool calls the model makes (after the text, if any).
        usage: merged (deeply) over the generated usage object, in the API's field names.
        omit_usage: send no usage at all (like OpenAI-compatible servers that ignore
            ``stream_options``): no usage field, no usage chunk.
        cached_tokens: prompt tokens read from the cache (OpenAI ``cached_tokens``,
            Anthropic ``cache_read_input_tokens``), on top of the counted words.
        cache_write_tokens: Anthropic ``cache_creation_input_tokens`` (Anthropic only).
        reasoning_tokens: reasoning tokens, added to the output tokens and reported in
            the API's details field.
        model: the model named in the response, instead of echoing the request's.
        response_status: Responses API terminal status to force (``"incomplete"``,
            ``"failed"``); by default ``completed``, or ``incomplete`` when capped.
        error_type: the error ``type`` for an error status or a mid-stream error.
        error_message: the error message for an error status or a mid-stream error.
        error_after: in a stream, send this many events, then the API's in-stream error
            event (Anthropic ``event: error``, OpenAI ``data: {"error": ...}``), then
            end the stream.
        reset_after: reset the connection (TCP RST) after this many stream events, or,
            for a plain response, after this many body bytes (0: before the status line).
        gzip: force (True) or forbid (False) a gzip-compressed body; by default the body
            is compressed when the provider's ``gzip`` is on and the request accepts it.
        delay: seconds to wait before each stream event (or before a plain body),
            instead of the provider's ``chunk_delay``.
        done: end an OpenAI chat/completions stream with ``data: [DONE]``.
        anthropic_delta_usage: what Anthropic's ``message_delta`` usage carries:
            ``"full"`` (output plus input and cache counts, as current API versions send)
            or ``"output"`` (only ``output_tokens``, as older versions did); by default
            the provider's setting.
        path: apply only to a request whose path ends with this; ``None`` matches any.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    events: Sequence[RawEvent] | None = None
    text: str | None = None
    tool_calls: Sequence[ToolCall] = ()
    usage: Mapping[str, Any] | None = None
    omit_usage: bool = False
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    model: str | None = None
    response_status: ResponseStatus | None = None
    error_type: str | None = None
    error_message: str | None = None
    error_after: int | None = None
    reset_after: int | None = None
    gzip: bool | None = None
    delay: float | None = None
    done: bool = True
    anthropic_delta_usage: Literal["full", "output"] | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"Scripted.status must be an HTTP status, got {self.status}")
        for name in ("cached_tokens", "cache_write_tokens", "reasoning_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"Scripted.{name} must not be negative")
        for name in ("error_after", "reset_after"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Scripted.{name} must not be negative, got {value}")
        if self.delay is not None and self.delay < 0:
            raise ValueError(f"Scripted.delay must not be negative, got {self.delay}")

    def matches(self, path: str) -> bool:
        """Whether this script applies to a request for ``path``."""
        return self.path is None or path.rstrip("/").endswith(self.path.rstrip("/"))


@dataclass
class RecordedRequest:
    """One request the fake received, and how it answered.

    Attributes:
        method: the HTTP method.
        path: the URL path, without the query string.
        query: the query parameters (``{"api-version": ["2024-10-21"]}``).
        headers: the request headers, names in lower case (repeated ones joined by
            ``", "``).
        body: the raw request body.
        json: the parsed body when it is JSON, else ``None``.
        request_id: the id the fake answered with (``x-request-id`` for OpenAI paths,
            ``request-id`` for Anthropic).
        status: the response status, once answered.
        usage: the usage object the fake reported (API field names), if any.
        stream: whether the answer was an event stream.
        outcome: ``"pending"`` while answering, then ``"ok"``, ``"reset"`` (the fake
            reset the connection) or ``"client_gone"`` (the client hung up first).
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    json: Any
    request_id: str
    status: int | None = None
    usage: dict[str, Any] | None = None
    stream: bool = False
    outcome: str = "pending"

    def header(self, name: str) -> str | None:
        """Return the request header ``name`` (any case), or ``None``."""
        return self.headers.get(name.lower())


def count_words(text: str) -> int:
    """Count whitespace-separated words: the fake's token count for a text."""
    return len(text.split())


def count_input_tokens(body: Mapping[str, Any]) -> int:
    """The fake's input token count of a request body (see the module docstring).

    Args:
        body: the parsed JSON request body.

    Returns:
        The words of its text fields (token ids count one each), at least 1.
    """
    return max(1, sum(text_words(body.get(name)) for name in _TEXT_FIELDS))


def text_words(value: object) -> int:
    """Count the words of the text in a request value (see :func:`count_input_tokens`)."""
    if isinstance(value, str):
        return count_words(value)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(text_words(item) for item in value)
    if isinstance(value, Mapping):
        return sum(text_words(value[key]) for key in _TEXT_KEYS if key in value)
    return 0
