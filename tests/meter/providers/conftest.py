"""Fixtures of the provider SDK tests: one loopback replay server per module."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from conformance.providers.conftest import loopback_only  # noqa: F401 - autouse fixture
from conformance.providers.server import ReplayServer

os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(scope="module")
def server() -> Iterator[ReplayServer]:
    """A loopback server; each test loads the exchanges it serves."""
    with ReplayServer() as replay_server:
        yield replay_server
