"""Find credentials in a recording before it enters the corpus.

A recording may carry only placeholders where credentials went (``X-GOOG-API-KEY-XXX``,
``AUTHORIZATION-XXX``, ``key=***``, ``scrubbed``, ``DUMMY_GOOGLE_API_KEY``). :func:`scan`
reports anything else that looks like one:

* a credential header (``Authorization``, ``x-api-key``, ``x-goog-api-key``,
  ``x-amz-security-token``, ``Cookie``...) whose value is not a placeholder;
* a credential query parameter (``key``, ``api_key``, ``access_token``,
  ``X-Amz-Signature``...) whose value is not a placeholder;
* a credential field (``access_token``, ``refresh_token``, ``id_token``,
  ``client_secret``, ``api_key``...) in a YAML, JSON or form-encoded body;
* anywhere in the text, in every body once decoded (gzip, base64, AWS event-stream
  frames and the base64 ``bytes`` inside them): AWS access key ids (``AKIA``/``ASIA``...),
  SigV4 signatures, Google API keys (``AIza``) and OAuth tokens (``ya29.``), JSON Web
  Tokens, OpenAI/Anthropic/Groq keys (``sk-``, ``gsk_``), bearer tokens, private keys.

Response ``Set-Cookie`` headers are not credentials: they are the provider's own
bot-management cookies, issued to the recorder.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import gzip
import json
import re
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote_plus, urlsplit

import yaml

SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "anthropic-api-key",
        "openai-api-key",
        "x-amz-security-token",
        "x-amzn-bedrock-api-key",
        "cookie",
    }
)

SECRET_PARAMS = frozenset(
    {
        "key",
        "api_key",
        "apikey",
        "api-key",
        "access_token",
        "token",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)

SECRET_FIELDS = frozenset(
    {
        "access_token",
        "refresh_token",
        "id_token",
        "client_secret",
        "api_key",
        "apikey",
        "secret_access_key",
        "aws_secret_access_key",
        "session_token",
        "password",
        "private_key",
    }
)

_PLACEHOLDER = re.compile(
    r"""^(?:(?:bearer|basic|token|aws4-hmac-sha256)\s+)?(?:
        |\*+
        |(?-i:[A-Za-z0-9_-]*XXX[A-Za-z0-9_-]*)
        |<[^>]*>
        |\{\{[^}]*\}\}
        |(?:dummy|fake|test|mock|redacted|scrubbed|filtered|placeholder|removed|none|null)[\w-]*
        |[\w-]*(?:dummy|fake|redacted|scrubbed|placeholder)[\w-]*
    )$""",
    re.IGNORECASE | re.VERBOSE,
)

PATTERNS: dict[str, re.Pattern[str]] = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}\b"),
    "AWS SigV4 signature": re.compile(r"Signature=[0-9a-f]{64}"),
    "AWS secret access key": re.compile(
        r"(?i)aws.{0,20}secret.{0,20}[=:]\s*['\"]?[A-Za-z0-9/+=]{40}\b"
    ),
    "Google API key": re.compile(r"AIza[0-9A-Za-z_\-]{35}"),
    "Google OAuth token": re.compile(r"\bya29\.[0-9A-Za-z_\-]{20,}"),
    "Google refresh token": re.compile(r"\b1//0[0-9A-Za-z_\-]{20,}"),
    "JSON Web Token": re.compile(
        r"eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"
    ),
    "OpenAI/Anthropic key": re.compile(r"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
    "Groq key": re.compile(r"\bgsk_[A-Za-z0-9]{20,}"),
    "bearer token": re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]{20,}"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
}

_FORM_SECRET = re.compile(
    r"(?:^|[&?\s])(client_secret|refresh_token|access_token|password|api_key)=([^&\s]*)"
)
_BASE64ISH = re.compile(r"^[A-Za-z0-9+/=_-]{24,}$")


@dataclass(frozen=True)
class Finding:
    """One credential (or credential-looking value) found in a recording."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


def is_placeholder(value: str) -> bool:
    """Whether ``value`` is an obvious stand-in for a credential.

    Percent-encoding, quotes and brackets around it are ignored (``%5B%27scrubbed%27%5D``
    is ``['scrubbed']``).
    """
    return bool(_PLACEHOLDER.match(unquote_plus(value).strip().strip("[]'\" ")))


