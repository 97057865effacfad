"""google-genai through the guard: refusals, streams left early, untrusted usage, instrument."""

from __future__ import annotations

import asyncio
import gc
import json
from datetime import datetime, timezone
from decimal import Decimal
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
    one_call,
    served,
    usd,
)
from payi_guard import BudgetExceeded, Guard, is_refusal
from payi_guard.clock import FakeClock
from payi_guard.exceptions import UnknownModelRefused
from payi_guard.meter import flush_abandoned_streams, guarded_by

genai = pytest.importorskip("google.genai")
from google.genai import errors, types  # noqa: E402

STREAM = "gemini/pydantic-ai/test_google_model_stream"
LONG_STREAM = "gemini/pydantic-ai/test_google_stream_usage_is_live_mid_stream"
GENERATE = "gemini/crewai/test_gemini_token_usage_tracking"
MODEL = "gemini-2.5-flash"


def client_for(server: ReplayServer, *, retries: int = 0) -> Any:
    retry = types.HttpRetryOptions(attempts=retries, initial_delay=0.001, max_delay=0.001)
    options = types.HttpOptions(
        base_url=server.url, api_version="v1beta", retry_options=retry if retries else None
    )
    return genai.Client(api_key="k", http_options=options)


async def call(client: Any, mode: str, stream: bool) -> Any:
    models = client.aio.models if mode == "async" else client.models
    if stream:
        if mode == "async":
            return [
                chunk
                async for chunk in await models.generate_content_stream(model=MODEL, contents="Hi")
            ]
        return list(models.generate_content_stream(model=MODEL, contents="Hi"))
    if mode == "async":
        return await models.generate_content(model=MODEL, contents="Hi")
    return models.generate_content(model=MODEL, contents="Hi")


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("stream", [False, True])
async def test_refusal_is_one_client_error_never_retried(
    server: ReplayServer, mode: str, stream: bool
) -> None:
    server.load(served(STREAM if stream else GENERATE))
    guard = make_guard(TIGHT)
    client = guard.wrap(client_for(server, retries=5))
    with capture_logs() as logs, pytest.raises(errors.ClientError) as info:
        await call(client, mode, stream)
    exc = info.value
    assert isinstance(exc, BudgetExceeded)
    assert is_refusal(exc)
    assert exc.code == 429
    assert exc.status == "RESOURCE_EXHAUSTED"
    assert exc.user_id == USER
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1  # HttpRetryOptions did not retry it
    assert not events(logs, "genai_call")
    await client.aio.aclose()
    client.close()


def test_refusal_is_not_retried_by_per_request_retry_options(server: ReplayServer) -> None:
    server.load(served(GENERATE))
    guard = make_guard(TIGHT)
    client = guard.wrap(client_for(server))
    retry = types.HttpRetryOptions(attempts=4, initial_delay=0.001, max_delay=0.001)
    config = types.GenerateContentConfig(http_options=types.HttpOptions(retry_options=retry))
    with capture_logs() as logs, pytest.raises(errors.ClientError):
        client.models.generate_content(model=MODEL, contents="Hi", config=config)
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1


def test_unknown_model_is_refused_as_permission_denied(server: ReplayServer) -> None:
    server.load(served(GENERATE))
    client = make_guard().wrap(client_for(server))
    with pytest.raises(errors.ClientError) as info:
        client.models.generate_content(model="gemini-from-the-future", contents="Hi")
    assert isinstance(info.value, UnknownModelRefused)
    assert info.value.code == 403
    assert not is_refusal(info.value)
    assert server.received == []


def test_a_tuned_model_is_metered_as_a_model_without_a_known_price(server: ReplayServer) -> None:
    # A Developer API tuned model and a Vertex AI endpoint: no price is known for either
    # before the response names its model, so the unknown_model policy applies; they
    # never pass unmetered.
    body = {
        "candidates": [{"content": {"parts": [{"text": "Hi"}], "role": "model"}}],
        "usageMetadata": {"promptTokenCount": 1000, "candidatesTokenCount": 100},
        "modelVersion": MODEL,
    }
    credentials = pytest.importorskip("google.oauth2.credentials")

    def vertex() -> Any:
        return genai.Client(
            vertexai=True,
            project="p",
            location="us-central1",
            credentials=credentials.Credentials(token="t"),
            http_options=types.HttpOptions(base_url=server.url),
        )

    def developer() -> Any:
        return client_for(server)

    tuned = [
        (developer, "tunedModels/my-model", "/v1beta/tunedModels/my-model:generateContent"),
        (
            vertex,
            "projects/p/locations/us-central1/endpoints/123",
            "/endpoints/123:generateContent",
        ),
    ]
    for make_client, model, path in tuned:
        refusing = make_guard().wrap(make_client())
        with pytest.raises(errors.ClientError) as info:
            refusing.models.generate_content(model=model, contents="Hi")
        assert isinstance(info.value, UnknownModelRefused), model
        assert server.received == []
        server.load([made_up(f"https://generativelanguage.googleapis.com{path}", body)])
        allowing = make_guard(unknown_model="allow").wrap(make_client())
        with capture_logs() as logs:
            allowing.models.generate_content(model=model, contents="Hi")
        line = one_call(logs)
        assert server.received[-1].path.endswith(path), server.received[-1].path
        assert line["model"] == "/".join(model.split("/")[-2:])
        assert line["response_model"] == MODEL
        # gemini-2.5-flash: $0.30 / $2.50 a million tokens
        assert usd(line["cost_usd"]) == Decimal("0.00055")
        server.received.clear()


