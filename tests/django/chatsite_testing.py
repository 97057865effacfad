"""Settings of the example site as the served tests run it.

The example's settings, with a guard on a fake clock (fixed at 2026-11-27T12:00:00Z, so
windows and ``Retry-After`` never depend on the day the tests run), the test budgets,
and the routes of :mod:`chatsite_testing_urls`.
"""

from __future__ import annotations

from pathlib import Path

from chatsite.settings import *  # noqa: F403
from chatsite.settings import PAYI_GUARD as SITE_PAYI_GUARD

from payi_guard import Guard
from payi_guard.clock import FakeClock

NOW = 1_795_780_800.0
"""2026-11-27T12:00:00Z: noon, so a daily window resets in 43200 s."""

BUDGETS = Path(__file__).with_name("budgets.yaml")

ROOT_URLCONF = "chatsite_testing_urls"
PAYI_GUARD = {key: value for key, value in SITE_PAYI_GUARD.items() if key != "config"}
PAYI_GUARD["guard"] = "chatsite_testing.build_guard"


def build_guard() -> Guard:
    """The served site's guard: the test budgets on the fake clock."""
    return Guard.from_yaml(BUDGETS, clock=FakeClock(NOW))
