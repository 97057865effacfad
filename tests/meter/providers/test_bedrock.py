"""boto3 bedrock-runtime through the guard: refusals, streams left early, usage, instrument."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from dataclasses import replace
from decimal import ROUND_CEILING, Decimal
from typing import Any

import genai_prices
import pytest
from conformance.providers.cassette import Exchange
from conformance.providers.corpus import PRICED_AT
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
    used,
)
from payi_guard import BudgetExceeded, is_refusal
from payi_guard.exceptions import UnknownModelRefused
from payi_guard.meter import guarded_by
from payi_guard.meter.providers.bedrock import GuardedSession
from payi_guard.meter.providers.eventstream import EventStreamDecoder

boto3 = pytest.importorskip("boto3")
import botocore.exceptions  # noqa: E402
from botocore.config import Config  # noqa: E402

CONVERSE = "bedrock/openllmetry/test_meta_converse_with_events_with_no_content"
CONVERSE_STREAM = "bedrock/pydantic-ai/test_bedrock_model_stream"
INVOKE = "bedrock/openllmetry/test_anthropic_3_completion_string_content"
INVOKE_STREAM = "bedrock/openllmetry/test_anthropic_3_completion_streaming"
MESSAGES: Any = [{"role": "user", "content": [{"text": "Hi"}]}]
CLAUDE = "anthropic.claude-3-sonnet-20240229-v1:0"
CLAUDE_BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 50,
        "messages": [{"role": "user", "content": "Hi"}],
    }
)


def client_for(server: ReplayServer, *, mode: str = "standard", attempts: int = 1) -> Any:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="secret", region_name="us-east-1"
    )
    config = Config(retries={"total_max_attempts": attempts, "mode": mode})
    return session.client("bedrock-runtime", endpoint_url=server.url, config=config)


def call(client: Any, operation: str) -> Any:
    if operation == "converse":
        return client.converse(modelId="meta.llama3-2-1b-instruct-v1:0", messages=MESSAGES)
    if operation == "converse_stream":
        response = client.converse_stream(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)
        return list(response["stream"])
    if operation == "invoke":
        return client.invoke_model(modelId=CLAUDE, body=CLAUDE_BODY)["body"].read()
    response = client.invoke_model_with_response_stream(modelId=CLAUDE, body=CLAUDE_BODY)
    return list(response["body"])


RECORDED = {
    "converse": CONVERSE,
    "converse_stream": CONVERSE_STREAM,
    "invoke": INVOKE,
    "invoke_stream": INVOKE_STREAM,
}


@pytest.mark.parametrize("mode", ["legacy", "standard", "adaptive"])
@pytest.mark.parametrize("operation", list(RECORDED))
def test_refusal_is_one_throttling_exception_never_retried(
    server: ReplayServer, mode: str, operation: str
) -> None:
    server.load(served(RECORDED[operation]))
    guard = make_guard(TIGHT)
    client = guard.wrap(client_for(server, mode=mode, attempts=5))
    with capture_logs() as logs, pytest.raises(client.exceptions.ThrottlingException) as info:
        call(client, operation)
    exc: Any = info.value
    assert exc.response["Error"]["Code"] == "ThrottlingException"
    assert exc.response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert isinstance(exc, BudgetExceeded)
    assert is_refusal(exc)
    assert exc.user_id == USER
    assert server.received == []
    assert len(events(logs, "budget_exceeded")) == 1  # botocore did not retry it
    assert not events(logs, "genai_call")


def test_application_inference_profile_follows_the_unknown_model_policy(
    server: ReplayServer,
) -> None:
    profile = "arn:aws:bedrock:us-east-1:012345678901:application-inference-profile/abc123"
    server.load(served(CONVERSE))
    client = make_guard().wrap(client_for(server))
    with pytest.raises(client.exceptions.AccessDeniedException) as info:
        client.converse(modelId=profile, messages=MESSAGES)
    assert isinstance(info.value, UnknownModelRefused)
    assert not is_refusal(info.value)
    assert server.received == []

    allowing = make_guard(unknown_model={"input_per_mtok": 1, "output_per_mtok": 2})
    client = allowing.wrap(client_for(server))
    with capture_logs() as logs:
        client.converse(modelId=profile, messages=MESSAGES)
    call_event = one_call(logs)
    assert call_event["model"] == profile
    assert (call_event["input_tokens"], call_event["output_tokens"]) == (52, 30)
    assert usd(call_event["cost_usd"]) == usd("0.000112")  # 52 x $1 + 30 x $2 per MTok


@pytest.mark.parametrize("operation", ["converse_stream", "invoke_stream"])
def test_stream_closed_early_is_settled_once(server: ReplayServer, operation: str) -> None:
    server.load(served(RECORDED[operation]))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        if operation == "converse_stream":
            stream = client.converse_stream(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)[
                "stream"
            ]
        else:
            stream = client.invoke_model_with_response_stream(modelId=CLAUDE, body=CLAUDE_BODY)[
                "body"
            ]
        next(iter(stream))
        stream.close()
    assert_settled_early(guard, logs)


def test_invoke_body_left_unread_is_charged_from_the_headers(server: ReplayServer) -> None:
    server.load(served(INVOKE))
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        response = client.invoke_model(modelId=CLAUDE, body=CLAUDE_BODY)
        response["body"].close()
    call_event = one_call(logs)
    assert call_event["outcome"] == "ok"
    assert (call_event["input_tokens"], call_event["output_tokens"]) == (16, 19)


def test_a_titan_embedding_without_count_headers_is_charged_from_its_body(
    server: ReplayServer,
) -> None:
    # The recorded answer (bedrock/pydantic-ai/TestBedrock.test_titan_v2_minimal) without
    # its token-count header, as a proxy that drops it would pass it on.
    model = "amazon.titan-embed-text-v2:0"
    uri = f"https://bedrock-runtime.us-east-1.amazonaws.com/model/{model}/invoke"
    server.load([made_up(uri, {"embedding": [-0.0529, 0.1153], "inputTextTokenCount": 5})])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        response = client.invoke_model(modelId=model, body=json.dumps({"inputText": "Hi"}))
        assert json.loads(response["body"].read())["inputTextTokenCount"] == 5
    call_event = one_call(logs)
    assert not events(logs, "usage_invalid")
    assert (call_event["outcome"], call_event["input_tokens"], call_event["output_tokens"]) == (
        "ok",
        5,
        0,
    )
    assert usd(call_event["cost_usd"]) == Decimal("0.0000001")  # $0.02 per million


def test_converse_with_untrusted_usage_is_charged_its_reservation(server: ReplayServer) -> None:
    uri = "https://bedrock-runtime.us-east-1.amazonaws.com/model/amazon.nova-micro-v1%3A0/converse"
    body = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hello"}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": 3, "outputTokens": -1, "totalTokens": 2},
    }
    server.load([made_up(uri, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        client.converse(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)
    assert_unverified(guard, logs, "outputTokens is negative")


def test_stream_without_usage_is_charged_its_reservation(server: ReplayServer) -> None:
    # The recorded Converse stream, without its final metadata event.
    recorded = served(CONVERSE_STREAM)[0]
    frames = _frames(recorded.body)
    assert json.loads(frames[-1][1])["usage"]["outputTokens"] == 82
    body = b"".join(raw for raw, _payload in frames[:-1])
    server.load([Exchange("made-up", 0, "POST", recorded.uri, b"", 200, recorded.headers, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        list(client.converse_stream(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)["stream"])
    assert_unverified(guard, logs, "no usage reported")


def test_a_stream_ended_by_an_exception_event_is_settled_at_once(server: ReplayServer) -> None:
    # The recorded Converse stream cut after its first two messages, then the exception
    # message Bedrock sends when the model fails mid-stream.
    recorded = served(CONVERSE_STREAM)[0]
    frames = [raw for raw, _payload in _frames(recorded.body)[:2]]
    failure = _exception("modelStreamErrorException", {"message": "The model failed."})
    body = b"".join([*frames, failure])
    server.load([Exchange("made-up", 0, "POST", recorded.uri, b"", 200, recorded.headers, body)])
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs:
        response = client.converse_stream(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)
        with pytest.raises(botocore.exceptions.EventStreamError, match="modelStreamError"):
            list(response["stream"])
        # The app still holds the response: the call is settled all the same.
        call = one_call(logs)
    assert call["outcome"] == "error"
    assert 0 < usd(call["cost_usd"]) < usd(call["reserved_usd"])
    assert used(guard) == usd(call["cost_usd"])
    del response


def _exception(kind: str, payload: dict[str, Any]) -> bytes:
    """An event-stream exception message, as Bedrock sends one."""
    return _message(
        _header(":exception-type", kind)
        + _header(":content-type", "application/json")
        + _header(":message-type", "exception"),
        payload,
    )


def _frames(body: bytes) -> list[tuple[bytes, bytes]]:
    """The raw bytes and payload of each event-stream message."""
    out = []
    pos = 0
    while pos < len(body):
        total = int.from_bytes(body[pos : pos + 4], "big")
        (message,) = EventStreamDecoder().feed(body[pos : pos + total])
        out.append((body[pos : pos + total], message.payload))
        pos += total
    return out


def test_instrument_guards_clients_made_before_and_after(server: ReplayServer) -> None:
    guard = make_guard()
    before = client_for(server)
    guard.instrument()
    try:
        after = client_for(server)
        other = boto3.session.Session(region_name="us-east-1").client(
            "s3", endpoint_url=server.url, aws_access_key_id="a", aws_secret_access_key="b"
        )
        with capture_logs() as logs:
            for client in (before, after):
                server.load(served(CONVERSE))
                call(client, "converse")
        listing = b'<ListAllMyBucketsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"/>'
        server.load([made_up(server.url + "/", listing, content_type="application/xml")])
        other.list_buckets()
        assert not isinstance(other._endpoint.http_session, GuardedSession)  # bedrock only
        assert isinstance(after._endpoint.http_session, GuardedSession)
        assert guarded_by(before) is guarded_by(after) is guard
    finally:
        guard.uninstrument()
    assert guarded_by(before) is None
    calls = events(logs, "genai_call")
    assert [(c["provider"], c["output_tokens"]) for c in calls] == [("aws", 30), ("aws", 30)]
    server.load(served(CONVERSE))
    with capture_logs() as logs:
        call(before, "converse")
    assert not events(logs, "genai_call")  # uninstrument restored the client


def test_wrap_refuses_other_services() -> None:
    s3 = boto3.session.Session(region_name="us-east-1").client(
        "s3", aws_access_key_id="a", aws_secret_access_key="b"
    )
    with pytest.raises(TypeError, match="bedrock-runtime"):
        make_guard().wrap(s3)


def test_cross_region_profiles_resolve_to_the_models_price(server: ReplayServer) -> None:
    guard = make_guard()
    client = guard.wrap(client_for(server))
    costs = []
    for model in (
        "anthropic.claude-3-5-sonnet-20241022-v2:0",
        "us.anthropic.claude-3-5-sonnet-20241022-v2:0",
        "arn:aws:bedrock:us-east-1::foundation-model/anthropic.claude-3-5-sonnet-20241022-v2:0",
    ):
        server.load(served("bedrock/crewai/test_bedrock_async_basic_call"))
        with capture_logs() as logs:
            client.converse(modelId=model, messages=MESSAGES)
        costs.append(usd(one_call(logs)["cost_usd"]))
    assert costs[0] > 0
    assert len(set(costs)) == 1, costs


def test_chunk_bytes_pass_through_unchanged(server: ReplayServer) -> None:
    server.load(served(INVOKE_STREAM))
    client = make_guard().wrap(client_for(server))
    events_seen = call(client, "invoke_stream")
    texts = [json.loads(event["chunk"]["bytes"]) for event in events_seen]
    recorded = [
        json.loads(base64.b64decode(json.loads(payload)["bytes"]))
        for _raw, payload in _frames(served(INVOKE_STREAM)[0].body)
    ]
    assert texts == recorded


def test_an_error_status_releases_the_reservation(server: ReplayServer) -> None:
    uri = "https://bedrock-runtime.us-east-1.amazonaws.com/model/amazon.nova-micro-v1%3A0/converse"
    error = made_up(uri, {"message": "Model is not ready"})
    server.load(
        [
            replace(
                error,
                status=400,
                headers=(*error.headers, ("x-amzn-errortype", "ValidationException")),
            )
        ]
    )
    guard = make_guard()
    client = guard.wrap(client_for(server))
    with capture_logs() as logs, pytest.raises(client.exceptions.ValidationException) as info:
        client.converse(modelId="amazon.nova-micro-v1:0", messages=MESSAGES)
    assert not is_refusal(info.value)
    calls = events(logs, "genai_call")
    assert [(c["outcome"], c["cost_usd"]) for c in calls] == [("error", 0.0)]
    assert guard.usage(USER)[0].used == 0


# --- 1-hour cache writes -------------------------------------------------------------------

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
HOUR_CACHE_BODY = json.dumps(
    {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 100,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "text",
                        "text": "Hi",
                        "cache_control": {"type": "ephemeral", "ttl": "1h"},
                    }
                ],
            }
        ],
    }
)
ANTHROPIC_USAGE: dict[str, Any] = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 100_000,
    "cache_read_input_tokens": 0,
    "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100_000},
    "output_tokens": 40,
}
CONVERSE_USAGE = {
    "inputTokens": 12,
    "outputTokens": 40,
    "totalTokens": 100_052,
    "cacheReadInputTokens": 0,
    "cacheWriteInputTokens": 100_000,
    "cacheDetails": [{"ttl": "1h", "inputTokens": 100_000}],
}


def _header(name: str, value: str) -> bytes:
    key, text = name.encode(), value.encode()
    return bytes([len(key)]) + key + b"\x07" + struct.pack(">H", len(text)) + text


def _message(headers: bytes, payload: dict[str, Any]) -> bytes:
    """One event-stream message: its prelude, ``headers``, the JSON payload, the CRCs."""
    data = json.dumps(payload).encode()
    prelude = struct.pack(">II", 16 + len(headers) + len(data), len(headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + headers + data
    return body + struct.pack(">I", zlib.crc32(body))


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    """One event-stream frame, as Bedrock sends it."""
    return _message(
        _header(":event-type", event_type)
        + _header(":content-type", "application/json")
        + _header(":message-type", "event"),
        payload,
    )


def _chunk(obj: dict[str, Any]) -> bytes:
    return _event("chunk", {"bytes": base64.b64encode(json.dumps(obj).encode()).decode()})


def _stream_exchange(uri: str, body: bytes) -> Exchange:
    headers = (
        ("content-type", "application/vnd.amazon.eventstream"),
        ("transfer-encoding", "chunked"),
    )
    return Exchange("made-up", 0, "POST", uri, b"", 200, headers, body)


def _genai_prices(body: dict[str, Any], flavor: str) -> Decimal:
    """What genai-prices charges for the usage in ``body``, rounded up to a nano-dollar."""
    extracted = genai_prices.extract_usage(body, provider_id="aws", api_flavor=flavor)
    price = genai_prices.calc_price(
        extracted.usage, SONNET, provider_id="aws", genai_request_timestamp=PRICED_AT
    )
    return Decimal(price.total_price).quantize(Decimal("1e-9"), rounding=ROUND_CEILING)


@pytest.mark.parametrize("operation", ["converse", "converse_stream", "invoke", "invoke_stream"])
def test_one_hour_cache_writes_are_charged_at_their_own_rate(
    server: ReplayServer, operation: str
) -> None:
    base = "https://bedrock-runtime.us-east-1.amazonaws.com/model/" + SONNET
    converse = {
        "output": {"message": {"role": "assistant", "content": [{"text": "Hello"}]}},
        "stopReason": "end_turn",
        "usage": CONVERSE_USAGE,
        "metrics": {"latencyMs": 100},
    }
    message: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5-20250929",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": "end_turn",
        "usage": ANTHROPIC_USAGE,
    }
    if operation == "converse":
        server.load([made_up(f"{base}/converse", converse)])
    elif operation == "converse_stream":
        frames = [
            _event("messageStart", {"role": "assistant"}),
            _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hello"}}),
            _event("contentBlockStop", {"contentBlockIndex": 0}),
            _event("messageStop", {"stopReason": "end_turn"}),
            _event("metadata", {"usage": CONVERSE_USAGE, "metrics": {"latencyMs": 100}}),
        ]
        server.load([_stream_exchange(f"{base}/converse-stream", b"".join(frames))])
    elif operation == "invoke":
        # The headers give one cache-write total; the body tells the 1-hour ones apart.
        counts = {
            "input": "12",
            "output": "40",
            "cache-read-input": "0",
            "cache-write-input": "100000",
        }
        headers = tuple((f"x-amzn-bedrock-{k}-token-count", v) for k, v in counts.items())
        exchange = made_up(f"{base}/invoke", message)
        server.load([replace(exchange, headers=exchange.headers + headers)])
    else:
        start = {
            **message,
            "content": [],
            "stop_reason": None,
            "usage": {**ANTHROPIC_USAGE, "output_tokens": 1},
        }
        metrics = {
            "inputTokenCount": 12,
            "outputTokenCount": 40,
            "invocationLatency": 1,
            "firstByteLatency": 1,
            "cacheReadInputTokenCount": 0,
            "cacheWriteInputTokenCount": 100_000,
        }
        events_: list[dict[str, Any]] = [
            {"type": "message_start", "message": start},
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Hello"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 40},
            },
            {"type": "message_stop", "amazon-bedrock-invocationMetrics": metrics},
        ]
        server.load(
            [
                _stream_exchange(
                    f"{base}/invoke-with-response-stream", b"".join(map(_chunk, events_))
                )
            ]
        )
    guard = make_guard([{"max": 1000, "per": "day"}])
    client = guard.wrap(client_for(server))
    messages: Any = [
        {
            "role": "user",
            "content": [{"text": "Hi"}, {"cachePoint": {"type": "default", "ttl": "1h"}}],
        }
    ]
    with capture_logs() as logs:
        if operation == "converse":
            client.converse(modelId=SONNET, messages=messages)
        elif operation == "converse_stream":
            list(client.converse_stream(modelId=SONNET, messages=messages)["stream"])
        elif operation == "invoke":
            client.invoke_model(modelId=SONNET, body=HOUR_CACHE_BODY)["body"].read()
        else:
            list(
                client.invoke_model_with_response_stream(modelId=SONNET, body=HOUR_CACHE_BODY)[
                    "body"
                ]
            )
    line = one_call(logs)
    expected = (
        _genai_prices(converse, "default")
        if "converse" in operation
        else _genai_prices(message, "anthropic")
    )
    assert expected == Decimal("0.6606996")  # $6.60 a million 1-hour writes, not $4.125
    assert usd(line["cost_usd"]) == expected
