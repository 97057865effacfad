"""A scanner for credentials in recorded traffic.

Every cassette of the corpus passes it; a recording that carries a credential is
dropped, never edited. What counts as a credential:

* provider keys anywhere in the file or in a decoded body: OpenAI (``sk-...``),
  Anthropic (``sk-ant-...``), Google (``AIza...``), GitHub tokens, AWS access key ids
  (``AKIA...`` / ``ASIA...``);
* a bearer token anywhere, unless it is an obvious placeholder;
* an ``authorization``, ``x-api-key``, ``api-key`` (and similar) header whose value is
  not an obvious placeholder;
* a ``cookie`` or ``set-cookie`` header carrying any cookie but Cloudflare's
  bot-management and load-balancing ones (``__cf_bm``, ``_cfuvid``, ``__cflb``), which
  identify no account and open no session.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

KEY_PATTERNS: Mapping[str, re.Pattern[str]] = {
    "Anthropic API key": re.compile(r"\bsk-ant-[A-Za-z0-9_-]{20,}"),
    "OpenAI API key": re.compile(r"\bsk-(?!ant-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}"),
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "Google API key": re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
}

_BEARER = re.compile(r"(?i)\bbearer\s+([A-Za-z0-9._~+/=-]{8,})")

_SESSION_COOKIE = re.compile(
    r"(?i)\b(?:session(?:_?id)?|sid|auth[_-]?token|access[_-]?token|refresh[_-]?token)"
    r"=[^;\s'\"]{8,}"
)

SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "x-api-key",
        "api-key",
        "openai-api-key",
        "anthropic-api-key",
        "x-goog-api-key",
        "ocp-apim-subscription-key",
    }
)

_PLACEHOLDER = re.compile(
    r"(?i)^(?:bearer\s+)?(?:|<[^>]*>|\*+|x+|redacted|filtered|dummy|none|null|placeholder"
    r"|(?:fake|test|mock|dummy)[\w.-]*|sk-(?:fake|test|mock|dummy)[\w.-]*)$"
)

ALLOWED_COOKIES = frozenset({"__cf_bm", "_cfuvid", "__cflb"})
_COOKIE_ATTRIBUTES = frozenset(
    {"path", "expires", "domain", "max-age", "samesite", "secure", "httponly", "partitioned"}
)
_COOKIE_NAME = re.compile(r"(?:^|[;,])\s*([^=;,\s]+)=")


def is_placeholder(value: str) -> bool:
    """Whether a secret header's value is an obvious placeholder, not a credential."""
    return bool(_PLACEHOLDER.match(value.strip()))


def cookie_names(value: str) -> list[str]:
    """The cookie names in a ``cookie`` or ``set-cookie`` header value."""
    return [name for name in _COOKIE_NAME.findall(value) if name.lower() not in _COOKIE_ATTRIBUTES]


def scan_text(text: str) -> list[str]:
    """Credentials found in free text (a file, a decoded body)."""
    found = [
        f"{label}: {match.group(0)[:12]}..."
        for label, pattern in KEY_PATTERNS.items()
        for match in pattern.finditer(text)
    ]
    found.extend(
        f"bearer token: {match.group(1)[:8]}..."
        for match in _BEARER.finditer(text)
        if not is_placeholder(match.group(1))
    )
    found.extend(f"session cookie: {m.group(0)[:16]}..." for m in _SESSION_COOKIE.finditer(text))
    return found


def scan_headers(headers: object) -> list[str]:
    """Credentials found in a recorded header mapping."""
    if not isinstance(headers, Mapping):
        return []
    found: list[str] = []
    for name, values in headers.items():
        lower = str(name).lower()
        items = values if isinstance(values, list) else [values]
        for value in (str(v) for v in items):
            if lower in SECRET_HEADERS and not is_placeholder(value):
                found.append(f"{lower} header: {value[:8]}...")
            if lower in ("cookie", "set-cookie"):
                found.extend(
                    f"{lower} header: cookie {cookie}"
                    for cookie in cookie_names(value)
                    if cookie not in ALLOWED_COOKIES
                )
    return found


def _bodies(part: Mapping[str, Any]) -> Iterator[str]:
    body = part.get("body")
    value: Any = body.get("string") if isinstance(body, Mapping) else body
    if isinstance(value, bytes):
        try:
            value = gzip.decompress(value) if value[:2] == b"\x1f\x8b" else value
            yield value.decode("utf-8", "replace")
        except OSError:
            yield value.decode("utf-8", "replace")


def scan_file(path: Path) -> list[str]:
    """Every credential found in a cassette: its text, its headers, its decoded bodies."""
    text = path.read_text(encoding="utf-8")
    found = scan_text(text)
    document = yaml.safe_load(text)
    for item in document.get("interactions") or []:
        for part in (item.get("request") or {}, item.get("response") or {}):
            found.extend(scan_headers(part.get("headers")))
            for body in _bodies(part):
                found.extend(scan_text(body))
    return found
