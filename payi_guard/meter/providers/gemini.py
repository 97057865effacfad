"""Google Gemini through ``google-genai`` (``payi-guard[gemini]``): Developer API and Vertex AI.

What is metered (at the transport of the client's httpx / httpx2 clients):
``models.generate_content``, ``generate_content_stream`` and their ``client.aio`` twins,
``embed_content`` (``embedContent``, ``batchEmbedContents``, Vertex ``predict`` of
embedding models). Everything else (files, caches, tuning, ``count_tokens``, image and
video generation, the Live API's websocket) passes through.

The wire (:class:`GeminiDialect`, also used for LiteLLM's Gemini route):

* the model is in the URL, ``.../models/{model}:{method}`` (Vertex:
  ``.../publishers/google/models/{model}:{method}``), priced under genai-prices'
  ``google`` provider;
* the bound: every text part, tool declaration and response schema of the body, an
  allowance per image (:data:`~payi_guard.meter.tokens.DEFAULT_IMAGE_TOKENS`) and per
  file URI or inline audio, video or document
  (:data:`~payi_guard.meter.tokens.DEFAULT_FILE_TOKENS`, more for a large inline part:
  :func:`~payi_guard.meter.modality.gemini_part`);
  output ``generationConfig.maxOutputTokens`` (thoughts included) times
  ``candidateCount``, else the model's cap;
* usage: ``usageMetadata``; input = ``promptTokenCount - cachedContentTokenCount +
  toolUsePromptTokenCount``, cache reads = ``cachedContentTokenCount``, output =
  ``totalTokenCount - promptTokenCount - toolUsePromptTokenCount`` (thoughts included,
  whichever way the model counts them in ``candidatesTokenCount``). Stream chunks carry
  running totals: the last one is charged.

Installing: ``wrap`` / ``instrument`` guard the client's sync httpx client, its async
client (one guarded inner client per event loop, as google-genai keeps them), and send
async calls through that async client instead of aiohttp (aiohttp traffic cannot be
metered at an httpx transport). A refusal is raised as ``google.genai.errors.ClientError``
(code 429; 403 for an unknown model) that is also the payi_guard refusal, and retries
configured with ``HttpRetryOptions`` never retry it.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any, Final

from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, PayiGuardError
from payi_guard.meter.modality import gemini_media, gemini_part
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.parse import ParsedUsage
from payi_guard.meter.providers.hooks import Patches
from payi_guard.meter.providers.meter import Dialect, ProviderMeter
from payi_guard.meter.providers.wire import (
    Bound,
    JsonBodyTracker,
    Report,
    SSETracker,
    UntrustedUsage,
    WireEndpoint,
    WireRequest,
    WireTracker,
    count,
    first_cap,
    model_cap,
)
from payi_guard.meter.refusal import refusal_response, refusal_status, sdk_refusal
from payi_guard.meter.tier import tier_context
from payi_guard.meter.tokens import EstimateMode, image_token_bound
from payi_guard.meter.transport import TransportMeter

__all__ = [
    "DIALECT",
    "GeminiDialect",
    "gemini_usage",
    "guarded_by",
    "http_client_of",
    "instrument",
    "refuse",
    "uninstrument",
    "wrap",
]

PROVIDER: Final = "google"

_GENERATE: Final = {"generateContent": False, "streamGenerateContent": True}
_EMBED: Final = frozenset({"embedContent", "batchEmbedContents"})

_OUTPUT_CAPS: Final = (
    ("gemini-1.0", 2_048),
    ("gemini-1.5", 8_192),
    ("gemini-2.0", 8_192),
    ("gemini-2.5", 65_536),
    ("gemini-3", 65_536),
    ("gemma", 8_192),
)
"""Output caps by model name fragment (thinking tokens included)."""

DEFAULT_OUTPUT_CAP: Final = 65_536
"""The output cap of a Gemini model not in the table."""


# ---------------------------------------------------------------------------------------
# The wire
# ---------------------------------------------------------------------------------------


def _get(obj: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present (REST accepts camelCase and snake_case fields)."""
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def gemini_usage(meta: Mapping[str, Any]) -> ParsedUsage:
    """Read a ``usageMetadata`` object (camelCase or snake_case).

    Raises:
        UntrustedUsage: a count is missing (``promptTokenCount``), negative or not a
            whole number, or the counts contradict each other.
    """
    names = _snake if "prompt_token_count" in meta else _camel
    prompt = count(meta, names("promptTokenCount"))
    cached = count(meta, names("cachedContentTokenCount"), default=0)
    tool = count(meta, names("toolUsePromptTokenCount"), default=0)
    thoughts = count(meta, names("thoughtsTokenCount"), default=0)
    candidates = count(meta, names("candidatesTokenCount"), default=0)
    total = count(meta, names("totalTokenCount"), default=prompt + tool + candidates + thoughts)
    if cached > prompt:
        raise UntrustedUsage("cachedContentTokenCount exceeds promptTokenCount")
    output = total - prompt - tool
    if output < 0:
        raise UntrustedUsage("totalTokenCount is below the prompt's tokens")
    return ParsedUsage(
        input_tokens=prompt - cached + tool,
        output_tokens=output,
        cache_read_tokens=cached,
        reasoning_tokens=min(thoughts, output),
        complete=True,
        media=gemini_media(meta, prompt - cached + tool, cached, output),
    )


