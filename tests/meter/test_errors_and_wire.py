"""Error statuses and retries, resets, gzip, stream_options refusal, passthrough traffic."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, MutableMapping
from decimal import Decimal
from typing import Any

import anthropic
import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import (
    PRICES,
    calls,
    expected_cost,
    logged_usd,
    make_guard,
    one_call,
    used,
    user_message,
)
from payi_guard import is_refusal, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.ledger import MAX_UNITS
from payi_guard.meter.tokenizer import count_input_tokens
from payi_guard.meter.tokens import estimate_input_tokens
from payi_guard.testing import DEFAULT_REPLY, FakeProvider, Scripted

PROMPT = user_message("Tell me a short story about a lighthouse")
FAST_RETRY = {"retry-after-ms": "1"}


def openai_client(guard: Guard, fake: FakeProvider, *, max_retries: int = 0, **options: Any) -> Any:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=max_retries)
    return guard.wrap(client, **options)


def anthropic_client(guard: Guard, fake: FakeProvider) -> Any:
    client = anthropic.Anthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=0)
    return guard.wrap(client)


async def contents(stream: Any, into: list[str]) -> None:
    """Append each chunk's text to ``into`` until the async stream ends or raises."""
    async for chunk in stream:
        into.append(chunk.choices[0].delta.content or "")


def estimated_output(text: str, deltas: int) -> int:
    """The meter's output estimate for received text (2.5 bytes per token, + 16)."""
    return max(math.ceil(len(text.encode()) / 2.5), deltas) + 16


def cost_of(input_tokens: int, output_tokens: int, rate_in: int, rate_out: int) -> Decimal:
    return Decimal(input_tokens * rate_in + output_tokens * rate_out) / 1_000_000


# -- error statuses ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "attempts"),
    [
        (400, openai.BadRequestError, 1),
        (401, openai.AuthenticationError, 1),
        (429, openai.RateLimitError, 3),
        (500, openai.InternalServerError, 3),
    ],
)
def test_openai_error_statuses_release_every_attempt(
    guard: Guard, fake: FakeProvider, status: int, error: type[Exception], attempts: int
) -> None:
    fake.set_default("/chat/completions", Scripted(status=status, headers=FAST_RETRY))
    client = openai_client(guard, fake, max_retries=2)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(error) as info:
            client.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert not is_refusal(info.value)
    assert len(fake.requests) == attempts
    events = calls(logs)
    assert len(events) == attempts  # each attempt reserved and released its own
    assert all(e["outcome"] == "error" and e["cost_usd"] == 0 for e in events)
    assert all(e["reserved_usd"] > 0 for e in events)
    assert used(guard, "alice") == 0


@pytest.mark.parametrize(
    ("status", "error", "attempts"),
    [
        (400, anthropic.BadRequestError, 1),
        (401, anthropic.AuthenticationError, 1),
        (429, anthropic.RateLimitError, 3),
        (500, anthropic.InternalServerError, 3),
        (529, anthropic.InternalServerError, 3),
    ],
)
async def test_anthropic_error_statuses_release_every_attempt(
    guard: Guard, fake: FakeProvider, status: int, error: type[Exception], attempts: int
) -> None:
    fake.set_default("/v1/messages", Scripted(status=status, headers=FAST_RETRY))
    client: Any = guard.wrap(
        anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=2)
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(error):
            await client.messages.create(model="claude-test", max_tokens=50, messages=PROMPT)
    await client.close()
    assert len(fake.requests) == attempts
    events = calls(logs)
    assert len(events) == attempts
    assert all(e["outcome"] == "error" and e["cost_usd"] == 0 for e in events)
    assert used(guard, "alice") == 0


