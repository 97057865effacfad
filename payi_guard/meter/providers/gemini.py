"""Google Gemini through ``google-genai`` (``payi-guard[gemini]``): Developer API and Vertex AI.

What is metered (at the transport of the client's httpx / httpx2 clients):
``models.generate_content``, ``generate_content_stream`` and their ``client.aio`` twins,
``embed_content`` (``embedContent``, ``batchEmbedContents``, Vertex ``predict`` of
embedding models). Everything else (files, caches, tuning, ``count_tokens``, image and
video generation, the Live API's websocket) passes through.

The wire (the model in the URL, the bound, ``usageMetadata``, streams) is
:mod:`~payi_guard.meter.providers.gemini_wire`, also used for LiteLLM's Gemini route.

Installing: ``wrap`` / ``instrument`` guard the client's sync httpx client, its async
client (one guarded inner client per event loop, as google-genai keeps them), and send
async calls through that async client instead of aiohttp (aiohttp traffic cannot be
metered at an httpx transport). A refusal is raised as ``google.genai.errors.ClientError``
(code 429; 403 for an unknown model) that is also the payi_guard refusal, and retries
configured with ``HttpRetryOptions`` never retry it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from types import ModuleType
from typing import Any

from payi_guard.engine import Guard
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.providers.gemini_wire import DIALECT, GeminiDialect, gemini_usage, refuse
from payi_guard.meter.providers.hooks import Patches
from payi_guard.meter.providers.meter import ProviderMeter
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
