"""The HTTP side of the fake: the threaded server, routing, and writing answers to the wire."""

from __future__ import annotations

import contextlib
import gzip as gzip_module
import http.server
import json
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any, Final, Protocol
from urllib.parse import parse_qs, urlsplit

from payi_guard.testing.fake_provider import anthropic_api, openai_api
from payi_guard.testing.fake_provider.script import RecordedRequest, Scripted
from payi_guard.testing.fake_provider.wire import (
    Call,
    Plan,
    ProviderSettings,
    api_headers,
    body_bytes,
    data_event,
    error_plan,
    hex_id,
    is_anthropic_path,
    merge_headers,
    typed_event,
)

__all__ = ["Handler", "Host", "Server"]

_SSE_TYPE: Final = "text/event-stream; charset=utf-8"
_JSON_TYPE: Final = "application/json"


class Host(ProviderSettings, Protocol):
    """The provider as its request handler sees it: settings, scripts and records."""

    @property
    def gzip(self) -> bool:
        """Compress bodies when the request allows gzip."""

    @property
    def chunk_delay(self) -> float:
        """Seconds to wait before each stream event."""

    def _record(self, record: RecordedRequest) -> None: ...

    def _answering(self, record: RecordedRequest, plan: Plan) -> None: ...

    def _finish(self, record: RecordedRequest, outcome: str) -> None: ...

    def _script_for(self, path: str) -> Scripted: ...


class Server(http.server.ThreadingHTTPServer):
    """The threaded server: it knows its provider and can close every open connection."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    # Many clients connect at once in concurrency tests; the default backlog of 5 resets.
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[http.server.BaseHTTPRequestHandler],
        provider: Host,
    ) -> None:
        self.provider = provider
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Track the connection, then serve it in a thread."""
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        """Forget the connection, then close it."""
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
        """Print a traceback only for errors that are not the network's."""
        # Clients hanging up and scripted resets are normal here, not worth a traceback;
        # anything else is a bug worth seeing.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


_JSON_ROUTES: Final[tuple[tuple[tuple[str, ...], Callable[[Call], Plan]], ...]] = (
    (("v1", "messages", "count_tokens"), anthropic_api.count_tokens),
    (("v1", "messages"), anthropic_api.messages),
    (("chat", "completions"), openai_api.chat),
    (("responses",), openai_api.responses),
    (("embeddings",), openai_api.embeddings),
    (("completions",), openai_api.completions),
)

_MULTIPART_ROUTES: Final = (("audio", "transcriptions"), ("files",))


def _route(path: str) -> Callable[[Call], Plan] | None:
    segments = tuple(s for s in path.split("/") if s)
    for suffix, handler in _JSON_ROUTES:
        if segments[-len(suffix) :] == suffix:
            return handler
    return None


def _stream_error_event(path: str, script: Scripted, sequence_number: int) -> bytes:
    """The error event each API sends inside a stream that fails after a 200."""
    if is_anthropic_path(path):
        kind = script.error_type or "overloaded_error"
        message = script.error_message or "Overloaded"
        return typed_event({"type": "error", "error": {"type": kind, "message": message}})
    message = script.error_message or "The server had an error while processing your request."
    if _route(path) is openai_api.responses:
        return typed_event(
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
    return data_event({"error": error})


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


class _ConnectionReset(Exception):
    """The fake reset the connection on purpose."""


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers one connection's requests like the OpenAI or Anthropic API."""

    protocol_version = "HTTP/1.1"
    server_version = "fake-provider"
    sys_version = ""
    timeout = 60
    # Without TCP_NODELAY each small answer waits ~40 ms for the client's delayed ACK.
    disable_nagle_algorithm = True
    server: Server

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: tests read the recorded requests, not access logs."""

    def do_GET(self) -> None:
        """Answer a GET."""
        self._handle()

    def do_POST(self) -> None:
        """Answer a POST."""
        self._handle()

    def do_DELETE(self) -> None:
        """Answer a DELETE."""
        self._handle()

    def do_PUT(self) -> None:
        """Answer a PUT."""
        self._handle()

    def do_PATCH(self) -> None:
        """Answer a PATCH."""
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
        anthropic = is_anthropic_path(path)
        request_id = f"req_{hex_id(24)}"
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
        call = Call(
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
        plan.headers = merge_headers(plan.headers, script.headers)
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

    def _plan(self, call: Call, raw: bytes, parsed: Any, anthropic: bool) -> Plan:
        """Decide the answer: scripted error, validation error, or the endpoint's reply."""
        script = call.script
        if script.status != 200:
            return error_plan(call, script.status)
        if script.events is not None:
            return Plan(200, api_headers(call, 200), events=self._scripted_events(call))
        if script.body is not None:
            return Plan(200, api_headers(call, 200), body=body_bytes(script.body))
        segments = tuple(s for s in call.path.split("/") if s)
        if self.command == "GET" and segments[-1:] == ("models",):
            return openai_api.models(call)
        if self.command == "POST" and any(segments[-len(s) :] == s for s in _MULTIPART_ROUTES):
            if segments[-1] == "files":
                return openai_api.file_upload(call, len(raw))
            return openai_api.transcription(call)
        handler = _route(call.path) if self.command == "POST" else None
        if handler is None:
            message = f"Invalid URL ({self.command} {call.path})"
            return error_plan(call, 404, None if anthropic else message)
        problem = self._validate(call, parsed, anthropic)
        if problem is not None:
            return error_plan(call, 400, problem)
        return handler(call)

    def _validate(self, call: Call, parsed: Any, anthropic: bool) -> str | None:
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

    def _scripted_events(self, call: Call) -> list[bytes]:
        typed = is_anthropic_path(call.path) or _route(call.path) is openai_api.responses
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
                events.append(typed_event(item))
            else:
                events.append(data_event(dict(item)))
        return events

    # -- response -----------------------------------------------------------------------

    def _start(self, plan: Plan, defaults: dict[str, str], use_gzip: bool) -> None:
        self.send_response(plan.status)
        if use_gzip:
            defaults = {**defaults, "content-encoding": "gzip"}
        for name, value in merge_headers(defaults, plan.headers).items():
            self.send_header(name, value)

    def _write_body(
        self, plan: Plan, use_gzip: bool, delay: float, reset_after: int | None
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
        self, plan: Plan, use_gzip: bool, delay: float, reset_after: int | None
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
