"""The real openai SDK (3.x, httpx2), sync and async, through a guarded client.

Every test charges through the real SDK against the fake provider and checks that the
amount charged (ledger and ``genai_call``) is the price of the usage the fake reported,
computed independently, and that the caller sees what the provider sent.
"""

from __future__ import annotations

import base64
import inspect
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from pydantic import BaseModel
from structlog.testing import capture_logs

from meter._support import (
    assert_charged,
    expected_cost,
    logged_usd,
    make_guard,
    one_call,
    used,
    user_message,
)
from payi_guard import request_scope, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard, UnknownModelRefused
from payi_guard.testing import DEFAULT_REPLY, FakeProvider, Scripted, ToolCall

PROMPT = user_message("What is the weather like in Paris today")


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def maybe(value: Any) -> Any:
    """Await ``value`` if the async client returned an awaitable."""
    return await value if inspect.isawaitable(value) else value


async def drain(stream: Any) -> list[Any]:
    """Every item of a sync or async stream."""
    if hasattr(stream, "__aiter__"):
        return [item async for item in stream]
    return list(stream)


_open: list[Any] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        await maybe(_open.pop().close())


def client_for(guard: Guard, fake: FakeProvider, mode: str, **kwargs: Any) -> Any:
    cls = openai.OpenAI if mode == "sync" else openai.AsyncOpenAI
    kwargs.setdefault("max_retries", 0)
    client = cls(base_url=fake.openai_base_url, api_key="sk-test", **kwargs)
    _open.append(client)
    return guard.wrap(client)


@pytest.fixture
def alice() -> Iterator[None]:
    with track_context(user_id="alice"):
        yield


# -- chat completions -------------------------------------------------------------------


async def test_chat_plain(guard: Guard, fake: FakeProvider, mode: str, alice: None) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        reply = await maybe(client.chat.completions.create(model="gpt-test", messages=PROMPT))
    (record,) = fake.requests
    assert reply.choices[0].message.content == DEFAULT_REPLY
    assert reply.usage.prompt_tokens == record.usage["prompt_tokens"]  # type: ignore[index]
    assert record.headers["accept-encoding"] == "identity"
    assert "stream_options" not in record.json
    event = assert_charged(guard, "alice", logs, record, "gpt-test", stream=False)
    assert (event["input_tokens"], event["output_tokens"]) == (8, 10)
    assert event["endpoint"] == "chat"
    assert event["reserved_usd"] >= event["cost_usd"]


async def test_chat_stream_hides_the_usage_chunk_it_asked_for(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        stream = await maybe(
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        )
        chunks = await drain(stream)
    (record,) = fake.requests
    assert record.json["stream_options"] == {"include_usage": True}
    # Ordinary `chunk.choices[0]` code keeps working: no usage-only chunk reaches it.
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == DEFAULT_REPLY
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert len(chunks) == 12  # role, 10 words, finish: everything the fake sent but one
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)


