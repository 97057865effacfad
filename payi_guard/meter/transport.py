"""The guarding transport: meters every GenAI call an httpx or httpx2 client sends.

One implementation serves both HTTP modules (``httpx`` for older SDKs, ``httpx2`` for
openai 3.x and anthropic 2.x): :class:`TransportMeter` holds every decision, module
agnostic; :mod:`payi_guard.meter.transport_classes` builds the transport and
response-stream classes of a module that apply them.

Per request (see :mod:`payi_guard.meter.parse` for the parsing):

1. :func:`~payi_guard.meter.parse.classify` picks out metered calls; everything else,
   and any body that is not a JSON object (multipart uploads, streamed request bodies),
   goes to the inner transport untouched.
2. The JSON body gives the model (or the Azure deployment), ``stream`` and the output
   cap; a chat / legacy completions stream gets ``stream_options.include_usage`` unless
   switched off for that URL; :mod:`payi_guard.meter.estimate` bounds the call, and the
   guard prices and reserves it with the attribution in effect **now**
   (``Guard.begin``). A refusal never reaches the inner transport
   (:mod:`payi_guard.meter.refusal`).
3. A copy of the request goes out (the app's own request object is left as it built
   it) with ``accept-encoding: identity`` (a compressed body hides its usage; a server
   that compresses anyway is decoded here), the rebuilt body and its
   ``content-length``, and Pay-i headers when the bridge is on. The provider is the
   one the URL names (genai-prices' API addresses: Groq, DeepSeek, OpenRouter...).
4. An error status releases the reservation (each SDK retry is a new transport call with
   its own reservation). A JSON body is read here and settled with its ``usage``. An
   event stream is handed back wrapped (:mod:`payi_guard.meter.streams`): bytes pass
   through unchanged (minus the usage-only chunk the guard caused) while the usage is
   tracked, and the reservation is settled exactly once, whichever comes first: the end
   of the stream, ``close()`` (``break``, ``with``), an error while reading, or garbage
   collection. A request that asked for a stream gets one whatever its content type. A
   body the inner transport already read (``Response(content=...)``) is metered whole
   and settled before it is returned. Usage that cannot be trusted is charged the
   reservation (``unverified``).

Servers that refuse ``stream_options`` (HTTP 400/422 whose body names it): when the
guard added the option, the request is sent once more without it and the base URL is
remembered (per ``wrap``/``instrument`` call), so later streams there go out unchanged
and are charged from what they stream (input from the request's estimate, output
counted from the deltas plus a margin).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import Any, Final, Literal

from payi_guard.context import Attribution, get_context
from payi_guard.engine import CallRequest, Guard, Reservation
from payi_guard.engine.calls import make_call_request
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.estimate import request_bounds
from payi_guard.meter.options import MeterOptions, base_url
from payi_guard.meter.parse import (
    Endpoint,
    RequestInfo,
    classify,
    inject_include_usage,
    with_include_usage,
)
from payi_guard.meter.payi_bridge import PayiBridge
from payi_guard.meter.plain import is_event_stream, plain_result
from payi_guard.meter.refusal import refusal_response
from payi_guard.meter.request_body import has_header, header_text, set_header
from payi_guard.meter.streams import (
    DECODABLE_ENCODINGS,
    Settlement,
    StreamState,
    stream_state,
)
from payi_guard.meter.tokenizer import count_input_tokens
from payi_guard.pricing import TokenUsage, provider_for_url

__all__ = [
    "UNKNOWN_MODEL",
    "PlannedCall",
    "TransportMeter",
]

UNKNOWN_MODEL: Final = "unknown"
"""The model charged when a request names none (priced by the ``unknown_model`` policy)."""

_OPENAI_HOSTS: Final = frozenset({"api.openai.com"})
_STREAM_OPTIONS_STATUSES: Final = frozenset({400, 422})

# An app talks to a handful of URLs: the provider of each is memoised, up to this many.
_MEMO_SIZE: Final = 256
_SDK_HEADER: Final = b"x-stainless-lang"
"""A header the OpenAI, Anthropic and Groq SDKs send with every request they build."""


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
        # The provider each (scheme, host, port, path) names (see provider_for).
        self._url_providers: dict[tuple[str, str, int | None, str], str] = {}
        self.origins: set[tuple[str, str, int | None]] | None = None
        """For an SDK's HTTP client: the ``(scheme, host, port)`` its calls go to. A
        request elsewhere that the SDK did not build (no ``x-stainless-lang`` header) is
        the app's own traffic on a client it shares with the SDK: never metered.
        ``None`` (a plain HTTP client the app wrapped): every metered path is."""

    # -- before sending ------------------------------------------------------------------

    def provider_for(self, endpoint: Endpoint, url: Any) -> str:
        """The provider a call to ``endpoint`` at ``url`` is charged under.

        The ``provider`` option if given; Anthropic and Azure by their endpoints; OpenAI
        for ``api.openai.com``; a host genai-prices knows as another provider's API
        (Groq, DeepSeek, OpenRouter...) as that provider; else ``openai-compatible``.
        """
        return self._provider(endpoint, url, url.host, url.path)

    def _provider(self, endpoint: Endpoint, url: Any, host: str, path: str) -> str:
        """:meth:`provider_for`, given the URL's host and path (memoised per URL)."""
        provider = self.options.provider
        if provider is not None:
            return provider
        if endpoint.provider in ("anthropic", "azure", "google"):
            return endpoint.provider
        if self.provider_hint == "azure":
            return "azure"
        scheme, port = url.scheme, url.port
        key = (scheme, host, port, path)
        try:
            return self._url_providers[key]
        except KeyError:
            pass
        if host.lower() in _OPENAI_HOSTS:
            provider = "openai"
        else:
            netloc = f"{host}:{port}" if port else host
            provider = provider_for_url(f"{scheme}://{netloc}{path}") or "openai-compatible"
        if len(self._url_providers) >= _MEMO_SIZE:
            self._url_providers.clear()
        self._url_providers[key] = provider
        return provider

    def plan(self, request: Any) -> PlannedCall | None:
        """Plan a request, or return ``None`` when it is not metered (passthrough)."""
        url = request.url
        host: str = url.host
        path: str = url.path
        endpoint = classify(request.method, path, host)
        if endpoint is None:
            return None
        origins = self.origins
        if origins is not None and (url.scheme, host, url.port) not in origins:
            if not has_header(request.headers, _SDK_HEADER):
                return None  # the app's own request on an HTTP client shared with the SDK
            if len(origins) < _MEMO_SIZE:
                origins.add((url.scheme, host, url.port))  # a copy with another base_url
        try:
            raw: bytes = request.content
        except self._request_not_read:
            # A streamed body cannot be read without consuming it; SDKs never stream one.
            return None
        # content_type(request.headers), without its call.
        info = RequestInfo.parse(endpoint, raw, header_text(request.headers, "content-type"))
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
                send = with_include_usage(raw, body, new_body)
        inputs, outputs, cache_writes, price_context, web, files = request_bounds(
            body, kind, model, self.options.estimate_mode, info.max_output_tokens
        )
        call = make_call_request(  # CallRequest(...), every field in order
            model,
            self._provider(endpoint, url, host, path),
            kind,
            inputs,
            outputs,
            info.stream,
            cache_writes,
            price_context,
            web,
            files,
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
        """The request to send: rebuilt body, identity encoding, Pay-i headers.

        Always a new request object: the app's own (reachable as
        ``raw.http_request``) keeps the headers and body it was built with.
        """
        body = planned.body
        changed = body is not None
        if body is None:
            body = request.content
        chunked = changed and has_header(request.headers, b"transfer-encoding")
        if self.bridge.enabled():
            # The Pay-i headers hold attribution values HTTP can carry (printable ASCII:
            # the bridge leaves others out); the app's own headers are copied as they are.
            headers = request.headers.copy()
            self._fix_headers(headers, changed, chunked, len(body))
            # An anonymous caller is no Pay-i user, whatever its bucket's id.
            user = None if reservation.anonymous else reservation.user_id
            self.bridge.apply(headers, planned.attribution, user)
        else:
            # The new request copies the app's headers; only ASCII values are set, on
            # that copy (Host and the rest are already there).
            headers = request.headers
        out = self.module.Request(
            request.method,
            request.url,
            headers=headers,
            stream=self.module.ByteStream(body),
            extensions=request.extensions,  # copied by the request
        )
        if headers is request.headers:
            self._fix_headers(out.headers, changed, chunked, len(body))
        out.read()  # makes ``content`` available, as for any request built from bytes
        return out

    @staticmethod
    def _fix_headers(headers: Any, changed: bool, chunked: bool, length: int) -> None:
        """Identity encoding; the length of a rebuilt body, never chunked."""
        if changed:
            set_header(headers, "content-length", str(length))
            if chunked:
                del headers["transfer-encoding"]
        set_header(headers, "accept-encoding", "identity")

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
    def response_kind(planned: PlannedCall, response: Any) -> Literal["error", "stream", "plain"]:
        """What to do with a response.

        Returns:
            ``error`` for a non-2xx status (released); ``stream`` for a server-sent event
            stream (wrapped): the request asked for one (``stream: true``: the SDKs read
            the body as events whatever its content type, and some gateways send
            ``application/json``) or the response says ``text/event-stream``; ``plain``
            for any other body (read and settled).
        """
        if not 200 <= int(response.status_code) < 300:
            return "error"
        if planned.info.stream:
            return "stream"
        ctype = header_text(response.headers, "content-type")
        return "stream" if ctype is not None and is_event_stream(ctype) else "plain"

    def stream_state(
        self, planned: PlannedCall, reservation: Reservation, response: Any, *, loaded: bool = False
    ) -> StreamState:
        """The state of a stream about to be wrapped; fixes the response's headers.

        Args:
            planned: the planned call.
            reservation: its reservation.
            response: the response whose stream is wrapped (or read, when ``loaded``).
            loaded: the body is already read and decoded (see :meth:`read_loaded`).
        """
        body = planned.info.body
        kind = planned.endpoint.kind
        requested = planned.call.model

        def count_input(response_model: str | None) -> int | None:
            counted = None
            if response_model:
                counted = count_input_tokens(body, kind, response_model)
            return counted if counted is not None else count_input_tokens(body, kind, requested)

        return stream_state(
            response,
            reservation,
            planned.endpoint,
            added_include_usage=planned.added_include_usage,
            fallback_input=planned.call.input_tokens,
            max_output=planned.call.max_output_tokens,
            loaded=loaded,
            count_input=count_input,
        )

    @staticmethod
    def is_loaded(response: Any) -> bool:
        """Whether a response's body was read before the transport returned it.

        A transport that answers from memory (``httpx.MockTransport``, respx, a test's
        own) builds ``Response(content=bytes)``, which is read at once: the client then
        hands the app those bytes and never iterates the stream.
        """
        return bool(response.is_stream_consumed)

    def read_loaded(self, state: StreamState, response: Any) -> Any:
        """Meter an already-read stream whole; return the response the app gets.

        The events go through ``state`` at once (the guard's usage chunk and usage
        members are taken out as for a network stream), so the call can be settled now,
        before the app reads a byte. The response returned carries the bytes the app
        would have seen, with a ``content-length`` that matches them.
        """
        body = state.feed(response.content) + state.end()
        return self.module.Response(
            response.status_code,
            headers=response.headers,
            content=body,
            extensions=response.extensions,
        )

    @staticmethod
    def after_read(response: Any) -> None:
        """Fix the headers of a body read (and decoded) inside the transport."""
        headers = response.headers
        encoding = header_text(headers, "content-encoding")
        if encoding is not None and encoding.strip().lower() in DECODABLE_ENCODINGS:
            del headers["content-encoding"]
            headers["content-length"] = str(len(response.content))

    @staticmethod
    def plain_result(planned: PlannedCall, content: bytes) -> Settlement:
        """What to charge for a JSON (non-stream) response body.

        A body without a usage object, or whose counts cannot be trusted, is charged the
        reservation (outcome ``unverified``).
        """
        return plain_result(planned.endpoint, content)

    @staticmethod
    def lost_body_usage(planned: PlannedCall) -> TokenUsage:
        """What to charge when a successful plain body could not be read to its end.

        A plain answer is generated whole before its headers are sent, so the provider
        billed it, but its usage was in the part that never arrived: the input as a cut
        stream counts it (the model's tokenizer, else the bound) and the output cap (the
        answer cannot have been longer; its length is unknown).
        """
        call = planned.call
        counted = count_input_tokens(planned.info.body, planned.endpoint.kind, call.model)
        return TokenUsage(call.input_tokens if counted is None else counted, call.max_output_tokens)