def _texts(data: bytes, depth: int = 0) -> Iterator[str]:
    """``data`` as text, and every text hidden inside it (gzip, event-stream, base64)."""
    if depth > 3 or not data:
        return
    if data[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError, zlib.error):
            data = gzip.decompress(data)
    frames = list(_event_stream_payloads(data))
    if frames:
        for payload in frames:
            yield from _texts(payload, depth + 1)
        return
    text = data.decode("utf-8", errors="replace")
    yield text
    for candidate in _embedded_base64(text):
        yield from _texts(candidate, depth + 1)


def _event_stream_payloads(data: bytes) -> Iterator[bytes]:
    """The payloads of AWS event-stream frames, when ``data`` is a run of whole frames."""
    payloads = []
    offset = 0
    while offset + 16 <= len(data):
        total, headers_length = struct.unpack_from(">II", data, offset)
        prelude_crc = struct.unpack_from(">I", data, offset + 8)[0]
        if total < 16 or offset + total > len(data):
            return
        if zlib.crc32(data[offset : offset + 8]) != prelude_crc:
            return
        start = offset + 12 + headers_length
        payloads.append(data[start : offset + total - 4])
        offset += total
    if offset == len(data):
        yield from payloads


def _embedded_base64(text: str) -> Iterator[bytes]:
    """Decoded base64 strings found as JSON values in ``text`` (event-stream ``bytes``)."""
    try:
        document = json.loads(text)
    except ValueError:
        return
    for value in _strings(document):
        if _BASE64ISH.match(value):
            try:
                yield base64.b64decode(value + "=" * (-len(value) % 4), validate=False)
            except (binascii.Error, ValueError):
                continue


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


def _fields(obj: Any, where: str) -> Iterator[Finding]:
    """Credential fields with a real-looking value in parsed YAML or JSON."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            name = str(key).lower()
            if name in SECRET_FIELDS and isinstance(value, str) and not is_placeholder(value):
                yield Finding(where, f"field {key!r} holds a value")
            yield from _fields(value, where)
    elif isinstance(obj, list):
        for value in obj:
            yield from _fields(value, where)


def scan_text(text: str, where: str) -> Iterator[Finding]:
    """Credential patterns in ``text``."""
    for name, pattern in PATTERNS.items():
        for match in pattern.finditer(text):
            if not is_placeholder(match.group(0)):
                yield Finding(where, f"{name} ({match.group(0)[:12]}...)")
    for match in _FORM_SECRET.finditer(text):
        if not is_placeholder(match.group(2)):
            yield Finding(where, f"form field {match.group(1)!r} holds a value")
    try:
        document = json.loads(text)
    except ValueError:
        return
    yield from _fields(document, where)


def _header_values(raw: object) -> Iterator[tuple[str, str]]:
    if not isinstance(raw, Mapping):
        return
    for name, values in raw.items():
        for value in values if isinstance(values, list) else [values]:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            yield str(name), text


def _body_bytes(part: Mapping[str, Any]) -> bytes:
    body = part.get("body")
    if isinstance(body, Mapping):
        body = body.get("string", body.get("content"))
    if body is None:
        return b""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body, default=str).encode("utf-8")


def scan_document(document: Any, name: str) -> list[Finding]:
    """Every credential found in one parsed cassette document."""
    findings: list[Finding] = list(_fields(document, f"{name} (YAML)"))
    for index, item in enumerate(document.get("interactions") or []):
        for side in ("request", "response"):
            part = item.get(side) or {}
            where = f"{name} #{index} {side}"
            for header, value in _header_values(part.get("headers")):
                if header.lower() in SECRET_HEADERS and not is_placeholder(value):
                    findings.append(Finding(where, f"header {header!r} holds a value"))
            for text in _texts(_body_bytes(part)):
                findings.extend(scan_text(text, f"{where} body"))
        uri = str((item.get("request") or {}).get("uri", ""))
        for key, value in parse_qsl(urlsplit(uri).query, keep_blank_values=True):
            if key.lower() in SECRET_PARAMS and not is_placeholder(value):
                findings.append(Finding(f"{name} #{index} uri", f"query parameter {key!r}"))
    return findings


def scan(path: Path) -> list[Finding]:
    """Every credential found in the cassette at ``path`` (raw text included)."""
    text = path.read_text(encoding="utf-8")
    findings = list(scan_text(text, f"{path.name} (text)"))
    findings.extend(scan_document(yaml.safe_load(text), path.name))
    return findings
