"""Helpers of the meter tests: explicit prices, independent cost computation, log checks."""

from __future__ import annotations

from collections.abc import MutableMapping, Sequence
from decimal import Decimal
from typing import Any

from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.meter.sse import StreamUsageTracker
from payi_guard.testing import RecordedRequest

# USD per million tokens. Every rate is a whole number of nano-USD per token, so each
# expected cost below is exact: tokens * rate / 1e6 dollars.
PRICES: dict[str, dict[str, float]] = {
    "gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2, "cache_read_per_mtok": 0.5},
    "gpt-other": {"input_per_mtok": 3, "output_per_mtok": 6},
    "embed-test": {"input_per_mtok": 0.02, "output_per_mtok": 0},
    "davinci-test": {"input_per_mtok": 2, "output_per_mtok": 2},
    "claude-test": {
        "input_per_mtok": 3,
        "output_per_mtok": 15,
        "cache_read_per_mtok": 0.3,
        "cache_write_per_mtok": 3.75,
    },
}

Logs = Sequence[MutableMapping[str, Any]]


def make_guard(clock: FakeClock | None = None, **config: Any) -> Guard:
    """A memory guard with :data:`PRICES` and a generous default limit."""
    base: dict[str, Any] = {"prices": PRICES, "default": [{"max": 100, "per": "day"}]}
    base.update(config)
    storage = base.pop("storage_uri", None)
    key_prefix = base.pop("key_prefix", "pg")
    return Guard(base, clock=clock, storage=storage, key_prefix=key_prefix)


def price(model: str, kind: str) -> Decimal:
    """A rate from :data:`PRICES` in USD per million tokens (cache rates default)."""
    rates = PRICES[model]
    name = f"{kind}_per_mtok"
    if name not in rates:
        name = "input_per_mtok"
    return Decimal(str(rates[name]))


def expected_cost(record: RecordedRequest, model: str) -> Decimal:
    """The price, in USD, of the usage the fake reported for ``record`` (independent of
    the package's parsing: it reads the API field names directly)."""
    usage = record.usage
    assert usage is not None, "the fake reported no usage"
    million = Decimal(1_000_000)
    if record.path.endswith("/v1/messages"):
        tokens = {
            "input": usage["input_tokens"],
            "cache_read": usage.get("cache_read_input_tokens") or 0,
            "cache_write": usage.get("cache_creation_input_tokens") or 0,
            "output": usage["output_tokens"],
        }
    elif record.path.endswith("/responses"):
        cached = (usage.get("input_tokens_details") or {}).get("cached_tokens") or 0
        tokens = {
            "input": usage["input_tokens"] - cached,
            "cache_read": cached,
            "output": usage["output_tokens"],
        }
    else:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        tokens = {
            "input": usage["prompt_tokens"] - cached,
            "cache_read": cached,
            "output": usage.get("completion_tokens") or 0,
        }
    return sum((n * price(model, kind) for kind, n in tokens.items()), Decimal(0)) / million


def calls(logs: Logs) -> list[MutableMapping[str, Any]]:
    """The ``genai_call`` events."""
    return [e for e in logs if e["event"] == "genai_call"]


def one_call(logs: Logs) -> MutableMapping[str, Any]:
    """The only ``genai_call`` event (fails when there are more or none)."""
    found = calls(logs)
    assert len(found) == 1, found
    return found[0]


def used(guard: Guard, user: str) -> Decimal:
    """What the user's first (USD) limit has used: settled plus pending."""
    value = guard.usage(user)[0].used
    assert isinstance(value, Decimal)
    return value


def logged_usd(event: MutableMapping[str, Any]) -> Decimal:
    """``cost_usd`` of a log event as the exact decimal it stands for."""
    return Decimal(str(event["cost_usd"]))


def assert_charged(
    guard: Guard,
    user: str,
    logs: Logs,
    record: RecordedRequest,
    model: str,
    *,
    stream: bool,
    outcome: str = "ok",
    provider: str = "openai-compatible",
) -> MutableMapping[str, Any]:
    """One call was logged and charged exactly the price of what the fake reported."""
    event = one_call(logs)
    cost = expected_cost(record, model)
    assert logged_usd(event) == cost
    assert used(guard, user) == cost  # nothing left pending either
    assert event["user_id"] == user
    assert event["model"] == model
    assert event["provider"] == provider
    assert event["stream"] is stream
    assert event["outcome"] == outcome
    return event


def user_message(text: str) -> Any:
    """A one-message conversation (typed ``Any``: it is given to both SDKs' typed params)."""
    return [{"role": "user", "content": text}]


def tracker_state(tracker: StreamUsageTracker) -> tuple[object, ...]:
    """Everything a stream's tracker reports, for comparing two ways of feeding it."""
    return (
        tracker.usage,
        tracker.model,
        tracker.response_id,
        tracker.status,
        tracker.finished,
        tracker.errors,
        tracker.output_bytes,
        tracker.output_deltas,
        tracker.events,
        tracker.dropped,
    )
