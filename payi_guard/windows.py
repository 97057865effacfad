"""Calendar windows: ``minute | hour | day | week | month`` aligned to a time zone.

A window is ``[start, end)`` in epoch seconds. Days, weeks (ISO: Monday first) and months
start at local midnight of the configured zone, minutes and hours when its clocks show
one starting, so ``resets_at`` is exact across DST changes (:func:`window_at`); the
default zone is UTC.
"""

from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["PERIODS", "Period", "Window", "WindowCache", "window_at", "zone"]

Period = Literal["minute", "hour", "day", "week", "month"]
"""A calendar period a limit is counted over."""

PERIODS: tuple[Period, ...] = ("minute", "hour", "day", "week", "month")


@dataclass(frozen=True, slots=True)
class Window:
    """One calendar window.

    Attributes:
        per: the period.
        start: the first instant, epoch seconds.
        end: the first instant of the next window, epoch seconds.
    """

    per: Period
    start: int
    end: int

    @property
    def resets_at(self) -> datetime:
        """When the window ends, as an aware UTC ``datetime``."""
        return datetime.fromtimestamp(self.end, tz=timezone.utc)

    def contains(self, now: float) -> bool:
        """True if ``now`` falls inside the window."""
        return self.start <= now < self.end


@lru_cache(maxsize=64)
def zone(name: str) -> ZoneInfo | timezone:
    """Return the time zone called ``name`` (``UTC`` is the fixed UTC zone).

    Raises:
        ValueError: the zone is unknown.
    """
    if name.upper() == "UTC":
        return timezone.utc
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}") from exc


def _local_start(per: Period, local: datetime) -> datetime:
    if per == "minute":
        return local.replace(second=0, microsecond=0)
    if per == "hour":
        return local.replace(minute=0, second=0, microsecond=0)
    midnight = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if per == "day":
        return midnight
    if per == "week":
        return midnight - timedelta(days=midnight.weekday())
    return midnight.replace(day=1)


def _local_next(per: Period, start: datetime) -> datetime:
    if per == "minute":
        return start + timedelta(minutes=1)
    if per == "hour":
        return start + timedelta(hours=1)
    if per == "day":
        return start + timedelta(days=1)
    if per == "week":
        return start + timedelta(days=7)
    if start.month == 12:
        return start.replace(year=start.year + 1, month=1)
    return start.replace(month=start.month + 1)


def _offset(instant: int, tz: ZoneInfo | timezone) -> int:
    """The offset of ``tz``'s clocks from UTC at ``instant``, in whole seconds."""
    offset = datetime.fromtimestamp(instant, tz=tz).utcoffset()
    return int(offset.total_seconds()) if offset is not None else 0


def _change(before: int, after: int, tz: ZoneInfo | timezone) -> int:
    """The first instant in ``(before, after]`` with another offset than ``before``'s.

    There must be one: ``after``'s offset differs from ``before``'s.
    """
    first = _offset(before, tz)
    while after - before > 1:
        middle = (before + after) // 2
        if _offset(middle, tz) == first:
            before = middle
        else:
            after = middle
    return after


def _instants(label: datetime, tz: ZoneInfo | timezone) -> tuple[int, ...]:
    """The instants at which the clocks of ``tz`` show ``label`` (naive local time).

    One instant, or two for a time the clocks show twice (when they go back); for a time
    they skip (when they go forward), the instant they jump, the first at which they
    show a later time.
    """
    late = int(label.replace(tzinfo=tz, fold=1).timestamp())
    early = int(label.replace(tzinfo=tz, fold=0).timestamp())
    shown = tuple(
        instant
        for instant in sorted({early, late})
        if datetime.fromtimestamp(instant, tz=tz).replace(tzinfo=None) == label
    )
    # Skipped: ``late`` (read with the offset after the jump) falls before it, ``early``
    # (the offset before) at or after it.
    return shown or (_change(late, early, tz),)


def _starts(size: int, low: int, high: int, tz: ZoneInfo | timezone) -> list[int]:
    """The instants in ``[low, high)`` at which ``tz``'s clocks start a minute or hour.

    Those at which the clocks show one starting (``hh:00:00``), and each jump forward
    into a later one. Within a stretch of one offset they are ``size`` seconds apart; a
    range of a few hours holds at most one change of offset.
    """
    found: list[int] = []
    at = low
    while at < high:
        offset = _offset(at, tz)
        change = _change(at, high, tz) if _offset(high, tz) != offset else high
        found.extend(range(at + (-(at + offset)) % size, change, size))
        shown = change + _offset(change, tz) if change < high else 0
        if shown % size and shown // size > (change - 1 + offset) // size:
            # The clocks jump forward to a time within a later minute or hour.
            found.append(change)
        at = change
    return found


def window_at(per: Period, now: float, tz: str = "UTC") -> Window:
    """Return the window of ``per`` that contains ``now`` in zone ``tz``.

    Minutes and hours: a window starts at an instant the zone's clocks show the start
    of one (``hh:00:00`` for an hour), or jump forward into a later one, and ends at the
    next such instant: when the clocks go back to ``01:00``, a new hour starts, though
    ``01:00`` was shown an hour before. Days, weeks and months: from the first instant
    of the local date that starts one to the first of the next (a day is 23 or 25 hours
    long across a DST change). Windows tile time, and every process finds the same
    window for the same instant.

    Raises:
        ValueError: unknown period or zone.
    """
    if per not in PERIODS:
        raise ValueError(f"unknown period {per!r}; expected one of {', '.join(PERIODS)}")
    tzinfo = zone(tz)
    if tzinfo is timezone.utc and per in ("minute", "hour", "day"):
        size = {"minute": 60, "hour": 3600, "day": 86400}[per]
        start = int(now // size * size)
        return Window(per, start, start + size)
    if tzinfo is timezone.utc and per == "week":
        # 1970-01-05 was a Monday.
        monday = 4 * 86400
        start = int((now - monday) // 604800 * 604800 + monday)
        return Window(per, start, start + 604800)
    if per in ("minute", "hour"):
        size = 60 if per == "minute" else 3600
        # A window is at most its size plus the largest jump back (an hour) long.
        second = math.floor(now)
        starts = _starts(size, second - size - 3600, second + size + 3600 + 1, tzinfo)
        begun = bisect.bisect_right(starts, second) - 1
        return Window(per, starts[begun], starts[begun + 1])
    local = datetime.fromtimestamp(now, tz=tzinfo).replace(tzinfo=None, fold=0)
    label = _local_start(per, local)
    start = _instants(label, tzinfo)[0]
    following = _instants(_local_next(per, label), tzinfo)
    end = following[0]
    if end <= now:
        # The clocks went back over the next date's start (no zone does so today).
        end = following[-1]
    return Window(per, start, end)


class WindowCache:
    """Remembers the current window per (period, zone) until it ends (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: dict[tuple[str, str], Window] = {}

    def get(self, per: Period, tz: str, now: float) -> Window:
        """Return the window containing ``now``, computing it only when it changed."""
        key = (per, tz)
        window = self._current.get(key)
        if window is not None and window.contains(now):
            return window
        window = window_at(per, now, tz)
        with self._lock:
            self._current[key] = window
        return window
