"""One conformance case: the same recorded call made bare and guarded, then checked.

A case is an interaction, a transport and a variant (see :mod:`conformance.calls`). It
passes only if:

1. the app gets the same objects both ways (:class:`AppViewDiffers` otherwise);
2. the guard logged exactly one ``genai_call`` by the time the app was done with the
   response (:class:`NotSettledAtEnd`);
3. for a call read to its end, the logged tokens are the recorded usage
   (:class:`TokensDiffer`) and ``cost_usd`` and the ledger are the recorded usage priced
   by genai-prices, rounded up to the nano-dollar (:class:`CostDiffers`);
4. for a provider error, nothing is charged: DESIGN section 5 releases the reservation
   of an error status (:class:`ChargedWrongly`);
5. for a stream the app broke off, the input charged is close to the input the
   provider billed before any output (:class:`ChargedWrongly`; the ratio is collected
   in :data:`BREAK_RATIOS`).

Each failure is its own ``AssertionError`` subclass, so a known gap can be marked as
expected for the one failure it causes and nothing else.
"""

from __future__ import annotations

import gc
import itertools
import threading
from collections.abc import Iterator, MutableMapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import httpx2
from structlog.testing import capture_logs
from structlog.typing import EventDict

from conformance import calls
from conformance.calls import Observed, Transport
from conformance.corpus import Interaction
from conformance.expected import CLOCK_START, NANO, Bill, bill, input_before_output
from conformance.replay import LoopbackTransport, ReplayServer, Route, memory_transport
from payi_guard import Guard, track_context
from payi_guard.clock import FakeClock

USER_PREFIX = "conformance"
"""Every guarded run charges its own user, ``conformance-<n>``."""

_RUNS = itertools.count(1)

CONFIG: dict[str, Any] = {
    # Generous: no recorded call comes near it.
    "default": [{"max": 1000, "per": "day"}],
    # Models genai-prices does not know are sent, not refused (the Azure deployment).
    "unknown_model": "allow",
}

QUICK_SETTLE = 0.05
"""How long to wait before paying for a full garbage collection (clean-up only)."""

SETTLE_WAIT = 10.0
"""How long a run waits for a stream the guard left open to be settled by the collector
(a clean-up bound only: what the checks use was captured when the app was done)."""

BREAK_MAX_RATIO = Decimal("1.25")
"""The most input a broken-off stream may be charged, as a multiple of the real input."""

BREAK_SLACK_TOKENS = 8
"""Tokens a broken-off stream's input may be off by, either way, whatever its size (the
message framing a tokenizer count may miss or add)."""


class AppViewDiffers(AssertionError):
    """The app got something different with the guard than without it."""


class RequestHeadersDiffer(AssertionError):
    """The request object the app holds (``http_request``) was changed by the guard."""


class NotSettledAtEnd(AssertionError):
    """No ``genai_call`` (or more than one) by the time the app was done."""


class TokensDiffer(AssertionError):
    """The logged token counts are not the recorded usage."""


class CostDiffers(AssertionError):
    """``cost_usd`` or the ledger is not the recorded usage priced by genai-prices."""


class ReservedTooLittle(AssertionError):
    """The call cost more than its reservation: a hard limit would not have held."""


class ChargedWrongly(AssertionError):
    """An error, or a broken-off stream, was charged what the policy does not allow."""


@dataclass(frozen=True)
class Case:
    """One interaction, replayed over one transport as one variant."""

    interaction: Interaction
    transport: Transport
    variant: str

    @property
    def id(self) -> str:
        """The pytest id: ``source/cassette[#n]-transport-variant``."""
        return f"{self.interaction.id}-{self.transport}-{self.variant}"


@dataclass(frozen=True)
class BreakRatio:
    """Input charged for a broken-off stream against the input the provider billed."""

    case: str
    charged: int
    real: int

    @property
    def ratio(self) -> Decimal:
        """``charged / real``."""
        return Decimal(self.charged) / Decimal(self.real)


BREAK_RATIOS: dict[str, BreakRatio] = {}
"""Filled by the ``break`` cases of a run; printed in the terminal summary."""


def make_guard() -> Guard:
    """A guard on the memory store, its clock at the date prices are taken at."""
    return Guard(CONFIG, clock=FakeClock(CLOCK_START))


