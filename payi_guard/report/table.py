"""Text for a terminal: escaped, measured as the terminal draws it, fitted to a width.

Everything a user or a log line can put in a field goes through :func:`printable`
before it is shown, so control characters (ESC sequences, newlines, carriage returns,
bidirectional overrides) never reach the terminal raw, where they could recolour the
screen or forge rows. :func:`fit_table` lays out rows within a width (80 columns unless
the terminal is wider): it shortens the columns marked as shrinkable and leaves out
optional columns, least useful first, and says which ones it left out.
"""

from __future__ import annotations

import shutil
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "MIN_WIDTH",
    "Column",
    "FittedTable",
    "display_width",
    "fit_table",
    "printable",
    "shorten",
    "terminal_width",
]

MIN_WIDTH = 40
"""The narrowest width a table is laid out for (a narrower request is raised to this)."""

_ELLIPSIS = "…"
_GAP = "  "
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def printable(text: str) -> str:
    r"""``text`` with every character a terminal would not simply draw escaped.

    Control and format characters, line and paragraph separators, unassigned code
    points and every space but U+0020 become Python-style escapes (``\x1b``, ``\n``,
    ``\u202e``); a backslash becomes ``\\``, so an escape in the output always means
    an escaped character and the text can be read back exactly.

    Args:
        text: any text (a user id, a model name).

    Returns:
        Text whose characters are all printable.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    for char in text:
        if char in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[char])
        elif char.isprintable():
            out.append(char)
        else:
            code = ord(char)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    return "".join(out)


def _char_width(char: str) -> int:
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal (wide East Asian characters take two).

    Args:
        text: printable text (see :func:`printable`).
    """
    if text.isascii():
        return len(text)
    return sum(_char_width(char) for char in text)


def shorten(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` columns, ending with ``…`` when it was cut.

    Args:
        text: printable text.
        width: the most columns the result may take (at least 1).
    """
    if display_width(text) <= width:
        return text
    out: list[str] = []
    used = 0
    for char in text:
        step = _char_width(char)
        if used + step > width - 1:
            break
        out.append(char)
        used += step
    return "".join(out) + _ELLIPSIS


def _pad(text: str, width: int, align: Literal["<", ">"]) -> str:
    gap = " " * max(0, width - display_width(text))
    return text + gap if align == "<" else gap + text


def terminal_width(requested: int | None = None) -> int:
    """The width to lay text out for.

    Args:
        requested: an explicit width (``--width``); ``None`` for the terminal's.

    Returns:
        ``requested``, else ``$COLUMNS``, else the width of the terminal on stdout, else
        80 (output to a file or a pipe); never less than :data:`MIN_WIDTH`.
    """
    width = requested if requested is not None else shutil.get_terminal_size().columns
    return max(MIN_WIDTH, width)


@dataclass(frozen=True, slots=True)
class Column:
    """One column of a :func:`fit_table` layout.

    Attributes:
        header: the column's title.
        align: ``<`` (left, for names) or ``>`` (right, for figures).
        drop: the order in which optional columns are left out when the table is too
            wide (1 first); ``None`` for a column that is always shown.
        shrink: for a column of names, the narrowest it may be cut to (with ``…``);
            ``None`` for a column that is never cut.
    """

    header: str
    align: Literal["<", ">"] = ">"
    drop: int | None = None
    shrink: int | None = None


@dataclass(frozen=True, slots=True)
class FittedTable:
    """A table laid out within a width.

    Attributes:
        lines: the header, the rows, and a rule before each row index in ``rules_before``.
        dropped: the headers of the columns left out, in the order they were left out.
        width: the width it was fitted to.
        needed: the width that shows every column and every cell whole.
    """

    lines: tuple[str, ...]
    dropped: tuple[str, ...]
    width: int
    needed: int


_COMFORTABLE = 24  # a shrinkable column is first cut to this many columns


def fit_table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    width: int,
    *,
    rules_before: Sequence[int] = (),
) -> FittedTable:
    """Lay out ``rows`` within ``width`` columns.

    First shrinkable columns are cut to 24 columns, then optional columns are left out
    (lowest ``drop`` first), then shrinkable columns are cut down to their ``shrink``.
    Cells are used as given: escape user text with :func:`printable` first.

    Args:
        columns: the columns.
        rows: the cells, one sequence per row, one cell per column.
        width: the most columns a line may take.
        rules_before: row indexes before which a rule of dashes is drawn (the totals).

    Returns:
        The lines (no trailing spaces) and the headers of the columns left out.
    """
    count = len(columns)
    natural = [
        max([display_width(c.header), *(display_width(row[i]) for row in rows)])
        for i, c in enumerate(columns)
    ]
    widths = list(natural)
    shown = list(range(count))
    needed = sum(natural) + len(_GAP) * (count - 1)

    def total() -> int:
        return sum(widths[i] for i in shown) + len(_GAP) * (len(shown) - 1)

    def cut(floor: int | None) -> None:
        for i in shown:
            limit = columns[i].shrink
            excess = total() - width
            if limit is None or excess <= 0:
                continue
            target = max(limit, display_width(columns[i].header), floor or 0)
            if widths[i] > target:
                widths[i] = max(target, widths[i] - excess)

    cut(_COMFORTABLE)
    optional = [i for i in range(count) if columns[i].drop is not None]
    dropped: list[str] = []
    for i in sorted(optional, key=lambda i: columns[i].drop or 0):
        if total() <= width:
            break
        shown.remove(i)
        dropped.append(columns[i].header)
    cut(None)

    def line(cells: Sequence[str]) -> str:
        parts = [_pad(shorten(cells[i], widths[i]), widths[i], columns[i].align) for i in shown]
        return _GAP.join(parts).rstrip()

    lines = [line([c.header for c in columns])]
    for index, row in enumerate(rows):
        if index in rules_before:
            lines.append(_GAP.join("-" * widths[i] for i in shown))
        lines.append(line(row))
    return FittedTable(tuple(lines), tuple(dropped), width, needed)
