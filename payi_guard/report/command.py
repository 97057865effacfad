"""``payi-guard report``: its argument parser and the command behind it.

:mod:`payi_guard.cli` puts it under ``payi-guard``; ``python -m payi_guard.report`` runs
it alone (:func:`report_main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, TextIO

from payi_guard.clock import Clock, SystemClock
from payi_guard.config.summary import redact_uri
from payi_guard.exceptions import ConfigError, StorageError
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
from payi_guard.report.store import store_report
from payi_guard.report.table import MIN_WIDTH, terminal_width

__all__ = ["add_report_parser", "report_main", "run_report"]


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


class _Paragraphs(argparse.HelpFormatter):
    """Help text wrapped to the terminal, paragraph by paragraph (blank lines kept)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [" ".join(p.split()) for p in text.strip().split("\n\n")]
        return "\n\n".join(
            textwrap.fill(p, width, initial_indent=indent, subsequent_indent=indent)
            for p in paragraphs
        )


def _width_arg(text: str) -> int:
    try:
        value = int(text) if text.isascii() else 0
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of columns")
    if value < MIN_WIDTH:
        raise argparse.ArgumentTypeError(f"{text}: a report needs at least {MIN_WIDTH} columns")
    return value


_DESCRIPTION = """\
Per-user spend from payi_guard's JSON logs (genai_call, budget_warning, budget_exceeded,
budget_overrun and budget_adjusted events). Costs are summed exactly; operators'
adjustments are shown apart from what calls cost. Lines that are not JSON are skipped
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


def _days_arg(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if not 1 <= value <= 3660:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days from 1 to 3660")
    return value


def _configure_report(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "logs", nargs="*", metavar="LOG", help="log files (gzip is detected), or - for stdin"
    )
    store = parser.add_argument_group(
        "from the store (no log files)",
        "--from-store reads the usage analytics the store keeps per user and day "
        "(analytics_days in the budgets file) instead of logs.",
    )
    store.add_argument(
        "--from-store", action="store_true", help="report from the store's analytics"
    )
    store.add_argument("--config", "-c", metavar="FILE", help="the budgets file (its storage)")
    store.add_argument("--storage", metavar="URI", help="storage URI (default: the file's)")
    store.add_argument(
        "--key-prefix", default="pg", metavar="PREFIX", help="the app's key prefix (default: pg)"
    )
    store.add_argument(
        "--days", type=_days_arg, metavar="N", help="the last N UTC days, today included (30)"
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
        help="the table's width (default: $COLUMNS, else the terminal's, else 80; "
        "at least 40); columns that do not fit are left out and named",
    )
    parser.set_defaults(func=run_report, report_parser=parser)
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
        formatter_class=_Paragraphs,
    )
    return _configure_report(parser)


def _resolve(bound: datetime | timedelta | None, now: datetime) -> datetime | None:
    if isinstance(bound, timedelta):
        try:
            return now - bound
        except OverflowError:  # an age reaching before year 1: every line is after it
            return datetime.min.replace(tzinfo=timezone.utc)
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
    clock = clock or getattr(args, "clock", None) or SystemClock()
    if getattr(args, "from_store", False) or getattr(args, "days", None) is not None:
        return _run_from_store(args, out, err, clock)
    if not args.logs:
        parser = getattr(args, "report_parser", None)
        if parser is not None:  # usage and exit status 2, as for any bad argument
            parser.error("name LOG files (or - for stdin), or use --from-store --config FILE")
        err.write(
            "payi-guard report: error: name LOG files (or - for stdin), "
            "or use --from-store --config FILE\n"
        )
        return 2
    now = datetime.fromtimestamp(clock.now(), tz=timezone.utc)
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
    cut: UnreadableLog | None = None
    try:
        read_logs(args.logs, builder, stdin)
    except UnreadableLog as exc:
        if not exc.partial or not builder.lines:
            err.write(f"payi-guard report: error: {exc}\n")
            return 2
        cut = exc  # a log that failed part way: report what was read, and say so
    report = builder.build(sort=args.sort, top=args.top)
    if args.format == "table":
        write_table(report, out, width=getattr(args, "width", None))
    else:
        (write_csv if args.format == "csv" else write_json)(report, out)
        line = f"payi-guard report: {summary(report)}"
        err.write(textwrap.fill(line, terminal_width(args.width), subsequent_indent="  ") + "\n")
    out.flush()
    if cut is not None:
        line = (
            f"payi-guard report: error: {cut}; the report covers the "
            f"{report.lines:,} {'line' if report.lines == 1 else 'lines'} read before it"
        )
        err.write(textwrap.fill(line, terminal_width(args.width), subsequent_indent="  ") + "\n")
        return 1
    return 0


def _run_from_store(args: argparse.Namespace, out: TextIO, err: TextIO, clock: Clock) -> int:
    """``--from-store``: the report of the store's analytics.

    Exit status 2 for bad arguments or config, 1 when the store cannot be read.
    """

    def fail(message: str, status: int = 2) -> int:
        err.write(textwrap.fill(f"payi-guard report: error: {message}", terminal_width(None)))
        err.write("\n")
        return status

    if not getattr(args, "from_store", False):
        return fail("--days goes with --from-store")
    if args.logs:
        return fail("give LOG files or --from-store, not both")
    if args.since is not None or args.until is not None:
        return fail("--since and --until read logs; with --from-store use --days N")
    if not args.config:
        return fail("--from-store needs --config FILE (the budgets file naming the store)")
    from payi_guard.engine import Guard
    from payi_guard.ledger.sqlite import missing_sqlite_file
    from payi_guard.operate import no_ledger_message

    try:
        guard = Guard.from_yaml(args.config, storage=args.storage, key_prefix=args.key_prefix)
    except (ConfigError, OSError, ValueError) as exc:
        return fail(str(exc))
    try:
        if guard.storage_uri.startswith("memory:"):
            return fail(
                f"{args.config} keeps budgets in memory://, inside each app process: there "
                "is no shared store to read. Name it with --storage (redis://... or "
                "sqlite:///...)."
            )
        missing = missing_sqlite_file(guard.storage_uri)
        if missing is not None:
            return fail(no_ledger_message(missing).removeprefix("error: "))
        report = store_report(
            guard.ledger,
            guard.key_prefix,
            now=clock.now(),
            days=args.days or 30,
            by=args.by,
            users=tuple(args.user),
            orgs=tuple(args.org),
            models=tuple(args.model),
            sort=args.sort,
            top=args.top,
        )
    except StorageError as exc:
        return fail(f"cannot read the store {redact_uri(guard.storage_uri)}: {exc}", 1)
    finally:
        guard.close()
    if args.format == "table":
        write_table(report, out, width=getattr(args, "width", None))
    else:
        (write_csv if args.format == "csv" else write_json)(report, out)
        line = (
            f"payi-guard report: {len(report.rows)} rows from the store's analytics, "
            f"the last {args.days or 30} days"
        )
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
            formatter_class=_Paragraphs,
        )
    )
    try:
        args = parser.parse_args(argv)
        if not args.logs and not args.from_store and args.days is None:
            parser.error("name LOG files (or - for stdin), or use --from-store --config FILE")
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
