"""Pure parsing of GenAI HTTP traffic: endpoints, request bodies, usage, SSE streams.

Nothing here does I/O. The guarding transport uses these pieces in this order:

1. :func:`classify` tells a metered call (``POST .../chat/completions``) from traffic
   that passes through untouched (file uploads, listing models, ``count_tokens``).
2. :meth:`RequestInfo.parse` reads the JSON body: model, ``stream``, ``n``, the output
   cap. A body that is not JSON gives ``None`` and is passed through byte for byte.
3. :func:`inject_include_usage` asks an OpenAI chat (or legacy completions) stream for
   its final usage chunk; :func:`encode_body` serialises the changed body.
4. A plain response goes to :func:`usage_from_response`. A stream goes through a
   :class:`StreamMeter`: an incremental :class:`SSEDecoder` that keeps every event's raw
   bytes, and a :class:`StreamUsageTracker` that reads usage from the events and says
   which events to forward. The client receives the original bytes unchanged, minus only
   the usage-only chunk the guard itself caused.

Token counts follow one convention whatever the provider (:class:`ParsedUsage`):
``input_tokens`` excludes cache reads and cache writes, ``output_tokens`` includes
reasoning tokens.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Final, TypeAlias
from urllib.parse import unquote

from payi_guard.pricing import Endpoint as _PricedEndpoint
from payi_guard.pricing import TokenUsage

__all__ = [
    "ESTIMATE_BYTES_PER_TOKEN",
    "ESTIMATE_MARGIN_TOKENS",
    "Endpoint",
    "EndpointKind",
    "ParsedUsage",
    "RequestInfo",
    "SSEDecoder",
    "SSEEvent",
    "StreamError",
    "StreamMeter",
    "StreamUsageTracker",
    "classify",
    "encode_body",
    "inject_include_usage",
    "usage_from_response",
]

EndpointKind: TypeAlias = _PricedEndpoint
"""``"chat"``, ``"responses"``, ``"embeddings"``, ``"completions"`` or
``"anthropic_messages"``: the request kinds :mod:`payi_guard.pricing` estimates."""

ESTIMATE_BYTES_PER_TOKEN: Final = 2.5
"""UTF-8 bytes per token assumed when a stream ends without its usage report.

Real tokenizers average about 4 bytes of English per token, so 2.5 over-counts ordinary
text; one CJK character is 3 bytes, so it counts as 1.2 tokens, again not under.
"""

ESTIMATE_MARGIN_TOKENS: Final = 16
"""Tokens added to every output estimate.

They cover what was generated but never delivered when a stream was cut (tokens in
flight, stop tokens) and output that carries no text, such as message framing.
"""

_AZURE_HOST_SUFFIXES: Final = (
    ".openai.azure.com",
    ".cognitiveservices.azure.com",
    ".services.ai.azure.com",
)

_PORT: Final = re.compile(r":\d+$")

# Path suffixes (as segment tuples) of the metered OpenAI-style endpoints, longest first
# so that ``chat/completions`` wins over ``completions``.
_OPENAI_SUFFIXES: Final[tuple[tuple[tuple[str, ...], EndpointKind], ...]] = (
    (("chat", "completions"), "chat"),
    (("responses", "compact"), "responses"),
    (("responses",), "responses"),
    (("embeddings",), "embeddings"),
    (("completions",), "completions"),
)


# ---------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A metered GenAI endpoint, as recognised by :func:`classify`.

    Attributes:
        kind: ``"chat"``, ``"responses"``, ``"embeddings"``, ``"completions"`` or
            ``"anthropic_messages"``.
        provider: ``"anthropic"`` for the Messages API, ``"azure"`` for an Azure OpenAI
            path or host, else ``"openai"`` (OpenAI itself or any OpenAI-compatible
            server behind a custom ``base_url``).
        deployment: the Azure deployment named in the path
            (``/openai/deployments/{deployment}/...``), if any.
    """

    kind: EndpointKind
    provider: str = "openai"
    deployment: str | None = None

    @property
    def supports_include_usage(self) -> bool:
        """Whether a stream of this endpoint reports usage only when asked to.

        True for chat and legacy completions: their streams carry usage only with
        ``stream_options.include_usage``. Responses and Anthropic streams always do.
        """
        return self.kind in ("chat", "completions")


