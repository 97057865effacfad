"""The ``payi-guard`` command: ``report``, ``check``, ``usage``, ``demo``, and more.

The operator's ``adjust``, ``reset`` and ``users`` are run by :mod:`payi_guard.operate`.

Everything it prints for people fits the terminal (80 columns unless it is wider):
tables leave out optional columns and say so, messages wrap.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from collections.abc import Sequence
from datetime import timezone
from decimal import Decimal
from typing import Any, TextIO

from payi_guard.clock import Clock, SystemClock
from payi_guard.config import GuardConfig, LimitSpec
from payi_guard.exceptions import ConfigError, InvalidUserId, PayiGuardError, UnknownModel
from payi_guard.money import decimal_usd
from payi_guard.pricing import PriceBook
from payi_guard.report.command import _Paragraphs, add_report_parser, report_main, run_report
from payi_guard.report.table import Column, fit_table, terminal_width

__all__ = [
    "REFERENCE_INPUT_TOKENS",
    "REFERENCE_MODEL",
    "REFERENCE_OUTPUT_TOKENS",
    "add_report_parser",
    "build_parser",
    "config_warnings",
    "main",
    "report_main",
    "run_report",
]


# ----------------------------------------------------------------- check, usage, demo


_GLUE = "\x00"


def _say(stream: TextIO, text: str, width: int | None = None) -> None:
    """Write ``text`` wrapped to the terminal (continuation lines indented by two).

    The first two words stay on one line: ``error: budgets.yaml:7:`` is what editors
    and terminals recognise as a place to jump to.
    """
    head, space, rest = text.partition(" ")
    glued = head + _GLUE + rest if space else text
    filled = textwrap.fill(
        glued,
        terminal_width(width),
        subsequent_indent="  ",
        break_long_words=False,
        break_on_hyphens=False,
    )
    stream.write(filled.replace(_GLUE, " ") + "\n")


def _decimal(value: Decimal | int) -> str:
    """Exact fixed-point text with thousands separators, never exponent notation."""
    text = format(value, ",f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _amount(unit: str, value: Decimal | int) -> str:
    """An amount as people read it: ``$0.000075``, ``30 req``, ``200,000 tok``."""
    if unit == "usd":
        return "$" + _decimal(value)
    return f"{_decimal(value)} {'req' if unit == 'requests' else 'tok'}"


REFERENCE_MODEL = "gpt-4o-mini"
"""The model of ``payi-guard check``'s reference call (a common, inexpensive one)."""

REFERENCE_INPUT_TOKENS = 100
"""Input tokens of the reference call: a short prompt."""

REFERENCE_OUTPUT_TOKENS = 100
"""Output tokens of the reference call: a short answer (``max_tokens: 100``)."""

_MEMORY_WARNING = (
    "storage memory:// is per process: every worker of gunicorn -w 4 or uvicorn "
    "--workers 4 keeps counters of its own, so each limit is multiplied by the number of "
    "workers, and nothing survives a restart; use sqlite:///budgets.db for the workers "
    "of one host, redis:// (or valkey://) for several hosts"
)


def _block_limits(config: GuardConfig) -> list[LimitSpec]:
    """Every hard limit the file defines or applies, once each, in file order."""
    groups: list[tuple[LimitSpec, ...]] = [
        tuple(config.limits.values()),
        config.default,
        *config.tiers.values(),
        *config.users.values(),
        *config.orgs.values(),
        config.global_limits,
    ]
    if config.anonymous.strategy != "reject":
        groups.append(config.anonymous.limits)
    seen: dict[tuple[str, int | None], LimitSpec] = {}
    for specs in groups:
        for spec in specs:
            if spec.blocks:
                seen.setdefault((spec.name, spec.line), spec)
    return sorted(seen.values(), key=lambda s: (s.line is None, s.line or 0, s.name))


