"""The operator's commands: ``payi-guard adjust``, ``reset`` and ``users``.

They open the store the budgets file names (or ``--storage``) with the app's key prefix
(``--key-prefix``, ``pg`` unless the app's ``Guard`` sets another) and act on it as the
app's own guard would: an adjustment made here is atomic, logged as ``budget_adjusted``
(one JSON line per limit on this command's stderr, ready for ``payi-guard report``) and
kept in the user's history,
and every process sharing the store sees it (a process that had the user as spent in its
local cache within ``exhausted_cache_ttl``, 5 seconds by default). A ``memory://`` store
lives inside each app process, so these commands refuse it: adjust such an app from
inside it (``guard.adjust()``, the users page).

A user's tier is the app's business: ``--tier NAME`` names it for ``adjust`` and
``reset`` (so that the tier's limits are found by name), ``--tier-of MODULE:FUNCTION``
imports the app's own ``tier_of`` for every command. Without either, users not listed
under ``users:`` are read with ``default``'s limits (counters are shared by every limit
of one unit and period, so ``adjust --limit daily`` moves the same day's money counter a
tier's inline limit would).

The argument parsers are in :mod:`payi_guard.cli`; these are the commands behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import getpass
import importlib
import json
import re
import sys
import textwrap
from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Final, TextIO

import structlog

from payi_guard.admin.directory import (
    SORTS,
    STATES,
    UserDirectory,
    UserSummary,
    order_summaries,
    read_summaries,
)
from payi_guard.clock import SystemClock
from payi_guard.engine import Guard
from payi_guard.engine.tiers import TierFunction
from payi_guard.exceptions import ConfigError, InvalidUserId, PayiGuardError
from payi_guard.ledger.sqlite import missing_sqlite_file
from payi_guard.money import decimal_text
from payi_guard.report.table import Column, fit_table, printable, terminal_width
from payi_guard.usage import LimitUsage

__all__ = ["SORTS", "STATES", "run_adjust", "run_reset", "run_users"]

_MEMORY = (
    "error: {file} keeps its counters in memory://, inside each app process: a command "
    "in a process of its own cannot see or change them. Adjust such an app from inside it "
    "(guard.adjust(), guard.reset(), the users page), or name the shared store: --storage "
    "redis://HOST:6379/0 or sqlite:///budgets.db (and --key-prefix if the app sets one)."
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class _Refused(Exception):
    """A command-line mistake: printed as ``error: ...``, exit status 2."""


def _say(stream: TextIO, text: str) -> None:
    from payi_guard.cli import _say as say  # one wrapper for every command's messages

    say(stream, text)


def tier_function(args: argparse.Namespace) -> TierFunction | None:
    """The tier function ``--tier`` or ``--tier-of`` names, if either is given.

    Raises:
        ValueError: both are given, or ``--tier-of`` names no importable function.
    """
    try:
        return _tier_of(args)
    except _Refused as exc:
        raise ValueError(str(exc)) from None


def _tier_of(args: argparse.Namespace) -> TierFunction | None:
    tier: str | None = getattr(args, "tier", None)
    spec: str | None = getattr(args, "tier_of", None)
    if tier is not None and spec is not None:
        raise _Refused("give --tier or --tier-of, not both")
    if tier is not None:
        return lambda user_id: tier
    if spec is None:
        return None
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise _Refused(f"--tier-of takes MODULE:FUNCTION (myapp.billing:tier_of), not {spec!r}")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise _Refused(f"--tier-of {spec}: {exc}") from None
    if not callable(function):
        raise _Refused(f"--tier-of {spec} is not a function")
    found: TierFunction = function
    return found


def check_tier(guard: Guard, args: argparse.Namespace) -> None:
    """Refuse a ``--tier`` the budgets file does not define (a typo would read ``default``).

    Raises:
        ValueError: ``--tier`` names no tier under ``tiers:``.
    """
    tier: str | None = getattr(args, "tier", None)
    tiers = guard.config.tiers
    if tier is not None and tier not in tiers:
        defined = ", ".join(sorted(tiers)) if tiers else "none"
        raise ValueError(f"--tier {tier}: no such tier under `tiers:` in {args.config} ({defined})")


def _open(args: argparse.Namespace) -> Guard:
    """The guard of the budgets file on the shared store, or a refusal."""
    guard = Guard.from_yaml(
        args.config,
        storage=args.storage,
        key_prefix=args.key_prefix,
        clock=getattr(args, "clock", None) or SystemClock(),
        tier_of=_tier_of(args),
    )
    try:
        check_tier(guard, args)
    except ValueError:
        guard.close()
        raise
    if guard.storage_uri.startswith("memory:"):
        guard.close()
        raise _Refused(_MEMORY.format(file=args.config))
    missing = missing_sqlite_file(guard.storage_uri)
    if missing is not None:
        guard.close()
        raise _Refused(no_ledger_message(missing))
    return guard


def no_ledger_message(path: object) -> str:
    """Why a command refuses a ``sqlite://`` store whose file does not exist."""
    return (
        f"error: there is no ledger at {path}: an app creates it at its first call. "
        "Check the budgets file's storage, or --storage (a relative sqlite:/// path is "
        "relative to the budgets file's folder)."
    )


