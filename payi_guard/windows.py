"""Calendar windows: ``minute | hour | day | week | month`` aligned to a time zone.

A window is ``[start, end)`` in epoch seconds. Days, weeks (ISO: Monday first) and months
start at local midnight of the configured zone, so ``resets_at`` is exact across DST
changes; the default zone is UTC.
"""

from __future__ import annotations

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


def _to_epoch(local_naive: datetime, tz: ZoneInfo | timezone) -> int:
    # fold=0 picks the earlier of two ambiguous instants; a skipped local time (DST gap)
    # resolves to the instant just after the gap, both of which zoneinfo handles.
    return int(local_naive.replace(tzinfo=tz).timestamp())


def window_at(per: Period, now: float, tz: str = "UTC") -> Window:
    """Return the window of ``per`` that contains ``now`` in zone ``tz``.

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
    local = datetime.fromtimestamp(now, tz=tzinfo).replace(tzinfo=None)
    start_local = _local_start(per, local)
    end_local = _local_next(per, start_local)
    return Window(per, _to_epoch(start_local, tzinfo), _to_epoch(end_local, tzinfo))


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
