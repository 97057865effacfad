"""Fixtures of the web tests: a memory-backed Guard on the fake clock."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest

from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from web._support import config


@pytest.fixture
def make_guard(clock: FakeClock) -> Callable[..., Guard]:
    """Build a memory-backed Guard on the fake clock (2026-11-27T12:00:00Z)."""

    def build(cfg: Mapping[str, Any] | None = None, **kwargs: Any) -> Guard:
        return Guard(dict(cfg) if cfg is not None else config(), clock=clock, **kwargs)

    return build


@pytest.fixture
def guard(make_guard: Callable[..., Guard]) -> Guard:
    return make_guard()
