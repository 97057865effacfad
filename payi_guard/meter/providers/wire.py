"""Provider wire formats, pure: request bounds, trusted token counts, response trackers.

Nothing here does I/O or imports an SDK. Each provider module describes its wire format
with these pieces, and :mod:`payi_guard.meter.providers.meter` (httpx) or the Bedrock
botocore layer runs them:

* :class:`WireEndpoint` and :class:`WireRequest`: what a request is and what it may cost
  (model, stream, input and output bounds), from its URL and JSON body; :class:`Bound`
  gathers the text, images and files of a body for the input bound;
* :func:`count` reads one token count and refuses anything that cannot be trusted
  (missing, negative, not a whole number) with :class:`UntrustedUsage`;
* :class:`Report`: the usage a response reported, or why it cannot be trusted;
* trackers follow a response body as its bytes pass, without changing them:
  :class:`SSETracker` (server-sent events of JSON objects), :class:`JsonBodyTracker`
  (one JSON body, read at its end).

Token counts follow :class:`~payi_guard.meter.parse.ParsedUsage`: ``input_tokens``
excludes cache reads and writes, ``output_tokens`` includes reasoning.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from payi_guard.meter.sse import (
    ESTIMATE_BYTES_PER_TOKEN,
    ESTIMATE_MARGIN_TOKENS,
    SSEDecoder,
    SSEEvent,
)
from payi_guard.meter.tokens import (
    DEFAULT_FILE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    EndpointKind,
    EstimateMode,
    text_token_bound,
)
from payi_guard.meter.usage_objects import ParsedUsage

__all__ = [
    "Bound",
    "JsonBodyTracker",
    "Report",
    "SSETracker",
    "UntrustedUsage",
    "WireEndpoint",
    "WireRequest",
    "WireTracker",
    "count",
    "first_cap",
    "model_cap",
]


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireEndpoint:
    """A metered provider endpoint, recognised from a request's method and URL.

    Attributes:
        kind: ``chat`` (text generation) or ``embeddings``, as logged in ``genai_call``.
        operation: the provider's own name of the call (``generateContent``,
            ``converse-stream``, ``chat/completions``...).
        model: the model named in the URL (Gemini, Bedrock), else ``None`` (the body
            names it).
        stream: whether the URL asks for a stream (Gemini, Bedrock), else ``None`` (the
            body's ``stream`` decides).
    """

    kind: EndpointKind
    operation: str
    model: str | None = None
    stream: bool | None = None


@dataclass(frozen=True, slots=True)
class WireRequest:
    """What a metered request asks for, and the bounds the guard reserves.

    Attributes:
        model: the model charged (``None`` when neither URL nor body names one).
        stream: whether the response streams.
        input_tokens: an upper bound of every input token (cache included).
        output_tokens: an upper bound of the output tokens (every candidate).
        cache_writes: whether the call may write a prompt cache (priced at the
            cache-write rate in the bound).
        price_context: request facts that select a price variant.
    """

    model: str | None
    stream: bool
    input_tokens: int
    output_tokens: int
    cache_writes: bool = False
    price_context: Mapping[str, str] = field(default_factory=dict)


_MISSING: Final = object()


class Bound:
    """The parts of a request body that bound its input tokens.

    Text (keys and values) is bounded by :func:`~payi_guard.meter.tokens.text_token_bound`;
    each mapping or list entry adds one token of punctuation; each message adds
    :data:`~payi_guard.meter.tokens.MESSAGE_OVERHEAD_TOKENS`; images and files count an
    allowance each (their size is not in the request, or their bytes are not text).

    Args:
        image_tokens: tokens counted per image.
        file_tokens: tokens counted per file, document, audio or video part.
        media: tells a media part from any other mapping: returns ``"image"``,
            ``"file"``, the tokens a file part's size is worth (an ``int``: it counts
            that or the file allowance, the larger) or ``None``.
    """

    __slots__ = (
        "exact",
        "file_tokens",
        "files",
        "image_tokens",
        "images",
        "items",
        "media",
        "text",
    )

    def __init__(
        self,
        *,
        image_tokens: int,
        file_tokens: int = DEFAULT_FILE_TOKENS,
        media: Callable[[Mapping[str, Any]], str | int | None] | None = None,
    ) -> None:
        self.text: list[str] = []
        self.items = 0
        self.images = 0
        self.files = 0
        self.exact = 0
        self.image_tokens = image_tokens
        self.file_tokens = file_tokens
        self.media = media

    def add(self, obj: object) -> None:
        """Walk ``obj``: strings are text; media parts count their allowance."""
        if isinstance(obj, str):
            self.text.append(obj)
        elif isinstance(obj, Mapping):
            kind = self.media(obj) if self.media is not None else None
            if kind == "image":
                self.images += 1
                return
            if kind == "file":
                self.files += 1
                return
            if type(kind) is int:
                self.exact += max(kind, self.file_tokens)
                return
            self.exact += len(obj)
            for key, value in obj.items():
                self.text.append(str(key))
                self.add(value)
        elif isinstance(obj, list):
            self.exact += len(obj)
            for value in obj:
                self.add(value)
        elif obj is not None:
            self.text.append(str(obj))

    def add_items(self, items: object) -> None:
        """Walk a list of messages, counting the per-message overhead."""
        if isinstance(items, list):
            self.items += len(items)
            for item in items:
                self.add(item)
        elif items is not None:
            self.items += 1
            self.add(items)

    def tokens(self, mode: EstimateMode) -> int:
        """The input bound of everything added."""
        return (
            text_token_bound("\n".join(self.text), mode)
            + self.exact
            + self.items * MESSAGE_OVERHEAD_TOKENS
            + self.images * self.image_tokens
            + self.files * self.file_tokens
            + REQUEST_OVERHEAD_TOKENS
        )


def first_cap(body: Mapping[str, Any], *paths: str) -> int | None:
    """The first non-negative integer found at one of ``paths`` (dotted) in ``body``."""
    for path in paths:
        value: object = body
        for key in path.split("."):
            value = value.get(key) if isinstance(value, Mapping) else None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return None


def model_cap(model: str, table: Iterable[tuple[str, int]], default: int) -> int:
    """The output cap of ``model`` from ``(name fragment, cap)`` pairs, else ``default``.

    The longest fragment found in the lower-cased name wins, so ``gemini-2.5-flash``
    beats ``gemini``.
    """
    name = model.lower()
    best, best_len = default, -1
    for fragment, cap in table:
        if fragment in name and len(fragment) > best_len:
            best, best_len = cap, len(fragment)
    return best


# ---------------------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------------------


class UntrustedUsage(ValueError):
    """A usage report that cannot be trusted: the message says which count and why."""


def count(obj: Mapping[str, Any], key: str, *, default: int | None = None) -> int:
    """One token count of a usage report, checked.

    Args:
        obj: the usage object.
        key: the count's field.
        default: the value of an absent (or ``null``) field; ``None`` makes it required.

    Returns:
        The count: an ``int``, or a float with no fraction (Bedrock's Titan sends
        ``6.0``).

    Raises:
        UntrustedUsage: the field is required and absent, or it is negative, not a
            number, or a number with a fraction.
    """
    value = obj.get(key, _MISSING)
    if value is _MISSING or value is None:
        if default is None:
            raise UntrustedUsage(f"{key} is missing")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UntrustedUsage(f"{key} is not a number ({type(value).__name__})")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise UntrustedUsage(f"{key} is not a whole number")
    if value < 0:
        raise UntrustedUsage(f"{key} is negative")
    return int(value)


@dataclass(frozen=True, slots=True)
class Report:
    """A usage report read from a response.

    Attributes:
        usage: the usage, when it can be trusted.
        invalid: why it cannot be trusted, otherwise.
        model: the model the response names (it is priced as that model when it has a
            price), if it names one.
        price_context: the tier the response says served the call
            (:func:`~payi_guard.meter.tier.tier_context`), if it says.
    """

    usage: ParsedUsage | None = None
    invalid: str | None = None
    model: str | None = None
    price_context: Mapping[str, str] | None = None

    @classmethod
    def read(
        cls,
        parse: Callable[[], ParsedUsage],
        *,
        model: str | None = None,
        price_context: Mapping[str, str] | None = None,
    ) -> Report:
        """Run ``parse``; an :class:`UntrustedUsage` it raises becomes ``invalid``."""
        try:
            return cls(usage=parse(), model=model, price_context=price_context)
        except UntrustedUsage as exc:
            return cls(invalid=str(exc), model=model)


# ---------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------


class WireTracker:
    """Follows one response body as its bytes pass; never changes them.

    Subclasses read the body's format and set:

    * :attr:`report`: the final usage report (trusted or not), once seen;
    * :attr:`partial`: the usage reported so far by a stream that sends running totals
      or its input first (charged, completed by estimates, when the stream is cut);
    * :attr:`finished`: the body's own end marker arrived;
    * :attr:`errors`: errors the provider reported inside a 200 response;
    * :meth:`count_text` for every piece of generated output (the estimate of a cut
      stream).
    """

    def __init__(self) -> None:
        self.report: Report | None = None
        self.partial: ParsedUsage | None = None
        self.model: str | None = None
        """The model the body names so far (a cut stream is priced as it)."""
        self.price_context: Mapping[str, str] | None = None
        """The tier the body says served the call so far."""
        self.finished = False
        self.errors: list[str] = []
        self.output_bytes = 0
        self.output_deltas = 0

    def feed(self, chunk: bytes) -> None:
        """Observe the next bytes of the body."""

    def finish(self) -> None:
        """The body ended: observe what is still held."""

    def count_text(self, value: object) -> None:
        """Count a piece of generated output (text, reasoning, tool arguments)."""
        if isinstance(value, str) and value:
            self.output_bytes += len(value.encode("utf-8"))
            self.output_deltas += 1
        elif isinstance(value, (Mapping, list)) and value:
            self.count_text(json.dumps(value, ensure_ascii=False))

    def estimated_output_tokens(self, cap: int | None = None) -> int:
        """Output tokens of a body that ended without its final report (an estimate).

        ``max(ceil(bytes / 2.5), deltas) + 16``, at most ``cap`` (the output the request
        allowed), never below an output count the provider already reported.
        """
        by_bytes = math.ceil(self.output_bytes / ESTIMATE_BYTES_PER_TOKEN)
        estimate = max(by_bytes, self.output_deltas) + ESTIMATE_MARGIN_TOKENS
        if cap is not None:
            estimate = min(estimate, cap)
        reported = self.partial.output_tokens if self.partial is not None else 0
        return max(estimate, reported)


class SSETracker(WireTracker):
    """A server-sent event stream of JSON objects; :meth:`on_event` reads each one."""

    def __init__(self) -> None:
        super().__init__()
        self._decoder = SSEDecoder()

    def feed(self, chunk: bytes) -> None:
        """Decode the events ``chunk`` completes."""
        self._observe(self._decoder.feed(chunk))

    def finish(self) -> None:
        """Decode the last events."""
        self._observe(self._decoder.finish())
        self.on_end()

    def _observe(self, events: Iterable[SSEEvent]) -> None:
        for event in events:
            if not event.has_data or not event.complete:
                continue
            data = event.data.strip()
            if data == "[DONE]":
                self.finished = True
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self.on_event(event.event, obj)

    def on_event(self, name: str | None, obj: dict[str, Any]) -> None:
        """Read one event's JSON object (``name`` is its ``event:`` field)."""

    def on_end(self) -> None:
        """The stream ended (after its last event)."""


class JsonBodyTracker(WireTracker):
    """One JSON body: kept as it passes, read by ``read`` once it ended.

    Args:
        read: gives the report of the parsed body (``None`` when it is not JSON).
        report: a report already known from the response headers (it wins).
    """

    def __init__(self, read: Callable[[Any], Report], report: Report | None = None) -> None:
        super().__init__()
        self._read = read
        self._chunks: list[bytes] = []
        self.report = report

    def feed(self, chunk: bytes) -> None:
        """Keep ``chunk``."""
        if self.report is None:
            self._chunks.append(chunk)

    def finish(self) -> None:
        """Parse the body and read its report."""
        self.finished = True
        if self.report is not None:
            return
        body = b"".join(self._chunks)
        self._chunks = []
        try:
            obj: Any = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            obj = None
        self.report = self._read(obj)
