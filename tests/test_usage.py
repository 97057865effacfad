"""LimitUsage: the JSON form people read."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from decimal import Decimal

from payi_guard.usage import LimitUsage


def test_as_dict_writes_money_as_exact_decimals_never_exponents() -> None:
    usage = LimitUsage(
        name="daily",
        scope="user",
        unit="usd",
        used=Decimal(63_000) / 10**9,
        max=Decimal(1) / 10**9 * 100_000,
        remaining=Decimal(1) / 10**9,
        resets_at=datetime(2026, 11, 28, tzinfo=timezone.utc),
        state="ok",
    )
    assert str(usage.remaining) == "1E-9"  # what str() writes
    shown = usage.as_dict()
    assert (shown["used"], shown["max"], shown["remaining"]) == (
        "0.000063",
        "0.0001",
        "0.000000001",
    )
    assert not re.search(r"\d[eE][+-]?\d", str(shown))


def test_as_dict_writes_counts_as_integers_in_strings() -> None:
    usage = LimitUsage(
        name="rpm",
        scope="user",
        unit="requests",
        used=3,
        max=30,
        remaining=27,
        resets_at=datetime(2026, 11, 28, tzinfo=timezone.utc),
        state="ok",
    )
    shown = usage.as_dict()
    assert (shown["used"], shown["max"], shown["remaining"]) == ("3", "30", "27")
