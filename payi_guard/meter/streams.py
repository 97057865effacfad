"""Metered response streams: bytes passed through, usage tracked, settled exactly once.

The guarding transport hands an event stream back wrapped in a metered stream (built
here for ``httpx`` or ``httpx2`` by :func:`stream_classes`). Bytes pass through
unchanged (minus the usage-only chunk the guard caused, see
:mod:`payi_guard.meter.sse`), decoded first when a server compressed them anyway, and
the reservation is settled exactly once, whichever comes first: the end of the stream,
``close()`` (``break``, ``with``), an error while reading, or garbage collection. A
stream collected while open is settled on a background thread
(:func:`flush_abandoned_streams` waits for those).
"""

from __future__ import annotations

import queue
import threading
import weakref
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final

from payi_guard import log as events
from payi_guard._frozen import frozen_maker
from payi_guard.meter.parse import Endpoint
from payi_guard.meter.request_body import has_header, header_text
from payi_guard.meter.sse import StreamMeter
from payi_guard.pricing import TokenUsage

if TYPE_CHECKING:
    from payi_guard.engine import Reservation

__all__ = [
    "DECODABLE_ENCODINGS",
    "InputCounter",
    "Settlement",
    "StreamState",
    "flush_abandoned_streams",
    "stream_classes",
    "stream_state",
]

DECODABLE_ENCODINGS: Final = frozenset({"gzip", "x-gzip", "deflate"})
"""Content encodings decoded here when a server compresses despite ``identity``."""

_log = events.get_logger()

_UNREADABLE: Final = "not readable (the body's content-encoding cannot be decoded here)"


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


@dataclass(frozen=True, slots=True)
class Settlement:
    """What to charge for one call, once its response was read (or given up on).

    Attributes:
        usage: the tokens to charge (the provider's report, or the best estimate).
        outcome: ``ok``, ``incomplete`` or ``error``.
        response_model: the model the response names, if any.
        other_models: usage billed at other models' prices.
        problems: why the provider's usage cannot be trusted; when there are any, the
            reservation itself is charged (outcome ``unverified``) and ``usage`` is not.
        price_context: the tier the response says served the call
            (:func:`~payi_guard.meter.tier.tier_context`), ``None`` when it says none.
    """

    usage: TokenUsage
    outcome: str
    response_model: str | None = None
    other_models: tuple[tuple[str, TokenUsage], ...] = ()
    problems: tuple[str, ...] = ()
    price_context: Mapping[str, str] | None = None

    def apply(self, reservation: Reservation) -> None:
        """Settle ``reservation`` with this (sync ledger)."""
        if self.problems:
            reservation.settle_unverified(self.problems, response_model=self.response_model)
            return
        reservation.settle(
            self.usage,
            outcome=self.outcome,
            response_model=self.response_model,
            other_models=self.other_models,
            price_context=self.price_context,
        )

    async def aapply(self, reservation: Reservation) -> None:
        """Async :meth:`apply`."""
        if self.problems:
            await reservation.asettle_unverified(self.problems, response_model=self.response_model)
            return
        await reservation.asettle(
            self.usage,
            outcome=self.outcome,
            response_model=self.response_model,
            other_models=self.other_models,
            price_context=self.price_context,
        )


make_settlement: Final = frozen_maker(Settlement)
"""``Settlement(...)``, every field given in order, without ``__init__``'s cost."""

InputCounter = Callable[[str | None], int | None]
"""Counts a request's input tokens with a tokenizer, given the model the response
names (``None`` when none yet); ``None`` when it cannot."""


