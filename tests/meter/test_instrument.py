"""guard.instrument() / uninstrument(): every SDK client, before and after, restored."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from anthropic._base_client import BaseClient as AnthropicBase
from openai._base_client import BaseClient as OpenAIBase
from structlog.testing import capture_logs

from meter._support import calls, expected_cost, logged_usd, make_guard, used, user_message
from payi_guard import BudgetExceeded, is_refusal, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.meter import guarded_by, is_guarded
from payi_guard.testing import FakeProvider

PROMPT = user_message("Say something nice")
ORIGINAL_BUILD = (OpenAIBase.__dict__["_build_request"], AnthropicBase.__dict__["_build_request"])


@pytest.fixture
def instrumented(guard: Guard) -> Iterator[Guard]:
    guard.instrument(default_user_id="system")
    yield guard
    guard.uninstrument()
    assert OpenAIBase.__dict__["_build_request"] is ORIGINAL_BUILD[0]
    assert AnthropicBase.__dict__["_build_request"] is ORIGINAL_BUILD[1]


def openai_client(fake: FakeProvider) -> Any:
    return openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)


def test_clients_created_before_and_after_are_guarded(guard: Guard, fake: FakeProvider) -> None:
    before = openai_client(fake)
    before_anthropic: Any = anthropic.Anthropic(
        base_url=fake.anthropic_base_url, api_key="k", max_retries=0
    )
    guard.instrument(default_user_id="system")
    try:
        after = openai_client(fake)
        with capture_logs() as logs:
            before.chat.completions.create(model="gpt-test", messages=PROMPT)
            after.chat.completions.create(model="gpt-test", messages=PROMPT)
            before_anthropic.messages.create(model="claude-test", max_tokens=20, messages=PROMPT)
            with track_context(user_id="alice"):
                list(after.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True))
        assert is_guarded(before)
        assert is_guarded(after)
        assert guarded_by(before_anthropic) is guard
        one, two, three, four = fake.requests
        events = calls(logs)
        assert [e["user_id"] for e in events] == ["system", "system", "system", "alice"]
        assert logged_usd(events[0]) == expected_cost(one, "gpt-test")
        assert logged_usd(events[1]) == expected_cost(two, "gpt-test")
        assert logged_usd(events[2]) == expected_cost(three, "claude-test")
        assert logged_usd(events[3]) == expected_cost(four, "gpt-test")
        assert "stream_options" in four.json
    finally:
        guard.uninstrument()
    # Uninstrumented: the original transports are back, nothing is metered.
    original = before._client._transport
    assert not is_guarded(before)
    assert not is_guarded(after)
    assert type(original).__name__ == "HTTPTransport"
    with capture_logs() as logs:
        before.chat.completions.create(model="gpt-test", messages=PROMPT)
        new = openai_client(fake)
        list(new.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True))
    assert calls(logs) == []
    assert "stream_options" not in fake.requests[-1].json
    assert not is_guarded(new)


async def test_async_clients_and_copies(instrumented: Guard, fake: FakeProvider) -> None:
    client: Any = openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    copy = client.with_options(timeout=30)
    aclient: Any = anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k")
    with track_context(user_id="alice"), capture_logs() as logs:
        await copy.chat.completions.create(model="gpt-test", messages=PROMPT)
        await client.chat.completions.create(model="gpt-test", messages=PROMPT)
        stream = await aclient.messages.create(
            model="claude-test", max_tokens=20, messages=PROMPT, stream=True
        )
        async for _ in stream:
            pass
    assert len(calls(logs)) == 3
    assert used(instrumented, "alice") == sum((logged_usd(e) for e in calls(logs)), Decimal(0))
    await client.close()
    await aclient.close()


def test_instrument_is_idempotent(instrumented: Guard, fake: FakeProvider) -> None:
    instrumented.instrument()
    instrumented.instrument(default_user_id="system")
    client = openai_client(fake)
    with capture_logs() as logs:
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert len(calls(logs)) == 1  # metered once, not once per instrument() call
    assert len(fake.requests) == 1
    assert type(client._client._transport.inner).__name__ == "HTTPTransport"
    # Other sdks or options than the first call's: an error, not silently the first's.
    for changed in ({"sdks": ["openai"]}, {"include_usage": False}):
        with pytest.raises(ValueError, match="call uninstrument\\(\\) first to change them"):
            instrumented.instrument(**changed)


def test_uninstrument_is_idempotent_and_only_for_its_guard(guard: Guard, clock: FakeClock) -> None:
    other = make_guard(clock)
    other.uninstrument()  # never instrumented: nothing happens
    guard.instrument()
    try:
        with pytest.raises(RuntimeError, match="another Guard"):
            other.instrument()
        other.uninstrument()  # not the instrumenting guard: nothing happens
        assert OpenAIBase.__dict__["_build_request"] is not ORIGINAL_BUILD[0]
    finally:
        guard.uninstrument()
        guard.uninstrument()
    assert OpenAIBase.__dict__["_build_request"] is ORIGINAL_BUILD[0]


def test_wrapped_clients_stay_guarded_after_uninstrument(guard: Guard, fake: FakeProvider) -> None:
    guard.instrument(default_user_id="system")
    try:
        wrapped = openai_client(fake)
        wrapped.chat.completions.create(model="gpt-test", messages=PROMPT)  # instrument's
        guard.wrap(wrapped)  # now explicitly wrapped
    finally:
        guard.uninstrument()
    assert is_guarded(wrapped)
    with capture_logs() as logs:
        wrapped.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert len(calls(logs)) == 1
    # A wrapped client keeps refusals as SDK exceptions after uninstrument, too.
    tight = make_guard(default=[{"max": 0.000001, "per": "day"}])
    refused = tight.wrap(openai_client(fake))
    with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
        refused.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert isinstance(info.value, openai.RateLimitError)


def test_refusal_through_an_instrumented_client(clock: FakeClock, fake: FakeProvider) -> None:
    tight = make_guard(clock, default=[{"max": 0.000001, "per": "day"}])
    tight.instrument()
    try:
        client: Any = anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key="k")
        with track_context(user_id="alice"), pytest.raises(anthropic.RateLimitError) as info:
            client.messages.create(model="claude-test", max_tokens=20, messages=PROMPT)
    finally:
        tight.uninstrument()
    assert is_refusal(info.value)
    assert fake.requests == []


def test_plain_http_clients_are_not_instrumented(instrumented: Guard, fake: FakeProvider) -> None:
    with httpx2.Client(base_url=fake.openai_base_url) as http, capture_logs() as logs:
        http.post("/chat/completions", json={"model": "gpt-test", "messages": PROMPT})
    assert calls(logs) == []


def test_uninstrument_keeps_a_wrapper_added_after_it(guard: Guard, fake: FakeProvider) -> None:
    seen: list[str] = []
    guard.instrument()
    ours = OpenAIBase.__dict__["_build_request"]

    def theirs(self: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(options.url)
        return ours(self, options, *args, **kwargs)

    OpenAIBase._build_request = theirs  # type: ignore[method-assign]
    try:
        guard.uninstrument()
        assert OpenAIBase.__dict__["_build_request"] is theirs  # not dropped
        client = openai_client(fake)
        with capture_logs() as logs:
            client.chat.completions.create(model="gpt-test", messages=PROMPT)
        assert seen == ["/chat/completions"]
        assert calls(logs) == []  # ours is inert once uninstrumented
        assert not is_guarded(client)
    finally:
        OpenAIBase._build_request = ORIGINAL_BUILD[0]  # type: ignore[method-assign]