@contextmanager
def _transport(
    case: Case, server: ReplayServer, key: str, hold: threading.Event | None
) -> Iterator[httpx2.BaseTransport]:
    if case.transport == "memory":
        yield memory_transport(case.interaction)
        return
    with server.register(key, Route(case.interaction, hold=hold)):
        yield LoopbackTransport(server.port, key)


@dataclass
class Guarded:
    """The guarded run: what the app got, and what the guard logged and charged."""

    observed: Observed
    calls_at_end: list[MutableMapping[str, Any]]
    used_usd: Decimal
    events: list[MutableMapping[str, Any]]


def _calls(logs: list[MutableMapping[str, Any]], user: str) -> list[MutableMapping[str, Any]]:
    # Only this run's user: a stream abandoned by an earlier case may be settled by the
    # guard's background thread while this case's logs are being captured.
    return [dict(e) for e in logs if e.get("event") == "genai_call" and e.get("user_id") == user]


def run_bare(case: Case, server: ReplayServer) -> Observed:
    """Make the call without the guard."""
    hold = threading.Event() if case.variant == "break" else None
    with ExitStack() as stack:
        transport = stack.enter_context(_transport(case, server, f"{case.id}/bare", hold))
        client = stack.enter_context(calls.sdk_client(case.interaction, transport))
        on_break = hold.set if hold is not None else None
        try:
            return calls.call(case.interaction, case.variant, client, on_break=on_break)
        finally:
            if hold is not None:
                hold.set()


def run_guarded(case: Case, server: ReplayServer) -> Guarded:
    """Make the call through ``guard.wrap(client)``; snapshot the logs when the app is done."""
    guard = make_guard()
    user = f"{USER_PREFIX}-{next(_RUNS)}"
    hold = threading.Event() if case.variant == "break" else None
    at_end: list[MutableMapping[str, Any]] = []
    settled = threading.Event()

    def notice(_: object, __: str, event: EventDict) -> EventDict:
        if event.get("event") == "genai_call" and event.get("user_id") == user:
            settled.set()
        return event

    with ExitStack() as stack:
        transport = stack.enter_context(_transport(case, server, f"{case.id}/guarded", hold))
        client = guard.wrap(stack.enter_context(calls.sdk_client(case.interaction, transport)))
        logs = stack.enter_context(capture_logs(processors=[notice]))
        stack.enter_context(track_context(user_id=user))

        def broken_off() -> None:
            at_end.extend(_calls(logs, user))
            if hold is not None:
                hold.set()

        try:
            observed = calls.call(case.interaction, case.variant, client, on_break=broken_off)
        finally:
            if hold is not None:
                hold.set()
        if case.variant != "break":
            at_end.extend(_calls(logs, user))
        # Not settled when the app was done (the bytes-content gap): let the collector
        # settle it now, while this run's logs are captured, so it cannot land in another
        # test's. Nothing is asserted on what happens here; a stream freed by reference
        # counting is settled at once, one held in a cycle needs a full collection.
        if not settled.is_set() and not settled.wait(QUICK_SETTLE):
            gc.collect()
            settled.wait(SETTLE_WAIT)
    usd = next(u for u in guard.usage(user) if u.unit == "usd")
    used = usd.used
    assert isinstance(used, Decimal)
    guard.close()
    events: list[MutableMapping[str, Any]] = [
        dict(e) for e in logs if e.get("user_id") in (user, None)
    ]
    return Guarded(observed, at_end, used, events)


def _nano(cost_usd: object) -> int:
    assert isinstance(cost_usd, (int, float)), f"cost_usd is {cost_usd!r}"
    return int(Decimal(repr(cost_usd)) * NANO)


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if type(a) is not type(b):
        return f"{path or '.'}: {a!r:.200} != {b!r:.200}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}: present on one side only ({key in a} / {key in b})"
            if a[key] != b[key]:
                return _first_difference(a[key], b[key], f"{path}.{key}")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} items != {len(b)} items"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{path}[{i}]")
    return f"{path or '.'}: {a!r:.200} != {b!r:.200}"


