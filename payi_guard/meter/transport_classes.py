"""The httpx and httpx2 transports that apply a ``TransportMeter``'s decisions.

:func:`transport_classes` builds, once per HTTP module, a sync and an async transport
that wrap the app's own (each request is planned, reserved, sent, then settled or its
stream wrapped) and the response-stream classes of :mod:`payi_guard.meter.streams`.
The sync and async transports only differ in ``await``; every decision is
:class:`~payi_guard.meter.transport.TransportMeter`'s.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any, NamedTuple

from payi_guard.engine import Reservation
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.plain import plain_result
from payi_guard.meter.streams import stream_classes
from payi_guard.meter.transport import PlannedCall, TransportMeter

__all__ = ["TransportClasses", "transport_classes"]


class TransportClasses(NamedTuple):
    """The guarding classes built for one HTTP module."""

    transport: type[Any]
    async_transport: type[Any]
    stream: type[Any]
    async_stream: type[Any]


class _Wrapping:
    """The wrapped transport and the meter: what both guarding transports hold."""

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


def _build_classes(module: ModuleType) -> TransportClasses:
    MeteredStream, AsyncMeteredStream = stream_classes(module)
    sync_transport_base: type[Any] = module.BaseTransport
    async_transport_base: type[Any] = module.AsyncBaseTransport

    class GuardTransport(_Wrapping, sync_transport_base):  # type: ignore[misc]
        """Meters GenAI calls before handing them to the inner transport (sync)."""

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
            kind = meter.response_kind(planned, response)
            if kind == "error":
                reservation.release(outcome="error")
                return response
            if kind == "stream":
                if meter.is_loaded(response):
                    state = meter.stream_state(planned, reservation, response, loaded=True)
                    response = meter.read_loaded(state, response)
                    state.settle("end")
                    return response
                state = meter.stream_state(planned, reservation, response)
                response.stream = MeteredStream(response.stream, state)
                return response
            try:
                response.read()
            except BaseException:  # reset, timeout, Ctrl+C: the answer was billed anyway
                reservation.settle(meter.lost_body_usage(planned), outcome="error")
                raise
            meter.after_read(response)
            plain_result(planned.endpoint, response.content).apply(reservation)
            return response

        def close(self) -> None:
            self._inner.close()

        def __enter__(self) -> Any:
            self._inner.__enter__()
            return self

        def __exit__(self, *exc_info: Any) -> None:
            self._inner.__exit__(*exc_info)

    class AsyncGuardTransport(_Wrapping, async_transport_base):  # type: ignore[misc]
        """Meters GenAI calls before handing them to the inner transport (async)."""

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
            kind = meter.response_kind(planned, response)
            if kind == "error":
                await reservation.arelease(outcome="error")
                return response
            if kind == "stream":
                if meter.is_loaded(response):
                    state = meter.stream_state(planned, reservation, response, loaded=True)
                    response = meter.read_loaded(state, response)
                    await state.asettle("end")
                    return response
                state = meter.stream_state(planned, reservation, response)
                response.stream = AsyncMeteredStream(response.stream, state)
                return response
            try:
                await response.aread()
            except BaseException:  # reset, timeout, cancelled: the answer was billed anyway
                await reservation.asettle(meter.lost_body_usage(planned), outcome="error")
                raise
            meter.after_read(response)
            await plain_result(planned.endpoint, response.content).aapply(reservation)
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
