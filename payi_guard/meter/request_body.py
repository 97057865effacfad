"""Requests the guard reads and changes: their bodies and headers.

:func:`loads_json` parses a body; :func:`inject_include_usage` adds
``stream_options.include_usage`` to a stream (both re-exported by
:mod:`payi_guard.meter.parse`); :func:`content_type`, :func:`header_text` and
:func:`has_header` read the headers of an ``httpx``/``httpx2`` request or response.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from typing import Any, Final

__all__ = [
    "content_type",
    "encode_body",
    "has_header",
    "header_text",
    "inject_include_usage",
    "loads_json",
    "loads_json_text",
    "set_header",
    "with_include_usage",
]


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


_DECODER: Final = json.JSONDecoder()


def loads_json(content: bytes) -> Any:
    """``json.loads(content)``, faster for a JSON object in UTF-8.

    When ``content`` opens with ``{`` followed by anything but a NUL byte (so UTF-8),
    it skips ``json.loads``'s encoding sniffing and whitespace scans. Anything else
    (another encoding, surrounding whitespace, extra data, errors) is left to
    ``json.loads``, so the result and the errors are the same.
    """
    if type(content) is bytes and content[:1] == b"{" and content[1:2] != b"\x00":
        try:
            text = content.decode("utf-8", "surrogatepass")
        except ValueError:
            return json.loads(content)
        # json.loads(content) decodes it the same way (UTF-8, surrogatepass) first.
        return loads_json_text(text)
    return json.loads(content)


def loads_json_text(data: str) -> Any:
    """``json.loads(data)``, minus two whitespace scans for data that starts with ``{``.

    Anything else (leading or trailing whitespace, extra data, errors) is left to
    ``json.loads``, so the result and the errors are the same.
    """
    if data[:1] == "{":
        try:
            obj, end = _DECODER.raw_decode(data)
        except ValueError:
            return json.loads(data)
        if end == len(data):
            return obj
    return json.loads(data)


def _raw_values(headers: Any, name: bytes) -> list[bytes]:
    """The raw values of header ``name`` (lowercase), in order.

    ``httpx`` and ``httpx2`` keep each header as ``(name, lowercase name, value)`` in
    ``Headers._list``; reading it there spares building :attr:`Headers.raw` (a new list
    of pairs) and lowering every name. Anything else is read through ``raw``.
    """
    items = getattr(headers, "_list", None)
    if type(items) is list:
        try:
            return [value for _, key, value in items if key == name]
        except (TypeError, ValueError):  # not the triples this relies on
            pass
    size = len(name)
    return [value for key, value in headers.raw if len(key) == size and key.lower() == name]


def header_text(headers: Any, name: str) -> str | None:
    """``", ".join(headers.get_list(name))`` for a lowercase ASCII ``name``; ``None``: absent.

    A lookup by name first works out the headers' encoding, a pass over every header;
    ASCII values read the same in any of the encodings it can find, so only other
    values are left to ``get_list``.
    """
    lookup = name.encode("ascii")
    items = getattr(headers, "_list", None)
    values: list[bytes] = []
    if type(items) is list:
        # _raw_values(headers, lookup), as a loop here: no function (nor list
        # comprehension) call for each of the three reads of every call.
        try:
            for _, key, value in items:
                if key == lookup:
                    values.append(value)
        except (TypeError, ValueError):  # not the triples this relies on
            values = _raw_values(headers, lookup)
    else:
        values = _raw_values(headers, lookup)
    if not values:
        return None
    if len(values) == 1:
        if values[0].isascii():
            return values[0].decode("ascii")
    elif all(value.isascii() for value in values):
        return ", ".join(value.decode("ascii") for value in values)
    return ", ".join(headers.get_list(name))


def content_type(headers: Any) -> str | None:
    """``headers.get("content-type")``, read as :func:`header_text` reads it."""
    return header_text(headers, "content-type")


def has_header(headers: Any, name: bytes) -> bool:
    """``name in headers`` (``name`` in lowercase), without working out their encoding."""
    return bool(_raw_values(headers, name))


_LOWER_NAME: Final = operator.itemgetter(1)


def set_header(headers: Any, name: str, value: str) -> None:
    """``headers[name] = value`` for a lowercase ASCII ``name`` and an ASCII ``value``.

    ``Headers.__setitem__`` of ``httpx`` and ``httpx2`` looks for the name with a loop
    over every header; here C-level passes over ``Headers._list`` find it. The result is
    the same: the first entry of that name takes the value, any others are removed, and
    a name not there is appended. Anything but that list of triples is left to
    ``__setitem__``.
    """
    items = getattr(headers, "_list", None)
    if type(items) is list and (not items or len(items[0]) == 3):
        lookup = name.encode("ascii")
        try:
            keys = list(map(_LOWER_NAME, items))
        except (TypeError, IndexError):
            pass
        else:
            found = keys.count(lookup)
            if found == 0:
                items.append((lookup, lookup, value.encode("ascii")))
                return
            if found == 1:
                items[keys.index(lookup)] = (lookup, lookup, value.encode("ascii"))
                return
    headers[name] = value