def _camel(name: str) -> str:
    return name


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _usage_of(obj: Mapping[str, Any]) -> Any:
    return _get(obj, "usageMetadata", "usage_metadata")


def _model_of(obj: Mapping[str, Any]) -> str | None:
    """The model a response (or chunk) names: ``modelVersion``, if it names one."""
    model = _get(obj, "modelVersion", "model_version")
    return model if isinstance(model, str) and model else None


def _tier_of(meta: Mapping[str, Any]) -> Mapping[str, str] | None:
    """The tier ``usageMetadata.serviceTier`` says served the call, if it says."""
    tier = _get(meta, "serviceTier", "service_tier")
    return tier_context("service_tier", tier.lower() if isinstance(tier, str) else tier)


def _body_report(endpoint: WireEndpoint, obj: Any) -> Report:
    """The report of a whole response body (a JSON object, or a JSON array stream)."""
    if isinstance(obj, list):
        items = [item for item in obj if isinstance(item, Mapping)]
        metas = [meta for meta in map(_usage_of, items) if meta is not None]
        models = [model for model in map(_model_of, items) if model is not None]
        obj = {"usageMetadata": metas[-1]} if metas else {}
        obj.update({"modelVersion": models[-1]} if models else {})
    if not isinstance(obj, Mapping):
        return Report(invalid="the response body is not JSON")
    meta = _usage_of(obj)
    if isinstance(meta, Mapping):
        return Report.read(
            lambda: gemini_usage(meta), model=_model_of(obj), price_context=_tier_of(meta)
        )
    if endpoint.kind == "embeddings":
        return Report.read(lambda: _prediction_usage(obj))
    return Report(invalid="the response has no usageMetadata")


def _prediction_usage(obj: Mapping[str, Any]) -> ParsedUsage:
    """Vertex ``predict`` embeddings: ``predictions[].embeddings.statistics.token_count``."""
    predictions = obj.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        raise UntrustedUsage("the response reports no usage")
    total = 0
    for prediction in predictions:
        stats: Any = prediction
        for key in ("embeddings", "statistics"):
            stats = stats.get(key) if isinstance(stats, Mapping) else None
        if not isinstance(stats, Mapping):
            raise UntrustedUsage("a prediction reports no token_count")
        total += count(stats, "token_count")
    return ParsedUsage(input_tokens=total, complete=True)


