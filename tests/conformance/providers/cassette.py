"""Recorded provider traffic, loaded from cassette files as the bytes that went over the wire.

The cassettes under ``cassettes/<provider>/<source>/`` are copied unchanged from public
projects' test suites (``cassettes/SOURCES.md`` names the repository, path and commit of
each). Three layouts occur:

* VCR.py's own: ``request.body`` and ``response.body.string`` (text, or ``!!binary``
  bytes: gzip-compressed JSON when the response says ``Content-Encoding: gzip``, AWS
  event-stream frames for Bedrock streams), ``response.status.code``;
* pydantic-ai's serializer: the same, with JSON bodies stored as YAML under
  ``parsed_body`` (served again as compact JSON, with no content encoding);
* pydantic-ai's newer one: ``body: {type: json|text|binary, content: ...}`` and
  ``status`` as a plain integer.

Header values recorded as ``!!binary`` (botocore sends bytes) are decoded as UTF-8.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

CASSETTES = Path(__file__).parent / "cassettes"

GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Exchange:
    """One recorded request and the response the provider sent to it."""

    cassette: str
    """The cassette's path under ``cassettes/``."""
    index: int
    method: str
    uri: str
    request_body: bytes
    status: int
    headers: tuple[tuple[str, str], ...]
    """Response headers as recorded (names as recorded, one pair per value)."""
    body: bytes
    """The response body as the provider sent it: still gzip-compressed when
    :attr:`content_encoding` says so."""

    def header(self, name: str) -> str | None:
        """The first response header called ``name`` (any case), or ``None``."""
        lowered = name.lower()
        for key, value in self.headers:
            if key.lower() == lowered:
                return value
        return None

    @property
    def host(self) -> str:
        return urlsplit(self.uri).hostname or ""

    @property
    def path(self) -> str:
        """The URL path, percent-decoded (``/model/anthropic.claude-...:0/invoke``)."""
        return unquote(urlsplit(self.uri).path)

    @property
    def content_encoding(self) -> str | None:
        """``gzip`` when the recorded body is gzip-compressed bytes, else ``None``."""
        encoding = (self.header("content-encoding") or "").strip().lower()
        if encoding == "gzip" and self.body.startswith(GZIP_MAGIC):
            return "gzip"
        return None

    @property
    def chunked(self) -> bool:
        """Whether the provider sent the body with chunked transfer encoding."""
        return "chunked" in (self.header("transfer-encoding") or "").lower()

    @property
    def request_json(self) -> Any:
        """The request body parsed as JSON (``None`` when it is not JSON)."""
        try:
            return json.loads(self.request_body)
        except ValueError:
            return None


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return str(value)


def _headers(raw: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, Mapping):
        return ()
    pairs: list[tuple[str, str]] = []
    for name, values in raw.items():
        items = values if isinstance(values, list) else [values]
        pairs.extend((str(name), _text(value)) for value in items)
    return tuple(pairs)


def _json_bytes(obj: object) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _body(part: Mapping[str, Any]) -> bytes:
    """The body of a recorded request or response, whatever the layout."""
    if "parsed_body" in part:
        return _json_bytes(part["parsed_body"])
    body = part.get("body")
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    if isinstance(body, Mapping):
        if "type" in body:
            kind, content = body.get("type"), body.get("content")
            if kind == "json":
                return _json_bytes(content)
            if content is None:
                return b""
            return content if isinstance(content, bytes) else str(content).encode("utf-8")
        string = body.get("string")
        if isinstance(string, bytes):
            return string
        return str(string or "").encode("utf-8")
    raise ValueError(f"unknown body layout: {type(body).__name__}")


def _status(response: Mapping[str, Any]) -> int:
    status = response.get("status")
    if isinstance(status, Mapping):
        return int(status["code"])
    return int(status)  # type: ignore[arg-type]


@cache
def load(cassette: str) -> tuple[Exchange, ...]:
    """Every exchange of ``cassette`` (a path under ``cassettes/``), in recorded order."""
    with (CASSETTES / cassette).open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle)
    exchanges = []
    for index, item in enumerate(data["interactions"]):
        request, response = item["request"], item["response"]
        exchanges.append(
            Exchange(
                cassette=cassette,
                index=index,
                method=str(request["method"]).upper(),
                uri=str(request["uri"]),
                request_body=_body(request),
                status=_status(response),
                headers=_headers(response.get("headers")),
                body=_body(response),
            )
        )
    return tuple(exchanges)


def cassette_files() -> list[Path]:
    """Every cassette file of the corpus, sorted."""
    return sorted(CASSETTES.rglob("*.yaml"))


def raw_documents() -> Iterator[tuple[Path, Any]]:
    """Every cassette file with its parsed YAML document."""
    for path in cassette_files():
        with path.open(encoding="utf-8") as handle:
            yield path, yaml.safe_load(handle)
