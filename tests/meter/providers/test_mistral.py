"""mistralai through the guard: refusals, streams left early, untrusted usage, instrument."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from conformance.providers.server import ReplayServer
from structlog.testing import capture_logs

from meter.providers._support import (
    TIGHT,
    USER,
    assert_settled_early,
    assert_unverified,
    events,
    made_up,
    make_guard,
    served,
)
from payi_guard import BudgetExceeded, is_refusal
from payi_guard.meter import guarded_by

pytest.importorskip("mistralai.client")
from mistralai.client import Mistral, errors
from mistralai.client.utils import BackoffStrategy, RetryConfig

COMPLETE = "mistral/openllmetry/test_mistralai_chat_legacy"
STREAM = "mistral/openllmetry/test_mistralai_streaming_chat_with_events_with_content"
MESSAGES: Any = [{"role": "user", "content": "Hi"}]
URI = "https://api.mistral.ai/v1/chat/completions"


def client_for(server: ReplayServer, *, retries: bool = False) -> Mistral:
    retry = RetryConfig("backoff", BackoffStrategy(1, 2, 1.1, 100), True) if retries else None
    return Mistral(api_key="k", server_url=server.url, retry_config=retry)


async def call(client: Mistral, mode: str, stream: bool) -> Any:
    chat = client.chat
    if stream:
        if mode == "async":
            return [
                event
                async for event in await chat.stream_async(model="mistral-tiny", messages=MESSAGES)
            ]
        return list(chat.stream(model="mistral-tiny", messages=MESSAGES))
    if mode == "async":
        return await chat.complete_async(model="mistral-tiny", messages=MESSAGES)
    return chat.complete(model="mistral-tiny", messages=MESSAGES)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True])
async def test_refusal_is_one_sdk_error_never_retried(
    server: ReplayServer, mode: str, stream: bool
) -> None:
    server.load(served(STREAM if stream else COMPLETE))
    guard = make_guard(TIGHT)
    client = guard.wrap(client_for(server, retries=True))
    with capture_logs() as logs, pytest.raises(errors.SDKError) as info:
        await call(client, mode, stream)
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert is_refusal(exc)
    assert exc.status_code == 429
    assert exc.user_id == USER
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1  # the RetryConfig did not retry it
    assert not events(logs, "genai_call")


def test_stream_closed_early_is_settled_once(server: ReplayServer) -> None:
    server.load(served(STREAM))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        with client.chat.stream(model="mistral-tiny", messages=MESSAGES) as stream:
            for _event in stream:
                break
    assert_settled_early(guard, logs)


def test_usage_the_sdk_would_read_as_zero_is_not_trusted(server: ReplayServer) -> None:
    body = {
        "id": "x",
        "object": "chat.completion",
        "model": "mistral-tiny",
        "created": 1,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Hi"}}
        ],
        "usage": {"prompt_tokens": 11},
    }
    server.load([made_up(URI, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        response = client.chat.complete(model="mistral-tiny", messages=MESSAGES)
    assert response.usage.completion_tokens in (0, None)  # what the SDK would have charged
    assert_unverified(guard, logs, "completion_tokens is missing")


def test_instrument_guards_clients_made_before_and_after(server: ReplayServer) -> None:
    guard = make_guard()
    before = client_for(server)
    guard.instrument()
    try:
        after = client_for(server)
        with capture_logs() as logs:
            for client in (before, after):
                server.load(served(COMPLETE))
                client.chat.complete(model="mistral-tiny", messages=MESSAGES)
        assert guarded_by(before) is guarded_by(after) is guard
    finally:
        guard.uninstrument()
    assert guarded_by(before) is None
    calls = events(logs, "genai_call")
    assert [(c["provider"], c["output_tokens"]) for c in calls] == [("mistral", 96)] * 2
    server.load(served(COMPLETE))
    with capture_logs() as logs:
        before.chat.complete(model="mistral-tiny", messages=MESSAGES)
    assert not events(logs, "genai_call")


def test_an_error_status_releases_the_reservation(server: ReplayServer) -> None:
    error = made_up(URI, {"message": "Service unavailable"})
    server.load([replace(error, status=503)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs, pytest.raises(errors.SDKError) as info:
        client.chat.complete(model="mistral-tiny", messages=MESSAGES)
    assert info.value.status_code == 503
    assert not is_refusal(info.value)
    call = events(logs, "genai_call")
    assert [(c["outcome"], c["cost_usd"]) for c in call] == [("error", 0.0)]
    assert guard.usage(USER)[0].used == 0
