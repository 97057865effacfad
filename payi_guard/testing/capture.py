"""Capture payi_guard's structlog events in a test: :func:`capture_events`."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

from structlog.testing import capture_logs

__all__ = ["capture_events"]


class _Events(list[MutableMapping[str, Any]]):
    """The captured events, with a filter by event name."""

    def named(self, event: str) -> list[MutableMapping[str, Any]]:
        """Return the captured events called ``event`` (``genai_call``, ...)."""
        return [e for e in self if e.get("event") == event]


@contextmanager
def capture_events() -> Iterator[_Events]:
    """Capture every structlog event logged inside the block.

    Like :func:`structlog.testing.capture_logs` (whose caveats apply: it reconfigures
    structlog for the duration and is not thread-safe to enter concurrently).

    Yields:
        A list of event dicts (``event`` holds the name), filled as events are logged,
        with a ``named(event)`` filter.
    """
    events = _Events()

    def keep(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> Any:
        events.append({**event_dict, "log_level": method})
        return event_dict

    with capture_logs(processors=[keep]):
        yield events
