r"""Redis glob patterns (``SCAN ... MATCH``) for the in-process ledger.

The memory ledger must select exactly the keys Redis would, so it translates the
pattern with Redis' own rules (``stringmatchlen`` in ``util.c``) rather than
:mod:`fnmatch`, which differs: ``[^a]`` negates in Redis (``[!a]`` in fnmatch) and a
backslash escapes the next character (fnmatch has no escape).

* ``*`` matches any run of characters, ``?`` any one character;
* ``[abc]``, ``[a-z]`` and ``[^a-z]`` are classes (a reversed range is swapped, an empty
  class matches nothing, an unterminated class ends at the end of the pattern);
* ``\x`` matches ``x`` literally, inside a class too;
* matching is case-sensitive and covers the whole key (Redis compares bytes; keys
  here are ASCII, where characters and bytes agree).
"""

from __future__ import annotations

import re

__all__ = ["escape", "glob_regex", "literal_prefix"]

_SPECIAL = frozenset("*?[]\\")


def escape(text: str) -> str:
    """Return a pattern that matches ``text`` literally (its glob characters escaped)."""
    return "".join("\\" + char if char in _SPECIAL else char for char in text)


def literal_prefix(pattern: str) -> str:
    """Return the literal text every key matching ``pattern`` starts with.

    Used to skip keys cheaply before running the regular expression.
    """
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char in "*?[":
            break
        if char == "\\" and index + 1 < len(pattern):
            index += 1
            char = pattern[index]
        out.append(char)
        index += 1
    return "".join(out)


def _class(pattern: str, index: int) -> tuple[str, int]:
    """Translate the class opening at ``pattern[index - 1]``; return regex and next index."""
    negate = index < len(pattern) and pattern[index] == "^"
    if negate:
        index += 1
    members: list[str] = []
    while index < len(pattern) and pattern[index] != "]":
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            index += 1
            members.append(re.escape(pattern[index]))
            index += 1
            continue
        if index + 2 < len(pattern) and pattern[index + 1] == "-":
            low, high = char, pattern[index + 2]
            if low > high:
                low, high = high, low
            members.append(f"{re.escape(low)}-{re.escape(high)}")
            index += 3
            continue
        members.append(re.escape(char))
        index += 1
    index += 1  # past the closing bracket (or the end of an unterminated class)
    if not members:
        return ("(?s:.)" if negate else "(?!)"), index
    return f"[{'^' if negate else ''}{''.join(members)}]", index


def glob_regex(pattern: str) -> re.Pattern[str]:
    """Compile a Redis glob pattern into an equivalent regular expression.

    Args:
        pattern: the glob, as given to ``SCAN ... MATCH``.

    Returns:
        A compiled expression to use with ``fullmatch``.
    """
    parts: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        index += 1
        if char == "*":
            if not parts or parts[-1] != ".*":
                parts.append(".*")
        elif char == "?":
            parts.append(".")
        elif char == "[":
            regex, index = _class(pattern, index)
            parts.append(regex)
        elif char == "\\" and index < len(pattern):
            parts.append(re.escape(pattern[index]))
            index += 1
        else:
            parts.append(re.escape(char))
    return re.compile("".join(parts), re.DOTALL)
