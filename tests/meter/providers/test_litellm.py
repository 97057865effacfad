"""The LiteLLM SDK under ``guard.instrument()``: each route charged once, refusals, streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from conformance.providers.server import ReplayServer
from structlog.testing import capture_logs

from meter.providers._support import (
    TIGHT,
    USER,
    assert_settled_early,
    events,
    make_guard,
    one_call,
    served,
)
from payi_guard import BudgetExceeded, Guard, is_refusal
from payi_guard.exceptions import UnknownModelRefused

litellm = pytest.importorskip("litellm")

OPENAI = "litellm/crewai/test_litellm_async_with_system_message"
GEMINI = "litellm/crewai/test_gemini_models[gemini-gemini-2.0-flash-001]"
GEMINI_STREAM = "gemini/pydantic-ai/test_google_stream_usage_is_live_mid_stream"
BEDROCK = "bedrock/openllmetry/test_meta_converse_with_events_with_no_content"
MESSAGES: Any = [{"role": "user", "content": "Hi"}]


def kwargs(server: ReplayServer, route: str, **extra: Any) -> dict[str, Any]:
    if route == "bedrock":
        base: dict[str, Any] = {
            "model": "bedrock/converse/meta.llama3-2-1b-instruct-v1:0",
            "aws_bedrock_runtime_endpoint": server.url,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "secret",
            "aws_region_name": "us-east-1",
        }
    else:
        model = "openai/gpt-4o-mini" if route == "openai" else "gemini/gemini-2.0-flash-001"
        suffix = "/v1" if route == "openai" else "/v1beta"
        base = {"model": model, "api_base": server.url + suffix, "api_key": "k"}
    return {**base, "messages": MESSAGES, "num_retries": 0, "max_retries": 0, **extra}


def complete(mode: str, args: dict[str, Any]) -> Any:
    if mode == "async":
        return asyncio.run(litellm.acompletion(**args))
    return litellm.completion(**args)


@pytest.fixture
def instrumented() -> Iterator[Guard]:
    guard = make_guard()
    guard.instrument()
    yield guard
    guard.uninstrument()


@pytest.fixture
def refusing() -> Iterator[Guard]:
    guard = make_guard(TIGHT)
    guard.instrument()
    yield guard
    guard.uninstrument()


RECORDED = {"openai": OPENAI, "gemini": GEMINI, "bedrock": BEDROCK}


@pytest.mark.parametrize("route", list(RECORDED))
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_each_route_is_charged_once(
    instrumented: Guard, server: ReplayServer, route: str, mode: str
) -> None:
    server.load(served(RECORDED[route]))
    with capture_logs() as logs:
        complete(mode, kwargs(server, route))
    call = one_call(logs)
    assert call["outcome"] == "ok"
    assert call["user_id"] == USER
    expected = {"openai": ("gpt-4o-mini", 24, 8), "gemini": ("gemini-2.0-flash-001", 7, 9)}
    expected["bedrock"] = ("meta.llama3-2-1b-instruct-v1:0", 52, 30)
    assert (call["model"], call["input_tokens"], call["output_tokens"]) == expected[route]


@pytest.mark.parametrize("route", list(RECORDED))
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_refusal_is_one_litellm_rate_limit_error(
    refusing: Guard, server: ReplayServer, route: str, mode: str
) -> None:
    server.load(served(RECORDED[route]))
    # max_retries reaches the openai SDK (LiteLLM's own num_retries is shown below).
    with capture_logs() as logs, pytest.raises(litellm.RateLimitError) as info:
        complete(mode, kwargs(server, route, max_retries=3))
    exc: Any = info.value
    assert exc.category == "litellm_rate_limit"
    assert isinstance(exc, BudgetExceeded)
    assert is_refusal(exc)
    assert exc.user_id == USER
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1
    assert not events(logs, "genai_call")


def test_num_retries_reruns_a_refused_call_without_reaching_the_provider(
    refusing: Guard, server: ReplayServer
) -> None:
    server.load(served(GEMINI))
    with capture_logs() as logs, pytest.raises(litellm.RateLimitError) as info:
        litellm.completion(**kwargs(server, "gemini", num_retries=2))
    assert is_refusal(info.value)
    assert server.received == []
    # LiteLLM re-ran the call twice after the first attempt; each one was refused again.
    assert len(events(logs, "budget_exceeded")) == 3


def test_unknown_model_is_a_permission_denied_error(
    instrumented: Guard, server: ReplayServer
) -> None:
    server.load(served(GEMINI))
    args = kwargs(server, "gemini")
    args["model"] = "gemini/gemini-from-the-future"
    with pytest.raises(litellm.PermissionDeniedError) as info:
        litellm.completion(**args)
    assert isinstance(info.value, UnknownModelRefused)
    assert server.received == []


def test_stream_left_early_is_settled_once(instrumented: Guard, server: ReplayServer) -> None:
    server.load(served(GEMINI_STREAM))
    args = kwargs(server, "gemini", stream=True)
    args["model"] = "gemini/gemini-2.5-flash"
    with capture_logs() as logs:
        stream = litellm.completion(**args)
        next(iter(stream))
        stream.completion_stream.close()
    assert_settled_early(instrumented, logs)
