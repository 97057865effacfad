"""Stream usage: what a metered stream's events report, and which bytes go on.

A :class:`StreamUsageTracker` reads usage from the events an
:class:`~payi_guard.meter.sse.decoder.SSEDecoder` yields (with the usage parsers of
:mod:`payi_guard.meter.parse`) and says which events to forward; a
:class:`~payi_guard.meter.sse.meter.StreamMeter` puts the two together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

from payi_guard.meter.parse import (
    Endpoint,
    ParsedUsage,
    anthropic_usage,
    openai_usage,
    responses_file_searches,
    responses_usage,
    responses_web_searches,
)
from payi_guard.meter.request_body import loads_json_text
from payi_guard.meter.sse.decoder import SSEEvent
from payi_guard.meter.tier import response_tier, tier_context

__all__ = [
    "CHAT_KINDS",
    "ESTIMATE_BYTES_PER_TOKEN",
    "ESTIMATE_MARGIN_TOKENS",
    "StreamError",
    "StreamUsageTracker",
]

ESTIMATE_BYTES_PER_TOKEN: Final = 2.5
"""UTF-8 bytes per token assumed when a stream ends without its usage report.

Real tokenizers average about 4 bytes of English per token, so 2.5 over-counts ordinary
text; one CJK character is 3 bytes, so it counts as 1.2 tokens, again not under.
"""

ESTIMATE_MARGIN_TOKENS: Final = 16
"""Tokens added to every output estimate.