async def test_chat_stream_keeps_the_usage_chunk_the_caller_asked_for(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        stream = await maybe(
            client.chat.completions.create(
                model="gpt-test",
                messages=PROMPT,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        chunks = await drain(stream)
    (record,) = fake.requests
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == record.usage["completion_tokens"]  # type: ignore[index]
    assert len(chunks) == 13
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)


async def test_chat_stream_tool_call_deltas(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    arguments = '{"city": "Paris", "unit": "celsius"}'
    fake.enqueue(Scripted(text="", tool_calls=[ToolCall("get_weather", arguments, id="call_1")]))
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        stream = await maybe(
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        )
        chunks = await drain(stream)
    (record,) = fake.requests
    pieces = [
        call.function.arguments or ""
        for chunk in chunks
        for call in chunk.choices[0].delta.tool_calls or []
    ]
    assert "".join(pieces) == arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    event = assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)
    assert event["output_tokens"] == record.usage["completion_tokens"]  # type: ignore[index]


async def test_chat_stream_with_several_choices(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        stream = await maybe(
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True, n=3)
        )
        chunks = await drain(stream)
    (record,) = fake.requests
    assert {chunk.choices[0].index for chunk in chunks} == {0, 1, 2}
    event = assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)
    assert event["output_tokens"] == 30


async def test_chat_cached_prompt_tokens_are_priced_as_cache_reads(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    fake.enqueue(Scripted(cached_tokens=1024, reasoning_tokens=7))
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        await maybe(client.chat.completions.create(model="gpt-test", messages=PROMPT))
    (record,) = fake.requests
    event = assert_charged(guard, "alice", logs, record, "gpt-test", stream=False)
    assert event["cache_read_tokens"] == 1024
    assert event["output_tokens"] == 17


async def test_chat_stream_helper(guard: Guard, fake: FakeProvider, mode: str, alice: None) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        if mode == "sync":
            with client.chat.completions.stream(model="gpt-test", messages=PROMPT) as stream:
                kinds = [event.type for event in stream]
                final = stream.get_final_completion()
        else:
            async with client.chat.completions.stream(model="gpt-test", messages=PROMPT) as stream:
                kinds = [event.type async for event in stream]
                final = await stream.get_final_completion()
    (record,) = fake.requests
    assert final.choices[0].message.content == DEFAULT_REPLY
    assert final.usage is None  # the usage chunk the guard asked for was hidden
    assert "content.done" in kinds
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)


class City(BaseModel):
    city: str
    country: str


async def test_parse_structured_output(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    fake.enqueue(Scripted(text='{"city": "Paris", "country": "France"}'))
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        reply = await maybe(
            client.chat.completions.parse(model="gpt-test", messages=PROMPT, response_format=City)
        )
    (record,) = fake.requests
    assert reply.choices[0].message.parsed == City(city="Paris", country="France")
    assert record.json["response_format"]["type"] == "json_schema"
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=False)


async def test_with_raw_response(guard: Guard, fake: FakeProvider, mode: str, alice: None) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        raw = await maybe(
            client.chat.completions.with_raw_response.create(model="gpt-test", messages=PROMPT)
        )
        reply = await maybe(raw.parse())
    (record,) = fake.requests
    assert raw.headers["x-request-id"] == record.request_id
    assert reply.usage.total_tokens == record.usage["total_tokens"]  # type: ignore[index]
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=False)


def test_with_streaming_response_plain_and_stream(guard: Guard, fake: FakeProvider) -> None:
    client = client_for(guard, fake, "sync")
    with track_context(user_id="alice"), capture_logs() as logs:
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=PROMPT
        ) as response:
            reply = response.parse()
        with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=PROMPT, stream=True
        ) as response:
            lines = list(response.iter_lines())
    plain, streamed = fake.requests
    assert reply.choices[0].message.content == DEFAULT_REPLY
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert not any('"choices":[]' in line for line in data)  # usage chunk hidden
    first, second = [e for e in logs if e["event"] == "genai_call"]
    assert logged_usd(first) == expected_cost(plain, "gpt-test")
    assert logged_usd(second) == expected_cost(streamed, "gpt-test")
    assert (first["stream"], second["stream"]) == (False, True)
    assert used(guard, "alice") == logged_usd(first) + logged_usd(second)


async def test_async_with_streaming_response(guard: Guard, fake: FakeProvider, alice: None) -> None:
    client = client_for(guard, fake, "async")
    with capture_logs() as logs:
        async with client.chat.completions.with_streaming_response.create(
            model="gpt-test", messages=PROMPT, stream=True
        ) as response:
            lines = [line async for line in response.iter_lines()]
    (record,) = fake.requests
    assert lines.count("data: [DONE]") == 1
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=True)


