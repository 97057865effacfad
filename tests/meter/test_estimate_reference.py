"""The request estimate against a plain reference: the same numbers on varied inputs.

:func:`text_token_bound` counts its byte classes with ``translate`` and ``count``; the
reference below counts them with one regular expression per class, as the rule reads.
"""

from __future__ import annotations

import random
import re

from hypothesis import given, settings
from hypothesis import strategies as st

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
