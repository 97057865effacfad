"""Contract cases no public recording shows, built from real recordings.

DESIGN section 9: usage that cannot be trusted (negative, not an integer) is charged
the reservation, logged with ``outcome: "unverified"`` and a ``usage_invalid`` event;
a call whose upper bound exceeds what a counter can hold is a refusal, before anything
is sent, whatever ``on_storage_error`` says. Audio tokens are charged at the model's
audio rates, in a plain response and in a stream's usage chunk (the stream is read whole:
``gpt-audio`` has no offline tokenizer, so a stream broken off before its usage keeps
its bound, which the ordinary replay's ``break`` check does not allow).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import pytest

from conformance import calls, derived
from conformance.corpus import Interaction
from conformance.expected import CLOCK_START, bill
from conformance.harness import USER_PREFIX, Case, _nano, run_bare, run_guarded
from conformance.replay import LoopbackTransport, ReplayServer, Route
from payi_guard import Guard, is_refusal, track_context
from payi_guard.clock import FakeClock


class UsageTrusted(AssertionError):
    """Untrustworthy usage was charged as if it were the provider's word."""


class NotRefused(AssertionError):
    """An oversized call was not refused before it was sent."""


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("kind", sorted(derived.INVALID_USAGE))
def test_invalid_usage_is_charged_the_reservation(
    kind: str, stream: bool, replay_server: ReplayServer
) -> None:
    interaction = derived.invalid_usage(kind, stream=stream)
    case = Case(interaction, "loopback", "create")
    bare = run_bare(case, replay_server)
    guarded = run_guarded(case, replay_server)
    assert bare.items == guarded.observed.items
    assert len(guarded.calls_at_end) == 1
    line = guarded.calls_at_end[0]
    invalid = [e for e in guarded.events if e.get("event") == "usage_invalid"]
    if (
        line.get("outcome") != "unverified"
        or line.get("cost_usd") != line.get("reserved_usd")
        or not invalid
    ):
        raise UsageTrusted(
            f"prompt_tokens={derived.INVALID_USAGE[kind]!r}: outcome {line.get('outcome')!r}, "
            f"cost_usd {line.get('cost_usd')} for a reservation of {line.get('reserved_usd')}, "
            f"{len(invalid)} usage_invalid event(s)"
        )


@pytest.mark.parametrize("on_storage_error", ["block", "allow"])
def test_counter_overflow_is_refused_before_sending(
    on_storage_error: str, replay_server: ReplayServer
) -> None:
    interaction = derived.oversized_output_cap()
    guard = Guard(
        {
            "default": [{"max": 1000, "per": "day"}],
            "on_storage_error": on_storage_error,
        },
        clock=FakeClock(CLOCK_START),
    )
    key = f"overflow/{on_storage_error}"
    raised: BaseException | None = None
    with (
        replay_server.register(key, Route(interaction)) as route,
        calls.sdk_client(interaction, LoopbackTransport(replay_server.port, key)) as client,
        track_context(user_id=f"{USER_PREFIX}-overflow-{on_storage_error}"),
    ):
        guard.wrap(client)
        body: dict[str, Any] = dict(interaction.request)
        try:
            client.chat.completions.create(**body)
        except Exception as exc:
            raised = exc
    guard.close()
    if raised is None or not is_refusal(raised) or route.requests:
        raise NotRefused(
            f"on_storage_error={on_storage_error}: the app got "
            f"{type(raised).__name__ if raised else 'a response'}, "
            f"{len(route.requests)} request(s) reached the provider"
        )


@pytest.mark.parametrize("transport", ["memory", "loopback"])
@pytest.mark.parametrize(
    "make", [derived.chat_audio, derived.chat_stream_audio], ids=["plain", "stream"]
)
def test_audio_tokens_are_charged_at_audio_rates(
    make: Callable[[], Interaction],
    transport: Literal["loopback", "memory"],
    replay_server: ReplayServer,
) -> None:
    interaction = make()
    expected = bill(interaction)
    assert expected is not None
    as_text = replace(expected, parts=tuple(replace(p, media={}) for p in expected.parts))
    want, text_price = expected.nano(), as_text.nano()
    assert want is not None
    assert text_price is not None
    assert want > text_price  # audio is dearer than text: the case tells them apart
    guarded = run_guarded(Case(interaction, transport, "create"), replay_server)
    assert len(guarded.calls_at_end) == 1
    line = guarded.calls_at_end[0]
    assert line.get("outcome") == "ok"
    assert _nano(line.get("cost_usd")) == want
