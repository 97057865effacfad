"""Bedrock's streamed responses: the AWS event stream read event by event.

:class:`ConverseStream` (``converse-stream``) and :class:`InvokeStream`
(``invoke-with-response-stream``, base64 JSON chunks in the model family's format) count
the text as it passes and read the usage the stream ends with, over the framing of
:mod:`~payi_guard.meter.providers.eventstream`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
from collections.abc import Mapping
from typing import Any, Final

from payi_guard.meter.providers.bedrock_usage import (
    anthropic_1h_writes,
    converse_usage,
    family_usage,
    metrics_usage,
    with_1h_writes,
)
from payi_guard.meter.providers.eventstream import EventMessage, EventStreamDecoder
from payi_guard.meter.providers.wire import Report, UntrustedUsage, WireTracker, count
from payi_guard.meter.usage_objects import ParsedUsage

__all__ = ["ConverseStream", "EventStreamTracker", "InvokeStream"]


class EventStreamTracker(WireTracker):
    """An ``application/vnd.amazon.eventstream`` body: :meth:`on_message` per message."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = EventStreamDecoder()

    def feed(self, chunk: bytes) -> None:
        """Decode the messages ``chunk`` completes."""
        for message in self._decoder.feed(chunk):
            if message.message_type not in (None, "event"):
                self.errors.append(message.exception_type or message.message_type or "error")
                continue
            try:
                payload: Any = json.loads(message.payload) if message.payload else {}
            except (ValueError, UnicodeDecodeError):
                continue
            if isinstance(payload, dict):
                self.on_message(message, payload)

    def finish(self) -> None:
        """The body ended."""
        self.on_end()

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Read one event's JSON payload."""

    def on_end(self) -> None:
        """The stream ended."""
        if self.report is None and self._decoder.broken is not None:
            self.report = Report(
                invalid=f"the event stream cannot be decoded: {self._decoder.broken}"
            )


class ConverseStream(EventStreamTracker):
    """``converse-stream``: text deltas, then ``messageStop``, then ``metadata`` with usage."""

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Read one Converse stream event."""
        kind = message.event_type
        if kind == "contentBlockDelta":
            delta = payload.get("delta")
            if isinstance(delta, Mapping):
                self.count_text(delta.get("text"))
                for key in ("toolUse", "reasoningContent"):
                    inner = delta.get(key)
                    if isinstance(inner, Mapping):
                        self.count_text(inner.get("input") or inner.get("text"))
        elif kind == "messageStop":
            self.finished = True
        elif kind == "metadata":
            usage = payload.get("usage")
            if isinstance(usage, Mapping):
                self.report = Report.read(lambda: converse_usage(usage))
            else:
                self.report = Report(invalid="the metadata event has no usage")


_CHUNK_TEXT: Final = ("outputText", "generation", "completion", "text")


class InvokeStream(EventStreamTracker):
    """``invoke-with-response-stream``: base64 JSON chunks of the model family's format."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, Any] | None = None
        self._writes_1h = 0

    def on_message(self, message: EventMessage, payload: dict[str, Any]) -> None:
        """Decode one ``chunk`` and read its counts and text."""
        encoded = payload.get("bytes")
        if message.event_type != "chunk" or not isinstance(encoded, str):
            return
        try:
            chunk: Any = json.loads(base64.b64decode(encoded))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return
        if not isinstance(chunk, dict):
            return
        self._last = chunk
        self._count(chunk)
        metrics = chunk.get("amazon-bedrock-invocationMetrics")
        if isinstance(metrics, Mapping):
            # One cache-write total: message_start told the 1-hour writes apart.
            writes_1h = self._writes_1h
            self.report = Report.read(lambda: with_1h_writes(metrics_usage(metrics), writes_1h))
            return
        kind = chunk.get("type")
        if kind == "message_start":
            inner = chunk.get("message")
            usage = inner.get("usage") if isinstance(inner, Mapping) else None
            if isinstance(usage, Mapping):
                with contextlib.suppress(UntrustedUsage):
                    self._writes_1h = anthropic_1h_writes(usage)
                self.partial = with_1h_writes(
                    ParsedUsage(
                        input_tokens=_safe(usage, "input_tokens"),
                        cache_read_tokens=_safe(usage, "cache_read_input_tokens"),
                        cache_write_tokens=_safe(usage, "cache_creation_input_tokens"),
                    ),
                    self._writes_1h,
                )

    def _count(self, chunk: Mapping[str, Any]) -> None:
        delta = chunk.get("delta")
        if isinstance(delta, Mapping):  # Anthropic
            self.count_text(delta.get("text") or delta.get("partial_json") or delta.get("thinking"))
        for key in _CHUNK_TEXT:
            self.count_text(chunk.get(key))
        block = chunk.get("contentBlockDelta")  # Nova
        if isinstance(block, Mapping) and isinstance(block.get("delta"), Mapping):
            self.count_text(block["delta"].get("text"))
        for item in chunk.get("outputs") or chunk.get("choices") or ():  # Mistral
            if isinstance(item, Mapping):
                self.count_text(item.get("text"))
                for key in ("delta", "message"):
                    inner = item.get(key)
                    if isinstance(inner, Mapping):
                        self.count_text(inner.get("content"))

    def on_end(self) -> None:
        """Without invocation metrics, the family's counts in the last chunk."""
        super().on_end()
        last = self._last
        if self.report is None and last is not None:
            self.report = Report.read(lambda: family_usage(last))


def _safe(obj: Mapping[str, Any], key: str) -> int:
    try:
        return count(obj, key, default=0)
    except UntrustedUsage:
        return 0