def failures(case: Case, bare: Observed, guarded: Guarded) -> list[AssertionError]:
    """Every way ``case`` falls short (see the module docstring), most visible first."""
    found: list[AssertionError] = []
    app_bare = {"items": bare.items, "error": bare.error}
    app_guarded = {"items": guarded.observed.items, "error": guarded.observed.error}
    if app_bare != app_guarded:
        found.append(
            AppViewDiffers("bare vs guarded: " + _first_difference(app_bare, app_guarded, "app"))
        )
    if bare.request_headers != guarded.observed.request_headers:
        found.append(
            RequestHeadersDiffer(
                "the request the app holds: "
                + _first_difference(bare.request_headers, guarded.observed.request_headers)
            )
        )
    logged = guarded.calls_at_end
    if len(logged) != 1:
        found.append(
            NotSettledAtEnd(
                f"{len(logged)} genai_call line(s) when the app was done with the response "
                f"(outcomes {[c.get('outcome') for c in logged]})"
            )
        )
        return found
    found.extend(_accounting(case, logged[0], guarded.used_usd))
    return found


def _accounting(case: Case, line: MutableMapping[str, Any], used: Decimal) -> list[AssertionError]:
    interaction = case.interaction
    if not interaction.ok:
        if _nano(line.get("cost_usd")) != 0 or used != 0:
            return [
                ChargedWrongly(
                    f"provider error {interaction.status} charged "
                    f"cost_usd={line.get('cost_usd')}, ledger {used}"
                )
            ]
        return []
    if case.variant == "break":
        return _check_break(case, line)
    found: list[AssertionError] = []
    if line.get("outcome") != "ok" and not _reports_error(interaction):
        # Read to its end: a settle from the end of the body says "ok"; "incomplete"
        # means the call was settled some other way (garbage collection).
        found.append(
            NotSettledAtEnd(f"a call read to its end was logged as {line.get('outcome')!r}")
        )
    expected = bill(interaction)
    if expected is None:
        # The recording has no usage (a stream made without include_usage against a
        # server that ignores it): only "never $0" can be checked.
        if _nano(line.get("cost_usd")) <= 0:
            found.append(ChargedWrongly("a call with no reported usage was charged $0"))
        return found
    if "under_estimated_usd" in line:
        found.append(
            ReservedTooLittle(
                f"cost_usd {line.get('cost_usd')} for a reservation of {line.get('reserved_usd')}"
            )
        )
    return [*found, *_check_tokens(line, expected), *_check_cost(line, expected, used)]


def _reports_error(interaction: Interaction) -> bool:
    """Whether a recorded stream carries an error event (its outcome may say so)."""
    return interaction.is_stream and any(
        isinstance(data, dict) and (data.get("error") or data.get("type") == "error")
        for _, data in interaction.events()
    )


def _check_tokens(line: MutableMapping[str, Any], expected: Bill) -> list[AssertionError]:
    tokens = expected.tokens
    want = {
        "input_tokens": tokens.input_tokens,
        "output_tokens": tokens.output_tokens,
        "cache_read_tokens": tokens.cache_read_tokens,
        "cache_write_tokens": tokens.cache_write_tokens,
    }
    got = {name: line.get(name) for name in want}
    if got != want:
        return [TokensDiffer(f"logged {got}, recorded {want}")]
    return []


def _check_cost(
    line: MutableMapping[str, Any], expected: Bill, used: Decimal
) -> list[AssertionError]:
    want = expected.nano()
    got = _nano(line.get("cost_usd"))
    ledger = int(used * NANO)
    if want is None:
        if line.get("priced") is not False:
            return [
                CostDiffers(
                    f"{expected.model} is unknown to genai-prices, yet the call was logged "
                    f"as priced (cost_usd {line.get('cost_usd')})"
                )
            ]
        return []
    if got != want or ledger != want:
        return [
            CostDiffers(
                f"cost_usd {Decimal(got) / NANO} (ledger {used}), genai-prices "
                f"{Decimal(want) / NANO} for {expected.model} {expected.parts}"
            )
        ]
    return []


def _check_break(case: Case, line: MutableMapping[str, Any]) -> list[AssertionError]:
    real = input_before_output(case.interaction)
    if not real:
        return []
    charged = sum(
        int(line.get(name) or 0)
        for name in ("input_tokens", "cache_read_tokens", "cache_write_tokens")
    )
    BREAK_RATIOS[case.id] = BreakRatio(case.id, charged, real)
    if line.get("outcome") != "incomplete":
        return [ChargedWrongly(f"a broken-off stream logged outcome {line.get('outcome')!r}")]
    if charged < real - BREAK_SLACK_TOKENS or charged > real * BREAK_MAX_RATIO + BREAK_SLACK_TOKENS:
        return [
            ChargedWrongly(
                f"broken-off stream charged {charged} input tokens for {real} real "
                f"(ratio {Decimal(charged) / Decimal(real):.2f})"
            )
        ]
    return []
