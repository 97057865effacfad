"""A local fake of the OpenAI and Anthropic HTTP APIs, for tests and demos.

:class:`FakeProvider` is a real HTTP server on ``127.0.0.1`` (stdlib only) that answers
the way the real APIs do, on the wire: the same JSON bodies and usage objects, the same
server-sent event streams, the same error bodies and headers. Point the official SDKs at
it with a dummy key::

    import openai
    from payi_guard.testing import FakeProvider, Scripted

    with FakeProvider() as fp:
        client = openai.OpenAI(base_url=fp.openai_base_url, api_key="sk-test", max_retries=0)
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi there"}]
        )
        assert reply.usage.prompt_tokens == 2
        fp.enqueue(Scripted(status=429))  # the next call is rate limited
        assert fp.requests[0].json["model"] == "gpt-4o-mini"

Endpoints (any path prefix works, so ``base_url="http://host/custom/v1"`` and Azure's
``/openai/deployments/{name}/...`` are served too):

* ``POST .../chat/completions``: plain and streamed, ``n`` choices, tool calls,
  ``stream_options.include_usage`` (the final chunk has ``choices: []`` and ``usage``).
* ``POST .../responses``: plain and streamed with typed events, ending in
  ``response.completed``, ``response.incomplete`` or ``response.failed``.
* ``POST .../embeddings``: ``float`` and ``base64`` (little-endian float32) encodings.
* ``POST .../completions`` (legacy): plain and streamed.
* ``POST .../v1/messages`` (Anthropic): plain and the full event stream;
  ``POST .../v1/messages/count_tokens``.
* ``POST .../audio/transcriptions`` and ``POST .../files`` (multipart): recorded and
  answered, nothing more. ``GET .../models`` lists models.

Deterministic token counts, so tests can compute costs:

* input tokens are the whitespace-separated words of the request text
  (:func:`count_input_tokens`): string values of ``messages``, ``system``,
  ``instructions``, ``input`` and ``prompt``, walking lists and the ``content``,
  ``text``, ``input``, ``output``, ``tool_calls``, ``function`` and ``arguments`` keys
  of objects (so roles, names and ids do not count); integers in an
  ``input``/``prompt`` token array count one each; never less than 1. Scripted
  ``cached_tokens`` / ``cache_write_tokens`` come on top of that count: OpenAI reports
  ``prompt_tokens = words + cached_tokens``; Anthropic reports ``input_tokens = words``
  next to its cache fields.
* output tokens, per choice, are the words of the reply (``reply=`` or
  ``Scripted(text=...)``) capped by ``max_completion_tokens`` / ``max_tokens`` /
  ``max_output_tokens`` (a capped reply ends with ``length`` / ``max_tokens`` /
  ``incomplete``), plus ``ceil(len(arguments) / 4)`` per tool call (arguments stream in
  4-character pieces), plus scripted ``reasoning_tokens``. Streams send one text delta
  per word, so the deltas joined give the reply.
* ``Scripted(usage={...})`` deep-merges over the generated usage object, in the API's
  own field names, to report anything else.

Every request is recorded (:attr:`FakeProvider.requests`). Errors, resets, gzip and
delays are scripted per request with :class:`Scripted` (:meth:`FakeProvider.enqueue`) or
per path (:meth:`FakeProvider.set_default`).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import gzip as gzip_module
import http.server
import json
import math
import socket
import struct
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, Literal, TypeAlias
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "DEFAULT_REPLY",
    "FakeProvider",
    "RawEvent",
    "RecordedRequest",
    "Scripted",
    "ToolCall",
    "count_input_tokens",
    "count_words",
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
_SSE_TYPE: Final = "text/event-stream; charset=utf-8"
_JSON_TYPE: Final = "application/json"

ResponseStatus = Literal["completed", "incomplete", "failed"]


# ---------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------


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
    return max(1, sum(_text_words(body.get(name)) for name in _TEXT_FIELDS))


def _text_words(value: object) -> int:
    if isinstance(value, str):
        return count_words(value)
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_text_words(item) for item in value)
    if isinstance(value, Mapping):
        return sum(_text_words(value[key]) for key in _TEXT_KEYS if key in value)
    return 0


# ---------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------


class FakeProvider:
    """A threaded local HTTP server that answers like OpenAI and Anthropic.

    Use it as a context manager (or call :meth:`start` / :meth:`stop`). It binds
    ``127.0.0.1`` on an ephemeral port; handler threads are daemons, so a forgotten
    server never blocks interpreter exit.

    Args:
        reply: the reply text of every generated answer.
        gzip: compress bodies (JSON and streams) when the request's ``Accept-Encoding``
            allows gzip, as real servers do.
        chunk_delay: seconds to wait before each stream event (slow mode).
        reject_stream_options: answer 400 to any request carrying ``stream_options``,
            like OpenAI-compatible servers that do not know the option.
        embedding_dimensions: the vector size when a request gives no ``dimensions``.
        anthropic_delta_usage: the default of :attr:`Scripted.anthropic_delta_usage`.
        retry_after: seconds announced in ``retry-after`` on 429 answers (a fraction of
            a second is sent as ``retry-after-ms`` too, so SDK retries stay fast).
        host: the interface to bind.
        port: the port to bind; 0 picks a free one.
    """

    def __init__(
        self,
        *,
        reply: str = DEFAULT_REPLY,
        gzip: bool = True,
        chunk_delay: float = 0.0,
        reject_stream_options: bool = False,
        embedding_dimensions: int = 8,
        anthropic_delta_usage: Literal["full", "output"] = "full",
        retry_after: float = 1.0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if chunk_delay < 0:
            raise ValueError(f"chunk_delay must not be negative, got {chunk_delay}")
        if embedding_dimensions < 1:
            raise ValueError(f"embedding_dimensions must be at least 1, got {embedding_dimensions}")
        if retry_after < 0:
            raise ValueError(f"retry_after must not be negative, got {retry_after}")
        self.reply = reply
        self.gzip = gzip
        self.chunk_delay = chunk_delay
        self.reject_stream_options = reject_stream_options
        self.embedding_dimensions = embedding_dimensions
        self.anthropic_delta_usage = anthropic_delta_usage
        self.retry_after = retry_after
        self._host = host
        self._port = port
        self._lock = threading.Condition()
        self._queue: list[Scripted] = []
        self._defaults: dict[str, Scripted] = {}
        self._records: list[RecordedRequest] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeProvider:
        """Start serving in a background thread; returns ``self``.

        Raises:
            RuntimeError: if it is already running.
        """
        if self._server is not None:
            raise RuntimeError("FakeProvider is already running")
        server = _Server((self._host, self._port), _Handler, self)
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"FakeProvider:{server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close every open connection (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.shutdown()
        server.close_connections()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> FakeProvider:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: if the server is not running.
        """
        if self._server is None:
            raise RuntimeError("FakeProvider is not running: use it as a context manager")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:{port}``: the Anthropic SDK's and Azure's ``base_url``."""
        return f"http://{self._host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """``{base_url}/v1``: the OpenAI SDK's ``base_url``."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """The Anthropic SDK's ``base_url`` (the SDK adds ``/v1/messages`` itself)."""
        return self.base_url

    # -- control ------------------------------------------------------------------------

    def enqueue(self, *scripts: Scripted) -> None:
        """Script the next responses, in order.

        Each request takes the first queued script that :meth:`Scripted.matches` its path;
        requests with no matching script get the path default, else normal answers.
        """
        with self._lock:
            self._queue.extend(scripts)

    def set_default(self, path: str, script: Scripted | None) -> None:
        """Set how requests for a path are answered when no queued script applies.

        Args:
            path: applies to every request whose path ends with it
                (``"/chat/completions"``).
            script: the answer; ``None`` removes the default.
        """
        with self._lock:
            if script is None:
                self._defaults.pop(path.rstrip("/"), None)
            else:
                self._defaults[path.rstrip("/")] = script

    @property
    def pending(self) -> int:
        """How many queued scripts no request has taken yet."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot (copies) of every request received so far, oldest first."""
        with self._lock:
            return [copy.copy(record) for record in self._records]

    def clear(self) -> None:
        """Forget recorded requests, queued scripts and path defaults."""
        with self._lock:
            self._records.clear()
            self._queue.clear()
            self._defaults.clear()

    def wait_for(
        self, n: int, timeout: float = 5.0, *, answered: bool = False
    ) -> list[RecordedRequest]:
        """Block until at least ``n`` requests arrived (or were answered).

        Args:
            n: the number of requests to wait for.
            timeout: seconds to wait at most.
            answered: wait until those requests are fully answered (``outcome`` is no
                longer ``"pending"``), not only received.

        Returns:
            The snapshot of :attr:`requests`.

        Raises:
            TimeoutError: if fewer requests arrived in time (the message says how many).
        """

        def ready() -> bool:
            done = self._records
            if answered:
                done = [r for r in done if r.outcome != "pending"]
            return len(done) >= n

        with self._lock:
            if not self._lock.wait_for(ready, timeout=timeout):
                raise TimeoutError(
                    f"waited {timeout}s for {n} request(s), got {len(self._records)}"
                )
            return [copy.copy(record) for record in self._records]

    # -- used by the handler ------------------------------------------------------------

    def _record(self, record: RecordedRequest) -> None:
        with self._lock:
            self._records.append(record)
            self._lock.notify_all()

    def _answering(self, record: RecordedRequest, plan: _Plan) -> None:
        with self._lock:
            record.status = plan.status
            record.usage = plan.usage
            record.stream = plan.events is not None

    def _finish(self, record: RecordedRequest, outcome: str) -> None:
        with self._lock:
            record.outcome = outcome
            self._lock.notify_all()

    def _script_for(self, path: str) -> Scripted:
        with self._lock:
            for index, script in enumerate(self._queue):
                if script.matches(path):
                    return self._queue.pop(index)
            stripped = path.rstrip("/")
            for suffix, script in self._defaults.items():
                if stripped.endswith(suffix):
                    return script
        return Scripted()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Many clients connect at once in concurrency tests; the default backlog of 5 resets.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        provider: FakeProvider,
    ) -> None:
        self.provider = provider
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handler threads blocked on idle keep-alive connections."""
        with self._open_lock:
            sockets = list(self._open)
            self._open.clear()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up and scripted resets are normal here, not worth a traceback;
        # anything else is a bug worth seeing.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


# ---------------------------------------------------------------------------------------
# What one request is answered with
# ---------------------------------------------------------------------------------------


@dataclass
class _Plan:
    """A response ready to write: a JSON body or a list of SSE events."""

    status: int
    headers: dict[str, str]
    body: bytes | None = None
    events: list[bytes] | None = None
    usage: dict[str, Any] | None = None


@dataclass
class _Call:
    """Everything an endpoint function needs to build its answer."""

    provider: FakeProvider
    script: Scripted
    path: str
    body: dict[str, Any]
    request_id: str
    deployment: str | None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> str:
        if self.script.model:
            return self.script.model
        model = self.body.get("model")
        if isinstance(model, str) and model:
            return model
        return self.deployment or "fake-model"

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def input_tokens(self) -> int:
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
        return [(call.id or f"call_{_hex(24)}", call) for call in self.script.tool_calls]

    def merge_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        return _deep_merge(usage, self.script.usage or {})


def _hex(n: int) -> str:
    return uuid.uuid4().hex[:n]


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _pieces(text: str) -> list[str]:
    return [text[i : i + ARGUMENT_PIECE] for i in range(0, len(text), ARGUMENT_PIECE)]


def _argument_tokens(call: ToolCall) -> int:
    return math.ceil(len(call.arguments) / ARGUMENT_PIECE)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def _data_event(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _typed_event(obj: Mapping[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\n" + _data_event(obj)


def _is_anthropic_path(path: str) -> bool:
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


def _error_plan(call: _Call, status: int, message: str | None = None) -> _Plan:
    anthropic = _is_anthropic_path(call.path)
    if call.script.body is not None:
        body = _body_bytes(call.script.body)
    elif anthropic:
        body = _dumps(_anthropic_error(status, call.script, call.request_id, message))
    else:
        body = _dumps(_openai_error(status, call.script, message))
    headers = _api_headers(call, status)
    return _Plan(status=status, headers=headers, body=body)


def _body_bytes(body: object) -> bytes:
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return _dumps(body)


def _api_headers(call: _Call, status: int) -> dict[str, str]:
    """The headers the real API sends next to a body: ids, versions, rate limits."""
    provider = call.provider
    if _is_anthropic_path(call.path):
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


# -- OpenAI chat completions ----------------------------------------------------------------


def _chat_usage(call: _Call, output: int) -> dict[str, Any] | None:
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


def _choices(call: _Call) -> int:
    n = call.body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _chat(call: _Call) -> _Plan:
    words, capped = call.words("max_completion_tokens", "max_tokens")
    tools = call.tool_calls()
    n = _choices(call)
    per_choice = len(words) + sum(_argument_tokens(tool) for _, tool in tools)
    usage = _chat_usage(call, n * per_choice)
    finish = "length" if capped else ("tool_calls" if tools else "stop")
    content = " ".join(words) if words or not tools else None
    base = {
        "id": f"chatcmpl-{_hex(29)}",
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
        return _Plan(200, _api_headers(call, 200), body=_dumps(body), usage=usage)

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
        return _data_event(obj)

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
            for piece in _pieces(tool.arguments):
                step = {"index": position, "function": {"arguments": piece}}
                events.append(chunk(i, {"tool_calls": [step]}))
        events.append(chunk(i, {}, finish))
    if include_usage:
        events.append(_data_event({**chunk_base, "choices": [], "usage": usage}))
    if call.script.done:
        events.append(b"data: [DONE]\n\n")
    return _Plan(200, _api_headers(call, 200), events=events, usage=usage)


def _include_usage(call: _Call) -> bool:
    options = call.body.get("stream_options")
    return isinstance(options, Mapping) and options.get("include_usage") is True


# -- OpenAI legacy completions ----------------------------------------------------------------


def _completions(call: _Call) -> _Plan:
    words, capped = call.words("max_tokens")
    n = _choices(call)
    usage = _chat_usage(call, n * len(words))
    if usage is not None:
        # The legacy endpoint reports no token details.
        usage = {k: v for k, v in usage.items() if not k.endswith("_details")}
    finish = "length" if capped else "stop"
    base = {
        "id": f"cmpl-{_hex(29)}",
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
        return _Plan(200, _api_headers(call, 200), body=_dumps(body), usage=usage)

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
        return _data_event(obj)

    events = [
        chunk(i, word if k == 0 else f" {word}") for i in range(n) for k, word in enumerate(words)
    ]
    events.extend(chunk(i, "", finish) for i in range(n))
    if include_usage:
        events.append(_data_event({**base, "choices": [], "usage": usage}))
    if call.script.done:
        events.append(b"data: [DONE]\n\n")
    return _Plan(200, _api_headers(call, 200), events=events, usage=usage)


# -- OpenAI Responses -----------------------------------------------------------------------


def _responses(call: _Call) -> _Plan:
    words, capped = call.words("max_output_tokens")
    tools = call.tool_calls()
    cached = call.script.cached_tokens
    reasoning = call.script.reasoning_tokens
    output_tokens = len(words) + sum(_argument_tokens(t) for _, t in tools) + reasoning
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
    message_id = f"msg_{_hex(32)}"
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
            "id": f"fc_{_hex(32)}",
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
        "id": f"resp_{_hex(32)}",
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
        return _Plan(200, _api_headers(call, 200), body=_dumps(response), usage=usage)
    return _Plan(
        200,
        _api_headers(call, 200),
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
        events.append(_typed_event({"type": event_type, "sequence_number": len(events), **fields}))

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
        for piece in _pieces(item["arguments"]):
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


def _embeddings(call: _Call) -> _Plan:
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
    tokens = max(1, _text_words(raw))
    usage = (
        None
        if call.script.omit_usage
        else call.merge_usage({"prompt_tokens": tokens, "total_tokens": tokens})
    )
    body: dict[str, Any] = {"object": "list", "data": data, "model": call.model}
    if usage is not None:
        body["usage"] = usage
    return _Plan(200, _api_headers(call, 200), body=_dumps(body), usage=usage)


# -- Anthropic messages ---------------------------------------------------------------------


def _anthropic_messages(call: _Call) -> _Plan:
    words, capped = call.words("max_tokens")
    tools = [
        (f"toolu_{_hex(24)}" if tool.id is None else tool.id, tool) for _, tool in call.tool_calls()
    ]
    reasoning = call.script.reasoning_tokens
    output_tokens = len(words) + sum(_argument_tokens(t) for _, t in tools) + reasoning
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
        "id": f"msg_{_hex(24)}",
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
        return _Plan(200, _api_headers(call, 200), body=_dumps(message), usage=usage)

    events: list[bytes] = []
    start_usage = None if usage is None else {**usage, "output_tokens": min(1, output_tokens)}
    start = {**message, "content": [], "stop_reason": None, "stop_sequence": None}
    if start_usage is not None:
        start["usage"] = start_usage
    events.append(_typed_event({"type": "message_start", "message": start}))
    tool_by_id = dict(tools)
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            events.append(
                _typed_event(
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
                    _typed_event({"type": "content_block_delta", "index": index, "delta": delta})
                )
        else:
            tool = tool_by_id[block["id"]]
            events.append(
                _typed_event(
                    {
                        "type": "content_block_start",
                        "index": index,
                        "content_block": {**block, "input": {}},
                    }
                )
            )
            for piece in _pieces(tool.arguments):
                delta = {"type": "input_json_delta", "partial_json": piece}
                events.append(
                    _typed_event({"type": "content_block_delta", "index": index, "delta": delta})
                )
        events.append(_typed_event({"type": "content_block_stop", "index": index}))
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
    events.append(_typed_event(message_delta))
    events.append(_typed_event({"type": "message_stop"}))
    return _Plan(200, _api_headers(call, 200), events=events, usage=usage)


def _anthropic_count_tokens(call: _Call) -> _Plan:
    body = {"input_tokens": call.input_tokens}
    return _Plan(200, _api_headers(call, 200), body=_dumps(body))


# -- passthrough endpoints ------------------------------------------------------------------


def _transcription(call: _Call) -> _Plan:
    body = {"text": call.script.text if call.script.text is not None else call.provider.reply}
    return _Plan(200, _api_headers(call, 200), body=_dumps(body))


def _file_upload(call: _Call, size: int) -> _Plan:
    body = {
        "id": f"file-{_hex(24)}",
        "object": "file",
        "bytes": size,
        "created_at": call.created,
        "expires_at": None,
        "filename": "upload",
        "purpose": "assistants",
        "status": "processed",
        "status_details": None,
    }
    return _Plan(200, _api_headers(call, 200), body=_dumps(body))


def _models(call: _Call) -> _Plan:
    names = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
    data = [
        {"id": name, "object": "model", "created": 1_700_000_000, "owned_by": "system"}
        for name in names
    ]
    return _Plan(200, _api_headers(call, 200), body=_dumps({"object": "list", "data": data}))


_JSON_ROUTES: Final[tuple[tuple[tuple[str, ...], Callable[[_Call], _Plan]], ...]] = (
    (("v1", "messages", "count_tokens"), _anthropic_count_tokens),
    (("v1", "messages"), _anthropic_messages),
    (("chat", "completions"), _chat),
    (("responses",), _responses),
    (("embeddings",), _embeddings),
    (("completions",), _completions),
)

_MULTIPART_ROUTES: Final = (("audio", "transcriptions"), ("files",))


def _route(path: str) -> Callable[[_Call], _Plan] | None:
    segments = tuple(s for s in path.split("/") if s)
    for suffix, handler in _JSON_ROUTES:
        if segments[-len(suffix) :] == suffix:
            return handler
    return None


def _merge_headers(base: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``base`` updated by ``extra``, header names compared without case."""
    names = {name.lower() for name in extra}
    merged = {name: value for name, value in base.items() if name.lower() not in names}
    merged.update(extra)
    return merged