async def test_anthropic_529_then_retries_succeed(guard: Guard, fake: FakeProvider) -> None:
    fake.enqueue(
        Scripted(status=529, headers=FAST_RETRY),
        Scripted(status=500, headers=FAST_RETRY),
        Scripted(status=429),
    )
    client: Any = anthropic.AsyncAnthropic(
        base_url=fake.anthropic_base_url, api_key="k", max_retries=3
    )
    guard.wrap(client)
    with track_context(user_id="alice"), capture_logs() as logs:
        message = await client.messages.create(model="claude-test", max_tokens=50, messages=PROMPT)
    await client.close()
    assert message.content[0].text == DEFAULT_REPLY
    records = fake.requests
    assert [r.status for r in records] == [529, 500, 429, 200]
    events = calls(logs)
    assert [e["outcome"] for e in events] == ["error", "error", "error", "ok"]
    assert logged_usd(events[-1]) == expected_cost(records[-1], "claude-test")
    assert used(guard, "alice") == expected_cost(records[-1], "claude-test")


def test_openai_500_529_429_then_success(guard: Guard, fake: FakeProvider) -> None:
    fake.enqueue(
        Scripted(status=500, headers=FAST_RETRY),
        Scripted(status=529, headers=FAST_RETRY),
        Scripted(status=429),
    )
    client = openai_client(guard, fake, max_retries=3)
    with track_context(user_id="alice"), capture_logs() as logs:
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream)
    assert text == DEFAULT_REPLY
    records = fake.requests
    assert [r.status for r in records] == [500, 529, 429, 200]
    events = calls(logs)
    assert [e["outcome"] for e in events] == ["error", "error", "error", "ok"]
    assert used(guard, "alice") == expected_cost(records[-1], "gpt-test")


# -- resets -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_reset_mid_stream_charges_what_was_consumed(
    guard: Guard, fake: FakeProvider, mode: str
) -> None:
    fake.enqueue(Scripted(reset_after=5))  # role chunk + 4 words, then RST
    with track_context(user_id="alice"), capture_logs() as logs:
        received: list[str] = []
        if mode == "sync":
            client = openai_client(guard, fake)
            stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
            with pytest.raises(openai.APIConnectionError):
                received.extend(c.choices[0].delta.content or "" for c in stream)
        else:
            aclient: Any = guard.wrap(
                openai.AsyncOpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
            )
            astream = await aclient.chat.completions.create(
                model="gpt-test", messages=PROMPT, stream=True
            )
            with pytest.raises(openai.APIConnectionError):
                await contents(astream, received)
            await aclient.close()
    (record,) = fake.requests
    assert record.outcome == "reset"
    assert "".join(received) == " ".join(DEFAULT_REPLY.split()[:4])
    event = one_call(logs)
    assert event["outcome"] == "error"
    # Chat reports its input only at the end: the request's estimate stands in for it.
    body = {k: v for k, v in record.json.items() if k != "stream_options"}
    assert event["input_tokens"] == estimate_input_tokens(body, endpoint="chat")
    assert event["output_tokens"] == estimated_output("".join(received), 4)
    cost = cost_of(event["input_tokens"], event["output_tokens"], 1, 2)
    assert logged_usd(event) == cost
    assert used(guard, "alice") == cost


def test_reset_before_the_status_line_is_released_and_retried(
    guard: Guard, fake: FakeProvider
) -> None:
    fake.enqueue(Scripted(reset_after=0))
    client = openai_client(guard, fake, max_retries=1)
    with track_context(user_id="alice"), capture_logs() as logs:
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
    first, second = fake.requests
    assert first.outcome == "reset"
    events = calls(logs)
    assert [e["outcome"] for e in events] == ["error", "ok"]
    assert events[0]["cost_usd"] == 0
    assert used(guard, "alice") == expected_cost(second, "gpt-test")


