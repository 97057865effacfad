"""Fixtures of the meter tests: one fake provider per session, a guard per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from meter._support import make_guard
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.testing import FakeProvider


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeProvider]:
    with FakeProvider(retry_after=0.001) as server:
        yield server


@pytest.fixture
def fake(_fake_server: FakeProvider) -> Iterator[FakeProvider]:
    """The fake provider, cleared and in its default mode for each test."""
    _fake_server.clear()
    _fake_server.gzip = True
    _fake_server.reject_stream_options = False
    _fake_server.chunk_delay = 0.0
    _fake_server.anthropic_delta_usage = "full"
    yield _fake_server
    _fake_server.clear()


@pytest.fixture
def guard(clock: FakeClock) -> Guard:
    return make_guard(clock)
