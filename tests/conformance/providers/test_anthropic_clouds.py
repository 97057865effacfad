"""Claude through the anthropic SDK's cloud clients, on recorded real answers.

``anthropic.AnthropicBedrock`` sends each Messages call to Bedrock's runtime API, signed
with SigV4 (``/model/{modelId}/invoke``; ``invoke-with-response-stream`` answers with an
AWS event stream); ``anthropic.AnthropicVertex`` sends it to Vertex AI
(``.../publishers/anthropic/models/{model}:rawPredict``, ``:streamRawPredict``), the
model in the path. Both are replayed here, with the real SDK, against the loopback
server:

* Bedrock: every Anthropic ``InvokeModel`` recording of the Bedrock corpus (recorded
  through boto3; the same wire), charged the corpus's tokens at genai-prices' ``aws``
  price;
* Vertex AI: Anthropic API recordings of the main corpus (Vertex AI serves Claude's
  Messages API in the same JSON and event-stream format; only the address differs),
  charged the tokens the guard reads through the plain ``anthropic.Anthropic`` client
  on the same recording, at genai-prices' ``google`` price.

The application gets what it gets bare; the request reaches the server as the SDK built
it (the Bedrock one still signed, byte for byte).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, MutableMapping, Sequence
from decimal import Decimal
from typing import Any

import pytest
from structlog.testing import capture_logs

from conformance.providers.cassette import load
from conformance.providers.corpus import BEDROCK, PRICED_AT, Charge, Recording, priced
from conformance.providers.drivers import DUMMY_KEY, app_view
from conformance.providers.server import ReplayServer
from payi_guard import BudgetExceeded, Guard, is_refusal
from payi_guard.clock import FakeClock
from payi_guard.meter.parse import classify

anthropic = pytest.importorskip("anthropic")
pytest.importorskip("botocore")
pytest.importorskip("genai_prices")

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

USER = "conformance"
PROMPT = [{"role": "user", "content": "Hi"}]

CLAUDE_ON_BEDROCK = [
    r
    for r in BEDROCK
    if r.call.driver in ("bedrock.invoke", "bedrock.invoke_stream") and "anthropic." in r.call.model
]

# Anthropic API recordings (main corpus) replayed as Vertex AI answers: plain, streamed,
# with a cache write then a read.
VERTEX = (
    "../../cassettes/logfire/test_anthropic/test_sync_messages_version_latest.yaml",
    "../../cassettes/logfire/test_anthropic/test_sync_messages_stream_version_latest.yaml",
    "../../cassettes/pydantic-ai/test_anthropic/test_anthropic_cache_real_api.yaml",
)


def make_guard(limit: float = 1000) -> Guard:
    guard = Guard(
        {"default": [{"max": limit, "per": "day"}]}, clock=FakeClock(PRICED_AT.timestamp())
    )
    guard.default_user_id = USER
    return guard


def tokens_of(event: MutableMapping[str, Any]) -> Charge:
    return Charge(
        event["input_tokens"],
        event["output_tokens"],
        event["cache_read_tokens"],
        event["cache_write_tokens"],
    )


def calls_in(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    assert not [e for e in logs if e["event"] in ("usage_invalid", "meter_error")]
    return [e for e in logs if e["event"] == "genai_call"]


def run(
    make: Callable[[], Any],
    server: ReplayServer,
    exchanges: Any,
    model: str,
    stream: bool,
    aio: bool = False,
) -> tuple[list[Any], list[tuple[str, str, bytes]]]:
    """Make one Messages call per exchange (sync or async client); what the app got."""
    server.load(exchanges)
    client = make()
    seen: list[Any] = []

    async def acall() -> None:
        for _ in exchanges:
            if stream:
                events = await client.messages.create(
                    model=model, max_tokens=200, messages=PROMPT, stream=True
                )
                seen.extend([app_view(event) async for event in events])
            else:
                message = await client.messages.create(model=model, max_tokens=200, messages=PROMPT)
                seen.append(app_view(message))
        await client.close()

    if aio:
        asyncio.run(acall())
    else:
        for _ in exchanges:
            if stream:
                with client.messages.create(
                    model=model, max_tokens=200, messages=PROMPT, stream=True
                ) as events:
                    seen.extend(app_view(event) for event in events)
            else:
                seen.append(
                    app_view(client.messages.create(model=model, max_tokens=200, messages=PROMPT))
                )
        client.close()
    assert server.served_all
    received = [(r.method, r.path, r.body) for r in server.received]
    return seen, received


Sent = list[tuple[str, str, bytes]]


def bare_and_guarded(
    make: Callable[[], Any],
    server: ReplayServer,
    exchanges: Any,
    model: str,
    stream: bool,
    aio: bool,
) -> tuple[Sent, Sent, Guard, list[MutableMapping[str, Any]]]:
    """The calls made bare, then behind ``guard.wrap`` (its logs kept).

    The app gets the same both ways, and the server the same paths. Returns what the
    server received each time, the guard and its logs.
    """
    bare = run(make, server, exchanges, model, stream, aio)
    guard = make_guard()
    with capture_logs() as logs:
        guarded = run(lambda: guard.wrap(make()), server, exchanges, model, stream, aio)
    assert guarded[0] == bare[0]  # what the app got
    assert [(m, p) for m, p, _ in guarded[1]] == [(m, p) for m, p, _ in bare[1]]
    return bare[1], guarded[1], guard, logs


def bedrock_client(server: ReplayServer, *, aio: bool = False) -> Any:
    cls = anthropic.AsyncAnthropicBedrock if aio else anthropic.AnthropicBedrock
    return cls(
        aws_access_key="testing",
        aws_secret_key=DUMMY_KEY,
        aws_region="us-east-1",
        base_url=server.url,
        max_retries=0,
    )


def vertex_client(server: ReplayServer, *, aio: bool = False) -> Any:
    cls = anthropic.AsyncAnthropicVertex if aio else anthropic.AnthropicVertex
    return cls(
        region="us-east5",
        project_id="payi-guard-tests",
        access_token=DUMMY_KEY,
        base_url=f"{server.url}/v1",
        max_retries=0,
    )


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("recording", CLAUDE_ON_BEDROCK, ids=lambda r: r.id)
def test_claude_on_bedrock_is_charged_as_bedrock_bills_it(
    recording: Recording, aio: bool, replay_server: ReplayServer
) -> None:
    exchanges = load(recording.cassette)
    stream = recording.call.driver == "bedrock.invoke_stream"
    model = recording.call.model
    bare, guarded, guard, logs = bare_and_guarded(
        lambda: bedrock_client(replay_server, aio=aio), replay_server, exchanges, model, stream, aio
    )
    assert [b for *_, b in guarded] == [b for *_, b in bare]  # the signed bodies unchanged
    operation = "invoke-with-response-stream" if stream else "invoke"
    assert all(path.endswith(f"/{operation}") for _, path, _ in bare)
    calls = calls_in(logs)
    assert len(calls) == recording.call.calls
    total = Decimal(0)
    for event, charge in zip(calls, recording.charge, strict=True):
        assert (event["provider"], event["outcome"], event["stream"]) == ("aws", "ok", stream)
        assert tokens_of(event) == charge
        cost = Decimal(str(event["cost_usd"]))
        assert cost == priced(*recording.price, charge)
        total += cost
    assert total > 0
    assert guard.usage(USER)[0].used == total  # settled, nothing left held


@pytest.mark.parametrize("aio", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("cassette", VERTEX, ids=lambda c: c.rsplit("/", 1)[-1][:-5])
def test_claude_on_vertex_ai_is_charged_at_vertex_prices(
    cassette: str, aio: bool, replay_server: ReplayServer
) -> None:
    exchanges = load(cassette)
    first = exchanges[0].request_json
    model, stream = first["model"], first.get("stream") is True
    # The tokens: what the guard reads through Anthropic's own API on the same answers.
    direct = make_guard()
    with capture_logs() as direct_logs:
        run(
            lambda: direct.wrap(
                anthropic.Anthropic(api_key=DUMMY_KEY, base_url=replay_server.url, max_retries=0)
            ),
            replay_server,
            exchanges,
            model,
            stream,
        )
    charges = [tokens_of(e) for e in calls_in(direct_logs)]
    assert len(charges) == len(exchanges)
    assert all(e["provider"] == "anthropic" for e in calls_in(direct_logs))

    bare, _, guard, logs = bare_and_guarded(
        lambda: vertex_client(replay_server, aio=aio), replay_server, exchanges, model, stream, aio
    )
    specifier = "streamRawPredict" if stream else "rawPredict"
    assert all(
        path.endswith(f"/publishers/anthropic/models/{model}:{specifier}") for _, path, _ in bare
    )
    calls = calls_in(logs)
    assert [tokens_of(e) for e in calls] == charges
    total = Decimal(0)
    for event, charge in zip(calls, charges, strict=True):
        assert (event["provider"], event["outcome"], event["model"]) == ("google", "ok", model)
        cost = Decimal(str(event["cost_usd"]))
        assert cost == priced("google", model, charge)
        total += cost
    assert total > 0
    assert guard.usage(USER)[0].used == total


def test_instrument_meters_claude_on_bedrock_too(replay_server: ReplayServer) -> None:
    (recording,) = [r for r in CLAUDE_ON_BEDROCK if r.call.driver == "bedrock.invoke_stream"]
    exchanges = load(recording.cassette)
    guard = make_guard()
    guard.instrument(default_user_id=USER)
    try:
        with capture_logs() as logs:
            run(
                lambda: bedrock_client(replay_server),
                replay_server,
                exchanges,
                recording.call.model,
                True,
            )
    finally:
        guard.uninstrument()
    (event,) = calls_in(logs)
    assert (event["provider"], tokens_of(event)) == ("aws", recording.charge[0])
    assert Decimal(str(event["cost_usd"])) == priced(*recording.price, recording.charge[0])


def test_vertex_token_counts_and_other_paths_are_not_metered() -> None:
    base = "/v1/projects/p/locations/us-east5/publishers/anthropic/models"
    assert classify("POST", f"{base}/count-tokens:rawPredict") is None
    assert classify("POST", f"{base}/claude-sonnet-4-5@20250929:predict") is None
    assert classify("GET", f"{base}/claude-sonnet-4-5@20250929:rawPredict") is None
    endpoint = classify("POST", f"{base}/claude-sonnet-4-5%4020250929:streamRawPredict")
    assert endpoint is not None
    assert (endpoint.kind, endpoint.provider, endpoint.deployment) == (
        "anthropic_messages",
        "google",
        "claude-sonnet-4-5@20250929",
    )


@pytest.mark.parametrize("cloud", ["bedrock", "vertex"])
def test_a_refused_cloud_call_is_the_sdks_rate_limit_and_never_sent(
    cloud: str, replay_server: ReplayServer
) -> None:
    guard = make_guard(limit=0.000001)  # less than any call reserves
    replay_server.load([])
    client = guard.wrap(
        bedrock_client(replay_server) if cloud == "bedrock" else vertex_client(replay_server)
    )
    model = (
        "anthropic.claude-3-sonnet-20240229-v1:0"
        if cloud == "bedrock"
        else "claude-sonnet-4@20250514"
    )
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=model, max_tokens=200, messages=PROMPT)
    assert is_refusal(caught.value)
    assert isinstance(caught.value, BudgetExceeded)
    assert replay_server.received == []
    client.close()


def test_the_recordings_are_what_the_tests_say() -> None:
    # The Bedrock set is not empty and streams are in it; each Vertex recording is a
    # Messages answer of Anthropic's own API.
    assert {r.call.driver for r in CLAUDE_ON_BEDROCK} == {"bedrock.invoke", "bedrock.invoke_stream"}
    for cassette in VERTEX:
        for exchange in load(cassette):
            assert exchange.uri.startswith("https://api.anthropic.com/v1/messages")
            assert json.loads(exchange.request_body)["model"]
