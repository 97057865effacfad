"""A loopback HTTP/1.1 server that answers with recorded responses, in recorded order.

The SDKs under test are pointed at it (``base_url``, ``server_url``, ``endpoint_url``,
``api_base``), so every byte they parse went through their own HTTP stack: httpx2,
httpx, aiohttp or urllib3. A response recorded with chunked transfer encoding (every
stream) goes out chunked, cut into small pieces that split SSE events and AWS
event-stream frames in the middle, so the SDKs' incremental parsers are exercised. A
gzip-compressed recording goes out compressed, with its ``Content-Encoding``.

Each server serves one list of exchanges, once each; a request past the end is answered
with a 599 that names the problem. :attr:`ReplayServer.received` keeps what the SDK
sent, for the tests to compare with the recording.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

from conformance.providers.cassette import Exchange

PIECE = 97
"""Bytes per chunk of a chunked response: small and odd, so pieces end mid-event."""

_NOT_REPLAYED = frozenset(
    {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}
)


@dataclass(frozen=True)
class Received:
    """A request the server received."""

    method: str
    target: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def path(self) -> str:
        """The request path, percent-decoded, without the query."""
        return unquote(urlsplit(self.target).path)

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("transfer-encoding") or "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                parts.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(parts)
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._read_body()
        self.server.replay.record(
            Received(self.command, self.path, tuple(self.headers.items()), body)
        )
        exchange = self.server.replay.next_exchange()
        if exchange is None:
            message = b'{"error": "no recorded exchange is left for this request"}'
            self.send_response(599)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        self._respond(exchange)

    def _respond(self, exchange: Exchange) -> None:
        self.send_response(exchange.status)
        for name, value in exchange.headers:
            if name.lower() not in _NOT_REPLAYED:
                self.send_header(name, value)
        if exchange.content_encoding:
            self.send_header("content-encoding", exchange.content_encoding)
        body = exchange.body
        if exchange.chunked:
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), PIECE):
                piece = body[start : start + PIECE]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        self.wfile.flush()

    do_POST = _handle
    do_GET = _handle
    do_PUT = _handle
    do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    replay: ReplayServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet when a client drops its connection (a stream closed early)."""


class ReplayServer:
    """Serves ``exchanges`` in order on ``127.0.0.1`` (a context manager).

    One server can serve many replays, one after the other: :meth:`load` gives it the
    next recording's exchanges and forgets what it received (the tests keep one
    server per module).

    Args:
        exchanges: the recorded exchanges to answer with, one per request.
    """

    def __init__(self, exchanges: Sequence[Exchange] = ()) -> None:
        self._pending = list(exchanges)
        self._lock = threading.Lock()
        self.received: list[Received] = []
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.replay = self
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="replay-server",
            daemon=True,
        )

    def load(self, exchanges: Sequence[Exchange]) -> None:
        """Serve ``exchanges`` next, and forget the requests received so far."""
        with self._lock:
            self._pending = list(exchanges)
            self.received = []

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, no trailing slash."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def served_all(self) -> bool:
        with self._lock:
            return not self._pending

    def record(self, request: Received) -> None:
        with self._lock:
            self.received.append(request)

    def next_exchange(self) -> Exchange | None:
        with self._lock:
            return self._pending.pop(0) if self._pending else None

    def __enter__(self) -> ReplayServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
