"""Serving recorded responses to the real SDKs: on loopback, and from memory.

The SDK clients keep the recorded base URL (``https://api.openai.com/v1``, an Azure
endpoint, ``https://api.groq.com/openai/v1``...), so the guard sees the host it would
see in production. Below the guard, the HTTP client's own transport is one of:

* :class:`LoopbackTransport`: a real ``httpx2.HTTPTransport`` whose requests are
  re-aimed at :class:`ReplayServer`, a threaded HTTP/1.1 server on 127.0.0.1 that
  answers with the recorded status, headers and body; event streams go out with chunked
  transfer encoding, split into several pieces (some in the middle of an event);
* :func:`memory_transport`: ``httpx2.MockTransport`` answering with
  ``Response(content=bytes)``, a body that is already read, as respx and test suites
  return it.

Both answer through :func:`respond`, which plays the provider's part for the one request
option that changes the response: a chat stream recorded with
``stream_options.include_usage`` is served without the usage chunk, and without the
``"usage": null`` member of every other chunk, to a request that does not ask for it
(that is what OpenAI sends then).
"""

from __future__ import annotations

import http
import itertools
import json
import ssl
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx2

from conformance.corpus import Interaction, sse_events

ROUTE_HEADER = "x-conformance-case"
"""Names the registered case a loopback request belongs to (added below the guard)."""

HOLD_TIMEOUT = 30.0
"""Upper bound on how long a held stream waits for its release (a safety net only)."""


@dataclass(frozen=True)
class Served:
    """The response to send: status, headers and body, and whether it streams."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stream: bool


def _compact(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def without_usage(body: bytes) -> bytes:
    """A chat stream as OpenAI sends it when ``include_usage`` was not asked for."""
    out: list[bytes] = []
    for _, data, raw in sse_events(body):
        if not isinstance(data, dict) or "usage" not in data:
            out.append(raw)
            continue
        if isinstance(data["usage"], dict) and data.get("choices") == []:
            continue  # the usage-only chunk
        trimmed = {k: v for k, v in data.items() if k != "usage"}
        end = b"\r\n\r\n" if raw.endswith(b"\r\n\r\n") else b"\n\n"
        out.append(b"data: " + _compact(trimmed) + end)
    return b"".join(out)


def asks_include_usage(request_body: bytes) -> bool:
    """Whether a request body asks for ``stream_options.include_usage``."""
    try:
        body = json.loads(request_body or b"{}")
    except ValueError:
        return False
    options = body.get("stream_options") if isinstance(body, dict) else None
    return isinstance(options, dict) and options.get("include_usage") is True


def respond(interaction: Interaction, request_body: bytes) -> Served:
    """The provider's answer to ``request_body``, from the recording."""
    body = interaction.body
    if (
        interaction.kind == "chat"
        and interaction.is_stream
        and interaction.asked_include_usage
        and not asks_include_usage(request_body)
    ):
        body = without_usage(body)
    return Served(interaction.status, interaction.headers, body, interaction.is_stream)


def pieces(body: bytes) -> list[bytes]:
    """A stream split into a few pieces at fixed, uneven offsets."""
    cuts = sorted({len(body) * n // 13 for n in (2, 5, 6, 11)} - {0, len(body)})
    bounds = [0, *cuts, len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def head_events(body: bytes, count: int) -> tuple[bytes, bytes]:
    """The first ``count`` events of a stream with data, and the rest."""
    taken = 0
    end = 0
    for _, data, raw in sse_events(body):
        end += len(raw)
        if data is not None:
            taken += 1
        if taken >= count:
            break
    return body[:end], body[end:]


# ---------------------------------------------------------------------------------------
# Loopback
# ---------------------------------------------------------------------------------------


@dataclass
class Route:
    """A registered case: the interaction, and an optional hold for broken-off streams.

    Attributes:
        interaction: what to serve.
        hold: when set, a stream sends its first ``head`` events, then waits until this
            event is set before sending the rest (the client has gone by then).
        head: events sent before the hold.
        requests: the request bodies received, in order.
    """

    interaction: Interaction
    hold: threading.Event | None = None
    head: int = 1
    requests: list[bytes] = field(default_factory=list)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ReplayServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: the tests report what matters."""

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        request_body = self.rfile.read(length)
        route = self.server.routes[self.headers[ROUTE_HEADER]]
        route.requests.append(request_body)
        served = respond(route.interaction, request_body)
        # No Server or Date header: only what the provider sent.
        self.send_response_only(served.status, http.HTTPStatus(served.status).phrase)
        for name, value in served.headers:
            self.send_header(name, value)
        if not served.stream:
            self.send_header("content-length", str(len(served.body)))
            self.end_headers()
            self.wfile.write(served.body)
            return
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            if route.hold is None:
                for piece in pieces(served.body):
                    self._chunk(piece)
            else:
                head, tail = head_events(served.body, route.head)
                self._chunk(head)
                self.wfile.flush()
                route.hold.wait(HOLD_TIMEOUT)
                self.close_connection = True
                self._chunk(tail)
            self._chunk(b"")
        except OSError:
            self.close_connection = True  # the client went away, as a broken-off one does

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode("ascii") + data + b"\r\n")


class ReplayServer(ThreadingHTTPServer):
    """A loopback HTTP server answering registered cases (see :class:`Route`)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self._thread = threading.Thread(target=self.serve_forever, name="replay", daemon=True)

    @property
    def port(self) -> int:
        """The port the server listens on."""
        return int(self.server_address[1])

    def start(self) -> ReplayServer:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore clients that hang up (a broken-off stream does); report the rest."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
        self._thread.join()

    @contextmanager
    def register(self, key: str, route: Route) -> Iterator[Route]:
        """Serve ``route`` for requests routed with ``key`` while the iterator is open."""
        self.routes[key] = route
        try:
            yield route
        finally:
            del self.routes[key]


_SSL_CONTEXT = ssl.create_default_context()
"""Shared by every loopback transport: the server speaks plain HTTP, and loading the CA
bundle for each transport would dominate the run time."""


class LoopbackTransport(httpx2.HTTPTransport):
    """A real HTTP transport that sends every request to the replay server."""

    def __init__(self, port: int, key: str) -> None:
        super().__init__(verify=_SSL_CONTEXT)
        self._port = port
        self._key = key

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send ``request`` to the loopback server instead of its host."""
        headers = request.headers.copy()
        headers[ROUTE_HEADER] = self._key
        local = httpx2.Request(
            request.method,
            request.url.copy_with(scheme="http", host="127.0.0.1", port=self._port),
            headers=headers,
            stream=request.stream,
            extensions=request.extensions,
        )
        return super().handle_request(local)


def memory_transport(interaction: Interaction) -> httpx2.MockTransport:
    """A transport answering from memory with an already-read body."""

    def handler(request: httpx2.Request) -> httpx2.Response:
        served = respond(interaction, request.read())
        return httpx2.Response(
            served.status, headers=list(served.headers), content=served.body, request=request
        )

    return httpx2.MockTransport(handler)
