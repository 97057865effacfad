"""Observers: code outside the engine that wants to see every call and every refusal.

Telemetry (:mod:`payi_guard.otel`) is one. An observer is told of each metered call once
it is settled, released or recorded (the same moment ``genai_call`` is logged, with the
same numbers) and of each budget refusal (when ``budget_exceeded`` is logged). It runs
on the caller's thread, so it must be quick; an observer that raises is logged
(``observer_error``, once per observer) and never breaks the call.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from payi_guard import log as events
from payi_guard.context import Attribution
from payi_guard.engine.calls import CallRecord
from payi_guard.usage import LimitUsage

__all__ = ["CallEnded", "CallRefused", "Observer", "Observers"]


@dataclass(frozen=True, slots=True)
class CallEnded:
    """A metered call that ended (what ``genai_call`` logs).

    Attributes:
        record: the outcome: user, model, provider, usage, cost, latency, outcome.
        endpoint: ``chat``, ``responses``, ``embeddings``, ``completions``,
            ``anthropic_messages`` or a provider's own endpoint name.
        attribution: the attribution context of the call.
    """

    record: CallRecord
    endpoint: str
    attribution: Attribution


@dataclass(frozen=True, slots=True)
class CallRefused:
    """A call refused because a budget could be crossed (what ``budget_exceeded`` logs).

    Attributes:
        user_id: the user charged.
        org_id: the user's org, if any.
        limit: the limit that refused, as it stood.
        model: the model asked for.
        provider: the provider.
        endpoint: the endpoint kind.
    """

    user_id: str
    org_id: str | None
    limit: LimitUsage
    model: str
    provider: str
    endpoint: str


class Observer(Protocol):
    """What an observer implements."""

    def call_ended(self, event: CallEnded) -> None:
        """A call was settled, released or recorded."""
        ...

    def call_refused(self, event: CallRefused) -> None:
        """A call was refused by a budget."""
        ...


class Observers:
    """The observers of one guard (``guard.observers``); adding and removing is thread-safe.

    Notifying reads an immutable tuple, so it takes no lock on the call path.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._all: tuple[Observer, ...] = ()
        self._failed: set[int] = set()
        self._log = events.get_logger()

    def __bool__(self) -> bool:
        return bool(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def add(self, observer: Observer) -> None:
        """Start telling ``observer`` of calls and refusals (adding it twice is a no-op)."""
        with self._lock:
            if all(o is not observer for o in self._all):
                self._all = (*self._all, observer)

    def remove(self, observer: Observer) -> None:
        """Stop telling ``observer``; removing one that is not there is a no-op."""
        with self._lock:
            self._all = tuple(o for o in self._all if o is not observer)

    def call_ended(self, event: CallEnded) -> None:
        """Tell every observer of a call that ended."""
        for observer in self._all:
            try:
                observer.call_ended(event)
            except Exception as exc:
                self._failed_once(observer, exc)

    def call_refused(self, event: CallRefused) -> None:
        """Tell every observer of a refusal."""
        for observer in self._all:
            try:
                observer.call_refused(event)
            except Exception as exc:
                self._failed_once(observer, exc)

    def _failed_once(self, observer: Observer, exc: Exception) -> None:
        key = id(observer)
        if key in self._failed:
            return
        self._failed.add(key)
        self._log.error(
            events.OBSERVER_ERROR,
            observer=type(observer).__qualname__,
            error=str(exc),
            error_type=type(exc).__name__,
        )