@contextlib.contextmanager
def logs_to_stderr() -> Iterator[None]:
    """The library's events as JSON lines on stderr while a command runs.

    stdout stays the command's own output; the structlog configuration is restored after.
    """
    from payi_guard.log import configure_json

    saved = structlog.get_config()
    configure_json(sys.stderr)
    try:
        yield
    finally:
        structlog.configure(**saved)


def _operator(args: argparse.Namespace) -> str | None:
    """``--by``, else the login name running the command (``None`` if unknown)."""
    if args.by is not None:
        return str(args.by)
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return None
    return login if login.isprintable() and 0 < len(login) <= 200 else None


def _run(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    try:
        with logs_to_stderr():
            return command(args)
    except _Refused as exc:
        _say(sys.stderr, str(exc) if str(exc).startswith("error:") else f"error: {exc}")
        return 2
    except (ConfigError, InvalidUserId, ValueError, TypeError) as exc:
        _say(sys.stderr, f"error: {exc}")
        return 2
    except PayiGuardError as exc:  # the store failed (the message says if it may have applied)
        _say(sys.stderr, f"error: {exc}")
        return 1


def _money(unit: str, value: Decimal | int, *, sign: bool = False) -> str:
    text = format(value, ",f") if isinstance(value, Decimal) else f"{value:,}"
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    negative = text.startswith("-")
    text = text.lstrip("-") or "0"
    prefix = "-" if negative else ("+" if sign and value else "")
    if unit == "usd":
        return f"{prefix}${text}"
    return f"{prefix}{text} {'req' if unit == 'requests' else 'tok'}"


_CHANGED = (
    Column("limit", align="<", shrink=8),
    Column("change"),
    Column("used"),
    Column("max", drop=2),
    Column("remaining", drop=1),
    Column("state", align="<"),
)


def _print_changed(
    args: argparse.Namespace, usages: Sequence[LimitUsage], op: str, by: str | None
) -> None:
    if args.format == "json":
        document = {
            "user_id": args.user,
            "op": op,
            "reason": args.reason,
            "by": by,
            "limits": [u.as_dict() for u in usages],
        }
        print(json.dumps(document, indent=2))
        return
    if not usages:
        _print_fitted(f"{printable(args.user)}: no limits of their own: nothing to {op}")
        return
    changes = {u.name: _change(args, u, op) for u in usages}
    rows = [
        (
            u.name,
            changes[u.name],
            _money(u.unit, u.used),
            _money(u.unit, u.max),
            _money(u.unit, u.remaining),
            u.state,
        )
        for u in usages
    ]
    _print_fitted(f"{printable(args.user)}: {'adjusted' if op == 'adjust' else 'reset'}")
    for line in fit_table(_CHANGED, rows, terminal_width()).lines:
        print(line)


def _print_fitted(text: str) -> None:
    """Print ``text`` within the terminal's width (a long user id is broken across lines)."""
    print(
        textwrap.fill(
            text,
            terminal_width(),
            subsequent_indent="  ",
            break_long_words=True,
            break_on_hyphens=False,
        )
    )


def _change(args: argparse.Namespace, usage: LimitUsage, op: str) -> str:
    if op == "adjust":
        amount: Decimal | int = Decimal(args.amount) if usage.unit == "usd" else int(args.amount)
        return _money(usage.unit, amount, sign=True)
    return "reset"


def _adjust(args: argparse.Namespace) -> int:
    guard, by = _open(args), _operator(args)
    try:
        usage = guard.adjust(args.user, args.limit, args.amount, args.reason, by=by)
    finally:
        guard.close()
    _print_changed(args, [usage], "adjust", by)
    return 0


def _reset(args: argparse.Namespace) -> int:
    guard, by = _open(args), _operator(args)
    try:
        usages = guard.reset(args.user, args.limit, reason=args.reason, by=by)
    finally:
        guard.close()
    _print_changed(args, usages, "reset", by)
    return 0


def run_adjust(args: argparse.Namespace) -> int:
    """``payi-guard adjust USER AMOUNT --limit NAME --config FILE``: add to a window.

    Returns:
        0 done; 2 a bad argument, file, user, limit or amount, or a ``memory://`` store;
        1 the store failed: nothing was changed, unless the message says the store did
        not answer in time (then the user's history tells).
    """
    return _run(args, _adjust)


def run_reset(args: argparse.Namespace) -> int:
    """``payi-guard reset USER [--limit NAME] --config FILE``: zero the current window(s).

    Returns:
        As :func:`run_adjust`.
    """
    return _run(args, _reset)


# -- users ---------------------------------------------------------------------------------

_USERS = (
    Column("user", align="<", shrink=12),
    Column("state", align="<"),
    Column("spend"),
    Column("max", drop=2),
    Column("remaining", drop=1),
    Column("limit", align="<", drop=3, shrink=6),
)
_CSV_FIELDS = (
    "user_id",
    "state",
    "blocked",
    "cost_usd",
    "max_usd",
    "remaining_usd",
    "limit",
)


def _record(summary: UserSummary) -> dict[str, object]:
    """A user as the JSON and CSV forms show them.

    ``cost_usd`` is the spend of the user's tightest own money limit in its current
    window (``None`` without a money limit).
    """
    spend = summary.spend
    return {
        "user_id": summary.user_id,
        "kind": "anonymous" if summary.anonymous else "user",
        "state": summary.state,
        "blocked": summary.blocked,
        "cost_usd": None if spend is None else decimal_text(spend.used),
        "max_usd": None if spend is None else decimal_text(spend.max),
        "remaining_usd": None if spend is None else decimal_text(spend.remaining),
        "limit": None if spend is None else spend.name,
        "resets_at": None if spend is None else spend.resets_at.isoformat(),
        "limits": [limit.as_dict() for limit in summary.limits],
    }


_AMOUNT: Final = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
"""A decimal amount as :func:`~payi_guard.money.decimal_text` writes it."""


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = printable(str(value))
    if _AMOUNT.fullmatch(text):
        return text  # a number (a credit is negative), not a formula
    return "'" + text if text.startswith(_FORMULA_START) else text


async def _summaries(args: argparse.Namespace) -> tuple[list[UserSummary], bool]:
    guard = _open(args)
    try:
        directory = await UserDirectory(guard, max_keys=args.max_keys, ttl=0).get()
        summaries = await read_summaries(guard, directory.user_ids)
    finally:
        await guard.aclose()
    return summaries, directory.truncated


def _users(args: argparse.Namespace) -> int:
    summaries, truncated = asyncio.run(_summaries(args))
    if args.state is not None:
        summaries = [s for s in summaries if s.state == args.state]
    summaries = order_summaries(summaries, args.sort, descending=args.sort != "name")
    if truncated:
        _say(
            sys.stderr,
            f"note: the store holds more than --max-keys {args.max_keys} counters: some "
            "users are not listed",
        )
    if args.format == "json":
        print(json.dumps([_record(s) for s in summaries], indent=2))
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(_CSV_FIELDS)
        for summary in summaries:
            record = _record(summary)
            writer.writerow([_csv_cell(record[name]) for name in _CSV_FIELDS])
    else:
        _users_table(summaries)
    return 0


def _users_table(summaries: Sequence[UserSummary]) -> None:
    if not summaries:
        print("no users")
        return
    rows = []
    for summary in summaries:
        spend = summary.spend
        state = summary.state + (" (refused)" if summary.blocked else "")
        if spend is None:
            rows.append((printable(summary.user_id), state, "-", "-", "-", "-"))
            continue
        rows.append(
            (
                printable(summary.user_id),
                state,
                _money("usd", Decimal(spend.used)),
                _money("usd", Decimal(spend.max)),
                _money("usd", Decimal(spend.remaining)),
                spend.name,
            )
        )
    table = fit_table(_USERS, rows, terminal_width())
    for line in table.lines:
        print(line)
    if table.dropped:
        _say(sys.stdout, f"(left out to fit: {', '.join(table.dropped)}; --format json has all)")


def run_users(args: argparse.Namespace) -> int:
    """``payi-guard users --config FILE``: every user with counters, and where they stand.

    Returns:
        0 done; 2 a bad argument or file, or a ``memory://`` store; 1 the store failed.
    """
    return _run(args, _users)
