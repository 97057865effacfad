"""Bare replays: every provider recording, served on loopback, parsed by the real SDK.

Each recording is replayed through the SDK call that made it (sync or async, plain or
streamed), with no guard involved. The test proves that the recording still works with
the installed SDK: the SDK asked for the recorded path, consumed every recorded
response, and exposed exactly the usage the provider reported.
"""

from __future__ import annotations

import pytest

from conformance.providers.corpus import RECORDINGS, Recording
from conformance.providers.harness import replay, require_sdk
from conformance.providers.server import ReplayServer


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda r: r.id)
def test_sdk_exposes_recorded_usage(recording: Recording, replay_server: ReplayServer) -> None:
    require_sdk(recording)

    result = replay(recording, server=replay_server)

    assert result.served_all
    assert len(result.received) == len(result.exchanges) == recording.call.calls
    for sent, recorded in zip(result.received, result.exchanges, strict=True):
        assert sent.method == recorded.method
        assert sent.path == recorded.path
    assert len(result.usage) == len(recording.usage)
    for observed, expected in zip(result.usage, recording.usage, strict=True):
        assert {key: observed.get(key) for key in expected} == expected, observed
