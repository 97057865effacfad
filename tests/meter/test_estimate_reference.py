"""The request estimate against a plain reference: the same numbers on varied inputs.

:func:`text_token_bound` counts its byte classes with ``translate`` and ``count``; the
reference below counts them with one regular expression per class, as the rule reads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
import re
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.meter.estimate import estimate_request
from payi_guard.meter.server_tools import tool_input_tokens
from payi_guard.meter.tokens import text_token_bound
from payi_guard.money import ceil_div

_WORD_RUN = re.compile(rb"[A-Za-z\x80-\xff]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_SPACE_RUN = re.compile(rb"[ \t\n\r\x0b\x0c]+")
_MERGED_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c] (?=[^ \t\n\r\x0b\x0c0-9])")
_CASE_SWITCH = re.compile(rb"[a-z](?=[A-Z])")
_UPPER = re.compile(rb"[A-Z]")
_LEAD4 = re.compile(rb"[\xf0-\xf7]")


def reference_ratio_bound(text: str) -> int:
    """The "ratio" bound of ``text``, one regular expression per byte class."""
    data = text.encode("utf-8", "surrogatepass")
    size = len(data)
    if not size:
        return 0
    words = _WORD_RUN.findall(data)
    word_bytes = sum(map(len, words))
    digits = _DIGIT_RUN.findall(data)
    digit_bytes = sum(map(len, digits))
    space_runs = _SPACE_RUN.findall(data)
    space_bytes = sum(map(len, space_runs))
    spaces = data.count(b" ")
    upper = len(_UPPER.findall(data))
    switches = len(_CASE_SWITCH.findall(data))
    four_byte = len(_LEAD4.findall(data))
    merged = len(_MERGED_SPACE.findall(data))
    other = size - word_bytes - digit_bytes - space_bytes
    tokens = (
        ceil_div(2 * word_bytes + upper + switches + 4 * four_byte + len(words), 3)
        + ceil_div(digit_bytes + len(digits), 2)
        + ceil_div(spaces + 2 * len(space_runs), 2)
        + (space_bytes - spaces)
        - merged
        + other
    )
    return max(tokens, ceil_div(2 * size, 5))


_PIECES = [
    *" \t\n\r\x0b\x0c",
    *"aAbBzZ09 5.,;{}\"'\\-_/",
    "é",
    "日本",
    "🙂",
    "\x00",
    "\x7f",
    "\x80",
    "\ud800",
    "ÿ",
    "  ",
    "ab",
    "Ab",
    "aB",
    "12",
    " 1",
    " a",
    "a b c",
]


def test_text_bound_matches_reference_on_random_texts() -> None:
    rng = random.Random(20261127)
    for _ in range(20_000):
        count = rng.randint(0, 40)
        if rng.random() < 0.2:
            text = "".join(chr(rng.randint(0, 0x10FFFF)) for _ in range(count))
        else:
            text = "".join(rng.choice(_PIECES) for _ in range(count))
        assert text_token_bound(text) == reference_ratio_bound(text), repr(text)
        assert text_token_bound(text, "bytes") == len(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=200))
def test_text_bound_matches_reference(text: str) -> None:
    assert text_token_bound(text) == reference_ratio_bound(text)


def test_text_bound_matches_reference_on_long_texts() -> None:
    samples = [
        "The quick brown Fox jumps over 12 lazy dogs; camelCase and snake_case. " * 50,
        "日本語のテキストです。" * 200,
        "".join(chr(c) for c in range(0x20, 0x3000, 7)) * 3,
        "a" * 5000 + " " * 300 + "1" * 77,
        "🙂 🙂  x1 y2\tZ\n" * 400,
    ]
    for text in samples:
        assert text_token_bound(text) == reference_ratio_bound(text)


# -- whole request bodies ----------------------------------------------------------------

_ENDPOINTS = ("chat", "responses", "embeddings", "anthropic_messages", "completions")
_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-5-nano", "claude-sonnet-4-5", "o1-mini", "unknown-x")
_WORDS = ("hello", "World", "camelCase", "42", "3.14", "日本語", "🙂", " ", "\n", "{}", "a b", "")


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(0, 8)))


def _value(rng: random.Random, depth: int) -> object:
    roll = rng.random()
    if depth > 3 or roll < 0.35:
        return _text(rng)
    if roll < 0.45:
        return rng.choice((None, True, False, 0, 7, -3, 2.5, 10**12))
    if roll < 0.6:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll < 0.7:
        return rng.choice(
            (
                {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                {"image_url": "data:..."},
                {"type": "input_image", "file_id": "f"},
                {"type": "file", "file": {"file_id": "f"}},
                {"type": "file", "file": {"file_data": _text(rng)}},
                {"type": "document", "source": {"type": "base64", "data": _text(rng)}},
                {"type": "document", "source": {"type": "url", "url": "u"}},
                {"type": "text", "text": _text(rng), "cache_control": {"type": "ephemeral"}},
            )
        )
    keys = ("role", "content", "name", "text", "type", "arguments", "tool_calls", "x")
    return {rng.choice(keys): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _tools(rng: random.Random) -> object:
    kinds = ("function", "custom", None, "web_search", "web_search_20250305", "file_search")
    tools = []
    for _ in range(rng.randint(0, 3)):
        tool: dict[str, object] = {"name": _text(rng), "parameters": _value(rng, 2)}
        kind = rng.choice(kinds)
        if kind is not None:
            tool["type"] = kind
        if rng.random() < 0.3:
            tool["max_uses"] = rng.choice((0, 3, -1, "5", True))
        tools.append(tool)
    return rng.choice((tools, tools, [], None, "bad"))


def _body(rng: random.Random) -> dict[str, object]:
    body: dict[str, object] = {}
    items = [_value(rng, 1) for _ in range(rng.randint(0, 4))]
    makers: tuple[tuple[str, Callable[[], object]], ...] = (
        ("messages", lambda: items if rng.random() < 0.9 else _text(rng)),
        ("input", lambda: rng.choice((items, _text(rng), [1, 2, 3], [[1, 2], [3]], [_text(rng)]))),
        ("prompt", lambda: rng.choice((_text(rng), [_text(rng), _text(rng)], [5, 6], []))),
        ("system", lambda: rng.choice((_text(rng), items))),
        ("instructions", lambda: _text(rng)),
        ("suffix", lambda: _text(rng)),
        ("tools", lambda: _tools(rng)),
        ("functions", lambda: _tools(rng)),
        ("tool_choice", lambda: rng.choice(("auto", {"type": "function", "name": "f"}))),
        ("response_format", lambda: _value(rng, 2)),
        ("text", lambda: _value(rng, 2)),
        ("prediction", lambda: _value(rng, 2)),
        ("cache_control", lambda: {"type": "ephemeral"}),
    )
    for key, make in makers:
        if rng.random() < 0.4:
            body[key] = make()
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n", "best_of"):
        if rng.random() < 0.3:
            body[key] = rng.choice((0, 1, 3, 100, -1, 2.0, "9", True, None))
    if rng.random() < 0.3:
        body["service_tier"] = rng.choice(("auto", "flex", "priority", 1))
    if rng.random() < 0.2:
        body["speed"] = rng.choice(("fast", 2))
    return body


# sha256 of the estimates of _body(random.Random(7)) x 3,000, each endpoint and mode,
# as computed by the regular-expression form of text_token_bound and the first form of
# the body walk (without what server-side tools add: tests/meter/test_server_tools.py).
_EXPECTED_DIGEST = "53c8f4be994c46fbc96c8fb5767450f48dd468f393ba41fd3ecf9dc5e31683e7"


def _estimates_digest() -> str:
    rng = random.Random(7)
    digest = hashlib.sha256()
    for _ in range(3_000):
        body = _body(rng)
        model = rng.choice(_MODELS)
        for endpoint in _ENDPOINTS:
            for mode in ("ratio", "bytes"):
                try:
                    found = estimate_request(body, endpoint, model, mode=mode)  # type: ignore[arg-type]
                    # The body's own bound: what server-side tools read came later.
                    tools = tool_input_tokens(
                        body,
                        endpoint,  # type: ignore[arg-type]
                        found.web_searches,
                        found.file_searches,
                    )
                    found = dataclasses.replace(found, input_tokens=found.input_tokens - tools)
                    row = repr(dataclasses.astuple(found))
                except (TypeError, ValueError) as exc:
                    row = type(exc).__name__
                digest.update(row.encode() + b"\n")
    return digest.hexdigest()


def test_estimates_match_recorded_digest() -> None:
    assert _estimates_digest() == _EXPECTED_DIGEST