# -- legacy completions, embeddings ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_legacy_completions(
    guard: Guard, fake: FakeProvider, mode: str, stream: bool, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        result = await maybe(
            client.completions.create(
                model="davinci-test", prompt="Say hello to the fake", max_tokens=5, stream=stream
            )
        )
        if stream:
            chunks = await drain(result)
            text = "".join(chunk.choices[0].text for chunk in chunks)
            assert all(chunk.usage is None for chunk in chunks)
        else:
            text = result.choices[0].text
    (record,) = fake.requests
    assert text == " ".join(DEFAULT_REPLY.split()[:5])
    assert (record.json.get("stream_options") is not None) is stream
    event = assert_charged(guard, "alice", logs, record, "davinci-test", stream=stream)
    assert event["endpoint"] == "completions"


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_embeddings(
    guard: Guard, fake: FakeProvider, mode: str, encoding: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        if encoding == "float":
            result = await maybe(
                client.embeddings.create(
                    model="embed-test", input=["one two three", "four"], encoding_format="float"
                )
            )
            vector = result.data[0].embedding
        else:
            raw = await maybe(
                client.embeddings.with_raw_response.create(
                    model="embed-test", input=["one two three", "four"], encoding_format="base64"
                )
            )
            encoded = raw.http_response.json()["data"][0]["embedding"]
            vector = list(struct.unpack("<8f", base64.b64decode(encoded)))
    (record,) = fake.requests
    assert record.json["encoding_format"] == encoding
    assert len(vector) == 8
    event = assert_charged(guard, "alice", logs, record, "embed-test", stream=False)
    assert (event["input_tokens"], event["output_tokens"]) == (4, 0)


# -- Responses ---------------------------------------------------------------------------


async def test_responses_plain(guard: Guard, fake: FakeProvider, mode: str, alice: None) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        response = await maybe(
            client.responses.create(model="gpt-test", input="Tell me about the fake provider")
        )
    (record,) = fake.requests
    assert response.output_text == DEFAULT_REPLY
    event = assert_charged(guard, "alice", logs, record, "gpt-test", stream=False)
    assert event["endpoint"] == "responses"


async def test_responses_plain_incomplete(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        response = await maybe(
            client.responses.create(model="gpt-test", input="Tell me more", max_output_tokens=3)
        )
    (record,) = fake.requests
    assert response.status == "incomplete"
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=False, outcome="incomplete")


@pytest.mark.parametrize(
    ("ending", "outcome"),
    [("completed", "ok"), ("incomplete", "incomplete"), ("failed", "error")],
)
async def test_responses_stream_endings(
    guard: Guard, fake: FakeProvider, mode: str, ending: str, outcome: str, alice: None
) -> None:
    if ending != "completed":
        fake.enqueue(Scripted(response_status=ending))  # type: ignore[arg-type]
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        stream = await maybe(
            client.responses.create(model="gpt-test", input="Stream it please", stream=True)
        )
        events = await drain(stream)
    (record,) = fake.requests
    assert events[-1].type == f"response.{ending}"
    assert "stream_options" not in record.json  # Responses streams always report usage
    # A failed response is still charged the usage it reports.
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=True, outcome=outcome)


