"""Reading typed values out of the document tree, with errors that say where and what.

:class:`NodeReader` holds the primitives every section of the budgets file is read with:
a word, one of several choices, an exact decimal, an amount of USD, a count, a time zone,
a name. Each failure is a :class:`~payi_guard.ConfigError` naming the file, the 1-based
line (when the tree came from YAML), the dotted key and what is wrong, with a "did you
mean" hint for near misses.
"""

from __future__ import annotations

import difflib
import re
import zoneinfo
from collections.abc import Iterable, Sequence
from decimal import Decimal, InvalidOperation
from fractions import Fraction

from payi_guard.config.model import MAX_AMOUNT
from payi_guard.config.yaml_tree import Entry, Map, Node, Scalar, Seq, child_path
from payi_guard.exceptions import ConfigError
from payi_guard.money import NANO_USD, decimal_usd

__all__ = ["NodeReader", "first_line", "kind_of", "node_text", "one_of", "suggest"]

_NAME = re.compile(r"[A-Za-z0-9_.-]+\Z")
_MAX_EXPONENT = 40


def suggest(word: str, options: Iterable[str]) -> str:
    """Return ``; did you mean 'x'?`` for the closest option, or ``""``."""
    by_lower = {option.lower(): option for option in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f"; did you mean {by_lower[close[0]]!r}?" if close else ""


def one_of(options: Sequence[str]) -> str:
    """Return the options as a comma-separated list, for messages."""
    return ", ".join(options)


class NodeReader:
    """The primitives of the config parser: typed values read from tree nodes.

    Args:
        source: the file the tree came from, named in errors.
    """

    def __init__(self, source: str | None) -> None:
        self._source = source

    def _error(self, message: str, line: int | None, path: str) -> ConfigError:
        return ConfigError(message, file=self._source, line=line, key=path or None)

    def _fields(self, node: Map, path: str, allowed: Sequence[str], what: str) -> dict[str, Entry]:
        """Return the entries of ``node`` by key, refusing keys not in ``allowed``."""
        found: dict[str, Entry] = {}
        for entry in node.entries:
            if entry.key not in allowed:
                hint = suggest(entry.key, allowed) or f"; {what} keys are: {one_of(allowed)}"
                raise self._error(
                    f"unknown key {entry.key!r}{hint}", entry.line, child_path(path, entry.key)
                )
            found[entry.key] = entry
        return found

    def _map(self, node: Node, path: str, what: str, example: str) -> Map:
        if isinstance(node, Map):
            return node
        raise self._error(f"expected {what}, like {example}; got {kind_of(node)}", node.line, path)

    def _word(self, node: Node, path: str, what: str) -> str:
        """Return a string value: a name, a choice, a URI or a zone."""
        if isinstance(node, Scalar):
            if node.text is not None:
                # YAML: a plain `yes` or `null` is still the word the user typed here.
                if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                    if node.text != "":
                        return node.text
                    raise self._error(f"has no value; expected {what}", node.line, path)
            elif isinstance(node.value, str):
                return node.value
        raise self._error(f"expected {what}, got {kind_of(node)}", node.line, path)

    def _choice(self, node: Node, path: str, options: Sequence[str], what: str) -> str:
        word = self._word(node, path, f"one of {one_of(options)}")
        if word in options:
            return word
        hint = suggest(word, options) or f"; expected one of {one_of(options)}"
        raise self._error(f"unknown {what} {word!r}{hint}", node.line, path)

    def _decimal(self, node: Node, path: str, what: str) -> Decimal:
        """Read an exact decimal number: from the YAML text, or Decimal(str(x)) in Python."""
        if not isinstance(node, Scalar) or node.value is None:
            got = "no value" if isinstance(node, Scalar) else kind_of(node)
            raise self._error(f"expected {what}, got {got}", node.line, path)
        value = node.value
        if isinstance(value, bool):
            raise self._error(f"expected {what}, got a boolean ({node.show()})", node.line, path)
        try:
            if isinstance(value, int):
                number = Decimal(value)
            elif isinstance(value, Fraction):
                number = Decimal(value.numerator) / Decimal(value.denominator)
                if Fraction(number) != value:
                    raise InvalidOperation
            elif isinstance(value, Decimal):
                number = value
            elif node.text is not None:
                # A YAML float or a quoted string: parse the digits as written.
                number = Decimal(node.text.strip().replace("_", ""))
            elif isinstance(value, float):
                number = Decimal(repr(value))
            elif isinstance(value, str):
                number = Decimal(value.strip())
            else:
                raise InvalidOperation
        except InvalidOperation:
            raise self._error(f"expected {what}, got {node.show()}", node.line, path) from None
        if not number.is_finite():
            raise self._error(f"expected {what}, got {node.show()}", node.line, path)
        # Exact arithmetic on 1e-999999 would build a million-digit integer: refuse early.
        if number and not -_MAX_EXPONENT <= number.adjusted() <= _MAX_EXPONENT:
            raise self._error(f"expected {what}, got {node.show()} (out of range)", node.line, path)
        return number

    def _usd(self, node: Node, path: str) -> int:
        """Read a positive USD amount into integer nano-USD, exactly."""
        amount = self._decimal(node, path, "an amount in USD (like 1.50)")
        if amount <= 0:
            raise self._error(f"must be more than 0 USD, got {node_text(node)}", node.line, path)
        nano = Fraction(amount) * NANO_USD
        if nano.denominator != 1:
            raise self._error(
                f"{node_text(node)} USD is more precise than the smallest unit "
                "(0.000000001 USD, 9 decimal places)",
                node.line,
                path,
            )
        if nano > MAX_AMOUNT:
            raise self._error(
                f"{node_text(node)} USD is too large (at most {decimal_usd(MAX_AMOUNT)})",
                node.line,
                path,
            )
        return int(nano)

    def _count(self, node: Node, path: str, unit: str) -> int:
        """Read a positive whole count of requests or tokens."""
        value = node.value if isinstance(node, Scalar) else None
        if isinstance(value, bool):
            raise self._error(
                f"{unit} must be a positive whole number, got a boolean ({node_text(node)})",
                node.line,
                path,
            )
        if not isinstance(value, int):
            raise self._error(
                f"{unit} must be a positive whole number, got {kind_of(node)}",
                node.line,
                path,
            )
        if value <= 0:
            raise self._error(f"{unit} must be more than 0, got {value}", node.line, path)
        if value > MAX_AMOUNT:
            raise self._error(f"{unit} is too large (at most {MAX_AMOUNT})", node.line, path)
        return value

    def _zone(self, node: Node, path: str) -> str:
        name = self._word(node, path, "an IANA time zone (like Europe/Paris)")
        if name == "UTC":
            return name
        try:
            zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
            hint = suggest(name, zoneinfo.available_timezones())
            raise self._error(
                f"unknown time zone {name!r}{hint or '; use an IANA name like Europe/Paris'}",
                node.line,
                path,
            ) from None
        return name

    def _name(self, key: str, line: int | None, path: str, what: str) -> str:
        if not _NAME.match(key):
            raise self._error(
                f"invalid {what} name {key!r}: use letters, digits, '.', '-' and '_' "
                "(':' is reserved for the names of inline limits)",
                line,
                path,
            )
        return key


def kind_of(node: Node) -> str:
    """Name the kind of a node for messages: 'a list', 'a mapping', 'the number 5'."""
    if isinstance(node, Map):
        return "a mapping"
    if isinstance(node, Seq):
        return "a list"
    value = node.value
    if value is None:
        return "no value"
    if isinstance(value, bool):
        return f"a boolean ({node.show()})"
    if isinstance(value, (int, float, Decimal, Fraction)):
        return f"the number {node_text(node)}"
    return f"the string {node.show() if node.text is not None else repr(value)}"


def node_text(node: Node) -> str:
    """Return a scalar as written (YAML text, or ``str`` of a Python value)."""
    if isinstance(node, Scalar):
        if node.text is not None:
            return node.text
        return str(node.value)
    return kind_of(node)


def first_line(*lines: int | None) -> int | None:
    """Return the first known line."""
    return next((line for line in lines if line is not None), None)
