"""Calendar windows: aligned to the period and the zone, exact across DST changes."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payi_guard.windows import PERIODS, Period, WindowCache, window_at

NOON = datetime(2026, 11, 27, 12, 34, 56, tzinfo=timezone.utc).timestamp()  # a Friday


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


@pytest.mark.parametrize(
    ("per", "start", "end"),
    [
        ("minute", datetime(2026, 11, 27, 12, 34), datetime(2026, 11, 27, 12, 35)),
        ("hour", datetime(2026, 11, 27, 12), datetime(2026, 11, 27, 13)),
        ("day", datetime(2026, 11, 27), datetime(2026, 11, 28)),
        ("week", datetime(2026, 11, 23), datetime(2026, 11, 30)),  # ISO weeks start Monday
        ("month", datetime(2026, 11, 1), datetime(2026, 12, 1)),
    ],
)
def test_utc_windows(per: Period, start: datetime, end: datetime) -> None:
    window = window_at(per, NOON)
    assert _utc(window.start) == start.replace(tzinfo=timezone.utc)
    assert _utc(window.end) == end.replace(tzinfo=timezone.utc)
    assert window.resets_at == end.replace(tzinfo=timezone.utc)
    assert window.per == per
    assert window.contains(NOON)
    assert window.contains(window.start)
    assert not window.contains(window.end)


def test_december_rolls_into_the_next_year() -> None:
    window = window_at("month", datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp())
    assert window.resets_at == datetime(2027, 1, 1, tzinfo=timezone.utc)


def test_a_window_in_a_zone_starts_at_local_midnight() -> None:
    paris = ZoneInfo("Europe/Paris")
    window = window_at("day", NOON, "Europe/Paris")
    assert datetime.fromtimestamp(window.start, tz=paris) == datetime(2026, 11, 27, tzinfo=paris)
    assert window.end - window.start == 86400


def test_days_across_dst_changes_are_23_and_25_hours_long() -> None:
    zone = "Europe/Paris"
    spring = datetime(2026, 3, 29, 12, tzinfo=ZoneInfo(zone)).timestamp()
    autumn = datetime(2026, 10, 25, 12, tzinfo=ZoneInfo(zone)).timestamp()
    short, long = window_at("day", spring, zone), window_at("day", autumn, zone)
    assert short.end - short.start == 23 * 3600
    assert long.end - long.start == 25 * 3600
    assert long.resets_at == datetime(2026, 10, 26, tzinfo=ZoneInfo(zone))


def test_utc_by_name_is_the_fixed_zone() -> None:
    for per in PERIODS:
        assert window_at(per, NOON, "UTC") == window_at(per, NOON)


@given(
    st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False),
    st.sampled_from(PERIODS),
    st.sampled_from(["UTC", "Europe/Paris", "America/New_York", "Asia/Kolkata"]),
)
def test_consecutive_windows_tile_time(now: float, per: Period, zone: str) -> None:
    window = window_at(per, now, zone)
    assert window.contains(now)
    following = window_at(per, window.end, zone)
    assert following.start == window.end
    assert following.end > following.start


def test_unknown_period_or_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown period"):
        window_at("year", NOON)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown time zone"):
        window_at("day", NOON, "Mars/Olympus_Mons")


def test_the_cache_keeps_a_window_until_it_ends() -> None:
    cache = WindowCache()
    first = cache.get("hour", "UTC", NOON)
    assert cache.get("hour", "UTC", NOON + 60) is first
    later = cache.get("hour", "UTC", first.end)
    assert later is not first
    assert later.start == first.end
    assert _utc(later.start) - _utc(first.start) == timedelta(hours=1)
    assert cache.get("hour", "Europe/Paris", NOON) is not later