def config_warnings(
    config: GuardConfig,
    *,
    model: str = REFERENCE_MODEL,
    output_tokens: int = REFERENCE_OUTPUT_TOKENS,
) -> list[str]:
    """What a valid budgets file may still get wrong, for ``payi-guard check``.

    * ``storage: memory://`` keeps counters inside each process (one budget per worker);
    * a hard limit below one *reference call* refuses every call: the reference call is
      :data:`REFERENCE_INPUT_TOKENS` input tokens and ``output_tokens`` output tokens
      (:data:`REFERENCE_OUTPUT_TOKENS`: a short prompt with ``max_tokens: 100``) to
      ``model``, priced as the guard reserves it (every input token at the highest
      input-side rate). A call that sets no ``max_tokens`` reserves the model's whole
      output cap, more still.

    Args:
        config: a validated configuration.
        model: the reference call's model.
        output_tokens: the reference call's output tokens.

    Returns:
        The warnings, each starting with ``file:line: `` when the line is known.
    """
    where = f"{config.source}: " if config.source else ""
    warnings: list[str] = []
    if config.storage.startswith("memory:"):
        warnings.append(where + _MEMORY_WARNING)
    tokens = REFERENCE_INPUT_TOKENS + output_tokens
    call = f"{model}, {REFERENCE_INPUT_TOKENS} input and {output_tokens} output tokens"
    try:
        rates = PriceBook(config.prices, config.unknown_model).rates(model)
        cost: int | None = rates.upper_bound_nano(REFERENCE_INPUT_TOKENS, output_tokens)
    except UnknownModel:
        cost = None
        warnings.append(
            f"{where}no price is known for the reference model {model!r}: money limits "
            "are not checked against a reference call (--model names another)"
        )
    for spec in _block_limits(config):
        needed = cost if spec.unit == "usd" else tokens if spec.unit == "tokens" else 1
        if needed is None or spec.max >= needed:
            continue
        at = f"{config.source}:{spec.line}: " if config.source and spec.line else where
        shown = _amount(spec.unit, spec.max_display()).replace(" tok", " tokens")
        reserved = "$" + _decimal(decimal_usd(needed)) if spec.unit == "usd" else f"{needed} tokens"
        warnings.append(
            f"{at}limit {spec.name!r} (max {shown} per {spec.per}) cannot admit one "
            f"reference call, which reserves {reserved} ({call}): it refuses every such call"
        )
    return warnings


def _cmd_check(args: argparse.Namespace) -> int:
    from payi_guard.config import check_file, describe

    try:
        config = check_file(args.file)
    except ConfigError as exc:
        _say(sys.stderr, f"error: {exc}")
        return 1
    _say(sys.stdout, f"{args.file}: ok ({describe(config)})")
    warnings = config_warnings(config, model=args.model, output_tokens=args.max_tokens)
    for warning in warnings:
        _say(sys.stderr, f"warning: {warning}")
    return 1 if warnings and args.strict else 0


_MEMORY_REFUSAL = (
    "error: {file} keeps its counters in memory://, inside each app process: this command "
    "runs in a process of its own and would show nothing spent. Read usage where the app "
    "runs (guard.usage(), the users page), or name the shared store: --storage "
    "redis://HOST:6379/0 or sqlite:///budgets.db (and --key-prefix if the app sets one). "
    "--storage memory:// shows "
    "which limits apply, with nothing spent."
)

_USAGE_COLUMNS = (
    Column("limit", align="<", shrink=8),
    Column("scope", align="<", drop=2),
    Column("used"),
    Column("max"),
    Column("remaining", drop=3),
    Column("state", align="<"),
    Column("resets", align="<", drop=1),
)


def _cmd_usage(args: argparse.Namespace) -> int:
    from payi_guard.operate import logs_to_stderr

    with logs_to_stderr():  # stdout is the usage alone (--format json stays JSON)
        return _usage(args)


