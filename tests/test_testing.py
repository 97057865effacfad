"""The public testing helpers work as documented."""

from __future__ import annotations

import openai

from payi_guard import Guard, track_context
from payi_guard.testing import FakeClock, FakeProvider, capture_events


def test_capture_events_fills_live_and_filters() -> None:
    guard = Guard(
        {"prices": {"m": {"input_per_mtok": 1, "output_per_mtok": 1}}},
        clock=FakeClock(),
    )
    with capture_events() as events:
        guard.record(user_id="alice", model="m", input_tokens=10)
        assert len(events.named("genai_call")) == 1
        guard.record(user_id="bob", model="m", input_tokens=10)
    assert [e["user_id"] for e in events.named("genai_call")] == ["alice", "bob"]
    assert events.named("budget_exceeded") == []


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(100.0)
    assert clock.now() == 100.0
    clock.advance(5)
    assert clock.now() == 105.0
    clock.set(200.0)
    assert clock.now() == 200.0
    assert clock.monotonic() == 100.0


def test_fake_provider_serves_the_real_sdk() -> None:
    with FakeProvider() as fp:
        client = openai.OpenAI(base_url=fp.openai_base_url, api_key="test", max_retries=0)
        with track_context(user_id="alice"):
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hello there"}]
            )
        assert reply.choices[0].message.content
        assert reply.usage is not None
        assert reply.usage.prompt_tokens > 0
        assert len(fp.requests) == 1
