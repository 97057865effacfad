"""Request bodies the guard changes: ``stream_options.include_usage`` added to a stream.

Re-exported by :mod:`payi_guard.meter.parse`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

__all__ = ["encode_body", "inject_include_usage", "with_include_usage"]


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


_INCLUDE_USAGE_MEMBER: Final = b'"stream_options":{"include_usage":true},'


def with_include_usage(raw: bytes, body: Mapping[str, Any], new_body: Mapping[str, Any]) -> bytes:
    """The bytes to send for ``new_body`` (:func:`inject_include_usage` of ``body``).

    When the body had no ``stream_options`` and its bytes open with ``{``, the member is
    put first into the original bytes (the body streams, so the object is not empty):
    the rest is sent as the SDK wrote it, never parsed back into text. Otherwise the
    new body is serialised (:func:`encode_body`).

    Args:
        raw: the request body as the client wrote it.
        body: ``raw`` parsed.
        new_body: the body with ``include_usage`` set.
    """
    if "stream_options" not in body and raw[:1] == b"{":
        return b"{" + _INCLUDE_USAGE_MEMBER + raw[1:]
    return encode_body(new_body)


def encode_body(body: Mapping[str, Any]) -> bytes:
    """Serialise a request body to compact UTF-8 JSON (for a body the guard changed)."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
