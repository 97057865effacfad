"""The guarding transport: meters every GenAI call an httpx or httpx2 client sends.

One implementation serves both HTTP modules (``httpx`` for older SDKs, ``httpx2`` for
openai 3.x and anthropic 2.x): :func:`transport_classes` builds the transport and
response-stream classes for a module from the module-agnostic :class:`TransportMeter`,
which holds every decision. The sync and async transports only differ in ``await``.

Per request (see :mod:`payi_guard.meter.parse` for the parsing):

1. :func:`~payi_guard.meter.parse.classify` picks out metered calls; everything else,
   and any body that is not a JSON object (multipart uploads, streamed request bodies),
   goes to the inner transport untouched.
2. The JSON body gives the model (or the Azure deployment), ``stream`` and the output
   cap; a chat / legacy completions stream gets ``stream_options.include_usage`` unless
   switched off for that URL; :mod:`payi_guard.pricing` bounds the cost, and the guard
   reserves it with the attribution in effect **now** (``Guard.begin``). A refusal never
   reaches the inner transport (:mod:`payi_guard.meter.refusal`).
3. The request goes out with ``accept-encoding: identity`` (a compressed body hides its
   usage; a server that compresses anyway is decoded here), the rebuilt body and its
   ``content-length``, and Pay-i headers when the bridge is on.
4. An error status releases the reservation (each SDK retry is a new transport call with
   its own reservation). A JSON body is read here and settled with its ``usage``. An
   event stream is handed back wrapped: bytes pass through unchanged (minus the
   usage-only chunk the guard caused) while the usage is tracked, and the reservation is
   settled exactly once, whichever comes first: the end of the stream, ``close()``
   (``break``, ``with``), an error while reading, or garbage collection.

Servers that refuse ``stream_options`` (HTTP 400/422 whose body names it): when the
guard added the option, the request is sent once more without it and the base URL is
remembered (per ``wrap``/``instrument`` call), so later streams there go out unchanged
and are charged from what they stream (input from the request's estimate, output
counted from the deltas plus a margin).
"""

from __future__ import annotations

import json
import queue
import threading
import weakref
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final, Literal, NamedTuple, cast

from payi_guard import log as events
from payi_guard.context import Attribution, get_context
from payi_guard.engine import CallRequest, Guard, Reservation
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.parse import (
    ESTIMATE_MARGIN_TOKENS,
    Endpoint,
    RequestInfo,
    StreamMeter,
    classify,
    encode_body,
    inject_include_usage,
    usage_from_response,
)
from payi_guard.meter.payi_bridge import PayiBridge
from payi_guard.meter.refusal import refusal_response

# The price variant and cache-write rules are pricing's own; sharing them keeps the
# reservation priced exactly as pricing estimates a body.
from payi_guard.pricing.rates import (
    EstimateMode,
    TokenUsage,
    _mentions_key,
    _price_context,
    estimate_input_tokens,
    image_token_bound,
    max_output_tokens,
)

__all__ = [
    "UNKNOWN_MODEL",
    "MeterOptions",
    "PlannedCall",
    "RefusalMode",
    "TransportClasses",
    "TransportMeter",
    "base_url",
    "flush_abandoned_streams",
    "transport_classes",
]

UNKNOWN_MODEL: Final = "unknown"
"""The model charged when a request names none (priced by the ``unknown_model`` policy)."""

RefusalMode = Literal["sdk", "raise", "response"]
"""How a refusal reaches the caller: ``sdk`` (synthesized response an SDK hook turns into
the combined exception), ``raise`` (the payi_guard exception itself), ``response``
(an ``application/problem+json`` response)."""

_OPENAI_HOSTS: Final = frozenset({"api.openai.com"})
_STREAM_OPTIONS_STATUSES: Final = frozenset({400, 422})
_INCLUDE_USAGE_SUFFIXES: Final = ("/chat/completions", "/completions")
_DECODABLE: Final = frozenset({"gzip", "x-gzip", "deflate"})

_log = events.get_logger()


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


