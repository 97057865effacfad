"""Shared fixtures: real Redis (required under CI=true), unique key prefixes, a fake clock."""

from __future__ import annotations

import os
import uuid

import pytest
from hypothesis import settings

from payi_guard.clock import FakeClock

REDIS_URL = os.environ.get("PAYI_GUARD_TEST_REDIS", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# CI runs the same examples every time (a red build always reproduces); developers' runs
# stay random and keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if IN_CI:
    settings.load_profile("ci")


def _redis_reachable(url: str) -> str | None:
    try:
        import redis
    except ImportError:  # pragma: no cover - dev extra always installs it
        return "the redis package is not installed"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        client.ping()
        client.close()
    except Exception as exc:
        return f"Redis at {url} is not reachable: {exc}"
    return None


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The URL of a real Redis server; skips without one, fails without one under CI."""
    problem = _redis_reachable(REDIS_URL)
    if problem is not None:
        if IN_CI:
            pytest.fail(f"CI=true needs Redis: {problem}")
        pytest.skip(problem)
    return REDIS_URL


@pytest.fixture
def key_prefix() -> str:
    """A key prefix no other test uses, so tests never need FLUSHDB."""
    return f"pgtest:{uuid.uuid4().hex[:12]}"


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock at 2026-11-27T12:00:00Z."""
    return FakeClock(1_795_780_800.0)
