"""The conformance corpus: recorded provider traffic, loaded from the cassette files.

Cassettes are copied unchanged from public projects (``cassettes/SOURCES.md`` names the
repository, path and commit of each). Three layouts occur:

* VCR.py's own: ``request.body`` and ``response.body.string`` (text, or ``!!binary``
  bytes, gzip-compressed when the response said so), ``response.status.code``;
* pydantic-ai's serializer: the same, with JSON bodies stored as YAML under
  ``parsed_body``;
* pydantic-ai's newer one: ``body: {type: json|text|binary|none, content: ...}`` and
  ``status`` as a plain integer.

Every interaction with a metered endpoint (OpenAI chat, Responses, embeddings, legacy
completions; Anthropic messages) becomes one :class:`Interaction`. The response is kept
as the provider sent it, decoded from any content encoding, so the replayer can serve it
to the real SDKs.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

CASSETTES = Path(__file__).parent / "cassettes"
"""Where the copied recordings live, one folder per source project."""

SYNTHETIC = Path(__file__).parent / "synthetic"
"""Small cases derived from real recordings, for gaps no public recording shows."""

Kind = Literal["chat", "responses", "embeddings", "completions", "messages"]

# Headers that describe the recorded connection, not the response: the replayer sets
# its own framing, and cookies are never replayed.
_NOT_SERVED = frozenset(
    {
        "connection",
        "content-encoding",
        "content-length",
        "date",
        "keep-alive",
        "server",
        "set-cookie",
        "transfer-encoding",
    }
)


@dataclass(frozen=True, eq=False)
class Interaction:
    """One recorded request and the provider's response to it.

    Attributes:
        file: the cassette path relative to the corpus root (``source/.../name.yaml``).
        index: the position of the interaction in its cassette.
        method: the HTTP method.
        url: the URL the request went to.
        request: the JSON body that was sent.
        status: the response status.
        headers: the response headers to serve (lower-case names, framing removed).
        body: the response body, decoded from any content encoding.
    """

    file: str
    index: int
    method: str
    url: str
    request: dict[str, Any]
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    multiple: bool = False

    @property
    def id(self) -> str:
        """A readable test id: the cassette path, plus ``#n`` in multi-call cassettes."""
        name = self.file.removesuffix(".yaml")
        return f"{name}#{self.index}" if self.multiple else name

    @property
    def source(self) -> str:
        """The project the recording comes from (its first path segment)."""
        return self.file.split("/", 1)[0]

    @property
    def host(self) -> str:
        """The host the request went to."""
        return urlsplit(self.url).hostname or ""

    @property
    def kind(self) -> Kind:
        """The API the request called."""
        kind = endpoint_kind(self.method, self.url)
        if kind is None:  # pragma: no cover - only metered calls are loaded
            raise ValueError(f"{self.url} is not a metered endpoint")
        return kind

    @property
    def beta(self) -> bool:
        """Whether an Anthropic call went to the beta surface (``?beta=true``)."""
        return "beta=true" in urlsplit(self.url).query

    @property
    def content_type(self) -> str:
        """The media type of the response."""
        for name, value in self.headers:
            if name == "content-type":
                return value.split(";", 1)[0].strip().lower()
        return ""

    @property
    def is_stream(self) -> bool:
        """Whether the response is a server-sent event stream.

        The request decides, as it does for the SDKs: a stream served with another
        content type (some gateways send ``application/json``) is still a stream.
        """
        return self.ok and self.request.get("stream") is True

    @property
    def ok(self) -> bool:
        """Whether the response has a success status."""
        return 200 <= self.status < 300

    @property
    def asked_include_usage(self) -> bool:
        """Whether the recorded request asked for ``stream_options.include_usage``."""
        options = self.request.get("stream_options")
        return isinstance(options, dict) and options.get("include_usage") is True

    def body_json(self) -> Any:
        """The response body parsed as JSON (``None`` when it is not JSON)."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def events(self) -> list[tuple[str | None, Any]]:
        """The ``(event name, parsed data)`` pairs of a stream, ``[DONE]`` left out."""
        return [(name, data) for name, data, _ in sse_events(self.body) if data is not None]


def endpoint_kind(method: str, url: str) -> Kind | None:
    """The metered API a request calls, or ``None`` for anything else."""
    if method.upper() != "POST":
        return None
    path = urlsplit(url).path.rstrip("/")
    if path.endswith("/v1/messages"):
        return "messages"
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/completions"):
        return "completions"
    return None


_EVENT_SPLIT = re.compile(rb"\r\n\r\n|\n\n|\r\r")


def sse_events(body: bytes) -> Iterator[tuple[str | None, Any, bytes]]:
    """Split a recorded event stream into ``(event, data, raw bytes)`` triples.

    ``data`` is the parsed JSON payload, or ``None`` for ``[DONE]``, comments and
    anything that is not JSON. ``raw`` includes the blank line that ends the event, so
    joining every ``raw`` gives the body back.
    """
    start = 0
    for match in _EVENT_SPLIT.finditer(body):
        raw = body[start : match.end()]
        start = match.end()
        yield _parse_event(raw)
    if body[start:].strip():
        yield _parse_event(body[start:])


def _parse_event(raw: bytes) -> tuple[str | None, Any, bytes]:
    name: str | None = None
    data: list[str] = []
    for line in raw.decode("utf-8").splitlines():
        field_name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field_name == "event":
            name = value
        elif field_name == "data":
            data.append(value)
    payload: Any = None
    if data:
        try:
            payload = json.loads("\n".join(data))
        except ValueError:
            payload = None
    return name, payload, raw


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _headers(raw: object) -> dict[str, list[str]]:
    """A cassette's header mapping with lower-case names and string values."""
    headers: dict[str, list[str]] = {}
    if not isinstance(raw, Mapping):
        return headers
    for name, values in raw.items():
        items = values if isinstance(values, list) else [values]
        # YAML reads an unquoted 2020-10-01 as a date: headers are text.
        headers.setdefault(str(name).lower(), []).extend(str(v) for v in items)
    return headers


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _body_bytes(part: Mapping[str, Any]) -> bytes:
    """The body of a recorded request or response, in any of the three layouts."""
    if "parsed_body" in part:
        return _json_bytes(part["parsed_body"])
    body = part.get("body")
    if body is None:
        return b""
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, bytes):
        return body
    if isinstance(body, Mapping):
        if "string" in body:
            value = body["string"]
            return value if isinstance(value, bytes) else str(value).encode("utf-8")
        kind = body.get("type")
        content = body.get("content")
        if kind == "json":
            return _json_bytes(content)
        if kind == "text":
            return str(content).encode("utf-8")
        if kind == "binary":
            return base64.b64decode(str(content))
        if kind == "none":
            return b""
    raise ValueError(f"unknown body layout: {body!r:.80}")


