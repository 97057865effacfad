"""Rendering a :class:`~payi_guard.report.aggregate.Report`: table, CSV, JSON, summary."""

from __future__ import annotations

import csv
import json
import textwrap
from decimal import Decimal
from typing import TextIO

from payi_guard.money import decimal_text
from payi_guard.report.aggregate import KEY_FIELDS, Report, ReportRow
from payi_guard.report.percentiles import EXACT_SAMPLES, PERCENTILE_RELATIVE_ERROR
from payi_guard.report.table import Column, fit_table, printable, terminal_width

__all__ = ["summary", "write_csv", "write_json", "write_table"]

_GROUP_NOUNS: dict[str, tuple[str, str]] = {
    "user": ("user", "users"),
    "org": ("org", "orgs"),
    "model": ("model", "models"),
    "use_case": ("use case", "use cases"),
}


def _money(value: Decimal) -> str:
    """``$1,234.004200``: exact, at least six decimals, more only when they are not zero."""
    text = format(value, ",f")
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(6, "0")
    return f"${whole}.{fraction}"


_FIELDS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "share_pct",
    "p50_usd",
    "p90_usd",
    "p99_usd",
    "percentiles_exact",
    "blocked",
    "warned",
    "overruns",
    "errors",
    "adjustments",
    "adjusted_usd",
)


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return decimal_text(value)  # a raw JSON number token: exact, unlike a float
    if isinstance(value, int):
        return str(value)
    # ASCII only (json escapes the rest); DEL is ASCII but no terminal should get it raw.
    return json.dumps(value).replace("\x7f", "\\u007f")


def write_json(report: Report, out: TextIO) -> None:
    """Write the rows as a JSON array of objects (money as exact JSON numbers).

    Keys keep their exact value; every character outside printable ASCII is a JSON
    escape, so the output is safe to show on a terminal.

    Args:
        report: the report.
        out: the text stream.
    """
    key_field = KEY_FIELDS[report.by]
    if not report.rows:
        out.write("[]\n")
        return
    out.write("[\n")
    for index, row in enumerate(report.rows):
        items = [(key_field, row.key), ("key", row.key)]
        items += [(name, getattr(row, name)) for name in _FIELDS]
        body = ", ".join(f"{_json_value(k)}: {_json_value(v)}" for k, v in items)
        out.write("  {" + body + ("}\n" if index == len(report.rows) - 1 else "},\n"))
    out.write("]\n")