def test_reset_inside_a_plain_body_charges_the_input_and_the_output_cap(
    guard: Guard, fake: FakeProvider
) -> None:
    # A plain answer is generated whole before its headers are sent: the provider billed
    # it, whatever the client received. Its usage was in the part lost: charged the
    # input and the most the answer can have been.
    fake.enqueue(Scripted(reset_after=40))
    client = openai_client(guard, fake, max_retries=1)
    with track_context(user_id="alice"), capture_logs() as logs:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=50)
    first, second = fake.requests
    lost, ok = calls(logs)
    assert lost["outcome"] == "error"
    # No tokenizer is known for gpt-test: the input's bound, as reserved.
    assert lost["input_tokens"] == estimate_input_tokens(first.json, endpoint="chat")
    assert lost["output_tokens"] == 50
    assert lost["cost_usd"] == lost["reserved_usd"]
    assert logged_usd(ok) == expected_cost(second, "gpt-test")
    assert used(guard, "alice") == logged_usd(lost) + logged_usd(ok)


def test_a_lost_plain_body_of_an_openai_model_is_charged_its_counted_input(
    clock: FakeClock, fake: FakeProvider
) -> None:
    guard = make_guard(clock, prices={**PRICES, "gpt-4o-mini": PRICES["gpt-test"]})
    fake.enqueue(Scripted(reset_after=40))
    client = openai_client(guard, fake)
    with track_context(user_id="alice"), capture_logs() as logs, pytest.raises(openai.APIError):
        client.chat.completions.create(model="gpt-4o-mini", messages=PROMPT, max_tokens=50)
    (lost,) = calls(logs)
    counted = count_input_tokens(fake.requests[0].json, "chat", "gpt-4o-mini")
    assert counted is not None
    assert counted < estimate_input_tokens(fake.requests[0].json, endpoint="chat")
    assert (lost["outcome"], lost["input_tokens"], lost["output_tokens"]) == ("error", counted, 50)
    assert used(guard, "alice") == logged_usd(lost) > 0


async def test_a_call_cancelled_while_its_plain_body_is_read_is_charged(
    guard: Guard, clock: FakeClock
) -> None:
    # The 200 and its headers came, the body is still on its way when the app's task
    # is cancelled (a client that disconnects, wait_for): billed, so charged as lost.
    reading = asyncio.Event()

    class Body(httpx2.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b'{"id": "chatcmpl-1", "object": "chat.completion", '
            reading.set()
            await asyncio.Event().wait()  # the rest never comes

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "application/json"}, stream=Body())

    http = httpx2.AsyncClient(transport=httpx2.MockTransport(answer))
    client = guard.wrap(
        openai.AsyncOpenAI(base_url="http://llm.test/v1", api_key="k", http_client=http)
    )

    async def call() -> None:
        with track_context(user_id="alice"):
            await client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=50)

    with capture_logs() as logs:
        task = asyncio.ensure_future(call())
        await reading.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (lost,) = calls(logs)
    assert (lost["outcome"], lost["output_tokens"]) == ("error", 50)
    assert lost["cost_usd"] == lost["reserved_usd"] > 0
    keys = guard.ledger.scan("*", now=clock.now())
    states = [s for s in guard.ledger.read(keys, now=clock.now()) if s.settled or s.pending]
    assert [(s.settled, s.pending) for s in states] == [(174_000, 0)]  # none left held
    assert logged_usd(lost) == Decimal("0.000174")


# -- gzip ------------------------------------------------------------------------------------


def test_identity_is_requested_and_gzip_is_decoded_anyway(guard: Guard, fake: FakeProvider) -> None:
    fake.enqueue(Scripted(gzip=True), Scripted(gzip=True), Scripted(gzip=True))
    client = openai_client(guard, fake)
    aclient = anthropic_client(guard, fake)
    with track_context(user_id="alice"), capture_logs() as logs:
        reply = client.chat.completions.create(model="gpt-test", messages=PROMPT)
        stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        chunks = list(stream)
        events = list(
            aclient.messages.create(
                model="claude-test", max_tokens=64, messages=PROMPT, stream=True
            )
        )
    plain, streamed, anthropic_stream = fake.requests
    assert all(r.headers["accept-encoding"] == "identity" for r in fake.requests)
    assert reply.choices[0].message.content == DEFAULT_REPLY
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    assert all(c.choices for c in chunks)  # the usage chunk was found and hidden
    assert events[-1].type == "message_stop"
    one, two, three = calls(logs)
    assert logged_usd(one) == expected_cost(plain, "gpt-test")
    assert logged_usd(two) == expected_cost(streamed, "gpt-test")
    assert logged_usd(three) == expected_cost(anthropic_stream, "claude-test")
    assert {one["outcome"], two["outcome"], three["outcome"]} == {"ok"}