def _decoded(body: bytes, encoding: str) -> bytes:
    """The body without its content encoding (recordings keep gzip bodies as sent)."""
    encoding = encoding.strip().lower()
    if encoding in ("gzip", "x-gzip") or (not encoding and body[:2] == b"\x1f\x8b"):
        return gzip.decompress(body)
    if encoding == "deflate":
        try:
            return zlib.decompress(body)
        except zlib.error:
            return zlib.decompress(body, -zlib.MAX_WBITS)
    if encoding in ("", "identity"):
        return body
    raise ValueError(f"unsupported content encoding {encoding!r}")


def _status(response: Mapping[str, Any]) -> int:
    status = response["status"]
    if isinstance(status, Mapping):
        return int(status["code"])
    return int(status)


def load_cassette(path: Path, root: Path = CASSETTES) -> list[Interaction]:
    """Every metered interaction of one cassette file."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    rel = path.relative_to(root).as_posix()
    raw_interactions = document["interactions"]
    loaded: list[Interaction] = []
    for index, item in enumerate(raw_interactions):
        request = item["request"]
        response = item["response"]
        method = str(request["method"])
        url = str(request["uri"])
        if endpoint_kind(method, url) is None:
            continue
        request_body = json.loads(_body_bytes(request) or b"{}")
        response_headers = _headers(response.get("headers"))
        encoding = ",".join(response_headers.get("content-encoding", []))
        body = _decoded(_body_bytes(response), encoding)
        served = tuple(
            (name, ", ".join(values))
            for name, values in sorted(response_headers.items())
            if name not in _NOT_SERVED
        )
        loaded.append(
            Interaction(
                file=rel,
                index=index,
                method=method,
                url=url,
                request=request_body,
                status=_status(response),
                headers=served,
                body=body,
                multiple=len(raw_interactions) > 1,
            )
        )
    return loaded


def cassette_files(root: Path = CASSETTES) -> list[Path]:
    """Every cassette of the corpus, in a stable order."""
    return sorted(root.rglob("*.yaml"))


@cache
def corpus() -> tuple[Interaction, ...]:
    """Every metered interaction of every copied cassette."""
    return tuple(i for path in cassette_files() for i in load_cassette(path))


@cache
def synthetic() -> tuple[Interaction, ...]:
    """The synthetic cases (``synthetic/*.yaml``), ids prefixed with ``synthetic/``."""
    return tuple(
        i for path in cassette_files(SYNTHETIC) for i in load_cassette(path, SYNTHETIC.parent)
    )
