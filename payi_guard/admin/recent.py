"""The most recent calls this process saw, for the user page (a bounded ring).

:class:`RecentCalls` is a guard observer (:mod:`payi_guard.engine.observers`): every
settled call and every refusal lands in a ring of at most ``size`` entries, shared by
all users; the oldest falls out first. It is per process (a host shows the calls it
served); the figures of the store's analytics are the ones every host agrees on.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from payi_guard.engine.observers import CallEnded, CallRefused
from payi_guard.money import decimal_text, decimal_usd

__all__ = ["DEFAULT_RECENT", "RecentCall", "RecentCalls"]

DEFAULT_RECENT = 2000
"""Calls the ring keeps (all users together)."""


@dataclass(frozen=True, slots=True)
class RecentCall:
    """One call as the user page lists it (money in nano-USD)."""

    at: float
    user_id: str
    model: str
    input_tokens: int
    output_tokens: int
    cost: int
    outcome: str
    latency_ms: float | None  # None: a refusal, which never reached the provider
    request_id: str | None
    use_case: str | None

    def as_dict(self) -> dict[str, object]:
        """The JSON form: money as a decimal string."""
        return {
            "at": self.at,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": decimal_text(decimal_usd(self.cost)),
            "outcome": self.outcome,
            "latency_ms": None if self.latency_ms is None else round(self.latency_ms, 3),
            "request_id": self.request_id,
            "use_case_name": self.use_case,
        }


class RecentCalls:
    """A guard observer keeping the last ``size`` calls and refusals.

    Args:
        clock: returns the current epoch time (the guard's clock).
        size: the most entries kept.
    """

    def __init__(self, clock: Callable[[], float], size: int = DEFAULT_RECENT) -> None:
        self._clock = clock
        self._ring: collections.deque[RecentCall] = collections.deque(maxlen=size)
        self._lock = threading.Lock()

    def call_ended(self, event: CallEnded) -> None:
        """Keep a settled, released or recorded call."""
        record = event.record
        usage = record.usage
        entry = RecentCall(
            self._clock(),
            record.user_id,
            record.model,
            usage.input_tokens if usage else 0,
            usage.output_tokens if usage else 0,
            record.cost_nano,
            record.outcome,
            record.latency_ms,
            event.attribution.request_id,
            event.attribution.use_case_name,
        )
        with self._lock:
            self._ring.append(entry)

    def call_refused(self, event: CallRefused) -> None:
        """Keep a refusal (nothing charged)."""
        entry = RecentCall(
            self._clock(), event.user_id, event.model, 0, 0, 0, "refused", None, None, None
        )
        with self._lock:
            self._ring.append(entry)

    def for_user(self, user_id: str, limit: int = 50) -> list[RecentCall]:
        """The newest ``limit`` entries of ``user_id``, newest first."""
        with self._lock:
            entries = list(self._ring)
        found: list[RecentCall] = []
        for entry in reversed(entries):
            if entry.user_id == user_id:
                found.append(entry)
                if len(found) >= limit:
                    break
        return found