class StreamState:
    """Everything a metered response stream needs to settle, without the stream itself.

    The garbage-collection finalizer holds this object, never the stream wrapper, so the
    wrapper can be collected.
    """

    __slots__ = (
        "count_input",
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
        endpoint: Endpoint,
        *,
        added_include_usage: bool,
        fallback_input: int,
        max_output: int,
        inflater: _Inflater | None,
        raw: bool,
        count_input: InputCounter | None = None,
    ) -> None:
        self.reservation = reservation
        self.count_input = count_input
        self.meter = StreamMeter(endpoint, added_include_usage=added_include_usage)
        self.fallback_input = fallback_input
        self.max_output = max_output
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

    def chunk_feeder(self) -> Callable[[bytes], bytes]:
        """The function each chunk goes through: :meth:`feed`, or the same in one call.

        The meter's own ``feed`` when the body is neither raw nor compressed and
        :meth:`feed` is not overridden.
        """
        if self.raw or self.inflater is not None or type(self).feed is not StreamState.feed:
            return self.feed
        return self.meter.feed

    def end(self) -> bytes:
        """The response body ended: return the bytes still held back."""
        if self.raw:
            return b""
        out = b""
        if self.inflater is not None:
            out = self.meter.feed(self.inflater.flush())
        return out + self.meter.finish()

    def result(self, reason: str) -> Settlement:
        """What to charge for a stream that ``reason`` ended.

        ``reason`` is ``end`` (the body ended), ``close`` (closed before that), ``error``
        (reading failed) or ``gc`` (collected while open).
        """
        if self.raw:
            # An encoding that cannot be decoded here hides the usage: it cannot be
            # verified, so what was reserved is charged.
            usage = TokenUsage(self.fallback_input, self.max_output)
            outcome = "ok" if reason == "end" else "incomplete"
            return Settlement(usage, outcome, problems=(f"usage: {_UNREADABLE}",))
        tracker = self.meter.tracker
        fallback = self.fallback_input
        if not tracker.input_reported and self.count_input is not None:
            # Ended before the provider reported the input: the tokenizer's count of the
            # request is closer to the bill than the reservation's bound.
            counted = self.count_input(tracker.model)
            if counted is not None:
                fallback = counted
        parsed = tracker.best_usage(fallback, self.max_output)
        if tracker.errors or tracker.status == "failed":
            outcome = "error"
        elif tracker.finished:
            outcome = "incomplete" if tracker.status == "incomplete" else "ok"
        elif reason == "error":
            outcome = "error"
        elif tracker.usage_complete or (reason == "end" and tracker.status is not None):
            # Closed after the final usage (LiteLLM closes an Anthropic stream at its
            # message_delta), or ended after the answer's finish reason without usage (a
            # server that ignores stream_options): the answer arrived whole. A body that
            # simply stops before either was cut short.
            outcome = "ok"
        else:
            outcome = "incomplete"
        return Settlement(
            parsed.to_token_usage(),
            outcome,
            response_model=tracker.model,
            other_models=parsed.other_models,
            problems=parsed.problems,
            price_context=tracker.price_context,
        )

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
            self.result(reason).apply(self.reservation)
        except Exception as exc:
            _log.error("meter_error", op="settle", error=str(exc), error_type=type(exc).__name__)

    async def asettle(self, reason: str) -> None:
        """Async :meth:`settle`."""
        if not self._claim():
            return
        try:
            await self.result(reason).aapply(self.reservation)
        except Exception as exc:
            _log.error("meter_error", op="settle", error=str(exc), error_type=type(exc).__name__)


def stream_state(
    response: Any,
    reservation: Reservation,
    endpoint: Endpoint,
    *,
    added_include_usage: bool,
    fallback_input: int,
    max_output: int,
    loaded: bool = False,
    count_input: InputCounter | None = None,
) -> StreamState:
    """The state of a stream about to be wrapped; fixes the response's headers.

    Args:
        response: the ``httpx``/``httpx2`` response whose stream is wrapped.
        reservation: the reservation to settle.
        endpoint: the endpoint the stream came from.
        added_include_usage: whether the guard added ``stream_options.include_usage``.
        fallback_input: the input tokens to charge if the stream never reports them.
        max_output: the output bound reserved (charged when the body cannot be read).
        loaded: the body was already read, and decoded, by the HTTP module.
        count_input: counts the request's input when the stream never reports it.
    """
    headers = response.headers
    encoding = (header_text(headers, "content-encoding") or "").strip().lower()
    inflater: _Inflater | None = None
    raw = False
    if loaded:
        if has_header(headers, b"content-encoding"):
            del headers["content-encoding"]
    elif encoding and encoding != "identity":
        if encoding in DECODABLE_ENCODINGS:
            inflater = _Inflater("deflate" if encoding == "deflate" else "gzip")
            del headers["content-encoding"]
        else:
            raw = True
    if not raw and has_header(headers, b"content-length"):
        del headers["content-length"]  # a dropped chunk changes the length
    return StreamState(
        reservation,
        endpoint,
        added_include_usage=added_include_usage,
        fallback_input=fallback_input,
        max_output=max_output,
        inflater=inflater,
        raw=raw,
        count_input=count_input,
    )


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
        self._queue: queue.SimpleQueue[StreamState | threading.Event] = queue.SimpleQueue()
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

    def submit(self, state: StreamState) -> None:
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


def _abandoned(state: StreamState) -> None:
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


def _settle_finalizer(owner: object, state: StreamState) -> weakref.finalize[Any, Any]:
    _ABANDONED.start()
    finalizer = weakref.finalize(owner, _abandoned, state)
    # At interpreter exit the ledger may already be closed: the reservation's TTL
    # returns the budget instead.
    finalizer.atexit = False
    return finalizer


def stream_classes(module: ModuleType) -> tuple[type[Any], type[Any]]:
    """Build the metered stream classes (sync, async) on ``module``'s stream bases.

    Args:
        module: ``httpx`` or ``httpx2``.
    """
    sync_stream_base: type[Any] = module.SyncByteStream
    async_stream_base: type[Any] = module.AsyncByteStream

    class MeteredStream(sync_stream_base):  # type: ignore[misc]
        """A response stream that forwards bytes while metering them (sync)."""

        def __init__(self, inner: Any, state: StreamState) -> None:
            self._inner = inner
            self._state = state
            self._finalizer = _settle_finalizer(self, state)

        def _settle(self, reason: str) -> None:
            self._finalizer.detach()
            self._state.settle(reason)

        def __iter__(self) -> Iterator[bytes]:
            state = self._state
            feed = state.chunk_feeder()
            try:
                for chunk in self._inner:
                    out = feed(chunk)
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

        def __init__(self, inner: Any, state: StreamState) -> None:
            self._inner = inner
            self._state = state
            self._iterator: Any = None
            self._feed = state.chunk_feeder()
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
                    out = self._feed(chunk)
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

    return MeteredStream, AsyncMeteredStream