TTS = "gemini-3.8-flash-tts"
"""A model genai-prices prices by tier: $0.50 / $9 a million tokens at the standard
tier, $0.90 / $16.20 at priority from 2026-10-15 (the guard's clock is set after it)."""

AFTER_TIERS = datetime(2026, 11, 27, 12, tzinfo=timezone.utc)


@pytest.mark.parametrize("stream", [False, True])
def test_a_call_is_charged_at_the_tier_its_usage_names(server: ReplayServer, stream: bool) -> None:
    def meta(tier: str | None) -> dict[str, Any]:
        found: dict[str, Any] = {"promptTokenCount": 1000, "candidatesTokenCount": 2000}
        return found if tier is None else {**found, "serviceTier": tier}

    def body(tier: str | None) -> dict[str, Any]:
        part = {"content": {"parts": [{"text": "Hi"}], "role": "model"}, "finishReason": "STOP"}
        return {"candidates": [part], "usageMetadata": meta(tier), "modelVersion": TTS}

    operation = "streamGenerateContent?alt=sse" if stream else "generateContent"
    uri = f"https://generativelanguage.googleapis.com/v1beta/models/{TTS}:{operation}"
    standard = Decimal("0.0185")  # 1000 * $0.50 + 2000 * $9 a million
    priority = Decimal("0.0333")  # 1000 * $0.90 + 2000 * $16.20 a million
    # asked for, reported, charged, logged
    cases: list[tuple[str | None, str | None, Decimal, object]] = [
        (None, "priority", priority, {"service_tier": "priority"}),  # the project's tier
        ("priority", "standard", standard, None),  # asked, not granted
        ("priority", None, priority, {"service_tier": "priority"}),  # the response says none
        (None, "STANDARD", standard, None),
    ]
    for asked, reported, charged, logged in cases:
        content = body(reported)
        if stream:
            data = b"data: " + json.dumps(content).encode() + b"\r\n\r\n"
            server.load([made_up(uri, data, content_type="text/event-stream")])
        else:
            server.load([made_up(uri, content)])
        guard = Guard(
            {"default": [{"max": 100, "per": "day"}]}, clock=FakeClock(AFTER_TIERS.timestamp())
        )
        guard.default_user_id = USER
        client = guard.wrap(client_for(server))
        config = (
            types.GenerateContentConfig(service_tier=types.ServiceTier(asked)) if asked else None
        )
        with capture_logs() as logs:
            if stream:
                list(client.models.generate_content_stream(model=TTS, contents="Hi", config=config))
            else:
                client.models.generate_content(model=TTS, contents="Hi", config=config)
        line = one_call(logs)
        assert (usd(line["cost_usd"]), line.get("price_context")) == (charged, logged), (
            asked,
            reported,
        )
        sent = json.loads(server.received[-1].body)
        assert sent.get("serviceTier") == asked


def test_sync_stream_closed_early_is_settled_once(server: ReplayServer) -> None:
    server.load(served(LONG_STREAM))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        chunks = client.models.generate_content_stream(model=MODEL, contents="Hi")
        next(chunks)
        chunks.close()
        del chunks
        gc.collect()
        assert flush_abandoned_streams()
    assert_settled_early(guard, logs)


async def test_async_stream_left_early_is_settled_once(server: ReplayServer) -> None:
    server.load(served(LONG_STREAM))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        stream = await client.aio.models.generate_content_stream(model=MODEL, contents="Hi")
        async for _chunk in stream:
            break
        await stream.aclose()
        del stream
        # google-genai leaves the response open when its generator is closed early (its
        # inner generators are closed by the event loop once collected): the stream is
        # settled when it is closed or collected.
        await settle_the_loop()
        await client.aio.aclose()
        await settle_the_loop()
        assert flush_abandoned_streams()
    assert_settled_early(guard, logs)


async def settle_the_loop() -> None:
    """Let the loop finalize collected async generators (no waiting on time)."""
    gc.collect()
    for _ in range(5):
        await asyncio.sleep(0)