@dataclass
class MeterOptions:
    """What one ``wrap``/``instrument`` call asked for (shared by the transports it made).

    Attributes:
        include_usage: inject ``stream_options.include_usage`` into chat and legacy
            completions streams (False: never).
        skip_include_usage: URL prefixes (``"http://llm.internal:8000/v1"``) where the
            option is never injected.
        retry_without_stream_options: resend once without the option when a server
            answers 400/422 naming ``stream_options``, and remember the base URL.
        provider: the provider name to charge under, instead of detecting it.
        payi: the Pay-i bridge: True, False, or None (on while Pay-i is instrumented).
        estimate_mode: how input text is bounded (see
            :func:`payi_guard.pricing.estimate_input_tokens`).
        refusal: how a refusal reaches the caller (:data:`RefusalMode`).
    """

    include_usage: bool = True
    skip_include_usage: tuple[str, ...] = ()
    retry_without_stream_options: bool = True
    provider: str | None = None
    payi: bool | None = None
    estimate_mode: EstimateMode = "ratio"
    refusal: RefusalMode = "raise"
    _learned: set[str] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @classmethod
    def from_kwargs(cls, options: Mapping[str, Any], *, refusal: RefusalMode) -> MeterOptions:
        """Validate the keyword options of ``wrap`` / ``instrument``.

        Args:
            options: the keyword arguments (see :func:`payi_guard.meter.wrap`).
            refusal: the refusal mode of the client kind: ``sdk`` for SDK clients (not
                changeable), ``raise`` for plain HTTP clients (``response`` allowed).

        Raises:
            TypeError: an unknown option, or a value of the wrong type.
            ValueError: a value out of range.
        """
        known = {
            "include_usage",
            "skip_include_usage",
            "retry_without_stream_options",
            "provider",
            "payi",
            "estimate_mode",
            "refusal",
        }
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        include_usage = options.get("include_usage", True)
        retry = options.get("retry_without_stream_options", True)
        for name, value in (
            ("include_usage", include_usage),
            ("retry_without_stream_options", retry),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be True or False, not {value!r}")
        skip = options.get("skip_include_usage", ())
        if isinstance(skip, str):
            skip = (skip,)
        if not isinstance(skip, Iterable) or not all(isinstance(s, str) and s for s in skip):
            raise TypeError("skip_include_usage must be a list of URL prefixes")
        provider = options.get("provider")
        if provider is not None and (not isinstance(provider, str) or not provider):
            raise TypeError("provider must be a non-empty string")
        payi = options.get("payi")
        if payi is not None and not isinstance(payi, bool):
            raise TypeError("payi must be True, False or None")
        mode = options.get("estimate_mode", "ratio")
        if mode not in ("ratio", "bytes"):
            raise ValueError(f"estimate_mode must be 'ratio' or 'bytes', not {mode!r}")
        chosen = options.get("refusal", refusal)
        if refusal == "sdk":
            if chosen != "sdk":
                raise ValueError(
                    "refusal cannot be changed for an SDK client: refusals always arrive "
                    "as the SDK's own exception classes"
                )
        elif chosen not in ("raise", "response"):
            raise ValueError(
                f"refusal must be 'raise' or 'response' for a plain HTTP client, not {chosen!r}"
            )
        return cls(
            include_usage=include_usage,
            skip_include_usage=tuple(s.rstrip("/") for s in skip),
            retry_without_stream_options=retry,
            provider=provider,
            payi=payi,
            estimate_mode=cast(EstimateMode, mode),
            refusal=cast(RefusalMode, chosen),
        )

    def injects_for(self, url: Any) -> bool:
        """Whether a chat / completions stream sent to ``url`` gets ``include_usage``."""
        if not self.include_usage:
            return False
        if self.skip_include_usage:
            text = str(url)
            if any(text.startswith(prefix) for prefix in self.skip_include_usage):
                return False
        with self._lock:
            return not self._learned or base_url(url) not in self._learned

    def learn_no_stream_options(self, base: str) -> None:
        """Remember that the server at ``base`` refuses ``stream_options``."""
        with self._lock:
            self._learned.add(base)
        _log.warning(
            "stream_options_refused",
            base_url=base,
            detail="the server refused stream_options; its streams are now sent unchanged "
            "and charged from the streamed output",
        )

    @property
    def refusing_stream_options(self) -> frozenset[str]:
        """The base URLs learned to refuse ``stream_options``."""
        with self._lock:
            return frozenset(self._learned)


# ---------------------------------------------------------------------------------------
# The module-agnostic core
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class PlannedCall:
    """A metered request, planned before it is reserved and sent.

    Attributes:
        endpoint: the endpoint it goes to.
        info: what its body asks for.
        call: what the guard reserves for.
        attribution: the attribution in effect when it was sent.
        body: the body to send instead of the original (the option was injected).
        added_include_usage: whether the guard added ``include_usage``.
        url: the request URL.
    """

    endpoint: Endpoint
    info: RequestInfo
    call: CallRequest
    attribution: Attribution
    body: bytes | None
    added_include_usage: bool
    url: Any


def base_url(url: Any) -> str:
    """The base URL of a request URL: its path without the chat / completions suffix."""
    path: str = url.path
    for suffix in _INCLUDE_USAGE_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{path}"


class _Inflater:
    """Incremental gzip / deflate decoding of a stream a server compressed anyway."""

    __slots__ = ("_deflate", "_first", "_obj")

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        self._first = True
        wbits = zlib.MAX_WBITS if self._deflate else zlib.MAX_WBITS | 16
        self._obj = zlib.decompressobj(wbits)

    def decompress(self, data: bytes) -> bytes:
        if self._first and self._deflate and data:
            self._first = False
            try:
                return self._obj.decompress(data)
            except zlib.error:
                # "deflate" servers send raw deflate as often as zlib-wrapped.
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        self._first = False
        return self._obj.decompress(data)

    def flush(self) -> bytes:
        return self._obj.flush()


class _StreamState:
    """Everything a metered response stream needs to settle, without the stream itself.

    The garbage-collection finalizer holds this object, never the stream wrapper, so the
    wrapper can be collected.
    """

    __slots__ = (
        "fallback_input",
        "inflater",
        "max_output",
        "meter",
        "raw",
        "reservation",
        "settled",
    )

    def __init__(
        self,
        reservation: Reservation,
        planned: PlannedCall,
        inflater: _Inflater | None,
        *,
        raw: bool,
    ) -> None:
        self.reservation = reservation
        self.meter = StreamMeter(planned.endpoint, added_include_usage=planned.added_include_usage)
        self.fallback_input = planned.call.input_tokens
        self.max_output = planned.call.max_output_tokens
        self.inflater = inflater
        self.raw = raw
        self.settled = False

    def feed(self, chunk: bytes) -> bytes:
        """Take raw response bytes; return the bytes to hand to the client."""
        if self.raw:
            return chunk
        if self.inflater is not None:
            chunk = self.inflater.decompress(chunk)
        return self.meter.feed(chunk)

    def end(self) -> bytes:
        """The response body ended: return the bytes still held back."""
        if self.raw:
            return b""
        out = b""
        if self.inflater is not None:
            out = self.meter.feed(self.inflater.flush())
        return out + self.meter.finish()

    def result(self, reason: str) -> tuple[TokenUsage, str]:
        """The usage to charge and the outcome, for a stream that ``reason`` ended.

        ``reason`` is ``end`` (the body ended), ``close`` (closed before that), ``error``
        (reading failed) or ``gc`` (collected while open).
        """
        if self.raw:
            # An encoding that cannot be decoded here hides the usage: charge the bound.
            usage = TokenUsage(self.fallback_input, self.max_output)
            return usage, "ok" if reason == "end" else "incomplete"
        tracker = self.meter.tracker
        usage = tracker.best_usage(self.fallback_input).to_token_usage()
        if tracker.errors or tracker.status == "failed":
            outcome = "error"
        elif tracker.finished:
            outcome = "incomplete" if tracker.status == "incomplete" else "ok"
        elif reason == "end":
            outcome = "ok"
        elif reason == "error":
            outcome = "error"
        else:
            outcome = "incomplete"
        return usage, outcome

    def _claim(self) -> bool:
        if self.settled:
            return False
        self.settled = True
        return True

    def settle(self, reason: str) -> None:
        """Settle the reservation (once) through the sync ledger; never raises."""
        if not self._claim():
            return
        try:
            usage, outcome = self.result(reason)
            self.reservation.settle(usage, outcome=outcome)
        except Exception as exc:
            _log.error("meter_error", op="settle", error=str(exc), error_type=type(exc).__name__)

    async def asettle(self, reason: str) -> None:
        """Async :meth:`settle`."""
        if not self._claim():
            return
        try:
            usage, outcome = self.result(reason)
            await self.reservation.asettle(usage, outcome=outcome)
        except Exception as exc:
            _log.error("meter_error", op="settle", error=str(exc), error_type=type(exc).__name__)


class TransportMeter:
    """The decisions of the guarding transport, shared by its sync and async forms.

    Args:
        guard: the guard that reserves and settles.
        options: the options of the ``wrap``/``instrument`` call.
        module: ``httpx`` or ``httpx2``, whose request/response classes are used.
        provider_hint: the provider the client class implies (``azure`` for
            ``AzureOpenAI``), used when the URL does not tell.
    """

    def __init__(
        self,
        guard: Guard,
        options: MeterOptions,
        module: ModuleType,
        provider_hint: str | None = None,
    ) -> None:
        self.guard = guard
        self.options = options
        self.module = module
        self.provider_hint = provider_hint
        self.bridge = PayiBridge(options.payi)
        self._request_not_read: type[BaseException] = module.RequestNotRead

    # -- before sending ------------------------------------------------------------------

    def provider_for(self, endpoint: Endpoint, host: str) -> str:
        """The provider a call to ``endpoint`` on ``host`` is charged under."""
        if self.options.provider is not None:
            return self.options.provider
        if endpoint.provider in ("anthropic", "azure"):
            return endpoint.provider
        if self.provider_hint == "azure":
            return "azure"
        if host.lower() in _OPENAI_HOSTS:
            return "openai"
        return "openai-compatible"

    def plan(self, request: Any) -> PlannedCall | None:
        """Plan a request, or return ``None`` when it is not metered (passthrough)."""
        url = request.url
        host: str = url.host
        endpoint = classify(request.method, url.path, host)
        if endpoint is None:
            return None
        try:
            raw: bytes = request.content
        except self._request_not_read:
            # A streamed body cannot be read without consuming it; SDKs never stream one.
            return None
        info = RequestInfo.parse(endpoint, raw, request.headers.get("content-type"))
        if info is None:
            return None
        model = info.model or UNKNOWN_MODEL
        kind = endpoint.kind
        body = info.body
        send: bytes | None = None
        added = False
        if info.stream and endpoint.supports_include_usage and self.options.injects_for(url):
            new_body, added = inject_include_usage(body)
            if added:
                send = encode_body(new_body)
        call = CallRequest(
            model=model,
            provider=self.provider_for(endpoint, host),
            endpoint=kind,
            input_tokens=estimate_input_tokens(
                body,
                mode=self.options.estimate_mode,
                endpoint=kind,
                image_tokens=image_token_bound(model),
            ),
            max_output_tokens=max_output_tokens(body, endpoint=kind, model=model),
            stream=info.stream,
            cache_writes=kind != "anthropic_messages" or _mentions_key(body, "cache_control"),
            price_context=_price_context(body, kind) or None,
        )
        return PlannedCall(endpoint, info, call, get_context(), send, added, url)

    def refuse(self, request: Any, exc: PayiGuardError) -> Any:
        """Answer a refused request without sending it (or raise, in ``raise`` mode)."""
        if self.options.refusal == "raise":
            raise exc
        return refusal_response(
            self.module, request, exc, problem=self.options.refusal == "response"
        )

    def outgoing(self, request: Any, planned: PlannedCall, reservation: Reservation) -> Any:
        """The request to send: rebuilt body, identity encoding, Pay-i headers."""
        body = planned.body
        if body is None:
            out = request
        else:
            headers = request.headers.copy()  # Host and the rest are already there
            headers["content-length"] = str(len(body))
            if "transfer-encoding" in headers:
                del headers["transfer-encoding"]
            out = self.module.Request(
                request.method,
                request.url,
                headers=headers,
                stream=self.module.ByteStream(body),
                extensions=dict(request.extensions),
            )
            out.read()  # makes ``content`` available, as for any request built from bytes
        out.headers["accept-encoding"] = "identity"
        if self.bridge.enabled():
            attribution = planned.attribution
            anonymous = attribution.user_id is None and self.guard.default_user_id is None
            user = None if anonymous else reservation.user_id
            self.bridge.apply(out.headers, attribution, user)
        return out

    # -- after the response ---------------------------------------------------------------

    def may_refuse_stream_options(self, planned: PlannedCall, response: Any) -> bool:
        """Whether this response may be a server refusing the injected option."""
        return (
            planned.added_include_usage
            and self.options.retry_without_stream_options
            and response.status_code in _STREAM_OPTIONS_STATUSES
        )

    def refused_stream_options(self, planned: PlannedCall, content: bytes) -> bool:
        """Whether a read error body names ``stream_options``; if so, plan the resend."""
        if b"stream_options" not in content:
            return False
        self.options.learn_no_stream_options(base_url(planned.url))
        planned.body = None
        planned.added_include_usage = False
        return True

    @staticmethod
    def response_kind(response: Any) -> Literal["error", "stream", "plain"]:
        """What to do with a response.

        Returns:
            ``error`` for a non-2xx status (released), ``stream`` for a server-sent
            event stream (wrapped), ``plain`` for any other body (read and settled).
        """
        if not 200 <= int(response.status_code) < 300:
            return "error"
        ctype: str = response.headers.get("content-type", "")
        if ctype.split(";", 1)[0].strip().lower() == "text/event-stream":
            return "stream"
        return "plain"

    def stream_state(
        self, planned: PlannedCall, reservation: Reservation, response: Any
    ) -> _StreamState:
        """The state of a stream about to be wrapped; fixes the response's headers."""
        headers = response.headers
        encoding = headers.get("content-encoding", "").strip().lower()
        inflater: _Inflater | None = None
        raw = False
        if encoding and encoding != "identity":
            if encoding in _DECODABLE:
                inflater = _Inflater("deflate" if encoding == "deflate" else "gzip")
                del headers["content-encoding"]
            else:
                raw = True
        if not raw and "content-length" in headers:
            del headers["content-length"]  # a dropped chunk changes the length
        return _StreamState(reservation, planned, inflater, raw=raw)

    @staticmethod
    def after_read(response: Any) -> None:
        """Fix the headers of a body read (and decoded) inside the transport."""
        headers = response.headers
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in _DECODABLE:
            del headers["content-encoding"]
            headers["content-length"] = str(len(response.content))

    @staticmethod
    def plain_result(planned: PlannedCall, content: bytes) -> tuple[TokenUsage, str]:
        """The usage and outcome of a JSON (non-stream) response body."""
        try:
            obj: Any = json.loads(content)
        except (ValueError, UnicodeDecodeError):
            obj = None
        parsed = usage_from_response(planned.endpoint, obj)
        call = planned.call
        if parsed.complete:
            usage = parsed.to_token_usage()
        else:
            # No usage object (some compatible servers): charge what was reserved.
            usage = TokenUsage(call.input_tokens, call.max_output_tokens)
        outcome = "ok"
        if planned.endpoint.kind == "responses" and isinstance(obj, dict):
            status = obj.get("status")
            if status == "incomplete":
                outcome = "incomplete"
            elif status == "failed":
                outcome = "error"
        return usage, outcome

    @staticmethod
    def lost_body_usage(planned: PlannedCall) -> TokenUsage:
        """What to charge when a successful plain body could not be read to its end."""
        return TokenUsage(planned.call.input_tokens, ESTIMATE_MARGIN_TOKENS)


# ---------------------------------------------------------------------------------------
# Abandoned streams
# ---------------------------------------------------------------------------------------


class _AbandonedStreams:
    """Settles streams that were garbage-collected while open, on a worker thread.

    A finalizer runs wherever the collector happens to run, possibly while that thread
    holds a lock the settle path needs (the memory ledger's, a connection pool's), and
    an async stream's event loop may be gone. So the finalizer only queues the stream's
    state (``SimpleQueue.put`` is safe there) and one daemon thread settles it through
    the sync ledger.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[_StreamState | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        thread = self._thread
        if thread is not None and thread.is_alive():
            return
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="payi-guard-settle", daemon=True
                )
                self._thread.start()

    def submit(self, state: _StreamState) -> None:
        self._queue.put(state)

    def flush(self, timeout: float) -> bool:
        self.start()
        marker = threading.Event()
        self._queue.put(marker)
        return marker.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                item.settle("gc")


_ABANDONED = _AbandonedStreams()


def _abandoned(state: _StreamState) -> None:
    if not state.settled:
        _ABANDONED.submit(state)


def flush_abandoned_streams(timeout: float = 5.0) -> bool:
    """Wait until every stream collected so far while open has been settled.

    Streams abandoned without being closed are settled by a background thread after the
    garbage collector finalizes them; call this (after ``gc.collect()`` if needed) where
    the charges must be visible, e.g. in tests or before shutdown.

    Args:
        timeout: seconds to wait at most.

    Returns:
        True when everything queued before the call was settled in time.
    """
    return _ABANDONED.flush(timeout)


# ---------------------------------------------------------------------------------------
# Module-specific classes
# ---------------------------------------------------------------------------------------


class TransportClasses(NamedTuple):
    """The guarding classes built for one HTTP module."""

    transport: type[Any]
    async_transport: type[Any]
    stream: type[Any]
    async_stream: type[Any]


_classes_lock = threading.Lock()
_classes: dict[str, TransportClasses] = {}


def transport_classes(module: ModuleType) -> TransportClasses:
    """The guarding transport and stream classes for ``httpx`` or ``httpx2`` (cached)."""
    with _classes_lock:
        classes = _classes.get(module.__name__)
        if classes is None:
            classes = _build_classes(module)
            _classes[module.__name__] = classes
        return classes


def _settle_finalizer(owner: object, state: _StreamState) -> weakref.finalize[Any, Any]:
    _ABANDONED.start()
    finalizer = weakref.finalize(owner, _abandoned, state)
    # At interpreter exit the ledger may already be closed: the reservation's TTL
    # returns the budget instead.
    finalizer.atexit = False
    return finalizer


def _build_classes(module: ModuleType) -> TransportClasses:
    sync_stream_base: type[Any] = module.SyncByteStream
    async_stream_base: type[Any] = module.AsyncByteStream
    sync_transport_base: type[Any] = module.BaseTransport
    async_transport_base: type[Any] = module.AsyncBaseTransport

    class MeteredStream(sync_stream_base):  # type: ignore[misc]
        """A response stream that forwards bytes while metering them (sync)."""

        def __init__(self, inner: Any, state: _StreamState) -> None:
            self._inner = inner
            self._state = state
            self._finalizer = _settle_finalizer(self, state)

        def _settle(self, reason: str) -> None:
            self._finalizer.detach()
            self._state.settle(reason)

        def __iter__(self) -> Iterator[bytes]:
            state = self._state
            try:
                for chunk in self._inner:
                    out = state.feed(chunk)
                    if out:
                        yield out
                tail = state.end()
            except Exception:
                self._settle("error")
                raise
            self._settle("end")
            if tail:
                yield tail

        def close(self) -> None:
            try:
                self._inner.close()
            finally:
                self._settle("close")

    class AsyncMeteredStream(async_stream_base):  # type: ignore[misc]
        """A response stream that forwards bytes while metering them (async).

        It is its own iterator rather than an async generator: a suspended async
        generator found by the collector is handed back to its event loop to be closed,
        which adds one more generator to close, in no defined order, to the SDK's own.
        """

        def __init__(self, inner: Any, state: _StreamState) -> None:
            self._inner = inner
            self._state = state
            self._iterator: Any = None
            self._ended = False
            self._finalizer = _settle_finalizer(self, state)

        async def _settle(self, reason: str) -> None:
            self._finalizer.detach()
            await self._state.asettle(reason)

        def __aiter__(self) -> Any:
            return self

        async def __anext__(self) -> bytes:
            if self._ended:
                raise StopAsyncIteration
            state = self._state
            if self._iterator is None:
                self._iterator = self._inner.__aiter__()
            try:
                while True:
                    try:
                        chunk = await self._iterator.__anext__()
                    except StopAsyncIteration:
                        break
                    out = state.feed(chunk)
                    if out:
                        return out
                tail = state.end()
            except Exception:
                self._ended = True
                await self._settle("error")
                raise
            self._ended = True
            await self._settle("end")
            if tail:
                return tail
            raise StopAsyncIteration

        async def aclose(self) -> None:
            try:
                await self._inner.aclose()
            finally:
                await self._settle("close")

    class GuardTransport(sync_transport_base):  # type: ignore[misc]
        """Meters GenAI calls before handing them to the inner transport (sync)."""

        def __init__(self, inner: Any, meter: TransportMeter) -> None:
            self._inner = inner
            self._meter = meter

        @property
        def inner(self) -> Any:
            """The transport requests are sent through."""
            return self._inner

        @property
        def meter(self) -> TransportMeter:
            """The shared decisions (guard, options)."""
            return self._meter

        def handle_request(self, request: Any) -> Any:
            meter = self._meter
            planned = meter.plan(request)
            if planned is None:
                return self._inner.handle_request(request)
            try:
                reservation = meter.guard.begin(planned.call, planned.attribution)
            except PayiGuardError as exc:
                return meter.refuse(request, exc)
            try:
                return self._send(request, planned, reservation)
            except BaseException:
                reservation.release(outcome="error")  # a no-op once settled
                raise

        def _send(self, request: Any, planned: PlannedCall, reservation: Reservation) -> Any:
            meter = self._meter
            response = self._inner.handle_request(meter.outgoing(request, planned, reservation))
            if meter.may_refuse_stream_options(planned, response):
                response.read()
                if meter.refused_stream_options(planned, response.content):
                    response.close()
                    outgoing = meter.outgoing(request, planned, reservation)
                    response = self._inner.handle_request(outgoing)
            kind = meter.response_kind(response)
            if kind == "error":
                reservation.release(outcome="error")
                return response
            if kind == "stream":
                state = meter.stream_state(planned, reservation, response)
                response.stream = MeteredStream(response.stream, state)
                return response
            try:
                response.read()
            except Exception:
                reservation.settle(meter.lost_body_usage(planned), outcome="error")
                raise
            meter.after_read(response)
            usage, outcome = meter.plain_result(planned, response.content)
            reservation.settle(usage, outcome=outcome)
            return response

        def close(self) -> None:
            self._inner.close()

        def __enter__(self) -> Any:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc_info: Any) -> None:
            self._inner.__exit__(*exc_info)

    class AsyncGuardTransport(async_transport_base):  # type: ignore[misc]
        """Meters GenAI calls before handing them to the inner transport (async)."""

        def __init__(self, inner: Any, meter: TransportMeter) -> None:
            self._inner = inner
            self._meter = meter

        @property
        def inner(self) -> Any:
            """The transport requests are sent through."""
            return self._inner

        @property
        def meter(self) -> TransportMeter:
            """The shared decisions (guard, options)."""
            return self._meter

        async def handle_async_request(self, request: Any) -> Any:
            meter = self._meter
            planned = meter.plan(request)
            if planned is None:
                return await self._inner.handle_async_request(request)
            try:
                reservation = await meter.guard.abegin(planned.call, planned.attribution)
            except PayiGuardError as exc:
                return meter.refuse(request, exc)
            try:
                return await self._send(request, planned, reservation)
            except BaseException:
                await reservation.arelease(outcome="error")  # a no-op once settled
                raise

        async def _send(self, request: Any, planned: PlannedCall, reservation: Reservation) -> Any:
            meter = self._meter
            outgoing = meter.outgoing(request, planned, reservation)
            response = await self._inner.handle_async_request(outgoing)
            if meter.may_refuse_stream_options(planned, response):
                await response.aread()
                if meter.refused_stream_options(planned, response.content):
                    await response.aclose()
                    outgoing = meter.outgoing(request, planned, reservation)
                    response = await self._inner.handle_async_request(outgoing)
            kind = meter.response_kind(response)
            if kind == "error":
                await reservation.arelease(outcome="error")
                return response
            if kind == "stream":
                state = meter.stream_state(planned, reservation, response)
                response.stream = AsyncMeteredStream(response.stream, state)
                return response
            try:
                await response.aread()
            except Exception:
                await reservation.asettle(meter.lost_body_usage(planned), outcome="error")
                raise
            meter.after_read(response)
            usage, outcome = meter.plain_result(planned, response.content)
            await reservation.asettle(usage, outcome=outcome)
            return response

        async def aclose(self) -> None:
            await self._inner.aclose()

        async def __aenter__(self) -> Any:
            await self._inner.__aenter__()
            return self

        async def __aexit__(self, *exc_info: Any) -> None:
            await self._inner.__aexit__(*exc_info)

    for cls in (MeteredStream, AsyncMeteredStream, GuardTransport, AsyncGuardTransport):
        cls.__module__ = __name__
        cls.__qualname__ = f"{cls.__name__}[{module.__name__}]"
    return TransportClasses(GuardTransport, AsyncGuardTransport, MeteredStream, AsyncMeteredStream)