class GeminiStream(SSETracker):
    """A ``streamGenerateContent?alt=sse`` stream: running ``usageMetadata`` totals."""

    def __init__(self) -> None:
        super().__init__()
        self._last: Mapping[str, Any] | None = None

    def on_event(self, name: str | None, obj: dict[str, Any]) -> None:
        """Read one chunk: its text, its running usage, its finish reason or error."""
        error = obj.get("error")
        if isinstance(error, Mapping):
            self.errors.append(str(error.get("message") or error.get("status") or "error"))
            return
        finished = False
        for candidate in obj.get("candidates") or ():
            if not isinstance(candidate, Mapping):
                continue
            if _get(candidate, "finishReason", "finish_reason"):
                finished = True
            content = candidate.get("content")
            for part in (content.get("parts") if isinstance(content, Mapping) else None) or ():
                if isinstance(part, Mapping):
                    self.count_text(part.get("text"))
                    self.count_text(_get(part, "functionCall", "function_call"))
        model = _model_of(obj)
        if model is not None:
            self.model = model
        meta = _usage_of(obj)
        if isinstance(meta, Mapping):
            self._last = meta
            tier = _tier_of(meta)
            if tier is not None:
                self.price_context = tier
            with contextlib.suppress(UntrustedUsage):
                self.partial = gemini_usage(meta)
        if finished:
            self.finished = True
        if self.finished and self._last is not None:
            self._report(self._last)

    def on_end(self) -> None:
        """The last running total is the call's usage."""
        if self._last is not None:
            self._report(self._last)

    def _report(self, last: Mapping[str, Any]) -> None:
        self.report = Report.read(
            lambda: gemini_usage(last), model=self.model, price_context=self.price_context
        )


class GeminiDialect(Dialect):
    """The Gemini REST wire format (Developer API and Vertex AI)."""

    provider = PROVIDER

    def classify(
        self, method: str, host: str, path: list[str], headers: Any = None
    ) -> WireEndpoint | None:
        """A generate or embed call (``models/{model}:{method}``), or a tuned model's.

        A tuned model (``endpoints/{id}``, ``tunedModels/{id}``) is priced as the model
        its response names; ``unknown_model`` decides whether it is sent.
        """
        if method != "POST" or len(path) < 2 or ":" not in path[-1]:
            return None
        name, _, operation = path[-1].rpartition(":")
        if not name:
            return None
        if path[-2] in _TUNED and operation in _GENERATE:
            return WireEndpoint("chat", operation, f"{path[-2]}/{name}", _GENERATE[operation])
        if path[-2] != "models":
            return None
        if operation in _GENERATE:
            return WireEndpoint("chat", operation, name, _GENERATE[operation])
        if operation in _EMBED or (operation == "predict" and "embedding" in name.lower()):
            return WireEndpoint("embeddings", operation, name, False)
        return None

    def describe(
        self, endpoint: WireEndpoint, body: Mapping[str, Any], mode: EstimateMode
    ) -> WireRequest:
        """The model, stream flag and bounds of a request body."""
        model = endpoint.model
        bound = Bound(image_tokens=image_token_bound(model or ""), media=gemini_part)
        if endpoint.kind == "embeddings":
            for key in ("content", "requests", "instances"):
                bound.add_items(body.get(key))
            return WireRequest(model, False, bound.tokens(mode), 0)
        bound.add_items(body.get("contents"))
        for keys in (
            ("systemInstruction", "system_instruction"),
            ("tools",),
            ("toolConfig", "tool_config"),
        ):
            bound.add(_get(body, *keys))
        config = _get(body, "generationConfig", "generation_config")
        config = config if isinstance(config, Mapping) else {}
        for key in ("responseSchema", "response_schema", "responseJsonSchema"):
            bound.add(config.get(key))
        cap = first_cap(config, "maxOutputTokens", "max_output_tokens")
        if cap is None:
            cap = model_cap(model or "", _OUTPUT_CAPS, DEFAULT_OUTPUT_CAP)
        candidates = first_cap(config, "candidateCount", "candidate_count") or 1
        tier = _tier_of(body)  # the tier asked for: the request's own serviceTier
        return WireRequest(
            model,
            bool(endpoint.stream),
            bound.tokens(mode),
            cap * candidates,
            price_context=dict(tier) if tier else {},
        )

    def tracker(
        self, endpoint: WireEndpoint, content_type: str, headers: Mapping[str, str] | Any
    ) -> WireTracker:
        """An SSE stream tracker, or a whole-body one (JSON object or array)."""
        if content_type == "text/event-stream":
            return GeminiStream()
        return JsonBodyTracker(partial(_body_report, endpoint))


_TUNED: Final = frozenset({"endpoints", "tunedModels"})  # before a tuned model's id

