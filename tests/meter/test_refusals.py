"""Refusals: one exception, of the SDK's class and payi_guard's, no retry, nothing sent."""

from __future__ import annotations

import inspect
import json
from collections.abc import AsyncIterator, Callable, MutableMapping, Sequence
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import PRICES, make_guard, user_message
from payi_guard import BudgetExceeded, StorageError, is_refusal, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard, UnknownModelRefused, UserRequired
from payi_guard.exceptions import ConfigError
from payi_guard.testing import FakeProvider, Scripted

PROMPT = user_message("Summarise the quarterly report in detail please")
TIGHT = {"default": [{"max": 0.000001, "per": "day"}]}  # one micro-dollar: nothing fits


async def maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


_open: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        client = _open.pop()
        await maybe(client.aclose() if hasattr(client, "aclose") else client.close())


def sdk_client(guard: Guard, fake: FakeProvider, sdk: str, mode: str) -> Any:
    # Generous retries: a refusal the SDK retried would show up as more attempts.
    client: Any
    if sdk == "openai":
        cls: Any = openai.OpenAI if mode == "sync" else openai.AsyncOpenAI
        client = cls(base_url=fake.openai_base_url, api_key="k", max_retries=5)
    elif sdk == "azure":
        cls = openai.AzureOpenAI if mode == "sync" else openai.AsyncAzureOpenAI
        client = cls(
            azure_endpoint=fake.base_url, api_key="k", api_version="2024-10-21", max_retries=5
        )
    else:
        cls = anthropic.Anthropic if mode == "sync" else anthropic.AsyncAnthropic
        client = cls(base_url=fake.anthropic_base_url, api_key="k", max_retries=5)
    _open.append(client)
    return guard.wrap(client)


def create_call(client: Any, sdk: str, model: str | None = None, **extra: Any) -> Any:
    if sdk == "anthropic":
        return client.messages.create(
            model=model or "claude-test", max_tokens=100, messages=PROMPT, **extra
        )
    return client.chat.completions.create(model=model or "gpt-test", messages=PROMPT, **extra)


def sdk_module(sdk: str) -> Any:
    return anthropic if sdk == "anthropic" else openai


def attempts(logs: Sequence[MutableMapping[str, Any]]) -> int:
    """How many times a request reached the guard (each logs one ``budget_exceeded``)."""
    return sum(1 for e in logs if e["event"] == "budget_exceeded")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("sdk", ["openai", "azure", "anthropic"])
@pytest.mark.parametrize("stream", [False, True])
async def test_budget_refusal_is_one_sdk_rate_limit_error(
    clock: FakeClock, fake: FakeProvider, sdk: str, mode: str, stream: bool
) -> None:
    guard = make_guard(clock, **TIGHT)
    client = sdk_client(guard, fake, sdk, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(BudgetExceeded) as info:
            await maybe(create_call(client, sdk, stream=stream))
    exc = info.value
    assert isinstance(exc, sdk_module(sdk).RateLimitError)
    assert is_refusal(exc)
    assert exc.user_id == "alice"
    assert exc.limit.name == "user:0"
    assert exc.limit.scope == "user"
    assert exc.retry_after == 12 * 3600  # the fake clock is at noon UTC
    assert exc.status_code == 429
    assert exc.response.headers["x-should-retry"] == "false"
    assert exc.response.headers["retry-after"] == str(12 * 3600)
    assert exc.response.request is not None
    assert "budget exceeded for user 'alice'" in str(exc)
    assert fake.requests == []  # the provider never saw it
    assert attempts(logs) == 1  # and the SDK did not retry
    assert not [e for e in logs if e["event"] == "genai_call"]


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_refusal_through_raw_and_streaming_response_wrappers(
    clock: FakeClock, fake: FakeProvider, sdk: str
) -> None:
    guard = make_guard(clock, **TIGHT)
    client = sdk_client(guard, fake, sdk, "sync")
    resource = client.messages if sdk == "anthropic" else client.chat.completions
    kwargs: dict[str, Any] = {"messages": PROMPT}
    kwargs.update(
        {"model": "claude-test", "max_tokens": 10} if sdk == "anthropic" else {"model": "gpt-test"}
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(sdk_module(sdk).RateLimitError) as raw:
            resource.with_raw_response.create(**kwargs)
        with pytest.raises(sdk_module(sdk).RateLimitError) as streaming:
            with resource.with_streaming_response.create(**kwargs):
                pass
    assert is_refusal(raw.value)
    assert is_refusal(streaming.value)
    assert fake.requests == []
    assert attempts(logs) == 2


def test_a_provider_rate_limit_is_not_a_refusal(guard: Guard, fake: FakeProvider) -> None:
    fake.set_default("/chat/completions", Scripted(status=429))
    client = sdk_client(guard, fake, "openai", "sync")
    client.max_retries = 0
    with track_context(user_id="alice"), pytest.raises(openai.RateLimitError) as info:
        create_call(client, "openai")
    assert not is_refusal(info.value)
    assert not isinstance(info.value, BudgetExceeded)
    assert len(fake.requests) == 1


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_anonymous_call_refused_as_user_required(
    clock: FakeClock, fake: FakeProvider, sdk: str, mode: str
) -> None:
    guard = make_guard(clock, anonymous={"strategy": "reject"})
    client = sdk_client(guard, fake, sdk, mode)
    with capture_logs() as logs, pytest.raises(UserRequired) as info:
        await maybe(create_call(client, sdk))
    assert isinstance(info.value, sdk_module(sdk).RateLimitError)
    assert is_refusal(info.value)
    assert info.value.user_id == "anonymous"
    assert fake.requests == []
    assert not [e for e in logs if e["event"] == "genai_call"]


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_unknown_model_refused_once(
    guard: Guard, fake: FakeProvider, sdk: str, mode: str
) -> None:
    client = sdk_client(guard, fake, sdk, mode)
    with track_context(user_id="alice"), pytest.raises(UnknownModelRefused) as info:
        await maybe(create_call(client, sdk, model="no-such-model"))
    assert isinstance(info.value, sdk_module(sdk).PermissionDeniedError)
    assert not is_refusal(info.value)  # not a budget refusal, but recognisable
    assert info.value.model == "no-such-model"
    assert info.value.status_code == 403
    assert fake.requests == []


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_storage_failure_fails_closed_once(fake: FakeProvider, sdk: str, mode: str) -> None:
    # Nothing listens on port 1: every reserve fails, and on_storage_error is block.
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 1, "per": "day"}]},
        storage="redis://127.0.0.1:1/0",
        storage_options={"socket_connect_timeout": 0.2},
    )
    client = sdk_client(guard, fake, sdk, mode)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(StorageError) as info:
            await maybe(create_call(client, sdk))
    assert isinstance(info.value, sdk_module(sdk).InternalServerError)
    assert info.value.status_code == 503
    assert not is_refusal(info.value)
    assert fake.requests == []
    assert sum(1 for e in logs if e["event"] == "storage_error") == 1  # no retry


