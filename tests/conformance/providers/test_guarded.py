"""Guarded replays: every recording through its real SDK, bare and guarded, compared.

For each recording the application must get exactly what it gets without the guard
(every response object, stream chunk and event, in JSON form), the provider must get
the same requests, and the guard must log one ``genai_call`` per SDK call whose tokens
are the recorded usage and whose ``cost_usd`` is that usage priced independently by
``genai_prices.calc_price`` (at :data:`~conformance.providers.corpus.PRICED_AT`,
rounded up to the nano-dollar), with nothing left reserved.

Clients are guarded with ``guard.wrap`` (every recording but LiteLLM's, which has no
client object), and once per SDK through ``guard.instrument()`` (every LiteLLM
recording).
"""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from decimal import Decimal
from typing import Any

import pytest
from structlog.testing import capture_logs

from conformance.providers.corpus import PRICED_AT, RECORDINGS, Charge, Recording, priced
from conformance.providers.harness import Replayed, replay, require_sdk
from conformance.providers.server import ReplayServer
from payi_guard import Guard
from payi_guard.clock import FakeClock

USER = "conformance"

WRAPPED = [r for r in RECORDINGS if r.provider != "litellm"]

INSTRUMENTED_IDS = (
    "gemini/pydantic-ai/test_google_stream_usage_is_live_mid_stream",  # async stream
    "gemini/openllmetry/test_client_spans",  # sync
    "bedrock/pydantic-ai/test_bedrock_model_stream",
    "mistral/openllmetry/test_mistralai_streaming_chat_with_events_with_content",
    "groq/openllmetry/test_chat_streaming_with_events_with_no_content",
)
INSTRUMENTED = [r for r in RECORDINGS if r.id in INSTRUMENTED_IDS or r.provider == "litellm"]


def make_guard() -> Guard:
    """A memory guard whose prices are those of :data:`PRICED_AT`."""
    clock = FakeClock(PRICED_AT.timestamp())
    guard = Guard({"default": [{"max": 1000, "per": "day"}]}, clock=clock)
    guard.default_user_id = USER
    return guard


def expected_cost(recording: Recording, charge: Charge) -> Decimal:
    """The recorded usage priced by genai-prices itself, rounded up to the nano-dollar."""
    pytest.importorskip("genai_prices")
    return priced(*recording.price, charge)


def expected_provider(recording: Recording) -> str:
    # LiteLLM's OpenAI route reaches the loopback server through the openai SDK: an
    # OpenAI-compatible base URL (priced by model name, the same price).
    if recording.provider == "litellm" and recording.call.options.get("route") == "openai":
        return "openai-compatible"
    return recording.price[0]


def assert_same_for_app_and_provider(bare: Replayed, guarded: Replayed) -> None:
    assert guarded.served_all
    assert guarded.transcript == bare.transcript
    assert guarded.usage == bare.usage
    assert [(r.method, r.path, r.body) for r in guarded.received] == [
        (r.method, r.path, r.body) for r in bare.received
    ]


def assert_charged_exactly(
    recording: Recording, guard: Guard, logs: Sequence[MutableMapping[str, Any]]
) -> None:
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert len(calls) == recording.call.calls, calls
    assert not [e for e in logs if e["event"] in ("usage_invalid", "meter_error")]
    total = Decimal(0)
    for event, charge in zip(calls, recording.charge, strict=True):
        assert event["outcome"] == "ok"
        assert event["provider"] == expected_provider(recording)
        assert event["user_id"] == USER
        tokens = (
            event["input_tokens"],
            event["output_tokens"],
            event["cache_read_tokens"],
            event["cache_write_tokens"],
        )
        assert tokens == (
            charge.input_tokens,
            charge.output_tokens,
            charge.cache_read_tokens,
            charge.cache_write_tokens,
        )
        cost = Decimal(str(event["cost_usd"]))
        assert cost == expected_cost(recording, charge)
        total += cost
    assert guard.usage(USER)[0].used == total  # settled, nothing left reserved


@pytest.mark.parametrize("recording", WRAPPED, ids=lambda r: r.id)
def test_wrapped_client_sees_the_same_and_is_charged_exactly(
    recording: Recording, replay_server: ReplayServer
) -> None:
    require_sdk(recording)
    bare = replay(recording, server=replay_server)
    guard = make_guard()

    with capture_logs() as logs:
        guarded = replay(recording, prepare=guard.wrap, server=replay_server)

    assert_same_for_app_and_provider(bare, guarded)
    assert_charged_exactly(recording, guard, logs)


@pytest.mark.parametrize("recording", INSTRUMENTED, ids=lambda r: r.id)
def test_instrumented_sdk_sees_the_same_and_is_charged_exactly(
    recording: Recording, replay_server: ReplayServer
) -> None:
    require_sdk(recording)
    bare = replay(recording, server=replay_server)
    guard = make_guard()
    guard.instrument(default_user_id=USER)
    try:
        with capture_logs() as logs:
            guarded = replay(recording, server=replay_server)
    finally:
        guard.uninstrument()

    assert_same_for_app_and_provider(bare, guarded)
    assert_charged_exactly(recording, guard, logs)


def test_every_provider_is_replayed_guarded() -> None:
    covered = {r.provider for r in WRAPPED} | {r.provider for r in INSTRUMENTED}
    assert covered == {r.provider for r in RECORDINGS}
    assert {r.call.sdk for r in INSTRUMENTED} == {r.call.sdk for r in RECORDINGS}
