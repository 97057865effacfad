"""The ``payi-guard`` command: ``report``, ``check``, ``usage`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, TextIO

from payi_guard.clock import Clock, SystemClock
from payi_guard.exceptions import ConfigError, InvalidUserId, PayiGuardError
from payi_guard.report import (
    EXACT_SAMPLES,
    PERCENTILE_RELATIVE_ERROR,
    ReportBuilder,
    ReportFilter,
    UnreadableLog,
    parse_time_bound,
    read_logs,
    summary,
    write_csv,
    write_json,
    write_table,
)
from payi_guard.report.aggregate import KEY_FIELDS
from payi_guard.report.table import terminal_width

__all__ = ["add_report_parser", "build_parser", "main", "report_main", "run_report"]


# ---------------------------------------------------------------------------- report


def _time_arg(text: str) -> datetime | timedelta:
    try:
        return parse_time_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _top_arg(text: str) -> int:
    try:
        value = int(text) if text.isascii() else 0
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _width_arg(text: str) -> int:
    try:
        value = int(text) if text.isascii() else 0
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of columns")
    return value


_DESCRIPTION = """\
Per-user spend from payi_guard's JSON logs (genai_call, budget_warning, budget_exceeded
and budget_overrun events). Costs are summed exactly. Lines that are not JSON are skipped
and counted, never fatal. Memory grows with the number of groups, not of lines.
"""

_EPILOG = f"""\
calls counts calls sent to a provider; blocked counts each refusal once (a refused
genai_call and the budget_exceeded of the same request_id and user are one refusal).
--since is inclusive, --until exclusive; with either, lines without a timestamp are left
out. p50/p90/p99 are nearest-rank costs per call: exact for a group of up to
{EXACT_SAMPLES:,} calls, within {PERCENTILE_RELATIVE_ERROR:.2%} for a larger one (marked ~).
csv and json write the summary line to stderr.
"""


def _configure_report(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "logs", nargs="+", metavar="LOG", help="log files (gzip is detected), or - for stdin"
    )
    parser.add_argument(
        "--since",
        type=_time_arg,
        metavar="WHEN",
        help="only events at or after WHEN: 2026-11-27, 2026-11-27T12:00Z, or an age: 24h, 7d",
    )
    parser.add_argument(
        "--until", type=_time_arg, metavar="WHEN", help="only events before WHEN (same forms)"
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="ID",
        help="only this user id or glob (acme:*); repeat for several",
    )
    parser.add_argument(
        "--org", action="append", default=[], metavar="ID", help="only this org id or glob"
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME", help="only this model or glob"
    )
    parser.add_argument(
        "--by",
        choices=tuple(KEY_FIELDS),
        default="user",
        help="what a row groups (default: user)",
    )
    parser.add_argument(
        "--sort",
        choices=("cost", "calls"),
        default="cost",
        help="descending order of the rows, ties by key (default: cost)",
    )
    parser.add_argument("--top", type=_top_arg, metavar="N", help="only the first N rows")
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default: table)",
    )
    parser.add_argument(
        "--width",
        type=_width_arg,
        metavar="COLS",
        help="the table's width (default: the terminal's, else $COLUMNS, else 80; "
        "at least 40); columns that do not fit are left out and named",
    )
    parser.set_defaults(func=run_report)
    return parser


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``report`` sub-command.

    The parser's defaults set ``func`` to :func:`run_report`, so a CLI can dispatch with
    ``args.func(args)``.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``report`` parser.
    """
    parser = subparsers.add_parser(
        "report",
        help="per-user spend, calls and budget events from the logs",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return _configure_report(parser)


def _resolve(bound: datetime | timedelta | None, now: datetime) -> datetime | None:
    if isinstance(bound, timedelta):
        return now - bound
    return bound


def run_report(
    args: argparse.Namespace,
    *,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Clock | None = None,
) -> int:
    """Run ``payi-guard report`` with parsed arguments.

    Args:
        args: the namespace from the ``report`` parser (``logs``, ``since``, ``until``,
            ``user``, ``org``, ``model``, ``by``, ``sort``, ``top``, ``format``,
            ``width``).
        stdin: the binary stream ``-`` reads (default: ``sys.stdin.buffer``).
        stdout: where the report goes (default: ``sys.stdout``).
        stderr: where errors, and the summary of csv and json, go (default: ``sys.stderr``).
        clock: the clock ages such as ``24h`` count back from.

    Returns:
        0 on success (skipped lines included), 2 for a bad argument or an unreadable file.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    now = datetime.fromtimestamp((clock or SystemClock()).now(), tz=timezone.utc)
    filters = ReportFilter(
        since=_resolve(args.since, now),
        until=_resolve(args.until, now),
        users=tuple(args.user),
        orgs=tuple(args.org),
        models=tuple(args.model),
    )
    if filters.since and filters.until and filters.since >= filters.until:
        err.write("payi-guard report: error: --since must be before --until\n")
        return 2
    builder = ReportBuilder(args.by, filters)
    try:
        read_logs(args.logs, builder, stdin)
    except UnreadableLog as exc:
        err.write(f"payi-guard report: error: {exc}\n")
        return 2
    report = builder.build(sort=args.sort, top=args.top)
    if args.format == "table":
        write_table(report, out, width=getattr(args, "width", None))
    else:
        (write_csv if args.format == "csv" else write_json)(report, out)
        line = f"payi-guard report: {summary(report)}"
        err.write(textwrap.fill(line, terminal_width(args.width), subsequent_indent="  ") + "\n")
    out.flush()
    return 0


def report_main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Clock | None = None,
) -> int:
    """Run the report as a program: ``python -m payi_guard.report LOG... [options]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        stdin: see :func:`run_report`.
        stdout: see :func:`run_report`.
        stderr: see :func:`run_report`; argparse's own messages go to ``sys.stderr``.
        clock: see :func:`run_report`.

    Returns:
        The exit status.
    """
    parser = _configure_report(
        argparse.ArgumentParser(
            prog="payi-guard report",
            description=_DESCRIPTION,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run_report(args, stdin=stdin, stdout=stdout, stderr=stderr, clock=clock)
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error, and no traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


# ----------------------------------------------------------------- check, usage, demo


def _cmd_check(args: argparse.Namespace) -> int:
    from payi_guard.config import check_file, describe

    try:
        config = check_file(args.file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.file}: ok ({describe(config)})")
    return 0


def _cmd_usage(args: argparse.Namespace) -> int:
    from payi_guard.engine import Guard

    try:
        guard = Guard.from_yaml(args.config, storage=args.storage)
        usages = guard.usage(args.user, limit_ids=args.limit_id or ())
    except (ConfigError, InvalidUserId) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PayiGuardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if "guard" in locals():
            guard.close()
    if args.format == "json":
        print(json.dumps([u.as_dict() for u in usages], indent=2))
        return 0
    if not usages:
        print(f"{args.user}: no limits apply (tracked only)")
        return 0
    header = ("limit", "scope", "unit", "used", "max", "remaining", "state", "resets_at")
    rows = [
        (
            u.name,
            u.scope,
            u.unit,
            str(u.used),
            str(u.max),
            str(u.remaining),
            u.state + ("" if u.type == "block" else " (soft)"),
            u.resets_at.strftime("%Y-%m-%d %H:%M:%SZ"),
        )
        for u in usages
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from payi_guard.demo import run_demo

    return run_demo(json_logs=args.json_logs, users=args.users, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``payi-guard`` command."""
    parser = argparse.ArgumentParser(
        prog="payi-guard",
        description="Per-user attribution and budgets for GenAI calls.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_report_parser(sub)

    check = sub.add_parser("check", help="validate a budgets YAML file")
    check.add_argument("file", help="the budgets file")
    check.set_defaults(func=_cmd_check)

    usage = sub.add_parser("usage", help="show a user's live usage of every limit")
    usage.add_argument("user", help="the user id (org:user for composite ids)")
    usage.add_argument("--config", "-c", required=True, help="the budgets file")
    usage.add_argument("--storage", help="storage URI (default: the file's `storage`)")
    usage.add_argument("--limit-id", action="append", help="also show this named limit")
    usage.add_argument("--format", choices=("table", "json"), default="table")
    usage.set_defaults(func=_cmd_usage)

    demo = sub.add_parser("demo", help="run a self-contained demo with simulated users")
    demo.add_argument("--json-logs", metavar="PATH", help="also keep the JSON logs here")
    demo.add_argument("--users", type=int, default=6, help="simulated users (default 6)")
    demo.add_argument("--quiet", action="store_true", help="no live table, just the report")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``payi-guard`` command; return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
