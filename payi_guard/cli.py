"""The ``payi-guard`` command: ``report``, ``check``, ``usage`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from payi_guard.exceptions import ConfigError, InvalidUserId, PayiGuardError

__all__ = ["build_parser", "main"]


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

    from payi_guard.report import add_report_parser

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