def _stream_error_event(path: str, script: Scripted, sequence_number: int) -> bytes:
    """The error event each API sends inside a stream that fails after a 200."""
    if _is_anthropic_path(path):
        kind = script.error_type or "overloaded_error"
        message = script.error_message or "Overloaded"
        return _typed_event({"type": "error", "error": {"type": kind, "message": message}})
    message = script.error_message or "The server had an error while processing your request."
    if _route(path) is _responses:
        return _typed_event(
            {
                "type": "error",
                "code": script.error_type or "server_error",
                "message": message,
                "param": None,
                "sequence_number": sequence_number,
            }
        )
    kind = script.error_type or "server_error"
    error = {"message": message, "type": kind, "param": None, "code": None}
    return _data_event({"error": error})


def _deployment(path: str) -> str | None:
    segments = [s for s in path.split("/") if s]
    if "deployments" in segments:
        index = segments.index("deployments")
        if index + 1 < len(segments):
            return segments[index + 1]
    return None


def _accepts_gzip(accept_encoding: str | None) -> bool:
    if not accept_encoding:
        return False
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        if name.strip().lower() in ("gzip", "*"):
            q = params.strip()
            if q.startswith("q="):
                try:
                    return float(q[2:]) > 0
                except ValueError:
                    return False
            return True
    return False