def _usage(args: argparse.Namespace) -> int:
    from payi_guard.engine import Guard
    from payi_guard.ledger.sqlite import missing_sqlite_file
    from payi_guard.operate import check_tier, no_ledger_message, tier_function

    guard: Guard | None = None
    try:
        guard = Guard.from_yaml(
            args.config,
            storage=args.storage,
            key_prefix=args.key_prefix,
            clock=getattr(args, "clock", None) or SystemClock(),
            tier_of=tier_function(args),
        )
        check_tier(guard, args)
        missing = missing_sqlite_file(guard.storage_uri)
        if missing is not None:
            _say(sys.stderr, no_ledger_message(missing))
            return 2
        usages = guard.usage(args.user, limit_ids=args.limit_id or ())
        in_memory = guard.storage_uri.startswith("memory:")
    except (ConfigError, InvalidUserId, ValueError) as exc:
        _say(sys.stderr, f"error: {exc}")
        return 2
    except PayiGuardError as exc:
        _say(sys.stderr, f"error: {exc}")
        return 1
    finally:
        if guard is not None:
            guard.close()
    if in_memory:
        if args.storage is None:
            _say(sys.stderr, _MEMORY_REFUSAL.format(file=args.config))
            return 2
        _say(
            sys.stderr,
            "note: memory:// starts empty in this process: every amount used below is 0, "
            "whatever the app has spent",
        )
    if args.format == "json":
        print(json.dumps([u.as_dict() for u in usages], indent=2))
        return 0
    if not usages:
        print(f"{args.user}: no limits apply (tracked only)")
        return 0
    rows = [
        (
            u.name,
            u.scope,
            _amount(u.unit, u.used),
            _amount(u.unit, u.max),
            _amount(u.unit, u.remaining),
            u.state + ("" if u.type == "block" else " (soft)"),
            u.resets_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%MZ"),
        )
        for u in usages
    ]
    table = fit_table(_USAGE_COLUMNS, rows, terminal_width())
    for line in table.lines:
        print(line)
    if table.dropped:
        _say(sys.stdout, f"(left out to fit: {', '.join(table.dropped)}; --format json has all)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from payi_guard.demo import run_demo

    return run_demo(json_logs=args.json_logs, users=args.users, quiet=args.quiet, serve=args.serve)


def _positive_int(text: str) -> int:
    value = int(text) if text.isascii() and text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def _demo_users(text: str) -> int:
    value = _positive_int(text)
    if value < 6:
        raise argparse.ArgumentTypeError(f"{text!r} is fewer than the demo's 6 built-in users")
    return value


def _version() -> str:
    from payi_guard import __version__

    return __version__


_CHECK_DESCRIPTION = f"""\
Validate a budgets file: exit 1 naming the file, line, key and what is wrong, else
print a summary and exit 0. Warnings go to stderr: storage memory:// (one budget per
worker process), and any hard limit that cannot admit one reference call ({
    REFERENCE_INPUT_TOKENS
} input and {REFERENCE_OUTPUT_TOKENS} output tokens to {
    REFERENCE_MODEL
}, priced as the guard reserves it).
"""

_USAGE_DESCRIPTION = """\
Show one user's live usage of every limit that applies (user or tier, org, global,
and --limit-id limits), read from the store the budgets file names. A memory:// store
lives inside each app process, so this command refuses it unless --storage memory://
is given (then it only shows which limits apply).
"""

_DEMO_DESCRIPTION = """\
Run a FastAPI app, an embedded fake OpenAI and simulated users on this machine,
offline: a live table of spend against limits (redrawn in place on a terminal, plain
lines otherwise), a warning and a 429, the users page, then the report from the JSON
logs. Fits the terminal (80 columns unless it is wider).
"""


_ADJUST_DESCRIPTION = """\
Add AMOUNT to the current window of one of USER's own limits, in the store the budgets
file names: dollars for a money limit (5, -2.50: a negative amount gives budget back),
a whole number for requests and tokens. Atomic; every process sharing the store sees
it. Logged as budget_adjusted (JSON on stderr) and kept in the user's history. A
counter past its max refuses the user's calls until the window ends.
"""

_RESET_DESCRIPTION = """\
Zero the current window of one of USER's own limits (--limit), or of all of them, in
the store the budgets file names. Calls in flight keep their reservations. Logged as
budget_adjusted (JSON on stderr) and kept in the user's history.
"""

_USERS_DESCRIPTION = """\
List every user (and anonymous bucket) with counters in the store the budgets file
names, with their state and the spend of their tightest money limit in its current
window. json is an array of objects with user_id, cost_usd, state and every limit.
"""


def _store_arguments(parser: argparse.ArgumentParser, *, tier: bool) -> None:
    """``--config``, ``--storage``, ``--key-prefix`` and the tier options."""
    parser.add_argument("--config", "-c", required=True, help="the budgets file")
    parser.add_argument("--storage", metavar="URI", help="storage URI (default: the file's)")
    parser.add_argument(
        "--key-prefix",
        default="pg",
        metavar="PREFIX",
        help="the key prefix the app's Guard uses (default: pg)",
    )
    if tier:
        parser.add_argument(
            "--tier", metavar="NAME", help="the user's tier, when the app assigns tiers"
        )
    parser.add_argument(
        "--tier-of",
        metavar="MODULE:FUNCTION",
        help="the app's tier_of function, to read users with the limits of their tier",
    )


def _operator_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", metavar="TEXT", help="why (kept in the history and logs)")
    parser.add_argument("--by", metavar="WHO", help="who (default: your login name)")
    parser.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table; json has exact amounts as strings)",
    )


def _cmd_operate(args: argparse.Namespace) -> int:
    from payi_guard import operate  # the users page's directory: imported when used

    run = {"adjust": operate.run_adjust, "reset": operate.run_reset, "users": operate.run_users}
    return run[args.command](args)


_NEGATIVE_NUMBER = re.compile(r"^-(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$")


