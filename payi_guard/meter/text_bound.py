"""The token bound of a text, from its UTF-8 bytes: :func:`text_token_bound`.

Re-exported by :mod:`payi_guard.meter.tokens`, which bounds whole request bodies with it.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["EstimateMode", "text_token_bound"]

EstimateMode = Literal["ratio", "bytes"]
"""How text is turned into a token bound; see
:func:`~payi_guard.meter.tokens.estimate_input_tokens`."""

# Byte classes for the "ratio" text bound. Each table maps every byte to one class
# letter, so one ``translate`` and a few ``count`` calls (all C-speed passes) give the
# sizes of the classes and, counting where a class starts, their runs.
_SPACE_BYTES = b" \t\n\r\x0b\x0c"
_DIGITS = b"0123456789"
_LOWER = bytes(range(ord("a"), ord("z") + 1))
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LEAD4 = bytes(range(0xF0, 0xF8))
_WORD_BYTES = _LOWER + _UPPER + bytes(range(0x80, 0x100))


def _class_table(classes: dict[bytes, bytes], default: bytes) -> bytes:
    """A ``translate`` table: each byte of a key to its letter, any other to ``default``."""
    table = bytearray(default * 256)
    for members, letter in classes.items():
        for byte in members:
            table[byte] = letter[0]
    return bytes(table)


# Letters (ASCII and every non-ASCII byte) as "w", the rest as ".".
_WORD_CLASSES = _class_table({_WORD_BYTES: b"w"}, b".")
# Lowercase ASCII letters as "l", capitals as "u", the rest as ".".
_CASE_CLASSES = _class_table({_LOWER: b"l", _UPPER: b"u"}, b".")
# Digits as "d", the rest as ".".
_DIGIT_CLASSES = _class_table({_DIGITS: b"d"}, b".")
# Whitespace as "s", the rest as ".".
_SPACE_CLASSES = _class_table({_SPACE_BYTES: b"s"}, b".")
# A space as "s", other whitespace as "t", digits as "d", anything else as "n".
_MERGE_CLASSES = _class_table({b" ": b"s", _SPACE_BYTES[1:]: b"t", _DIGITS: b"d"}, b"n")


def _merged_spaces(classes: bytes) -> int:
    """Single spaces between a non-space byte and a non-space, non-digit byte.

    ``classes`` is the text through :data:`_MERGE_CLASSES`. Every space followed by an
    "n" byte ("sn"), less those preceded by whitespace ("ssn", "tsn") or by nothing
    (the text's start); none of these patterns can overlap itself, so ``count`` finds
    every one.
    """
    return (
        classes.count(b"sn")
        - classes.count(b"ssn")
        - classes.count(b"tsn")
        - (classes[:2] == b"sn")
    )


def text_token_bound(text: str, mode: EstimateMode = "ratio") -> int:
    """A bound of the tokens of ``text`` (no chat-format overhead).

    ``"bytes"``: the UTF-8 length. Every token of a byte-level BPE (OpenAI's
    tokenizers, and any tokenizer with byte fallback) covers at least one byte, so this
    can never be exceeded.

    ``"ratio"``: a per-character-class bound that follows how GPT-style tokenizers split
    text, and is at least ``ceil(bytes / 2.5)``:

    * letters (ASCII and non-ASCII bytes): 2/3 token per byte, 1/3 more per ASCII
      capital, per run and per switch from a lowercase to a capital letter inside a run
      (camelCase, base64: rare letter pairs a tokenizer may split one letter at a
      time), 4/3 more per 4-byte character (emoji);
    * digits: 1/2 token per digit plus 1/2 per run (they split into groups of three);
    * whitespace: 1 per tab/newline, 1/2 per space plus 1 per run, minus the single
      spaces that merge into the next word;
    * everything else (punctuation, symbols, controls): 1 per byte.

    Measured with OpenAI's cl100k_base and o200k_base tokenizers it never under-counts
    prose (English, Chinese, Japanese, Korean, Russian, Greek, Hebrew, Arabic, Hindi,
    Thai, Vietnamese), code, JSON, numbers, UUIDs, hex, base64, URLs, LaTeX or emoji;
    it does under-count text made of characters the vocabulary lacks (runic, rare CJK
    ideographs: up to 3 tokens per character). Use ``"bytes"`` for a guarantee.

    Args:
        text: the text.
        mode: ``"ratio"`` or ``"bytes"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    data = text.encode("utf-8", "surrogatepass")
    size = len(data)
    if mode == "bytes":
        return size
    if mode != "ratio":
        raise ValueError(f"mode must be 'ratio' or 'bytes', not {mode!r}")
    if not size:
        return 0
    # The runs of a class in a two-letter class string (that letter and "."): where the
    # letter follows a ".", plus one when the string opens with it. Divisions round up
    # as ``-(-a // b)``.
    words = data.translate(_WORD_CLASSES)
    word_bytes = words.count(b"w")
    word_runs = words.count(b".w") + (words[:1] == b"w") if word_bytes else 0
    cases = data.translate(_CASE_CLASSES)
    upper = cases.count(b"u")
    # A lowercase letter followed by a capital: "lu" cannot overlap itself, so
    # ``count`` finds every one.
    switches = cases.count(b"lu") if upper else 0
    # Only ASCII text is as long in UTF-8 as in characters.
    four_byte = 0 if size == len(text) else size - len(data.translate(None, _LEAD4))
    digits = data.translate(_DIGIT_CLASSES)
    digit_bytes = digits.count(b"d")
    digit_runs = digits.count(b".d") + (digits[:1] == b"d") if digit_bytes else 0
    blanks = data.translate(_SPACE_CLASSES)
    space_bytes = blanks.count(b"s")
    space_runs = blanks.count(b".s") + (blanks[:1] == b"s") if space_bytes else 0
    spaces = data.count(b" ")
    merged = _merged_spaces(data.translate(_MERGE_CLASSES)) if spaces else 0
    other = size - word_bytes - digit_bytes - space_bytes
    tokens = (
        -(-(2 * word_bytes + upper + switches + 4 * four_byte + word_runs) // 3)
        - (-(digit_bytes + digit_runs) // 2)
        - (-(spaces + 2 * space_runs) // 2)
        + (space_bytes - spaces)
        - merged
        + other
    )
    return max(tokens, -(-2 * size // 5))
