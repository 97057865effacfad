"""Helpers for testing applications that use payi_guard.

Import them in your own tests::

    from payi_guard.testing import FakeClock, FakeProvider, capture_events

* :class:`FakeClock`: time that moves only when told to (windows, reservation expiry).
* :class:`FakeProvider`: a local fake of the OpenAI and Anthropic HTTP APIs; point an SDK
  client's ``base_url`` at it (:mod:`payi_guard.testing.fake_provider` documents what it
  answers and how it counts tokens).
* :func:`capture_events`: collect payi_guard's structlog events in a block.
"""

from __future__ import annotations

from payi_guard.clock import FakeClock
from payi_guard.testing.capture import capture_events
from payi_guard.testing.fake_provider import (
    DEFAULT_REPLY,
    FakeProvider,
    RawEvent,
    RecordedRequest,
    Scripted,
    ToolCall,
    count_input_tokens,
    count_words,
)

__all__ = [
    "DEFAULT_REPLY",
    "FakeClock",
    "FakeProvider",
    "RawEvent",
    "RecordedRequest",
    "Scripted",
    "ToolCall",
    "capture_events",
    "count_input_tokens",
    "count_words",
]
