"""Replay one recording through its real SDK: the building block of the provider tests.

:func:`replay` serves the recording's exchanges from a :class:`ReplayServer`, runs the
recording's driver, and returns what the SDK exposed and what it sent. The bare replays
call it as is; the guarded replays pass a ``prepare`` that guards each SDK client, and
compare the two results.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import pytest

from conformance.providers.cassette import Exchange, load
from conformance.providers.corpus import Recording
from conformance.providers.drivers import (
    DRIVERS,
    SDK_MODULES,
    Prepare,
    Transcript,
    Usage,
    same,
)
from conformance.providers.server import Received, ReplayServer

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass(frozen=True)
class Replayed:
    """The outcome of one replay."""

    usage: list[Usage]
    """Per SDK call, the token counts the SDK exposed."""
    transcript: Transcript
    """Everything the application got, in JSON form (see ``drivers.app_view``)."""
    received: list[Received]
    """What the SDK sent, in order."""
    exchanges: tuple[Exchange, ...]
    """The recorded exchanges that were served, in order."""
    served_all: bool


def exchanges_of(recording: Recording) -> tuple[Exchange, ...]:
    """The exchanges the recording's SDK calls consume."""
    exchanges = load(recording.cassette)
    if recording.served is None:
        return exchanges
    return tuple(exchanges[i] for i in recording.served)


def require_sdk(recording: Recording) -> None:
    """Skip when the recording's SDK is not installed; fail instead under CI."""
    module = SDK_MODULES[recording.call.sdk]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if found:
        return
    message = f"{module} is not installed (needed to replay {recording.id})"
    if IN_CI:
        pytest.fail(f"CI=true: {message}")
    pytest.skip(message)


def replay(
    recording: Recording, prepare: Prepare = same, server: ReplayServer | None = None
) -> Replayed:
    """Serve ``recording`` on loopback and drive its SDK through every recorded call.

    Args:
        recording: the recording.
        prepare: called with each SDK client once built; its result is used instead.
        server: the server to serve it from (loaded with the recording's exchanges);
            a new one when ``None``.

    Returns:
        What the SDK exposed and sent.
    """
    exchanges = exchanges_of(recording)
    if server is None:
        with ReplayServer(exchanges) as own:
            return _drive(recording, prepare, own, exchanges)
    server.load(exchanges)
    return _drive(recording, prepare, server, exchanges)


def _drive(
    recording: Recording,
    prepare: Prepare,
    server: ReplayServer,
    exchanges: tuple[Exchange, ...],
) -> Replayed:
    driver = DRIVERS[recording.call.driver]
    bodies = [e.request_body for e in exchanges]
    run = driver(recording.call, server.url, bodies, prepare)
    return Replayed(run.usage, run.transcript, list(server.received), exchanges, server.served_all)