def _add_operator_parsers(sub: Any) -> None:
    """Register ``adjust``, ``reset`` and ``users``."""
    adjust = sub.add_parser(
        "adjust",
        help="add to (or give back from) a user's current window",
        description=_ADJUST_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    adjust.add_argument(
        "user", metavar="USER", help="the user id (anonymous for the anonymous bucket)"
    )
    adjust.add_argument(
        "amount", metavar="AMOUNT", help="dollars for a money limit, else a whole number"
    )
    adjust.add_argument("--limit", required=True, metavar="NAME", help="the user's limit")
    # argparse takes "-1e-9" for an option (only "-1" and "-0.5" look like numbers to
    # it): this command has no option that looks like a number, so any number is one.
    adjust._negative_number_matcher = _NEGATIVE_NUMBER
    _store_arguments(adjust, tier=True)
    _operator_arguments(adjust)
    adjust.set_defaults(func=_cmd_operate)

    reset = sub.add_parser(
        "reset",
        help="zero a user's current window(s)",
        description=_RESET_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    reset.add_argument(
        "user", metavar="USER", help="the user id (anonymous for the anonymous bucket)"
    )
    reset.add_argument("--limit", metavar="NAME", help="only this limit (default: all theirs)")
    _store_arguments(reset, tier=True)
    _operator_arguments(reset)
    reset.set_defaults(func=_cmd_operate)

    users = sub.add_parser(
        "users",
        help="list users and where each stands",
        description=_USERS_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    _store_arguments(users, tier=False)
    users.add_argument(
        "--state", choices=("ok", "warning", "exceeded"), help="only users in this state"
    )
    users.add_argument(
        "--sort",
        choices=("name", "spend", "state", "remaining"),
        default="name",
        help="order (default: name; spend, state and remaining: largest first)",
    )
    users.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default: table)",
    )
    users.add_argument(
        "--max-keys",
        type=_positive_int,
        default=200_000,
        metavar="N",
        help="the most counter keys read to find users (default: 200000)",
    )
    users.set_defaults(func=_cmd_operate)


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``payi-guard`` command."""
    parser = argparse.ArgumentParser(
        prog="payi-guard",
        description="Per-user attribution and budgets for GenAI calls.",
        formatter_class=_Paragraphs,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"payi-guard {_version()}",
        help="print the version and exit",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_report_parser(sub)

    check = sub.add_parser(
        "check",
        help="validate a budgets YAML file",
        description=_CHECK_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    check.add_argument("file", help="the budgets file")
    check.add_argument(
        "--strict", action="store_true", help="exit 1 when there is any warning (for CI)"
    )
    check.add_argument(
        "--model",
        default=REFERENCE_MODEL,
        metavar="NAME",
        help=f"the reference call's model (default: {REFERENCE_MODEL})",
    )
    check.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=REFERENCE_OUTPUT_TOKENS,
        metavar="N",
        help=f"the reference call's output tokens (default: {REFERENCE_OUTPUT_TOKENS})",
    )
    check.set_defaults(func=_cmd_check)

    usage = sub.add_parser(
        "usage",
        help="show a user's live usage of every limit",
        description=_USAGE_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    usage.add_argument("user", help="the user id (org:user for composite ids)")
    _store_arguments(usage, tier=True)
    usage.add_argument(
        "--limit-id", action="append", metavar="NAME", help="also show this named limit"
    )
    usage.add_argument(
        "--format",
        choices=("table", "json"),
        default="table",
        help="output format (default: table; json has exact amounts as strings)",
    )
    usage.set_defaults(func=_cmd_usage)

    demo = sub.add_parser(
        "demo",
        help="run a self-contained demo with simulated users",
        description=_DEMO_DESCRIPTION,
        formatter_class=_Paragraphs,
    )
    demo.add_argument("--json-logs", metavar="PATH", help="also keep the JSON logs here")
    demo.add_argument(
        "--users",
        type=_demo_users,
        default=6,
        metavar="N",
        help="simulated users: the 6 built-in ones and N - 6 more (default 6)",
    )
    demo.add_argument("--quiet", action="store_true", help="no live table, just the report")
    demo.add_argument(
        "--serve",
        action="store_true",
        help="keep the app and its users page running after the report, until Ctrl+C",
    )
    demo.set_defaults(func=_cmd_demo)
    _add_operator_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None, *, clock: Clock | None = None) -> int:
    """Run the ``payi-guard`` command; return its exit code.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        clock: the clock ``usage`` reads windows with and ``report`` counts ages back
            from (default: the system clock).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    args.clock = clock
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
