"""The guarding transport's decisions for provider wire formats (Gemini, Bedrock, ...).

:class:`ProviderMeter` is a :class:`~payi_guard.meter.transport.TransportMeter` that the
same guarding transport runs (httpx and httpx2, sync and async): it plans requests with
one or more :class:`Dialect` objects (one per wire format), reserves, refuses with the
SDK's own exception, and wraps every successful response body so that its bytes reach
the caller unchanged while a :class:`~payi_guard.meter.providers.wire.WireTracker`
reads the usage. :class:`WireStreamState` settles exactly once, on every path (end,
close, error, garbage collection), with these outcomes:

* the provider's final usage report, trusted: charged, ``ok``;
* a report that cannot be trusted (missing, negative, not a whole number), or a body
  that ended without one: the reservation is charged, ``outcome="unverified"``, and a
  ``usage_invalid`` event says why;
* a body cut short (``close`` before its end, a read error, garbage collection): the
  input reported so far (or the request's estimate) plus the output received, counted
  from its text plus a margin; ``incomplete`` or ``error``.

With ``fallback=True`` (LiteLLM's HTTP clients, which carry every provider's format),
a request no dialect recognises is planned as an OpenAI / Anthropic call by the base
meter, and its body is wrapped the same way.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import unquote

from payi_guard import log as events
from payi_guard.context import get_context
from payi_guard.engine import CallRequest, Guard
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.parse import Endpoint, ParsedUsage, RequestInfo, usage_from_response
from payi_guard.meter.providers.wire import (
    JsonBodyTracker,
    Report,
    WireEndpoint,
    WireRequest,
    WireTracker,
)
from payi_guard.meter.streams import Settlement, StreamState, _Inflater, stream_state
from payi_guard.meter.transport import UNKNOWN_MODEL, PlannedCall, TransportMeter
from payi_guard.pricing import TokenUsage

if TYPE_CHECKING:
    from payi_guard.engine import Reservation
    from payi_guard.meter.tokens import EstimateMode

__all__ = [
    "Dialect",
    "ProviderMeter",
    "Refuse",
    "WireCall",
    "WireStreamState",
    "split_path",
]

_log = events.get_logger()

Refuse = Callable[[ModuleType, Any, PayiGuardError], Any]
"""Turns a refusal into what the caller gets: an exception to raise, or a response."""

_EVENT_STREAM_TYPES: Final = frozenset({"text/event-stream"})


def split_path(raw_path: str) -> list[str]:
    """The percent-decoded segments of a raw URL path (query and fragment dropped).

    Segments are split before decoding, so an ARN's encoded ``%2F`` stays inside its
    segment.
    """
    path = raw_path.split("?", 1)[0].split("#", 1)[0]
    return [unquote(segment) for segment in path.split("/") if segment]


def media_type(headers: Mapping[str, str] | Any) -> str:
    """The lower-cased media type of a ``content-type`` header (no parameters)."""
    value = headers.get("content-type") or ""
    return str(value).split(";", 1)[0].strip().lower()


class Dialect(ABC):
    """One provider wire format: which requests are calls, their bounds, their usage."""

    provider: str = ""
    """The provider charged, as genai-prices names it (``google``, ``aws``...)."""

    signed: bool = False
    """Requests carry a signature over their headers (AWS SigV4): never modified."""

    @abstractmethod
    def classify(
        self, method: str, host: str, path: list[str], headers: Any = None
    ) -> WireEndpoint | None:
        """The endpoint a request goes to, or ``None`` when it is not a metered call.

        Args:
            method: the HTTP method.
            host: the host, lower case.
            path: the path's segments, from :func:`split_path`.
            headers: the request's headers, when known.
        """

    @abstractmethod
    def describe(
        self, endpoint: WireEndpoint, body: Mapping[str, Any], mode: EstimateMode
    ) -> WireRequest:
        """What a request body asks for, and its bounds."""

    @abstractmethod
    def tracker(
        self, endpoint: WireEndpoint, content_type: str, headers: Mapping[str, str] | Any
    ) -> WireTracker:
        """A tracker for a successful response body of ``endpoint``."""


@dataclass(slots=True)
class WireCall(PlannedCall):
    """A planned call in a provider's wire format.

    Attributes:
        dialect: the dialect that planned it.
        wire: its endpoint.
    """

    dialect: Dialect | None = None
    wire: WireEndpoint | None = None


class WireStreamState(StreamState):
    """A :class:`~payi_guard.meter.streams.StreamState` whose usage comes from a tracker.

    Args:
        reservation: the reservation to settle.
        tracker: follows the body.
        fallback_input: input tokens charged when a cut body never reported them.
        max_output: the output bound reserved.
        inflater: decodes a body the server compressed, if any.
        raw: the body's encoding cannot be decoded here (its bound is charged).
        forward_decoded: hand the caller the decoded bytes (httpx, whose headers were
            fixed); ``False`` hands on the bytes as received (botocore decodes itself).
    """

    __slots__ = ("forward_decoded", "tracker")

    def __init__(
        self,
        reservation: Reservation,
        tracker: WireTracker,
        *,
        fallback_input: int,
        max_output: int,
        inflater: _Inflater | None = None,
        raw: bool = False,
        forward_decoded: bool = True,
    ) -> None:
        super().__init__(
            reservation,
            Endpoint("chat"),
            added_include_usage=False,
            fallback_input=fallback_input,
            max_output=max_output,
            inflater=inflater,
            raw=raw,
        )
        self.tracker = tracker
        self.forward_decoded = forward_decoded

    @classmethod
    def adopt(cls, base: StreamState, tracker: WireTracker) -> WireStreamState:
        """A wire state taking over the decoding decisions of a shared stream state."""
        return cls(
            base.reservation,
            tracker,
            fallback_input=base.fallback_input,
            max_output=base.max_output,
            inflater=base.inflater,
            raw=base.raw,
        )

    def feed(self, chunk: bytes) -> bytes:
        """Observe ``chunk``; return the bytes to hand to the caller."""
        if self.raw:
            return chunk
        data = chunk if self.inflater is None else self.inflater.decompress(chunk)
        self.tracker.feed(data)
        return data if self.forward_decoded else chunk

    def end(self) -> bytes:
        """The body ended: observe what the decoder still held."""
        if self.raw:
            return b""
        tail = b""
        if self.inflater is not None:
            tail = self.inflater.flush()
            self.tracker.feed(tail)
        self.tracker.finish()
        return tail if self.forward_decoded else b""

    def result(self, reason: str) -> Settlement:
        """What to charge for a body that ``reason`` ended (see the module doc)."""
        if self.raw:
            return super().result(reason)
        tracker = self.tracker
        report = tracker.report
        if report is not None and report.usage is not None:
            reported = report.usage
            return Settlement(
                reported.to_token_usage(),
                "error" if tracker.errors else "ok",
                response_model=report.model or tracker.model,
                other_models=reported.other_models,
                problems=reported.problems,
                price_context=(
                    tracker.price_context if report.price_context is None else report.price_context
                ),
            )
        if report is not None and report.invalid is not None:
            return Settlement(
                TokenUsage(0, 0),
                "ok",
                response_model=report.model or tracker.model,
                problems=(report.invalid,),
            )
        if reason == "end" and not tracker.errors:
            return Settlement(TokenUsage(0, 0), "ok", problems=("no usage reported",))
        if isinstance(tracker, JsonBodyTracker):
            # A plain answer is generated whole before its headers: the provider billed
            # it, but its usage was in the part lost (a read error, the app's task
            # cancelled or the body collected unread). Its input bound and output cap.
            return Settlement(
                TokenUsage(max(0, self.fallback_input), self.max_output),
                "error",
                response_model=tracker.model,
                price_context=tracker.price_context,
            )
        partial = tracker.partial or ParsedUsage(input_tokens=max(0, self.fallback_input))
        usage = replace(
            partial,
            output_tokens=tracker.estimated_output_tokens(self.max_output),
            web_searches=0,
            file_searches=0,
        ).to_token_usage()
        outcome = "error" if reason == "error" or tracker.errors else "incomplete"
        return Settlement(
            usage, outcome, response_model=tracker.model, price_context=tracker.price_context
        )


def _openai_report(endpoint: Endpoint) -> Callable[[Any], Report]:
    def read(obj: Any) -> Report:
        parsed = usage_from_response(endpoint, obj)
        if parsed.complete:
            return Report(usage=parsed)
        return Report(invalid="the response has no usage object")

    return read


class ProviderMeter(TransportMeter):
    """The guarding transport's decisions for provider wire formats.

    Args:
        guard: the guard that reserves and settles.
        options: the options of the ``wrap``/``instrument`` call.
        module: ``httpx`` or ``httpx2``.
        dialects: the wire formats recognised, tried in order.
        refuse: how a refusal reaches the caller (see :data:`Refuse`).
        fallback: plan a request no dialect recognises as an OpenAI / Anthropic call
            (LiteLLM's clients); otherwise it passes through untouched.
    """

    def __init__(
        self,
        guard: Guard,
        options: MeterOptions,
        module: ModuleType,
        dialects: Sequence[Dialect],
        refuse: Refuse,
        *,
        fallback: bool = False,
    ) -> None:
        super().__init__(guard, options, module)
        self.dialects = tuple(dialects)
        self._refuse = refuse
        self.fallback = fallback

    def plan(self, request: Any) -> PlannedCall | None:
        """Plan a request, or return ``None`` when it is not metered (passthrough)."""
        url = request.url
        host = str(url.host).lower()
        path = split_path(url.raw_path.decode("ascii", "replace"))
        for dialect in self.dialects:
            endpoint = dialect.classify(request.method.upper(), host, path, request.headers)
            if endpoint is not None:
                return self._plan_wire(request, dialect, endpoint)
        return super().plan(request) if self.fallback else None

    def _plan_wire(self, request: Any, dialect: Dialect, endpoint: WireEndpoint) -> WireCall | None:
        try:
            raw: bytes = request.content
        except self._request_not_read:
            return None
        try:
            body: Any = json.loads(raw) if raw else {}
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(body, dict):
            return None
        wire = dialect.describe(endpoint, body, self.options.estimate_mode)
        model = wire.model or UNKNOWN_MODEL
        generic = Endpoint(endpoint.kind, provider=dialect.provider)
        info = RequestInfo(generic, model, wire.stream, 1, False, None, body)
        call = CallRequest(
            model=model,
            provider=self.options.provider or dialect.provider,
            endpoint=endpoint.kind,
            input_tokens=wire.input_tokens,
            max_output_tokens=wire.output_tokens,
            stream=wire.stream,
            cache_writes=wire.cache_writes,
            price_context=dict(wire.price_context) or None,
        )
        return WireCall(
            generic, info, call, get_context(), None, False, request.url, dialect, endpoint
        )

    def refuse(self, request: Any, exc: PayiGuardError) -> Any:
        """Raise (or answer) a refused request the way its SDK reports a rate limit."""
        result = self._refuse(self.module, request, exc)
        if isinstance(result, BaseException):
            raise result
        return result

    def outgoing(self, request: Any, planned: PlannedCall, reservation: Reservation) -> Any:
        """The request to send; a signed request goes out exactly as it was built."""
        if isinstance(planned, WireCall) and planned.dialect is not None and planned.dialect.signed:
            return request
        return super().outgoing(request, planned, reservation)

    @staticmethod
    def response_kind(planned: PlannedCall, response: Any) -> Literal["error", "stream", "plain"]:
        """``error`` for a non-2xx status; every other body is wrapped and metered."""
        if not 200 <= int(response.status_code) < 300:
            return "error"
        return "stream"

    def stream_state(
        self, planned: PlannedCall, reservation: Reservation, response: Any, *, loaded: bool = False
    ) -> StreamState:
        """The state of a response body about to be wrapped; fixes its headers."""
        wire = isinstance(planned, WireCall) and planned.dialect is not None
        if not wire and (
            planned.info.stream or media_type(response.headers) in _EVENT_STREAM_TYPES
        ):
            # An OpenAI / Anthropic stream: the shared state meters it.
            return super().stream_state(planned, reservation, response, loaded=loaded)
        base = stream_state(
            response,
            reservation,
            planned.endpoint,
            added_include_usage=planned.added_include_usage,
            fallback_input=planned.call.input_tokens,
            max_output=planned.call.max_output_tokens,
            loaded=loaded,
        )
        ctype = media_type(response.headers)
        tracker: WireTracker
        if isinstance(planned, WireCall) and planned.dialect is not None and planned.wire:
            tracker = planned.dialect.tracker(planned.wire, ctype, response.headers)
        else:
            tracker = JsonBodyTracker(_openai_report(planned.endpoint))
        return WireStreamState.adopt(base, tracker)