def classify(method: str, path: str, host: str | None = None) -> Endpoint | None:
    """Recognise a metered GenAI call from its method and URL path.

    Only ``POST`` requests are calls. Matching is on the end of the path, so any prefix
    works: ``/v1/chat/completions`` on OpenAI, ``/custom/v1/chat/completions`` behind an
    OpenAI-compatible ``base_url``, Azure's
    ``/openai/deployments/{deployment}/chat/completions?api-version=...``. Anthropic's
    Messages API must end in ``/v1/messages``; ``/v1/messages/count_tokens`` and message
    batches are not metered. ``/responses/compact`` is metered as a Responses call (it
    runs the model and reports the same usage object). Everything else (files, audio,
    models, fine-tuning, stored-completion listings) is passthrough.

    Args:
        method: the HTTP method.
        path: the URL path; a query string, if present, is ignored.
        host: the host the request goes to, used only to tell Azure from OpenAI.

    Returns:
        The :class:`Endpoint`, or ``None`` for traffic that is not metered.
    """
    if method.upper() != "POST":
        return None
    segments = [s for s in path.split("?", 1)[0].split("#", 1)[0].split("/") if s]
    if segments[-2:] == ["v1", "messages"]:
        return Endpoint("anthropic_messages", provider="anthropic")
    for suffix, kind in _OPENAI_SUFFIXES:
        if tuple(segments[-len(suffix) :]) != suffix:
            continue
        prefix = segments[: -len(suffix)]
        deployment = None
        if len(prefix) >= 2 and prefix[-2] == "deployments":
            deployment = unquote(prefix[-1])
        azure = deployment is not None or _is_azure_host(host)
        return Endpoint(kind, provider="azure" if azure else "openai", deployment=deployment)
    return None


def _is_azure_host(host: str | None) -> bool:
    if not host:
        return False
    name = _PORT.sub("", host.strip().lower()).rstrip(".")
    return name.endswith(_AZURE_HOST_SUFFIXES)


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a metered request asks for, read from its JSON body.

    Attributes:
        endpoint: the endpoint the request was sent to.
        model: the ``model`` field; for an Azure deployment path whose body has no model,
            the deployment name; ``None`` when neither is known.
        stream: whether ``stream`` is true.
        n: how many choices are requested (``n``, chat and legacy completions); 1 when
            absent or invalid.
        include_usage: whether ``stream_options.include_usage`` is already true.
        max_output_tokens: the output cap the request sets (``max_completion_tokens``,
            else ``max_tokens`` for chat; ``max_output_tokens`` for Responses;
            ``max_tokens`` for legacy completions and Anthropic), per choice; ``None``
            when absent.
        body: the parsed body (not part of equality).
    """

    endpoint: Endpoint
    model: str | None
    stream: bool
    n: int
    include_usage: bool
    max_output_tokens: int | None
    body: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def parse(
        cls, endpoint: Endpoint, body_bytes: bytes, content_type: str | None
    ) -> RequestInfo | None:
        """Parse a request body.

        Args:
            endpoint: the endpoint from :func:`classify`.
            body_bytes: the raw request body.
            content_type: the request's ``Content-Type`` header, if any. A type that is
                not JSON (``multipart/form-data``) gives ``None`` without parsing.

        Returns:
            The :class:`RequestInfo`, or ``None`` when the body is not a JSON object (the
            transport then passes the request through untouched).
        """
        if content_type is not None and not _is_json_type(content_type):
            return None
        if not body_bytes:
            return None
        try:
            body = json.loads(body_bytes)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict):
            return None
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = endpoint.deployment
        stream_options = body.get("stream_options")
        include_usage = (
            isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        )
        n = 1
        if endpoint.kind in ("chat", "completions"):
            n = _positive_int(body.get("n")) or 1
        return cls(
            endpoint=endpoint,
            model=model,
            stream=body.get("stream") is True,
            n=n,
            include_usage=include_usage,
            max_output_tokens=_max_output_tokens(endpoint.kind, body),
            body=body,
        )


def _is_json_type(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _max_output_tokens(kind: EndpointKind, body: Mapping[str, Any]) -> int | None:
    names: tuple[str, ...]
    if kind == "chat":
        names = ("max_completion_tokens", "max_tokens")
    elif kind == "responses":
        names = ("max_output_tokens",)
    elif kind in ("completions", "anthropic_messages"):
        names = ("max_tokens",)
    else:
        return None
    for name in names:
        value = body.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def inject_include_usage(body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Ask a chat or legacy completions stream to end with its usage chunk.

    Sets ``stream_options.include_usage`` to true on a streaming body. The body passed in
    is never mutated. An explicit ``include_usage: false`` is overridden too: the chunk
    it brings is dropped again before the client sees it, so the client's view is the
    same either way.

    Args:
        body: the parsed request body.

    Returns:
        ``(body, added)``: the body to send, and whether the guard added the option (in
        which case the usage-only chunk must be dropped from what the client sees). A
        body that does not stream, already asks for usage, or has a ``stream_options``
        that is not an object is returned as is with ``False``.
    """
    if body.get("stream") is not True:
        return body, False
    options = body.get("stream_options")
    if options is None:
        options = {}
    elif not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False
    return {**body, "stream_options": {**options, "include_usage": True}}, True


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Serialise a request body to compact UTF-8 JSON (for a body the guard changed)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