def test_response_without_usage_is_charged_its_reservation(server: ReplayServer) -> None:
    body = {"candidates": [{"content": {"parts": [{"text": "Hello"}], "role": "model"}}]}
    uri = f"https://generativelanguage.googleapis.com/v1beta/models/{MODEL}:generateContent"
    server.load([made_up(uri, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        client.models.generate_content(model=MODEL, contents="Hi")
    assert_unverified(guard, logs, "no usageMetadata")


@pytest.mark.parametrize(
    ("meta", "reason"),
    [
        ({"promptTokenCount": -4, "totalTokenCount": 10}, "promptTokenCount is negative"),
        ({"promptTokenCount": "4", "totalTokenCount": 10}, "not a number"),
        ({"totalTokenCount": 10}, "promptTokenCount is missing"),
        ({"promptTokenCount": 9, "totalTokenCount": 3}, "below the prompt"),
    ],
)
def test_untrusted_usage_is_charged_its_reservation(
    server: ReplayServer, meta: dict[str, Any], reason: str
) -> None:
    body = {"candidates": [], "usageMetadata": meta}
    uri = f"https://generativelanguage.googleapis.com/v1beta/models/{MODEL}:generateContent"
    server.load([made_up(uri, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        client.models.generate_content(model=MODEL, contents="Hi")
    assert_unverified(guard, logs, reason)


def test_instrument_guards_clients_made_before_and_after(server: ReplayServer) -> None:
    guard = make_guard()
    before = client_for(server)
    guard.instrument()
    try:
        after = client_for(server)
        with capture_logs() as logs:
            for client in (before, after):
                server.load(served(GENERATE))
                client.models.generate_content(model="gemini-2.0-flash-001", contents="Hi")
        assert guarded_by(before) is guarded_by(after) is guard
    finally:
        guard.uninstrument()
    assert guarded_by(before) is None
    calls = events(logs, "genai_call")
    assert [c["provider"] for c in calls] == ["google", "google"]
    assert [c["output_tokens"] for c in calls] == [11, 11]
    server.load(served(GENERATE))
    with capture_logs() as logs:
        before.models.generate_content(model="gemini-2.0-flash-001", contents="Hi")
    assert not events(logs, "genai_call")  # uninstrument restored the client


def test_maximum_output_tokens_bound_the_reservation(server: ReplayServer) -> None:
    server.load(served(GENERATE))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    config = types.GenerateContentConfig(max_output_tokens=10, candidate_count=2)
    with capture_logs() as logs:
        client.models.generate_content(model="gemini-2.0-flash-001", contents="Hi", config=config)
    call_event = one_call(logs)
    # gemini-2.0-flash-001: $0.10 / $0.40 per MTok; 20 output tokens at most.
    assert usd(call_event["reserved_usd"]) < usd("0.00002")


def test_embeddings_without_usage_are_charged_their_reservation(server: ReplayServer) -> None:
    uri = (
        "https://generativelanguage.googleapis.com/v1beta/models/"
        "gemini-embedding-001:batchEmbedContents"
    )
    server.load([made_up(uri, {"embeddings": [{"values": [0.1, 0.2]}]})])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        result = client.models.embed_content(model="gemini-embedding-001", contents="Hello")
    assert result.embeddings is not None
    assert result.embeddings[0].values == [0.1, 0.2]
    assert server.received[0].path.endswith(":batchEmbedContents")
    assert_unverified(guard, logs, "reports no usage")
    assert one_call(logs)["endpoint"] == "embeddings"
    assert one_call(logs)["output_tokens"] == 0


def test_embeddings_with_usage_metadata_are_charged_it(server: ReplayServer) -> None:
    uri = (
        "https://generativelanguage.googleapis.com/v1beta/models/"
        "gemini-embedding-001:batchEmbedContents"
    )
    body = {"embeddings": [{"values": [0.1]}], "usageMetadata": {"promptTokenCount": 2000}}
    server.load([made_up(uri, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        client.models.embed_content(model="gemini-embedding-001", contents="Hello")
    call_event = one_call(logs)
    assert call_event["outcome"] == "ok"
    assert (call_event["input_tokens"], call_event["output_tokens"]) == (2000, 0)
    assert usd(call_event["cost_usd"]) == usd("0.0003")  # $0.15 per MTok


def test_an_hour_of_inline_audio_is_bounded_by_its_size(server: ReplayServer) -> None:
    # An hour of 24 kbit/s audio (10.8 MB inline): Gemini bills 32 tokens a second, 115,200
    # tokens at gemini-2.5-flash's $1.00 per million audio input tokens. The bound counts
    # one token per 8 bytes of the data (1.35 million at the $0.30 text rate), more than
    # the bill; the file allowance alone (32,000 tokens) was a tenth of it.
    uri = f"https://generativelanguage.googleapis.com/v1beta/models/{MODEL}:generateContent"
    usage = {
        "promptTokenCount": 115_210,
        "candidatesTokenCount": 20,
        "totalTokenCount": 115_230,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "AUDIO", "tokenCount": 115_200},
        ],
    }
    answer = {"candidates": [{"content": {"role": "model", "parts": [{"text": "ok"}]}}]}
    server.load([made_up(uri, {**answer, "usageMetadata": usage, "modelVersion": MODEL})])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    audio = types.Part.from_bytes(data=bytes(10_800_000), mime_type="audio/mp3")
    config = types.GenerateContentConfig(max_output_tokens=20)
    with capture_logs() as logs:
        client.models.generate_content(
            model=MODEL, contents=[audio, "Summarise this."], config=config
        )
    line = one_call(logs)
    # 10 text tokens at $0.30, 115,200 audio tokens at $1.00, 20 out at $2.50 per million
    assert usd(line["cost_usd"]) == usd("0.115253")
    assert usd(line["reserved_usd"]) > usd(line["cost_usd"])