def test_undefined_limit_id_is_a_config_error_once(guard: Guard, fake: FakeProvider) -> None:
    client = sdk_client(guard, fake, "openai", "sync")
    with track_context(user_id="alice", limit_ids=["nope"]):
        with pytest.raises(ConfigError, match="nope") as info:
            create_call(client, "openai")
    assert isinstance(info.value, openai.BadRequestError)
    assert fake.requests == []


# -- plain HTTP clients -----------------------------------------------------------------------


PlainFactory = Callable[[str], Any]


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
def test_plain_client_raises_the_refusal(clock: FakeClock, fake: FakeProvider, module: Any) -> None:
    guard = make_guard(clock, **TIGHT)
    client = guard.wrap(module.Client(base_url=fake.openai_base_url))
    _open.append(client)
    body = {"model": "gpt-test", "messages": PROMPT}
    with track_context(user_id="alice"), pytest.raises(BudgetExceeded) as info:
        client.post("/chat/completions", json=body)
    assert type(info.value) is BudgetExceeded
    assert fake.requests == []


@pytest.mark.parametrize("module", [httpx2, httpx], ids=["httpx2", "httpx"])
async def test_plain_async_client_problem_json_response(
    clock: FakeClock, fake: FakeProvider, module: Any
) -> None:
    guard = make_guard(clock, **TIGHT)
    client = guard.wrap(module.AsyncClient(base_url=fake.openai_base_url), refusal="response")
    _open.append(client)
    body = {"model": "gpt-test", "messages": PROMPT, "stream": True}
    with track_context(user_id="alice"):
        response = await client.post("/chat/completions", json=body)
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == str(12 * 3600)
    assert response.headers["x-payi-guard-refusal"] == "budget_exceeded"
    problem = json.loads(response.content)
    assert problem["type"] == "urn:payi-guard:budget_exceeded"
    assert problem["limit"]["name"] == "user:0"
    assert problem["user_id"] == "alice"
    assert response.request.url.path == "/v1/chat/completions"
    assert fake.requests == []


def test_refusal_option_is_validated(guard: Guard, fake: FakeProvider) -> None:
    with pytest.raises(ValueError, match="SDK client"):
        guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k"), refusal="raise")
    with pytest.raises(ValueError, match="'raise' or 'response'"):
        guard.wrap(httpx2.Client(), refusal="explode")
    with pytest.raises(TypeError, match="unknown option"):
        guard.wrap(httpx2.Client(), include_usages=False)
    with pytest.raises(TypeError, match="expects an OpenAI or Anthropic client"):
        guard.wrap(object())
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="k")
    with pytest.raises(TypeError, match="Chat: it is a resource of an SDK client; wrap the"):
        guard.wrap(client.chat)
