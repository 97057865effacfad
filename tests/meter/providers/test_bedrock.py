"""boto3 bedrock-runtime through the guard: refusals, streams left early, usage, instrument."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from conformance.providers.cassette import Exchange
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
from payi_guard import BudgetExceeded, is_refusal
from payi_guard.exceptions import UnknownModelRefused
from payi_guard.meter import guarded_by
from payi_guard.meter.providers.bedrock import GuardedSession
from payi_guard.meter.providers.eventstream import EventStreamDecoder

boto3 = pytest.importorskip("boto3")
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