def test_unguarded_clients_still_get_gzip(fake: FakeProvider) -> None:
    # The fake compresses whenever allowed: the identity request above is the guard's.
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    client.chat.completions.create(model="gpt-test", messages=PROMPT)
    (record,) = fake.requests
    assert "gzip" in record.headers["accept-encoding"]


# -- servers that refuse stream_options ----------------------------------------------------


def test_server_refusing_stream_options_is_retried_once_and_remembered(
    guard: Guard, fake: FakeProvider
) -> None:
    fake.reject_stream_options = True
    client = openai_client(guard, fake)
    with track_context(user_id="alice"), capture_logs() as logs:
        first = list(client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True))
        second = list(
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
        )
    refused, resent, remembered = fake.requests
    assert refused.status == 400
    assert "stream_options" in refused.json
    assert "stream_options" not in resent.json
    assert "stream_options" not in remembered.json  # the base URL was remembered
    for chunks in (first, second):
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == DEFAULT_REPLY
    warning = [e for e in logs if e["event"] == "stream_options_refused"]
    assert warning[0]["base_url"] == fake.openai_base_url
    events = calls(logs)
    assert len(events) == 2
    for event in events:
        # No usage came back: input from the estimate, output from the streamed text.
        assert event["outcome"] == "ok"
        assert event["input_tokens"] == estimate_input_tokens(resent.json, endpoint="chat")
        assert event["output_tokens"] == estimated_output(DEFAULT_REPLY, 10)
    total = sum((logged_usd(e) for e in events), Decimal(0))
    assert total == 2 * cost_of(events[0]["input_tokens"], events[0]["output_tokens"], 1, 2)
    assert used(guard, "alice") == total


def test_stream_options_switches(guard: Guard, fake: FakeProvider) -> None:
    off = openai_client(guard, fake, include_usage=True)
    guard.wrap(off, include_usage=False)  # wrapping again changes nothing
    skipped = openai_client(make_guard(), fake)  # another guard, defaults
    plain = guard.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0),
        skip_include_usage=[fake.openai_base_url],
    )
    disabled = guard.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0),
        include_usage=False,
    )
    with track_context(user_id="alice"):
        for client in (off, skipped, plain, disabled):
            list(client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True))
    injected = ["stream_options" in r.json for r in fake.requests]
    assert injected == [True, True, False, False]


def test_refusal_to_retry_without_stream_options_reaches_the_caller(
    guard: Guard, fake: FakeProvider
) -> None:
    fake.reject_stream_options = True
    client = openai_client(guard, fake, retry_without_stream_options=False)
    with track_context(user_id="alice"), capture_logs() as logs:
        with pytest.raises(openai.BadRequestError, match="stream_options"):
            client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    assert len(fake.requests) == 1
    assert one_call(logs)["outcome"] == "error"
    assert used(guard, "alice") == 0


def test_other_400s_on_injected_streams_are_not_resent(guard: Guard, fake: FakeProvider) -> None:
    fake.enqueue(Scripted(status=400, error_message="messages: too long"))
    client = openai_client(guard, fake)
    with track_context(user_id="alice"), pytest.raises(openai.BadRequestError, match="too long"):
        client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
    assert len(fake.requests) == 1


# -- passthrough ---------------------------------------------------------------------------


