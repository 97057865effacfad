"""Helpers of the provider SDK tests: guards, recorded and made-up exchanges, log checks."""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from decimal import Decimal
from typing import Any

from conformance.providers.cassette import Exchange, load
from conformance.providers.corpus import PRICED_AT, RECORDINGS, Recording
from conformance.providers.harness import exchanges_of

from payi_guard import Guard
from payi_guard.clock import FakeClock

USER = "alice"
TIGHT = [{"max": 0.000001, "per": "day"}]  # one micro-dollar: nothing fits
Logs = Sequence[MutableMapping[str, Any]]


def make_guard(limits: list[dict[str, Any]] | None = None, **config: Any) -> Guard:
    """A memory guard at :data:`PRICED_AT` whose default user is :data:`USER`."""
    base: dict[str, Any] = {"default": limits or [{"max": 100, "per": "day"}]}
    base.update(config)
    guard = Guard(base, clock=FakeClock(PRICED_AT.timestamp()))
    guard.default_user_id = USER
    return guard


def recording(recording_id: str) -> Recording:
    """The corpus recording with this id."""
    return next(r for r in RECORDINGS if r.id == recording_id)


def served(recording_id: str) -> tuple[Exchange, ...]:
    """The exchanges a recording's SDK calls consume."""
    return exchanges_of(recording(recording_id))


def made_up(
    uri: str, body: bytes | dict[str, Any], *, content_type: str = "application/json"
) -> Exchange:
    """A 200 response of our own making (for usage a provider should never send)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers: tuple[tuple[str, str], ...] = (("content-type", content_type),)
    if content_type != "application/json":
        headers += (("transfer-encoding", "chunked"),)
    return Exchange("made-up", 0, "POST", uri, b"", 200, headers, data)


def events(logs: Logs, name: str) -> list[MutableMapping[str, Any]]:
    """The log events called ``name``."""
    return [e for e in logs if e["event"] == name]


def one_call(logs: Logs) -> MutableMapping[str, Any]:
    """The only ``genai_call`` event."""
    calls = events(logs, "genai_call")
    assert len(calls) == 1, calls
    return calls[0]


def usd(value: object) -> Decimal:
    """A logged dollar amount as the exact decimal it stands for."""
    return Decimal(str(value))


def used(guard: Guard) -> Decimal:
    """What :data:`USER`'s first limit holds: settled plus pending."""
    value = guard.usage(USER)[0].used
    assert isinstance(value, Decimal)
    return value


def assert_unverified(guard: Guard, logs: Logs, reason: str) -> None:
    """The call was charged its reservation, logged ``unverified`` with a ``usage_invalid``."""
    call = one_call(logs)
    assert call["outcome"] == "unverified"
    assert usd(call["cost_usd"]) == usd(call["reserved_usd"]) > 0
    assert used(guard) == usd(call["cost_usd"])
    invalid = events(logs, "usage_invalid")
    assert len(invalid) == 1
    assert reason in invalid[0]["reason"]
    assert invalid[0]["model"] == call["model"]


def assert_settled_early(guard: Guard, logs: Logs) -> None:
    """A stream left early was settled once, as incomplete, with nothing left reserved."""
    call = one_call(logs)
    assert call["outcome"] == "incomplete"
    assert call["stream"] is True
    assert 0 < usd(call["cost_usd"]) <= usd(call["reserved_usd"])
    assert used(guard) == usd(call["cost_usd"])


__all__ = [
    "TIGHT",
    "USER",
    "Logs",
    "assert_settled_early",
    "assert_unverified",
    "events",
    "load",
    "made_up",
    "make_guard",
    "one_call",
    "recording",
    "served",
    "usd",
    "used",
]