DIALECT: Final = GeminiDialect()

_STATUS_NAMES: Final = {
    429: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    503: "UNAVAILABLE",
    400: "INVALID_ARGUMENT",
}


def refuse(module: ModuleType, request: Any, exc: PayiGuardError) -> BaseException:
    """The exception a refused Gemini call raises: the SDK's and payi_guard's at once.

    ``google.genai.errors.ClientError`` with code 429 (403 for an unknown model, 400 for
    another refusal), or ``ServerError`` with code 503 when the store failed closed.
    """
    from google.genai import errors

    status = refusal_status(exc)
    message = exc.describe() if isinstance(exc, BudgetExceeded) else str(exc)
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES[status]}}
    response = refusal_response(module, request, exc)
    cls = errors.ClientError if status < 500 else errors.ServerError
    return sdk_refusal(cls(status, body, response), exc)


# ---------------------------------------------------------------------------------------
# Installing on google-genai clients
# ---------------------------------------------------------------------------------------


class _MeteredThroughHttpx:
    """Set as ``async_client_args["transport"]``: async calls go through httpx.

    It tells google-genai to send async calls through its (guarded) httpx client, not
    aiohttp.
    """

    __slots__ = ()


@dataclass
class _Installed:
    guard: Guard
    source: str
    undo: list[Callable[[], None]] = field(default_factory=list)


_lock = threading.RLock()
_installed: weakref.WeakKeyDictionary[Any, _Installed] = weakref.WeakKeyDictionary()
_patches = Patches()


def _meter_factory(guard: Guard, options: MeterOptions) -> Callable[[ModuleType], TransportMeter]:
    def build(module: ModuleType) -> TransportMeter:
        return ProviderMeter(guard, options, module, (DIALECT,), refuse)

    return build


def _api_client_of(client: Any) -> Any:
    api = getattr(client, "_api_client", None)
    if api is None or not hasattr(api, "_httpx_client"):
        raise TypeError(
            f"cannot guard {type(client).__name__}: expected a google.genai Client or AsyncClient"
        )
    return api


def http_client_of(client: Any) -> Any:
    """The sync httpx client of a google-genai client (``None`` if it has none)."""
    api = getattr(client, "_api_client", None)
    return getattr(api, "_httpx_client", None)


def wrap(guard: Guard, client: Any, options: MeterOptions) -> None:
    """Guard a ``google.genai.Client`` (or its ``.aio`` client), sync and async calls."""
    _guard_api_client(_api_client_of(client), guard, options, "wrap")


def _guard_api_client(api: Any, guard: Guard, options: MeterOptions, source: str) -> None:
    from payi_guard.meter.clients import install_meter

    with _lock:
        existing = _installed.get(api)
        if existing is not None:
            if not (source == "wrap" and existing.source == "instrument"):
                return
            for undo in reversed(existing.undo):
                undo()
        factory = _meter_factory(guard, options)
        installed = _Installed(guard, source)

        def guard_http(http_client: Any) -> None:
            install_meter(http_client, guard, options, factory, source=source, sdk="gemini")

        sync = getattr(api, "_httpx_client", None)
        if sync is not None:
            guard_http(sync)
        aclient = getattr(api, "_async_httpx_client", None)
        if aclient is not None:
            _guard_async(aclient, guard_http, installed)
            _send_async_through_httpx(api, installed)
        _never_retry_refusals(api, installed)
        _installed[api] = installed


def _guard_async(aclient: Any, guard_http: Callable[[Any], None], installed: _Installed) -> None:
    """Guard google-genai's async client, keeping its one pool per event loop."""
    per_loop = getattr(aclient, "_per_loop", False) and hasattr(aclient, "_loop_clients")
    if not per_loop:
        guard_http(aclient)
        return
    make = type(aclient)._inner_client_cls

    def guarded_inner_client(**kwargs: Any) -> Any:
        inner = make(**kwargs)
        guard_http(inner)
        return inner

    aclient._inner_client_cls = guarded_inner_client
    for inner in list(aclient._loop_clients.values()):
        guard_http(inner)

    def undo() -> None:
        if aclient.__dict__.get("_inner_client_cls") is guarded_inner_client:
            del aclient._inner_client_cls

    installed.undo.append(undo)