def test_multipart_and_other_endpoints_pass_through_untouched(
    guard: Guard, fake: FakeProvider
) -> None:
    client = openai_client(guard, fake)
    content = b"line one\nline two\n" * 10
    with track_context(user_id="alice"), capture_logs() as logs:
        uploaded = client.files.create(file=("notes.txt", content), purpose="assistants")
        text = client.audio.transcriptions.create(file=("a.wav", b"RIFF0000"), model="whisper-1")
        models = client.models.list()
    upload, transcription, listing = fake.requests
    assert uploaded.bytes == len(upload.body)
    assert content in upload.body
    assert upload.headers["content-type"].startswith("multipart/form-data")
    assert upload.headers["accept-encoding"] != "identity"  # not touched at all
    assert transcription.path.endswith("/audio/transcriptions")
    assert text.text == DEFAULT_REPLY
    assert listing.method == "GET"
    assert next(m.id for m in models) == "gpt-4o-mini"
    assert calls(logs) == []
    assert used(guard, "alice") == 0


def test_non_json_body_to_a_metered_path_is_passed_through(
    guard: Guard, fake: FakeProvider
) -> None:
    http = guard.wrap(httpx2.Client(base_url=fake.openai_base_url))
    with track_context(user_id="alice"), capture_logs() as logs:
        response = http.post("/chat/completions", files={"file": ("x.bin", b"\x00\x01binary")})
        streamed = http.post(
            "/chat/completions",
            content=iter([b'{"model": "gpt-test", ', b'"messages": []}']),
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400  # the fake's answer, unmetered
    assert streamed.status_code == 200  # a streamed request body is not read by the guard
    multipart, chunked = fake.requests
    assert b"binary" in multipart.body
    assert chunked.json == {"model": "gpt-test", "messages": []}
    assert calls(logs) == []
    http.close()


@pytest.fixture
async def async_http(guard: Guard, fake: FakeProvider) -> AsyncIterator[httpx2.AsyncClient]:
    client = guard.wrap(httpx2.AsyncClient(base_url=fake.openai_base_url))
    yield client
    await client.aclose()


async def test_async_plain_client_error_and_success(
    guard: Guard, fake: FakeProvider, async_http: httpx2.AsyncClient
) -> None:
    fake.enqueue(Scripted(status=503))
    body = {"model": "gpt-test", "messages": PROMPT}
    with track_context(user_id="alice"), capture_logs() as logs:
        failed = await async_http.post("/chat/completions", json=body)
        ok = await async_http.post("/chat/completions", json=body)
    assert (failed.status_code, ok.status_code) == (503, 200)
    released, settled = calls(logs)
    assert released["outcome"] == "error"
    assert logged_usd(settled) == expected_cost(fake.requests[1], "gpt-test")


# -- usage that cannot be trusted ------------------------------------------------------------

TOO_LARGE = f"usage: more than a counter can hold ({MAX_UNITS} units)"


@pytest.mark.parametrize(
    ("script", "problems"),
    [
        (Scripted(omit_usage=True), ["usage: missing"]),
        (Scripted(usage={"prompt_tokens": -3}), ["prompt_tokens: -3"]),
        (Scripted(usage={"completion_tokens": "12"}), ["completion_tokens: '12'"]),
        (Scripted(usage={"prompt_tokens_details": {"cached_tokens": 1.5}}), None),
        # More than a counter holds: its cost could not be counted, nor logged as a float.
        (Scripted(usage={"prompt_tokens": 10**400}), [TOO_LARGE]),
        (Scripted(usage={"completion_tokens": 2**62}), [TOO_LARGE]),
        (Scripted(usage={"prompt_tokens": 10**15}), [TOO_LARGE]),  # $1bn at $1/Mtok
    ],
)
def test_untrusted_usage_of_a_plain_call_is_charged_the_reservation(
    guard: Guard, fake: FakeProvider, script: Scripted, problems: list[str] | None
) -> None:
    fake.enqueue(script)
    client = openai_client(guard, fake)
    with track_context(user_id="alice"), capture_logs() as logs:
        client.chat.completions.create(model="gpt-test", messages=PROMPT, max_tokens=50)
    event = one_call(logs)
    (invalid,) = [e for e in logs if e["event"] == "usage_invalid"]
    assert event["outcome"] == "unverified"
    assert event["cost_usd"] == event["reserved_usd"] > 0
    assert logged_usd(event) == used(guard, "alice")
    assert event["output_tokens"] == 50
    assert invalid["reason"] == "; ".join(problems or ["prompt_tokens_details.cached_tokens: 1.5"])


@pytest.mark.parametrize(
    ("usage", "problem"),
    [({"output_tokens": -1}, "output_tokens: -1"), ({"output_tokens": 10**400}, TOO_LARGE)],
)
async def test_untrusted_usage_of_an_anthropic_stream_is_charged_the_reservation(
    guard: Guard, fake: FakeProvider, usage: dict[str, int], problem: str
) -> None:
    fake.enqueue(Scripted(usage=usage))
    client = anthropic.AsyncAnthropic(base_url=fake.anthropic_base_url, api_key="k", max_retries=0)
    guard.wrap(client)
    with track_context(user_id="alice"), capture_logs() as logs:
        async with client.messages.stream(
            model="claude-test", max_tokens=40, messages=PROMPT
        ) as stream:
            await stream.get_final_message()
    await client.close()
    event = one_call(logs)
    assert event["outcome"] == "unverified"
    assert event["cost_usd"] == event["reserved_usd"]
    assert [e["reason"] for e in logs if e["event"] == "usage_invalid"] == [problem]


def read_stream(
    guard: Guard, fake: FakeProvider, script: Scripted
) -> tuple[MutableMapping[str, Any], list[MutableMapping[str, Any]]]:
    """Read alice's chat stream (``max_tokens=500``) served as ``script``: its call line, logs."""
    fake.enqueue(script)
    client = openai_client(guard, fake)
    with track_context(user_id="alice"), capture_logs() as logs:
        for _ in client.chat.completions.create(
            model="gpt-test", messages=PROMPT, max_tokens=500, stream=True
        ):
            pass
    return one_call(logs), logs


def _chat_chunk(content: str, finish: str | None = None) -> dict[str, Any]:
    delta = {"role": "assistant", "content": content}
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-test",
        "created": 1,
        "choices": [choice],
    }


