"""Rendering a :class:`~payi_guard.report.aggregate.Report`: table, CSV, JSON, summary."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from typing import TextIO

from payi_guard.report.aggregate import KEY_FIELDS, Report, ReportRow
from payi_guard.report.percentiles import EXACT_SAMPLES, PERCENTILE_RELATIVE_ERROR

__all__ = ["summary", "write_csv", "write_json", "write_table"]

_GROUP_NOUNS: dict[str, tuple[str, str]] = {
    "user": ("user", "users"),
    "org": ("org", "orgs"),
    "model": ("model", "models"),
    "use_case": ("use case", "use cases"),
}


def _plain(value: Decimal) -> str:
    """Exact fixed-point text of a Decimal, without trailing fractional zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


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
)


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _plain(value)  # a raw JSON number token: exact, unlike a float
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def write_json(report: Report, out: TextIO) -> None:
    """Write the rows as a JSON array of objects (money as exact JSON numbers).

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
        body = ", ".join(f"{json.dumps(k)}: {_json_value(v)}" for k, v in items)
        out.write("  {" + body + ("}\n" if index == len(report.rows) - 1 else "},\n"))
    out.write("]\n")


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _plain(value)
    return str(value)


def write_csv(report: Report, out: TextIO) -> None:
    """Write a header row and one row per group.

    Args:
        report: the report.
        out: the text stream.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([KEY_FIELDS[report.by], *_FIELDS])
    for row in report.rows:
        writer.writerow([_csv_value(row.key)] + [_csv_value(getattr(row, n)) for n in _FIELDS])


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
        f"{row.warned:,}",
        f"{row.overruns:,}",
        f"{row.errors:,}",
    ]


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
    if report.by != "user":
        parts.append(_plural(report.groups, noun))
    if len(report.rows) < report.groups:
        parts.append(f"showing top {len(report.rows):,} of {_plural(report.groups, noun)}")
    read = (
        f"{_plural(report.lines, ('line', 'lines'))} read: {report.skipped:,} skipped, "
        f"{_plural(report.other_events, ('other event', 'other events'))}, "
        f"{report.filtered_out:,} filtered out"
    )
    if report.undated:
        read += f" ({report.undated:,} without a timestamp)"
    return ", ".join(parts) + "; " + read


def write_table(report: Report, out: TextIO) -> None:
    """Write an aligned table, a totals row and the summary line.

    Args:
        report: the report.
        out: the text stream.
    """
    header = [KEY_FIELDS[report.by], "calls", "in_tokens", "out_tokens", "cost_usd", "share"]
    header += ["p50", "p90", "p99", "blocked", "warned", "overruns", "errors"]
    body = [_table_cells(row, "(none)" if row.key is None else row.key) for row in report.rows]
    totals = _table_cells(report.totals, "TOTAL")
    widths = [max(len(r[i]) for r in [header, totals, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out.write(line(header) + "\n")
    for cells in body:
        out.write(line(cells) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(line(totals) + "\n")
    out.write(summary(report) + "\n")
    if any(not r.percentiles_exact for r in (*report.rows, report.totals)):
        out.write(
            f"~ percentile from a histogram, within {PERCENTILE_RELATIVE_ERROR:.2%} "
            f"(groups of more than {EXACT_SAMPLES:,} calls)\n"
        )