# ---------------------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedUsage:
    """Token usage of one call, in the same terms for every provider.

    Attributes:
        input_tokens: input tokens billed at the full input rate: cache reads and cache
            writes excluded. For OpenAI, ``prompt_tokens - cached_tokens`` (OpenAI bills
            cache writes at the input rate, so they stay here); Anthropic's
            ``input_tokens`` already excludes its cache fields.
        output_tokens: output tokens, reasoning (thinking) tokens included, as every
            provider bills them.
        cache_read_tokens: input tokens read from the prompt cache.
        cache_write_tokens: input tokens written to the prompt cache with the default
            (5 minute) lifetime: Anthropic's ``cache_creation_input_tokens`` minus the
            1-hour writes.
        cache_write_1h_tokens: input tokens written with a 1-hour lifetime (Anthropic's
            ``cache_creation.ephemeral_1h_input_tokens``), billed at a higher rate.
        reasoning_tokens: the part of ``output_tokens`` spent on reasoning (informative).
        complete: whether the provider's final usage report was seen. When false, some
            counts may be missing or partial.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    complete: bool = False

    @property
    def total_input_tokens(self) -> int:
        """All input tokens: full-rate, cache reads and cache writes together."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
        )

    def to_token_usage(self) -> TokenUsage:
        """Convert to :class:`payi_guard.pricing.TokenUsage` for pricing."""
        return TokenUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens,
        )


def usage_from_response(endpoint: Endpoint, json_obj: object) -> ParsedUsage:
    """Read the usage of a plain (non-streamed) JSON response.

    Args:
        endpoint: the endpoint the request was sent to.
        json_obj: the parsed response body.

    Returns:
        The :class:`ParsedUsage`; ``complete`` is false (and counts are zero) when the
        body carries no usage object, as some OpenAI-compatible servers do.
    """
    if not isinstance(json_obj, Mapping):
        return ParsedUsage()
    usage = json_obj.get("usage")
    if endpoint.kind == "responses" and not isinstance(usage, Mapping):
        # Responses stream events wrap the response object; accept either.
        inner = json_obj.get("response")
        usage = inner.get("usage") if isinstance(inner, Mapping) else None
    if not isinstance(usage, Mapping):
        return ParsedUsage()
    if endpoint.kind == "anthropic_messages":
        return _anthropic_usage(usage, complete=True)
    if endpoint.kind == "responses":
        return _responses_usage(usage)
    return _openai_usage(usage)


def _openai_usage(usage: Mapping[str, Any]) -> ParsedUsage:
    """Chat, legacy completions and embeddings (``prompt_tokens`` style)."""
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    cached = min(prompt, _int(_dig(usage, "prompt_tokens_details", "cached_tokens")))
    reasoning = _int(_dig(usage, "completion_tokens_details", "reasoning_tokens"))
    return ParsedUsage(
        input_tokens=prompt - cached,
        output_tokens=completion,
        cache_read_tokens=cached,
        reasoning_tokens=min(reasoning, completion),
        complete=True,
    )