def _send_async_through_httpx(api: Any, installed: _Installed) -> None:
    options = getattr(api, "_http_options", None)
    if options is None:
        return
    before = options.async_client_args
    args = dict(before or {})
    if args.get("transport") is not None:
        return  # a transport of the caller's: google-genai uses httpx already
    args["transport"] = _MeteredThroughHttpx()
    options.async_client_args = args

    def undo() -> None:
        options.async_client_args = before

    installed.undo.append(undo)


class _RefusalNotRetried:
    """A tenacity ``retry`` predicate that never retries a payi_guard refusal."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, retry_state: Any) -> bool:
        outcome = retry_state.outcome
        failed = outcome is not None and outcome.failed
        if failed and isinstance(outcome.exception(), PayiGuardError):
            return False
        return bool(self.inner(retry_state))


def _restore_predicate(retrying: Any, guarded: Any, original: Any) -> None:
    if retrying.retry is guarded:
        retrying.retry = original


def _never_retry_refusals(api: Any, installed: _Installed) -> None:
    for name in ("_retry", "_async_retry"):
        retrying: Any = getattr(api, name, None)
        predicate = getattr(retrying, "retry", None)
        if predicate is None or isinstance(predicate, _RefusalNotRetried):
            continue
        guarded = _RefusalNotRetried(predicate)
        retrying.retry = guarded
        installed.undo.append(partial(_restore_predicate, retrying, guarded, predicate))
    _patch_retry_args()


_retry_args_original: Any = None


def _patch_retry_args() -> None:
    """Per-request ``retry_options`` build their own retrier: refuse to retry refusals there too."""
    global _retry_args_original
    from google.genai import _api_client

    with _lock:
        if _retry_args_original is not None:
            return
        original = _api_client.retry_args

        def retry_args(options: Any) -> Any:
            kwargs = original(options)
            if "retry" in kwargs:
                kwargs["retry"] = _RefusalNotRetried(kwargs["retry"])
            return kwargs

        retry_args.__wrapped__ = original  # type: ignore[attr-defined]
        setattr(_api_client, "retry_args", retry_args)  # noqa: B010 - typed module attribute
        _retry_args_original = original


def _guarding_build_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def _build_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self not in _installed:
            _guard_on_first_use(self)
        return original(self, *args, **kwargs)

    _build_request.__wrapped__ = original  # type: ignore[attr-defined]
    _build_request.__doc__ = original.__doc__
    return _build_request


def _guard_on_first_use(api: Any) -> None:
    from payi_guard.meter.clients import instrumenting

    current = instrumenting()
    if current is None:
        return
    guard, options = current
    _guard_api_client(api, guard, options, "instrument")


def instrument(guard: Guard, options: MeterOptions) -> None:
    """Guard every google-genai client on its first request.

    Patches ``BaseApiClient._build_request`` once ``google.genai`` is imported.
    """
    if _patches.start():
        _patches.when_imported(
            "google.genai._api_client",
            lambda module: _patches.replace(
                module.BaseApiClient, "_build_request", _guarding_build_request
            ),
        )


def uninstrument(guard: Guard) -> None:
    """Restore ``_build_request`` and undo what ``instrument`` did to each client."""
    global _retry_args_original
    _patches.undo()
    with _lock:
        wrapped = False
        for api, installed in list(_installed.items()):
            if installed.source == "instrument":
                for undo in reversed(installed.undo):
                    undo()
                del _installed[api]
            else:
                wrapped = True
        if not wrapped and _retry_args_original is not None:
            from google.genai import _api_client

            current = _api_client.retry_args
            if getattr(current, "__wrapped__", None) is _retry_args_original:
                setattr(_api_client, "retry_args", _retry_args_original)  # noqa: B010
            _retry_args_original = None


def guarded_by(client: Any) -> Guard | None:
    """The guard of a google-genai client, if guarded."""
    api = getattr(client, "_api_client", None)
    with _lock:
        installed = _installed.get(api) if api is not None else None
    return None if installed is None else installed.guard
