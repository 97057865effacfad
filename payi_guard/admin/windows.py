"""Each limit's current window, day by day, from the store's analytics.

A limit counted over whole UTC days (``day``, ``week`` or ``month`` in UTC) is shown with
what its owner's settled calls added on each day of the window so far: spend for a money
limit, calls for a request limit, input plus output tokens for a token limit. The
analytics are kept per user and per org, so a global or ``limit_ids`` counter has no such
history, nor has a minute or hour window, or one counted in another time zone (its days
do not line up with the analytics' UTC days). The figures are settled calls only:
reservations in flight and operators' adjustments move the counter, not the analytics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal

from payi_guard.engine import Guard
from payi_guard.ledger.analytics import DayUsage, History, aread_history
from payi_guard.money import decimal_text, decimal_usd
from payi_guard.usage import LimitUsage

__all__ = ["LimitWindow", "aread_windows", "window_dict"]

_DAY = 86_400
_MAX_DAYS = 366


@dataclass(frozen=True, slots=True)
class LimitWindow:
    """One limit and, when it has one, its window's usage per UTC day (oldest first)."""

    limit: LimitUsage
    days: tuple[tuple[str, Decimal | int], ...] | None


def _whole_days(limit: LimitUsage) -> bool:
    start = limit.window_start
    if start is None or limit.scope not in ("user", "org"):
        return False
    begin = int(start.timestamp())
    return begin % _DAY == 0 and int(limit.resets_at.timestamp()) - begin >= _DAY


def _amount(unit: str, day: DayUsage) -> Decimal | int:
    if unit == "usd":
        return decimal_usd(day.cost)
    if unit == "requests":
        return day.calls
    return day.input_tokens + day.output_tokens


def _days_of(limit: LimitUsage, history: History) -> tuple[tuple[str, Decimal | int], ...]:
    assert limit.window_start is not None
    first = limit.window_start.astimezone(timezone.utc).date().isoformat()
    return tuple((d.date, _amount(limit.unit, d)) for d in history.days if d.date >= first)


async def aread_windows(
    guard: Guard,
    limits: Sequence[LimitUsage],
    known: Mapping[tuple[str, str], History] | None = None,
) -> list[LimitWindow]:
    """Each of ``limits`` with its window's days, read from ``guard``'s store.

    One history read per owner (the user, each org) whose limits have whole-day windows,
    unless ``known`` (histories already read, by ``(scope, owner)``, ending today) holds
    one that reaches back far enough.

    Raises:
        StorageError: the store could not be read.
    """
    now = guard.clock.now()
    today = datetime.fromtimestamp(now, tz=timezone.utc).date()
    needed: dict[tuple[str, str], int] = {}
    for limit in limits:
        if _whole_days(limit):
            assert limit.window_start is not None
            span = (today - limit.window_start.astimezone(timezone.utc).date()).days + 1
            whose = (str(limit.scope), limit.counter)
            needed[whose] = min(max(needed.get(whose, 1), span), _MAX_DAYS)
    histories: dict[tuple[str, str], History] = {}
    for (scope, owner), span in needed.items():
        have = (known or {}).get((scope, owner))
        if have is not None and len(have.days) >= span:
            histories[scope, owner] = have
            continue
        histories[scope, owner] = await aread_history(
            guard.async_ledger,
            guard.key_prefix,
            "anonymous" if scope == "anonymous" else "user" if scope == "user" else "org",
            owner,
            days=span,
            now=now,
        )
    out = []
    for limit in limits:
        history = histories.get((str(limit.scope), limit.counter))
        days = _days_of(limit, history) if history is not None and _whole_days(limit) else None
        out.append(LimitWindow(limit, days))
    return out


def window_dict(window: LimitWindow) -> dict[str, object]:
    """The JSON form of one limit's window.

    The limit's own fields, ``window_start``, and ``days`` as ``{"date", "used"}`` with
    exact decimal text (``null`` when the window has no day-by-day history).
    """
    limit = window.limit
    start = limit.window_start
    return {
        **limit.as_dict(),
        "window_start": None if start is None else start.isoformat(),
        "days": None
        if window.days is None
        else [{"date": date, "used": decimal_text(value)} for date, value in window.days],
    }