def _responses_usage(usage: Mapping[str, Any]) -> ParsedUsage:
    total_input = _int(usage.get("input_tokens"))
    output = _int(usage.get("output_tokens"))
    cached = min(total_input, _int(_dig(usage, "input_tokens_details", "cached_tokens")))
    reasoning = _int(_dig(usage, "output_tokens_details", "reasoning_tokens"))
    return ParsedUsage(
        input_tokens=total_input - cached,
        output_tokens=output,
        cache_read_tokens=cached,
        reasoning_tokens=min(reasoning, output),
        complete=True,
    )


def _anthropic_usage(usage: Mapping[str, Any], *, complete: bool) -> ParsedUsage:
    output = _int(usage.get("output_tokens"))
    thinking = _int(_dig(usage, "output_tokens_details", "thinking_tokens"))
    writes = _int(usage.get("cache_creation_input_tokens"))
    writes_1h = min(writes, _int(_dig(usage, "cache_creation", "ephemeral_1h_input_tokens")))
    return ParsedUsage(
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=output,
        cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
        cache_write_tokens=writes - writes_1h,
        cache_write_1h_tokens=writes_1h,
        reasoning_tokens=min(thinking, output),
        complete=complete,
    )


def _int(value: object) -> int:
    """A token count from JSON: non-negative ints, integral floats; anything else is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value.is_integer():
        return max(0, int(value))
    return 0


def _positive_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _dig(obj: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


# ---------------------------------------------------------------------------------------
# Server-sent events
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSEEvent:
    r"""One block of a server-sent event stream, with the exact bytes it came from.

    A block ends at a blank line. Blocks that dispatch nothing (a ``: ping`` comment, a
    stray blank line) are events too, with ``has_data`` false, so that writing every
    kept event's ``raw`` reproduces the stream byte for byte.

    Attributes:
        raw: the block's bytes, line terminators and the ending blank line included.
        event: the ``event:`` field, or ``None``.
        data: the ``data:`` lines joined with ``\n``.
        id: the last event id seen so far in the stream (it persists, per the spec).
        retry: the ``retry:`` field, if any.
        has_data: whether the block had at least one ``data:`` line (only those are
            dispatched to a client).
        complete: false only for the trailing bytes of a stream that ended without a
            blank line (returned by :meth:`SSEDecoder.finish`).
    """

    raw: bytes
    event: str | None = None
    data: str = ""
    id: str | None = None
    retry: int | None = None
    has_data: bool = False
    complete: bool = True

    def json(self) -> Any:
        """Parse ``data`` as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.data)


_LINE_END = re.compile(rb"[\r\n]")
_BOM: Final = "\ufeff"