@pytest.mark.parametrize(
    ("events", "outcome"),
    [
        # The server closed the body cleanly after three deltas: no finish reason, no
        # usage, no [DONE]. The answer was cut short.
        ([_chat_chunk("Once"), _chat_chunk(" upon"), _chat_chunk(" a")], "incomplete"),
        # The answer's finish reason came, then the end, without usage (a server that
        # ignores stream_options): whole, charged its estimate.
        ([_chat_chunk("Once"), _chat_chunk(" upon", "stop")], "ok"),
    ],
)
def test_a_stream_that_ends_before_its_finish_is_incomplete(
    guard: Guard, fake: FakeProvider, events: list[dict[str, Any]], outcome: str
) -> None:
    event, _ = read_stream(guard, fake, Scripted(events=events))
    assert event["outcome"] == outcome
    assert 0 < logged_usd(event) < Decimal(str(event["reserved_usd"]))


def test_a_stream_without_usage_is_charged_its_estimate_not_the_reservation(
    guard: Guard, fake: FakeProvider
) -> None:
    # A server that ignores stream_options sends no usage: that is expected of it, so
    # the call is charged from what it streamed (outcome ok), not as untrusted.
    event, logs = read_stream(guard, fake, Scripted(omit_usage=True))
    assert event["outcome"] == "ok"
    assert logged_usd(event) < Decimal(str(event["reserved_usd"]))
    assert not [e for e in logs if e["event"] == "usage_invalid"]