They cover what was generated but never delivered when a stream was cut (tokens in
flight, stop tokens) and output that carries no text, such as message framing.
"""


@dataclass(frozen=True, slots=True)
class StreamError:
    """An error the provider reported inside a stream (after a 200 status).

    Attributes:
        type: the error type (``overloaded_error``, ``server_error``), if given.
        message: the error message, if given.
        code: the error code (OpenAI), if given.
    """

    type: str | None
    message: str | None
    code: str | None = None


_TERMINAL_RESPONSE_EVENTS: Final = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)

# Anthropic delta payload keys that carry generated output.
_ANTHROPIC_DELTA_TEXT_KEYS: Final = ("text", "partial_json", "thinking")

# Chat / legacy completions delta keys that carry generated output. ``reasoning_content``
# and ``reasoning`` are sent by OpenAI-compatible servers for reasoning models.
_CHAT_DELTA_TEXT_KEYS: Final = frozenset(
    {"content", "refusal", "reasoning_content", "reasoning", "text"}
)


class StreamUsageTracker:
    """Follows a stream event by event: usage, output received, errors, what to drop.

    Feed it every :class:`SSEEvent` of a response with :meth:`observe`; forward an
    event's raw bytes to the client only when it returns true.

    - Chat / legacy completions: the final usage chunk (``choices: []`` plus ``usage``)
      is read, and dropped when ``added_include_usage`` says the guard asked for it. A
      later usage object replaces an earlier one (servers that report running usage).
    - Responses: the usage of ``response.completed`` / ``response.incomplete`` /
      ``response.failed`` and that terminal status.
    - Anthropic: ``message_start`` usage merged with ``message_delta`` usage; a field the
      later event carries wins, fields it leaves out (cache counts) are kept.

    Args:
        endpoint: the endpoint the stream came from.
        added_include_usage: whether the guard added ``stream_options.include_usage``
            (from :func:`inject_include_usage`).
    """

    def __init__(self, endpoint: Endpoint, *, added_include_usage: bool = False) -> None:
        self.endpoint = endpoint
        self.added_include_usage = added_include_usage
        self.model: str | None = None
        """The model the provider names in the stream, once seen."""
        self.response_id: str | None = None
        """The provider's id of the response (``chatcmpl-...``, ``resp_...``, ``msg_...``)."""
        self.status: str | None = None
        """Terminal state: the Responses status (``completed``, ``incomplete``,
        ``failed``), Anthropic's ``stop_reason``, or the last chat ``finish_reason``."""
        self.finished = False
        """Whether the stream's own end marker arrived (``[DONE]``, ``message_stop``,
        a terminal Responses event)."""
        self.errors: list[StreamError] = []
        """Errors the provider reported inside the stream."""
        self._output_bytes = 0
        self._output_deltas = 0
        # Chat chunks that can only add to the output counts, kept unparsed until the
        # counts are read (a stream that ends with its usage never needs them).
        self._deferred: list[str | bytes] = []
        self._deferred_size = 0
        self.events = 0
        """Number of events with data observed."""
        self.dropped = 0
        """Number of events :meth:`observe` said to drop."""
        self.strip_usage: Literal["", "null", "value"] = ""
        """Whether the event :meth:`observe` just took is forwarded without its
        ``usage`` member (a chat chunk when the guard added ``include_usage``), and
        what that member holds: ``"null"``, ``"value"``, or ``""`` (forward as is)."""
        self.price_context: Mapping[str, str] | None = None
        """The tier the stream says served the call (OpenAI's ``service_tier``,
        Anthropic's ``usage.speed``: :func:`~payi_guard.meter.tier.tier_context`),
        ``None`` until it says."""
        self._usage: ParsedUsage | None = None
        self._anthropic: dict[str, Any] = {}
        self._input_reported = False

    @property
    def output_bytes(self) -> int:
        """UTF-8 bytes of generated text, reasoning and tool arguments received."""
        if self._deferred:
            self._count_deferred()
        return self._output_bytes

    @property
    def output_deltas(self) -> int:
        """Number of deltas that carried generated output."""
        if self._deferred:
            self._count_deferred()
        return self._output_deltas

    # -- feeding ------------------------------------------------------------------------

    def observe(self, event: SSEEvent) -> bool:
        """Take one event into account.

        Args:
            event: the next event of the stream, from :class:`SSEDecoder`.

        Returns:
            True if the event's bytes go to the client; false only for the usage-only
            chunk the guard caused with ``include_usage``.
        """
        if not event.has_data:
            self.strip_usage = ""
            return True
        return self.observe_data(event.data, event.event)

    def observe_data(self, data: str, event_name: str | None = None) -> bool:
        """:meth:`observe` for an event with data, given its ``data`` and ``event`` fields."""
        self.strip_usage = ""
        self.events += 1
        if data[:1] != "{" and data.strip() == "[DONE]":
            self.finished = True
            return True
        if self.endpoint.kind in CHAT_KINDS and self._only_counts(data):
            self._defer(data)
            return True
        try:
            obj = loads_json_text(data)
        except ValueError:
            return True
        if type(obj) is not dict:
            return True
        kind = self.endpoint.kind
        if kind == "anthropic_messages":
            self._observe_anthropic(event_name, obj)
            return True
        if kind == "responses":
            self._observe_responses(event_name, obj)
            return True
        forward = self._observe_chat(obj)
        if not forward:
            self.dropped += 1
        return forward

    def _only_counts(self, data: str) -> bool:
        """Whether a chat chunk can change nothing but the output counts.

        A byte scan: no ``usage``, ``error`` or non-null ``finish_reason`` member, and
        nothing about the model or id still to learn. A quote inside a JSON string is
        escaped, so a quoted name found here is a key or a whole string value; either
        way the chunk is then parsed at once (a value only costs the parse). A unicode
        escape could spell a key, so such a chunk is parsed at once too.
        """
        return (
            "\\u" not in data
            and '"usage"' not in data
            and '"error"' not in data
            and data.count('"finish_reason"') == data.count('"finish_reason":null')
            and (self.model is not None or '"model"' not in data)
            and (self.response_id is not None or '"id"' not in data)
        )

    def _defer(self, data: str | bytes) -> None:
        self._deferred.append(data)
        self._deferred_size += len(data)
        if self._deferred_size > _DEFERRED_LIMIT:
            self._count_deferred()  # bounded memory: a long stream is counted as it goes

    def defer_events(self, events: list[bytes], size: int) -> None:
        r"""Take whole one-line chat chunk events that can only add to the output counts.

        Each is an event's bytes, ``data: {...}\n\n``; what :meth:`observe_data` would
        do with their data is done when the counts are read (:class:`StreamMeter`
        checks each qualifies, as :meth:`observe_data` would).

        Args:
            events: the events' bytes.
            size: the bytes they hold (``sum(map(len, events))``), or more.
        """
        self.events += len(events)
        self._deferred += events
        self._deferred_size += size
        if self._deferred_size > _DEFERRED_LIMIT:
            self._count_deferred()

    def _count_deferred(self) -> None:
        """Parse the deferred chunks and add their output (counts add up in any order)."""
        deferred, self._deferred, self._deferred_size = self._deferred, [], 0
        for item in deferred:
            # A whole event's bytes (``data: {...}\n\n``) or the data of one.
            data = item if isinstance(item, str) else item[6:-2].decode("utf-8", errors="replace")
            try:
                obj = loads_json_text(data)
            except ValueError:
                continue
            if type(obj) is dict:
                self._observe_chat(obj)

    def _observe_chat(self, obj: dict[str, Any]) -> bool:
        error = obj.get("error")
        if error:
            # Some servers end a failed stream with one chunk carrying the error and the
            # usage billed so far: both count.
            self._add_openai_error(error)
        if self.model is None or self.response_id is None:
            self._note_identity(obj.get("model"), obj.get("id"))
            self._note_tier(tier_context("service_tier", obj.get("service_tier")))
        usage = obj.get("usage")
        if isinstance(usage, Mapping):
            self._usage = openai_usage(usage)
            self._input_reported = True
            self._note_tier(tier_context("service_tier", obj.get("service_tier")))
        choices = obj.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict:
                    self._count_chat_choice(choice)
        if not self.added_include_usage or "usage" not in obj:
            return True
        # What the guard's include_usage caused is taken back out: the usage-only chunk
        # is dropped, and the "usage" member of every other chunk (null, or the usage
        # some servers put on their last chunk) is removed from the bytes forwarded.
        if usage is None:
            self.strip_usage = "null"
        elif isinstance(usage, Mapping):
            if not choices and not error:
                return False
            self.strip_usage = "value"
        return True

    def _count_chat_choice(self, choice: dict[str, Any]) -> None:
        finish = choice.get("finish_reason")
        if type(finish) is str:
            self.status = finish
        delta = choice.get("delta")
        if type(delta) is not dict:
            delta = choice  # legacy completions put ``text`` on the choice itself
        # One pass over the delta's own members (usually one or two), not a lookup of
        # every key that may carry output.
        for key, value in delta.items():
            if key in _CHAT_DELTA_TEXT_KEYS:
                if type(value) is str and value:
                    self._output_bytes += len(value.encode("utf-8"))
                    self._output_deltas += 1
            elif key == "tool_calls":
                if type(value) is list:
                    for call in value:
                        function = call.get("function") if type(call) is dict else None
                        if isinstance(function, Mapping):
                            self._count_text(function.get("arguments"))
            elif key == "function_call" and isinstance(value, Mapping):
                self._count_text(value.get("arguments"))

    def _observe_responses(self, event_name: str | None, obj: dict[str, Any]) -> None:
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event_name
        if not isinstance(kind, str):
            return
        response = obj.get("response")
        if isinstance(response, Mapping):
            self._note_identity(response.get("model"), response.get("id"))
        if kind in _TERMINAL_RESPONSE_EVENTS:
            self.finished = True
            status = response.get("status") if isinstance(response, Mapping) else None
            self.status = status if isinstance(status, str) else kind.rsplit(".", 1)[1]
            usage = response.get("usage") if isinstance(response, Mapping) else None
            if isinstance(response, Mapping):
                self._note_tier(response_tier("responses", response))
            if isinstance(usage, Mapping) and isinstance(response, Mapping):
                self._usage = replace(
                    responses_usage(usage),
                    web_searches=responses_web_searches(response),
                    file_searches=responses_file_searches(response),
                )
                self._input_reported = True
            if kind == "response.failed" and isinstance(response, Mapping):
                self._add_openai_error(response.get("error") or {"type": "failed"})
        elif kind == "error":
            self._add_openai_error(obj)
        elif kind.endswith(".delta") and "audio" not in kind:
            self._count_text(obj.get("delta"))

    def _observe_anthropic(self, event_name: str | None, obj: dict[str, Any]) -> None:
        kind = obj.get("type") if isinstance(obj.get("type"), str) else event_name
        if kind == "message_start":
            message = obj.get("message")
            if isinstance(message, Mapping):
                self._note_identity(message.get("model"), message.get("id"))
                self._merge_anthropic(message.get("usage"), final=False)
        elif kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, Mapping):
                for key in _ANTHROPIC_DELTA_TEXT_KEYS:
                    self._count_text(delta.get(key))
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, Mapping):
                self._count_text(block.get("text"))
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.status = delta["stop_reason"]
            self._merge_anthropic(obj.get("usage"), final=True)
        elif kind == "message_stop":
            self.finished = True
        elif kind == "error":
            error = obj.get("error")
            error = error if isinstance(error, Mapping) else obj
            self.errors.append(StreamError(_str(error.get("type")), _str(error.get("message"))))

    def _merge_anthropic(self, usage: object, *, final: bool) -> None:
        if not isinstance(usage, Mapping):
            return
        for key, value in usage.items():
            if value is not None:
                self._anthropic[key] = value
        if "input_tokens" in self._anthropic:
            self._input_reported = True
        if "speed" in usage:
            self._note_tier(tier_context("speed", usage["speed"]))
        was_complete = self._usage is not None and self._usage.complete
        complete = (final or was_complete) and self._input_reported
        self._usage = anthropic_usage(self._anthropic, complete=complete, model=self.model)

    def _note_identity(self, model: object, response_id: object) -> None:
        if self.model is None and isinstance(model, str) and model:
            self.model = model
        if self.response_id is None and isinstance(response_id, str) and response_id:
            self.response_id = response_id

    def _note_tier(self, context: Mapping[str, str] | None) -> None:
        if context is not None:
            self.price_context = context

    def _add_openai_error(self, error: object) -> None:
        if not isinstance(error, Mapping):
            self.errors.append(StreamError(None, _str(error)))
            return
        self.errors.append(
            StreamError(
                _str(error.get("type")), _str(error.get("message")), _str(error.get("code"))
            )
        )

    def _count_text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self._output_bytes += len(value.encode("utf-8"))
            self._output_deltas += 1

    # -- results ------------------------------------------------------------------------

    @property
    def usage(self) -> ParsedUsage | None:
        """The usage the provider reported so far (``None`` if none yet).

        ``complete`` is true once the final report arrived: the chat usage chunk, a
        terminal Responses event with usage, or Anthropic's ``message_delta`` usage
        after ``message_start``.
        """
        return self._usage

    @property
    def input_reported(self) -> bool:
        """Whether the provider reported the input tokens.

        Anthropic does in ``message_start``, before any output; OpenAI only with the
        final usage.
        """
        return self._input_reported

    @property
    def usage_complete(self) -> bool:
        """Whether the provider's final usage report was seen."""
        return self._usage is not None and self._usage.complete

    def estimated_output_tokens(self, cap: int | None = None) -> int:
        """An estimate of the output tokens, for a stream without its final usage.

        ``max(ceil(output_bytes / 2.5), output_deltas) + 16``
        (:data:`ESTIMATE_BYTES_PER_TOKEN`, :data:`ESTIMATE_MARGIN_TOKENS`), at most
        ``cap`` (the output the request allowed: the model cannot have sent more), and
        never below an output count the provider already reported. Reasoning a model
        never streams (hidden reasoning tokens) cannot be seen and is not in the estimate.
        """
        by_bytes = math.ceil(self.output_bytes / ESTIMATE_BYTES_PER_TOKEN)
        estimate = max(by_bytes, self.output_deltas) + ESTIMATE_MARGIN_TOKENS
        if cap is not None:
            estimate = min(estimate, cap)
        reported = self._usage.output_tokens if self._usage is not None else 0
        return max(estimate, reported)

    def best_usage(self, fallback_input_tokens: int, output_cap: int | None = None) -> ParsedUsage:
        """The usage to settle with: the provider's report, completed by estimates.

        Args:
            fallback_input_tokens: the input tokens to charge when the stream never
                reported them (the transport's estimate from the request body).
            output_cap: the output the request allowed (see
                :meth:`estimated_output_tokens`).

        Returns:
            The reported usage when complete; otherwise the reported input counts (or
            the fallback) with :meth:`estimated_output_tokens`, ``complete=False``.
        """
        usage = self._usage
        if usage is not None and usage.complete:
            return usage
        if usage is not None and self._input_reported:
            output = self.estimated_output_tokens(output_cap)
            return replace(usage, output_tokens=output, complete=False)
        return ParsedUsage(
            input_tokens=max(0, fallback_input_tokens),
            output_tokens=self.estimated_output_tokens(output_cap),
            complete=False,
        )


CHAT_KINDS: Final = frozenset({"chat", "completions"})
"""The endpoint kinds whose streams are chat chunks (chat and legacy completions)."""
_DEFERRED_LIMIT: Final = 256 * 1024
"""Characters of deferred chat chunks held before they are counted anyway."""


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None