class SSEDecoder:
    r"""An incremental server-sent events parser that keeps each event's raw bytes.

    Feed it bytes split anywhere (inside a UTF-8 sequence, between ``\r`` and ``\n``):
    the events are the same whatever the split. Lines end at ``\r\n``, ``\n`` or
    ``\r`` (WHATWG SSE). A chunk that ends in ``\r`` keeps that line open until the
    next byte shows whether a ``\n`` follows; this only delays streams that use bare
    ``\r`` line ends. Bytes are held only until their block ends.

    Example::

        decoder = SSEDecoder()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                out.write(event.raw)
        for event in decoder.finish():
            out.write(event.raw)
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf before this offset are parsed lines of the block
        self._first_line = True
        self._last_id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []
        self._retry: int | None = None

    def _reset_stream(self) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._first_line = True
        self._last_id = None
        self._reset_block()

    def _reset_block(self) -> None:
        self._event = None
        self._data = []
        self._retry = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in an event."""
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes and return the events they complete, in order."""
        if not chunk:
            return []
        self._buf += chunk
        return self._drain(final=False)

    def finish(self) -> list[SSEEvent]:
        """End the stream: return the last events, then reset the decoder.

        Trailing bytes that no blank line ended come back as one event with
        ``complete=False`` (a client does not dispatch it, but its bytes still belong to
        the stream).
        """
        events = self._drain(final=True)
        if self._buf:
            if self._scan < len(self._buf):
                self._parse_line(bytes(self._buf[self._scan :]))
            events.append(self._make_event(bytes(self._buf), complete=False))
        self._reset_stream()
        return events

    def _drain(self, *, final: bool) -> list[SSEEvent]:
        buf = self._buf
        events: list[SSEEvent] = []
        start = 0  # where the current block begins
        scan = self._scan
        while True:
            match = _LINE_END.search(buf, scan)
            if match is None:
                break
            end = match.start()
            width = 1
            if buf[end] == 0x0D:
                if end + 1 < len(buf):
                    width = 2 if buf[end + 1] == 0x0A else 1
                elif not final:
                    break  # a "\n" may follow in the next chunk: decide then
            line = bytes(buf[scan:end])
            scan = end + width
            if self._parse_line(line):
                events.append(self._make_event(bytes(buf[start:scan]), complete=True))
                start = scan
        if start:
            del buf[:start]
        self._scan = scan - start
        return events

    def _parse_line(self, raw_line: bytes) -> bool:
        """Apply one line to the current block; True when it is the blank line ending it."""
        line = raw_line.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            return True
        if line.startswith(":"):
            return False
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return False

    def _make_event(self, raw: bytes, *, complete: bool) -> SSEEvent:
        event = SSEEvent(
            raw=raw,
            event=self._event or None,
            data="\n".join(self._data),
            id=self._last_id,
            retry=self._retry,
            has_data=bool(self._data),
            complete=complete,
        )
        self._reset_block()
        return event


# ---------------------------------------------------------------------------------------
# Stream usage
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamError:
    """An error the provider reported inside a stream (after a 200 status).

    Attributes:
        type: the error type (``overloaded_error``, ``server_error``), if given.
        message: the error message, if given.
        code: the error code (OpenAI), if given.
    """

    type: str | None
    message: str | None
    code: str | None = None


_TERMINAL_RESPONSE_EVENTS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)

# Anthropic delta payload keys that carry generated output.
_ANTHROPIC_DELTA_TEXT_KEYS: Final = ("text", "partial_json", "thinking")

# Chat / legacy completions delta keys that carry generated output. ``reasoning_content``
# and ``reasoning`` are sent by OpenAI-compatible servers for reasoning models.
_CHAT_DELTA_TEXT_KEYS: Final = ("content", "refusal", "reasoning_content", "reasoning", "text")


class StreamUsageTracker:
    """Follows a stream event by event: usage, output received, errors, what to drop.

    Feed it every :class:`SSEEvent` of a response with :meth:`observe`; forward an
    event's raw bytes to the client only when it returns true.

    - Chat / legacy completions: the final usage chunk (``choices: []`` plus ``usage``)
      is read, and dropped when ``added_include_usage`` says the guard asked for it. A
      later usage object replaces an earlier one (servers that report running usage).
    - Responses: the usage of ``response.completed`` / ``response.incomplete`` /
      ``response.failed`` and that terminal status.
    - Anthropic: ``message_start`` usage merged with ``message_delta`` usage; a field the
      later event carries wins, fields it leaves out (cache counts) are kept.

    Args:
        endpoint: the endpoint the stream came from.
        added_include_usage: whether the guard added ``stream_options.include_usage``
            (from :func:`inject_include_usage`).
    """

    def __init__(self, endpoint: Endpoint, *, added_include_usage: bool = False) -> None:
        self.endpoint = endpoint
        self.added_include_usage = added_include_usage
        self.model: str | None = None
        """The model the provider names in the stream, once seen."""
        self.response_id: str | None = None
        """The provider's id of the response (``chatcmpl-...``, ``resp_...``, ``msg_...``)."""
        self.status: str | None = None
        """Terminal state: the Responses status (``completed``, ``incomplete``,
        ``failed``), Anthropic's ``stop_reason``, or the last chat ``finish_reason``."""
        self.finished = False
        """Whether the stream's own end marker arrived (``[DONE]``, ``message_stop``,
        a terminal Responses event)."""
        self.errors: list[StreamError] = []
        """Errors the provider reported inside the stream."""
        self.output_bytes = 0
        """UTF-8 bytes of generated text, reasoning and tool arguments received."""
        self.output_deltas = 0
        """Number of deltas that carried generated output."""
        self.events = 0
        """Number of events with data observed."""
        self.dropped = 0
        """Number of events :meth:`observe` said to drop."""
        self._usage: ParsedUsage | None = None
        self._anthropic: dict[str, Any] = {}
        self._input_reported = False

    # -- feeding ------------------------------------------------------------------------

    def observe(self, event: SSEEvent) -> bool:
        """Take one event into account.

        Args:
            event: the next event of the stream, from :class:`SSEDecoder`.

        Returns:
            True if the event's bytes go to the client; false only for the usage-only
            chunk the guard caused with ``include_usage``.
        """
        if not event.has_data:
            return True
        self.events += 1
        data = event.data
        if data.strip() == "[DONE]":
            self.finished = True
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        kind = self.endpoint.kind
        if kind == "anthropic_messages":
            self._observe_anthropic(event.event, obj)
            return True
        if kind == "responses":
            self._observe_responses(event.event, obj)
            return True
        forward = self._observe_chat(obj)
        if not forward:
            self.dropped += 1
        return forward

    def _observe_chat(self, obj: dict[str, Any]) -> bool:
        error = obj.get("error")
        if error:
            self._add_openai_error(error)
            return True
        self._note_identity(obj.get("model"), obj.get("id"))
        usage = obj.get("usage")
        if isinstance(usage, Mapping):
            self._usage = _openai_usage(usage)
            self._input_reported = True
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, Mapping):
                    self._count_chat_choice(choice)
        # Only the chunk the guard caused is dropped: usage and no choices.
        return not (self.added_include_usage and isinstance(usage, Mapping) and not choices)

    def _count_chat_choice(self, choice: Mapping[str, Any]) -> None:
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.status = finish
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            delta = choice  # legacy completions put ``text`` on the choice itself
        for key in _CHAT_DELTA_TEXT_KEYS:
            self._count_text(delta.get(key))
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    self._count_text(function.get("arguments"))
        function_call = delta.get("function_call")
        if isinstance(function_call, Mapping):
            self._count_text(function_call.get("arguments"))

    def _observe_responses(self, event_name: str | None, obj: dict[str, Any]) -> None:
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event_name
        if not isinstance(kind, str):
            return
        response = obj.get("response")
        if isinstance(response, Mapping):
            self._note_identity(response.get("model"), response.get("id"))
        if kind in _TERMINAL_RESPONSE_EVENTS:
            self.finished = True
            status = response.get("status") if isinstance(response, Mapping) else None
            self.status = status if isinstance(status, str) else kind.rsplit(".", 1)[1]
            usage = response.get("usage") if isinstance(response, Mapping) else None
            if isinstance(usage, Mapping):
                self._usage = _responses_usage(usage)
                self._input_reported = True
            if kind == "response.failed" and isinstance(response, Mapping):
                self._add_openai_error(response.get("error") or {"type": "failed"})
        elif kind == "error":
            self._add_openai_error(obj)
        elif kind.endswith(".delta") and "audio" not in kind:
            self._count_text(obj.get("delta"))

    def _observe_anthropic(self, event_name: str | None, obj: dict[str, Any]) -> None:
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event_name
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, Mapping):
                self._note_identity(message.get("model"), message.get("id"))
                self._merge_anthropic(message.get("usage"), final=False)
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, Mapping):
                for key in _ANTHROPIC_DELTA_TEXT_KEYS:
                    self._count_text(delta.get(key))
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, Mapping):
                self._count_text(block.get("text"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.status = delta["stop_reason"]
            self._merge_anthropic(obj.get("usage"), final=True)
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            error = obj.get("error")
            error = error if isinstance(error, Mapping) else obj
            self.errors.append(StreamError(_str(error.get("type")), _str(error.get("message"))))

    def _merge_anthropic(self, usage: object, *, final: bool) -> None:
        if not isinstance(usage, Mapping):
            return
        for key, value in usage.items():
            if value is not None:
                self._anthropic[key] = value
        if "input_tokens" in self._anthropic:
            self._input_reported = True
        was_complete = self._usage is not None and self._usage.complete
        complete = (final or was_complete) and self._input_reported
        self._usage = _anthropic_usage(self._anthropic, complete=complete)

    def _note_identity(self, model: object, response_id: object) -> None:
        if self.model is None and isinstance(model, str) and model:
            self.model = model
        if self.response_id is None and isinstance(response_id, str) and response_id:
            self.response_id = response_id

    def _add_openai_error(self, error: object) -> None:
        if not isinstance(error, Mapping):
            self.errors.append(StreamError(None, _str(error)))
            return
        self.errors.append(
            StreamError(
                _str(error.get("type")), _str(error.get("message")), _str(error.get("code"))
            )
        )

    def _count_text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.output_bytes += len(value.encode("utf-8"))
            self.output_deltas += 1

    # -- results ------------------------------------------------------------------------

    @property
    def usage(self) -> ParsedUsage | None:
        """The usage the provider reported so far (``None`` if none yet).

        ``complete`` is true once the final report arrived: the chat usage chunk, a
        terminal Responses event with usage, or Anthropic's ``message_delta`` usage
        after ``message_start``.
        """
        return self._usage

    @property
    def usage_complete(self) -> bool:
        """Whether the provider's final usage report was seen."""
        return self._usage is not None and self._usage.complete

    def estimated_output_tokens(self) -> int:
        """An estimate of the output tokens, for a stream without its final usage.

        ``max(ceil(output_bytes / 2.5), output_deltas) + 16``
        (:data:`ESTIMATE_BYTES_PER_TOKEN`, :data:`ESTIMATE_MARGIN_TOKENS`), and never
        below an output count the provider already reported. Reasoning a model never
        streams (hidden reasoning tokens) cannot be seen and is not in the estimate.
        """
        by_bytes = math.ceil(self.output_bytes / ESTIMATE_BYTES_PER_TOKEN)
        estimate = max(by_bytes, self.output_deltas) + ESTIMATE_MARGIN_TOKENS
        reported = self._usage.output_tokens if self._usage is not None else 0
        return max(estimate, reported)

    def best_usage(self, fallback_input_tokens: int) -> ParsedUsage:
        """The usage to settle with: the provider's report, completed by estimates.

        Args:
            fallback_input_tokens: the input tokens to charge when the stream never
                reported them (the transport's estimate from the request body).

        Returns:
            The reported usage when complete; otherwise the reported input counts (or
            the fallback) with :meth:`estimated_output_tokens`, ``complete=False``.
        """
        usage = self._usage
        if usage is not None and usage.complete:
            return usage
        if usage is not None and self._input_reported:
            return replace(usage, output_tokens=self.estimated_output_tokens(), complete=False)
        return ParsedUsage(
            input_tokens=max(0, fallback_input_tokens),
            output_tokens=self.estimated_output_tokens(),
            complete=False,
        )


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


class StreamMeter:
    """An :class:`SSEDecoder` and a :class:`StreamUsageTracker` used together.

    :meth:`feed` takes raw response bytes and returns the bytes to hand to the client:
    every complete event unchanged, minus the usage-only chunk the guard caused. Bytes
    of an unfinished event are held until it ends.

    Args:
        endpoint: the endpoint the stream came from.
        added_include_usage: whether the guard added ``stream_options.include_usage``.
    """

    def __init__(self, endpoint: Endpoint, *, added_include_usage: bool = False) -> None:
        self.decoder = SSEDecoder()
        self.tracker = StreamUsageTracker(endpoint, added_include_usage=added_include_usage)

    def feed(self, chunk: bytes) -> bytes:
        """Parse ``chunk``; return the bytes of the completed events to forward."""
        return self._forward(self.decoder.feed(chunk))

    def finish(self) -> bytes:
        """End the stream; return the remaining bytes to forward."""
        return self._forward(self.decoder.finish())

    def _forward(self, events: Iterable[SSEEvent]) -> bytes:
        return b"".join(event.raw for event in events if self.tracker.observe(event))