# A spreadsheet runs a cell that starts with one of these as a formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_key(value: str | None) -> str:
    """A key cell: escaped like the table, and never read as a formula by a spreadsheet."""
    if value is None:
        return ""
    text = printable(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return decimal_text(value)
    return str(value)


def write_csv(report: Report, out: TextIO) -> None:
    r"""Write a header row and one row per group.

    The key column is escaped as in the table (``\x1b``, ``\n``, ``\\``): every row is
    one physical line and shows no control character; a key that a spreadsheet would
    run as a formula (starting with ``=``, ``+``, ``-`` or ``@``) is prefixed with ``'``.

    Args:
        report: the report.
        out: the text stream.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([KEY_FIELDS[report.by], *_FIELDS])
    for row in report.rows:
        writer.writerow([_csv_key(row.key)] + [_csv_value(getattr(row, n)) for n in _FIELDS])


def _adjusted(row: ReportRow) -> str:
    """``-$0.250000 (2)``: the money operators added (signed) and how many actions."""
    amount = row.adjusted_usd
    if not row.adjustments or amount is None:
        return "-"
    money = ("-" if amount < 0 else "+" if amount > 0 else "") + _money(abs(amount))
    return f"{money} ({row.adjustments:,})"


def _table_cells(row: ReportRow, label: str) -> list[str]:
    def money(value: Decimal | None) -> str:
        if value is None:
            return "-"
        return _money(value) if row.percentiles_exact else "~" + _money(value)

    if row.share_pct is None:
        share = "-"
    elif row.cost_usd and row.share_pct < Decimal("0.05"):
        share = "<0.1%"  # not 0.0%: the group did spend
    else:
        share = f"{row.share_pct:.1f}%"
    return [
        label,
        f"{row.calls:,}",
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        _money(row.cost_usd),
        share,
        money(row.p50_usd),
        money(row.p90_usd),
        money(row.p99_usd),
        f"{row.blocked:,}",
        _count(row.warned),
        _count(row.overruns),
        _count(row.errors),
    ]


def _count(value: int | None) -> str:
    """A count, or ``-`` for one the report does not know (a store report's)."""
    return "-" if value is None else f"{value:,}"


def _plural(count: int, words: tuple[str, str]) -> str:
    return f"{count:,} {words[0] if count == 1 else words[1]}"


def summary(report: Report) -> str:
    """One line of totals and of what was read (the table footer; stderr otherwise).

    Args:
        report: the report.

    Returns:
        The line, without a newline.
    """
    totals = report.totals
    noun = _GROUP_NOUNS[report.by]
    parts = [f"total {_money(totals.cost_usd)} over {_plural(totals.calls, ('call', 'calls'))}"]
    parts.append(_plural(report.users, ("user", "users")))
    adjusted = totals.adjusted_usd
    if totals.adjustments and adjusted is not None:
        sign = "-" if adjusted < 0 else "+"
        parts.append(
            f"{_plural(totals.adjustments, ('adjustment', 'adjustments'))} by operators "
            f"({sign}{_money(abs(adjusted))}, apart from the total)"
        )
    if report.by != "user":
        parts.append(_plural(report.groups, noun))
    if len(report.rows) < report.groups:
        parts.append(f"showing top {len(report.rows):,} of {_plural(report.groups, noun)}")
    if report.source is not None:
        return ", ".join(parts) + "; from " + report.source
    read = (
        f"{_plural(report.lines, ('line', 'lines'))} read: {report.skipped:,} skipped, "
        f"{_plural(report.other_events, ('other event', 'other events'))}, "
        f"{report.filtered_out:,} filtered out"
    )
    if report.undated:
        read += f" ({report.undated:,} without a timestamp)"
    return ", ".join(parts) + "; " + read


_TABLE_COLUMNS = (
    # Left out first when the terminal is narrow: p50, p90, the token counts, p99, then
    # the event counts; the key, calls and cost are always shown.
    Column("calls"),
    Column("in_tokens", drop=3),
    Column("out_tokens", drop=4),
    Column("cost_usd"),
    Column("share", drop=9),
    Column("p50", drop=1),
    Column("p90", drop=2),
    Column("p99", drop=5),
    Column("blocked", drop=10),
    Column("warned", drop=8),
    Column("overruns", drop=7),
    Column("errors", drop=6),
)


_ADJUSTED_COLUMN = Column("adjusted", drop=11)
"""Shown when the logs hold operators' adjustments: left out last of all."""


def write_table(report: Report, out: TextIO, *, width: int | None = None) -> None:
    """Write an aligned table, a totals row and the summary, within ``width`` columns.

    Keys (user ids, models, ...) are escaped with :func:`~payi_guard.report.table.printable`
    and cut with ``…`` when too long; when the table is still too wide, optional columns
    are left out (a note names them). Money is exact and never in exponent notation.

    Args:
        report: the report.
        out: the text stream.
        width: the most columns a line may take (see
            :func:`~payi_guard.report.table.terminal_width`; default: the terminal's).
    """
    fit_width = terminal_width(width)
    key = Column(KEY_FIELDS[report.by], align="<", shrink=12)
    adjusted = bool(report.totals.adjustments)
    columns = (key, *_TABLE_COLUMNS, *((_ADJUSTED_COLUMN,) if adjusted else ()))

    def cells(row: ReportRow, label: str) -> list[str]:
        return _table_cells(row, label) + ([_adjusted(row)] if adjusted else [])

    body = [cells(row, "(none)" if row.key is None else printable(row.key)) for row in report.rows]
    totals = cells(report.totals, "TOTAL")
    rows = [*body, totals]
    # An optional column with nothing in any row (a store report keeps no percentiles
    # nor warnings) says nothing: it is left out before any that has something.
    kept = [
        index
        for index, column in enumerate(columns)
        if column.drop is None or any(row[index] != "-" for row in rows)
    ]
    columns = tuple(columns[index] for index in kept)
    rows = [[row[index] for index in kept] for row in rows]
    table = fit_table(columns, rows, fit_width, rules_before=(len(body),))
    for line in table.lines:
        out.write(line + "\n")
    notes = [summary(report)]
    shown = {column.header for column in columns} - set(table.dropped)
    if any(r.percentiles_exact is False for r in (*report.rows, report.totals)) and (
        shown & {"p50", "p90", "p99"}
    ):
        notes.append(
            f"~ percentile from a histogram, within {PERCENTILE_RELATIVE_ERROR:.2%} "
            f"(groups of more than {EXACT_SAMPLES:,} calls)"
        )
    if table.dropped:
        notes.append(
            f"columns left out to fit {fit_width} columns: {', '.join(table.dropped)} "
            f"(--width {table.needed} shows them; --format csv has every column)"
        )
    for note in notes:
        out.write(textwrap.fill(note, fit_width, subsequent_indent="  ", break_on_hyphens=False))
        out.write("\n")