# ---------------------------------------------------------------------------------------
# The request handler
# ---------------------------------------------------------------------------------------


class _ConnectionReset(Exception):
    """The fake reset the connection on purpose."""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-provider"
    sys_version = ""
    timeout = 60
    # Without TCP_NODELAY each small answer waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        # Tests read recorded requests, not access logs.
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    # -- request ------------------------------------------------------------------------

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        provider = self.server.provider
        url = urlsplit(self.path)
        path = url.path
        body = self._read_body()
        headers: dict[str, str] = {}
        for name, value in self.headers.items():
            key = name.lower()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        parsed: Any = None
        content_type = headers.get("content-type", "")
        if body and "json" in content_type.lower():
            try:
                parsed = json.loads(body)
            except ValueError:
                parsed = None
        anthropic = _is_anthropic_path(path)
        request_id = f"req_{_hex(24)}"
        record = RecordedRequest(
            method=self.command,
            path=path,
            query=parse_qs(url.query, keep_blank_values=True),
            headers=headers,
            body=body,
            json=parsed,
            request_id=request_id,
        )
        provider._record(record)
        script = provider._script_for(path)
        call = _Call(
            provider=provider,
            script=script,
            path=path,
            body=parsed if isinstance(parsed, dict) else {},
            request_id=request_id,
            deployment=_deployment(path),
        )
        plan = self._plan(call, body, parsed, anthropic)
        if plan.events is not None and script.error_after is not None:
            error = _stream_error_event(path, script, script.error_after)
            plan.events = [*plan.events[: script.error_after], error]
        plan.headers = _merge_headers(plan.headers, script.headers)
        provider._answering(record, plan)
        use_gzip = script.gzip
        if use_gzip is None:
            use_gzip = provider.gzip and _accepts_gzip(headers.get("accept-encoding"))
        delay = script.delay if script.delay is not None else provider.chunk_delay
        try:
            if plan.events is not None:
                self._write_stream(plan, use_gzip, delay, script.reset_after)
            else:
                self._write_body(plan, use_gzip, delay, script.reset_after)
        except _ConnectionReset:
            provider._finish(record, "reset")
            return
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True
            provider._finish(record, "client_gone")
            return
        provider._finish(record, "ok")

    def _plan(self, call: _Call, raw: bytes, parsed: Any, anthropic: bool) -> _Plan:
        """Decide the answer: scripted error, validation error, or the endpoint's reply."""
        script = call.script
        if script.status != 200:
            return _error_plan(call, script.status)
        if script.events is not None:
            return _Plan(200, _api_headers(call, 200), events=self._scripted_events(call))
        if script.body is not None:
            return _Plan(200, _api_headers(call, 200), body=_body_bytes(script.body))
        segments = tuple(s for s in call.path.split("/") if s)
        if self.command == "GET" and segments[-1:] == ("models",):
            return _models(call)
        if self.command == "POST" and any(segments[-len(s) :] == s for s in _MULTIPART_ROUTES):
            if segments[-1] == "files":
                return _file_upload(call, len(raw))
            return _transcription(call)
        handler = _route(call.path) if self.command == "POST" else None
        if handler is None:
            message = f"Invalid URL ({self.command} {call.path})"
            return _error_plan(call, 404, None if anthropic else message)
        problem = self._validate(call, parsed, anthropic)
        if problem is not None:
            return _error_plan(call, 400, problem)
        return handler(call)

    def _validate(self, call: _Call, parsed: Any, anthropic: bool) -> str | None:
        """The 400 errors the real APIs answer to a malformed request."""
        if not isinstance(parsed, dict):
            if anthropic:
                return "There was an error parsing the body of your request."
            return (
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly. The OpenAI API expects a JSON "
                "payload, but what was sent was not valid JSON.)"
            )
        if not parsed.get("model") and call.deployment is None:
            return "model: Field required" if anthropic else "you must provide a model parameter"
        if anthropic:
            if "count_tokens" not in call.path and not isinstance(parsed.get("max_tokens"), int):
                return "max_tokens: Field required"
            return None
        if "stream_options" in parsed:
            if call.provider.reject_stream_options:
                return "Unrecognized request argument supplied: stream_options"
            if parsed.get("stream") is not True:
                return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
        return None

    def _scripted_events(self, call: _Call) -> list[bytes]:
        typed = _is_anthropic_path(call.path) or _route(call.path) is _responses
        events = []
        for item in call.script.events or ():
            if isinstance(item, bytes):
                events.append(item)
            elif isinstance(item, str):
                events.append(b"data: " + item.encode("utf-8") + b"\n\n")
            elif isinstance(item, tuple):
                name, data = item
                payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
                events.append(f"event: {name}\ndata: {payload}\n\n".encode())
            elif typed and "type" in item:
                events.append(_typed_event(item))
            else:
                events.append(_data_event(dict(item)))
        return events

    # -- response -----------------------------------------------------------------------

    def _start(self, plan: _Plan, defaults: dict[str, str], use_gzip: bool) -> None:
        self.send_response(plan.status)
        if use_gzip:
            defaults = {**defaults, "content-encoding": "gzip"}
        for name, value in _merge_headers(defaults, plan.headers).items():
            self.send_header(name, value)

    def _write_body(
        self, plan: _Plan, use_gzip: bool, delay: float, reset_after: int | None
    ) -> None:
        body = plan.body or b""
        if use_gzip:
            body = gzip_module.compress(body)
        if reset_after == 0:
            self._reset()
        if delay:
            time.sleep(delay)
        self._start(plan, {"content-type": _JSON_TYPE}, use_gzip)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if reset_after is not None:
            self.wfile.write(body[:reset_after])
            self._reset()
        self.wfile.write(body)

    def _write_stream(
        self, plan: _Plan, use_gzip: bool, delay: float, reset_after: int | None
    ) -> None:
        events = plan.events or []
        self._start(plan, {"content-type": _SSE_TYPE, "cache-control": "no-cache"}, use_gzip)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        compressor = zlib.compressobj(wbits=31) if use_gzip else None
        for sent, event in enumerate(events):
            if reset_after is not None and sent >= reset_after:
                self._reset()
            if delay:
                time.sleep(delay)
            data = event
            if compressor is not None:
                # A sync flush per event, so gzip never holds an event back.
                data = compressor.compress(event) + compressor.flush(zlib.Z_SYNC_FLUSH)
            self._chunk(data)
        if reset_after is not None:
            # Asked to reset after as many events as there are, or more: end without the
            # closing chunk, which a client sees as an incomplete body.
            self._reset()
        if compressor is not None:
            self._chunk(compressor.flush())
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        if data:
            self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")

    def _reset(self) -> None:
        """Close the socket with an RST (SO_LINGER 0), like a dropped connection."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        except OSError:
            pass
        raise _ConnectionReset