async def test_responses_stream_helper_and_beta(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = client_for(guard, fake, mode)
    with capture_logs() as logs:
        if mode == "sync":
            with client.responses.stream(model="gpt-test", input="Stream it") as stream:
                final = stream.get_final_response()
        else:
            async with client.responses.stream(model="gpt-test", input="Stream it") as stream:
                final = await stream.get_final_response()
        beta = await maybe(client.beta.responses.create(model="gpt-test", input="And beta"))
    helper_record, beta_record = fake.requests
    assert final.output_text == DEFAULT_REPLY
    assert beta.output[0].content[0].text == DEFAULT_REPLY
    assert beta_record.query == {"beta": ["true"]}
    first, second = [e for e in logs if e["event"] == "genai_call"]
    assert logged_usd(first) == expected_cost(helper_record, "gpt-test")
    assert logged_usd(second) == expected_cost(beta_record, "gpt-test")
    assert used(guard, "alice") == logged_usd(first) + logged_usd(second)


# -- attribution fields ---------------------------------------------------------------------


def test_logged_attribution_fields(clock: FakeClock, fake: FakeProvider) -> None:
    guard = make_guard(clock, limits={"support-bot": {"max": 5, "per": "month"}})
    client = client_for(guard, fake, "sync")
    with (
        request_scope(user_id="acme:alice", request_id="req-42"),
        track_context(
            use_case_name="summarize",
            use_case_id="uc-1",
            account_name="acme-prod",
            limit_ids=["support-bot"],
        ),
        capture_logs() as logs,
    ):
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    event = one_call(logs)
    assert event["user_id"] == "acme:alice"
    assert event["org_id"] == "acme"
    assert event["request_id"] == "req-42"
    assert event["use_case_name"] == "summarize"
    assert event["use_case_id"] == "uc-1"
    assert event["account_name"] == "acme-prod"
    assert event["limit_ids"] == ["support-bot"]
    (record,) = fake.requests
    cost = expected_cost(record, "gpt-test")
    assert guard.usage("acme:alice", limit_ids=["support-bot"])[-1].used == cost


# -- Azure ------------------------------------------------------------------------------------


def azure_client(guard: Guard, fake: FakeProvider, mode: str, **kwargs: Any) -> Any:
    cls = openai.AzureOpenAI if mode == "sync" else openai.AsyncAzureOpenAI
    client = cls(
        azure_endpoint=fake.base_url,
        api_key="azure-key",
        api_version="2024-10-21",
        max_retries=0,
        **kwargs,
    )
    _open.append(client)
    return guard.wrap(client)


async def test_azure_deployment_paths(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = azure_client(guard, fake, mode)
    with capture_logs() as logs:
        await maybe(client.chat.completions.create(model="gpt-test", messages=PROMPT))
        stream = await maybe(
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        )
        chunks = await drain(stream)
    plain, streamed = fake.requests
    assert plain.path == "/openai/deployments/gpt-test/chat/completions"
    assert plain.query["api-version"] == ["2024-10-21"]
    assert all(chunk.choices for chunk in chunks)
    first, second = [e for e in logs if e["event"] == "genai_call"]
    for event, record in ((first, plain), (second, streamed)):
        assert event["provider"] == "azure"
        assert event["model"] == "gpt-test"
        assert logged_usd(event) == expected_cost(record, "gpt-test")


async def test_azure_model_is_the_deployment_when_the_body_has_none(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    # A raw POST to a deployment path whose body names no model: the deployment prices it.
    client = azure_client(guard, fake, mode, azure_deployment="gpt-other")
    with capture_logs() as logs:
        raw = await maybe(
            client.post(
                "/chat/completions",
                cast_to=openai._legacy_response.HttpxBinaryResponseContent,
                body={"messages": PROMPT},
            )
        )
    assert raw.response.status_code == 200
    (record,) = fake.requests
    assert record.path == "/openai/deployments/gpt-other/chat/completions"
    event = one_call(logs)
    assert event["model"] == "gpt-other"
    assert event["provider"] == "azure"
    assert logged_usd(event) == expected_cost(record, "gpt-other")


async def test_an_azure_deployment_is_priced_as_the_model_its_response_names(
    clock: FakeClock, fake: FakeProvider, mode: str, alice: None
) -> None:
    # Before the call only the deployment is known: unknown_model decides (allow: sent
    # with nothing reserved). After it, the response's model prices it.
    guard = make_guard(clock, unknown_model="allow")
    fake.enqueue(Scripted(model="gpt-other"))
    client = azure_client(guard, fake, mode)
    with capture_logs() as logs:
        await maybe(client.chat.completions.create(model="prod-chat", messages=PROMPT))
    (record,) = fake.requests
    assert record.path == "/openai/deployments/prod-chat/chat/completions"
    event = one_call(logs)
    assert (event["model"], event["response_model"]) == ("prod-chat", "gpt-other")
    assert event["reserved_usd"] == 0
    assert "priced" not in event
    assert logged_usd(event) == expected_cost(record, "gpt-other") > 0


async def test_an_unknown_azure_deployment_is_refused_under_block(
    clock: FakeClock, fake: FakeProvider, mode: str, alice: None
) -> None:
    guard = make_guard(clock, unknown_model="block")
    client = azure_client(guard, fake, mode)
    with capture_logs() as logs, pytest.raises(openai.PermissionDeniedError) as refused:
        await maybe(client.chat.completions.create(model="prod-chat", messages=PROMPT))
    assert isinstance(refused.value, UnknownModelRefused)
    assert fake.requests == []
    assert [e["model"] for e in logs if e["event"] == "unknown_model"] == ["prod-chat"]


async def test_azure_responses_without_deployment_path(
    guard: Guard, fake: FakeProvider, mode: str, alice: None
) -> None:
    client = azure_client(guard, fake, mode)
    with capture_logs() as logs:
        await maybe(client.responses.create(model="gpt-test", input="Azure responses"))
    (record,) = fake.requests
    assert record.path == "/openai/responses"
    assert_charged(guard, "alice", logs, record, "gpt-test", stream=False, provider="azure")


def test_provider_is_openai_for_api_openai_com_and_can_be_forced(
    guard: Guard, fake: FakeProvider
) -> None:
    client = guard.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0),
        provider="openai",
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert one_call(logs)["provider"] == "openai"
    default = openai.OpenAI(api_key="k")
    from payi_guard.meter.options import MeterOptions
    from payi_guard.meter.parse import classify
    from payi_guard.meter.transport import TransportMeter

    meter = TransportMeter(guard, MeterOptions(), __import__("httpx2"))
    endpoint = classify("POST", "/v1/chat/completions", "api.openai.com")
    assert endpoint is not None
    assert meter.provider_for(endpoint, default.base_url) == "openai"
    internal = __import__("httpx2").URL("http://llm.internal:8000/v1/chat/completions")
    assert meter.provider_for(endpoint, internal) == "openai-compatible"
