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


# -- DST changes, zone by zone ------------------------------------------------------------

_ZONES = (
    "America/New_York",  # back an hour at 02:00 (01:00-02:00 shown twice)
    "Europe/Paris",
    "Australia/Lord_Howe",  # half-hour changes: 02:00 -> 02:30, 02:00 -> 01:30
    "America/Havana",  # back an hour at 01:00: midnight shown twice
    "America/Santiago",  # forward at midnight: midnight skipped
    "Pacific/Chatham",  # +12:45 / +13:45
    "Asia/Kolkata",  # +05:30, no changes
)


def _changes(name: str) -> list[int]:
    """The instants ``name`` changes its offset in 2026 and 2027."""
    tz = ZoneInfo(name)
    found = []
    first = int(datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp())
    for hour in range(2 * 366 * 24):
        before, after = first + hour * 3600, first + (hour + 1) * 3600
        if _offset(before, tz) != _offset(after, tz):
            while after - before > 1:
                middle = (before + after) // 2
                if _offset(middle, tz) == _offset(before, tz):
                    before = middle
                else:
                    after = middle
            found.append(after)
    return found


def _offset(instant: float, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(instant, tz=tz).utcoffset()


_CHANGES = {name: _changes(name) for name in _ZONES}


def _local(instant: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(instant, tz=tz).replace(tzinfo=None)


def _starts_an_hour(instant: int, tz: ZoneInfo) -> bool:
    """The clocks show ``hh:00`` at ``instant``, or jump forward into a later hour."""
    shown, before = _local(instant, tz), _local(instant - 60, tz)
    return shown.minute == 0 or shown.replace(minute=0) > before.replace(minute=0)


@pytest.mark.parametrize(
    "change", [(name, at) for name, changes in _CHANGES.items() for at in changes]
)
def test_hours_start_whenever_the_clocks_show_one_starting(change: tuple[str, int]) -> None:
    name, at = change
    tz = ZoneInfo(name)
    # Every zone here changes on a whole minute, so an hour can only start on one.
    around = range(at - 4 * 3600, at + 4 * 3600, 60)
    starts = [t for t in around if _starts_an_hour(t, tz)]
    for minute in range(at - 3 * 3600, at + 3 * 3600, 60):
        for now in (minute, minute + 59.5):
            window = window_at("hour", now, name)
            begun = max(t for t in starts if t <= now)
            assert (window.start, window.end) == (begun, starts[starts.index(begun) + 1]), now
            assert window_at("minute", now, name) == window_at("minute", now, "UTC")


@given(
    st.sampled_from([(name, at) for name, changes in _CHANGES.items() for at in changes]),
    st.floats(min_value=-3 * 86400, max_value=3 * 86400, allow_nan=False),
    st.sampled_from(PERIODS),
)
def test_every_process_finds_the_same_window_across_a_change(
    change: tuple[str, int], offset: float, per: Period
) -> None:
    name, at = change
    now = at + offset
    window = window_at(per, now, name)
    assert window.start <= now < window.end
    assert window_at(per, window.start, name) == window
    assert window_at(per, window.end - 1, name) == window
    assert window_at(per, window.end, name).start == window.end
    if per in ("day", "week", "month"):
        tz = ZoneInfo(name)
        date = _local(now, tz).date()
        assert _local(window.start, tz).date() <= date < _local(window.end, tz).date()
        assert _local(window.start - 1, tz).date() < _local(window.start, tz).date()


def test_the_hour_shown_twice_is_two_windows_in_every_process() -> None:
    name = "America/New_York"  # 2026-11-01: 01:00 EDT (05:00Z), then 01:00 EST (06:00Z)
    first = datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc).timestamp()
    second = datetime(2026, 11, 1, 6, 30, 5, tzinfo=timezone.utc).timestamp()
    hour, again = window_at("hour", first, name), window_at("hour", second, name)
    assert (_utc(hour.start).hour, _utc(hour.end).hour) == (5, 6)
    assert (_utc(again.start).hour, _utc(again.end).hour) == (6, 7)
    minute = window_at("minute", second, name)
    assert minute.end - minute.start == 60
    assert minute.start <= second < minute.end
    day = window_at("day", second, name)
    assert day.end - day.start == 25 * 3600
    havana = window_at(
        "day", datetime(2026, 11, 1, 5, 30, tzinfo=timezone.utc).timestamp(), "America/Havana"
    )
    assert havana.end - havana.start == 25 * 3600
