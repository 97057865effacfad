"""Installing the guarding transport: ``wrap``, ``instrument`` and ``uninstrument``.

A client is guarded by replacing the transport of its underlying HTTP client (and of
every mounted transport: proxies are mounts) with the guarding transport, which keeps
the original as its inner transport. Everything the client sends, whatever the SDK
method (``create``, ``.stream()``, ``.parse()``, ``with_raw_response``, beta
resources, copies made with ``with_options``), goes through it.

``instrument`` patches, at class level, the ``_build_request`` method every OpenAI and
Anthropic client calls for each HTTP attempt: on its first use a client's HTTP client
is guarded, so clients created before and after ``instrument()`` are both covered.
``uninstrument`` restores the method and the transports ``instrument`` installed.

The other SDKs (Gemini, Bedrock, Mistral, Groq, LiteLLM) are dispatched to
:mod:`payi_guard.meter.providers`, which installs its meters through
:func:`install_meter` (and, for botocore, its own HTTP session).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Final

from payi_guard.engine import Guard
from payi_guard.exceptions import MissingDependency
from payi_guard.meter import providers
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.payi_bridge import PayiBridge
from payi_guard.meter.refusal import (
    install_status_error_hook,
    refusal_response,
    remove_status_error_hook,
)
from payi_guard.meter.transport import TransportMeter
from payi_guard.meter.transport_classes import transport_classes

__all__ = [
    "guarded_by",
    "install_meter",
    "installed_source",
    "instrument",
    "instrumenting",
    "is_guarded",
    "uninstrument",
    "wrap",
]

_SDKS: Final = ("openai", "anthropic")
_HTTP_MODULES: Final = ("httpx2", "httpx")
_PATCHED_METHOD: Final = "_build_request"


@dataclass
class _Installation:
    """What was replaced on one HTTP client, to restore it."""

    transport: Any
    mounts: dict[Any, Any]
    source: str
    meter: TransportMeter
    sdk: str | None


@dataclass
class _Instrumentation:
    guard: Guard
    options: MeterOptions
    asked: tuple[frozenset[str] | None, dict[str, Any]]
    """The ``sdks`` and options it was called with (a second call must repeat them)."""
    patches: list[tuple[type[Any], Callable[..., Any], str]] = field(default_factory=list)


_lock = threading.RLock()
_installed: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()
_instrumentation: _Instrumentation | None = None


def _http_module(http_client: object) -> ModuleType | None:
    """``httpx2`` or ``httpx`` when ``http_client`` is one of their clients (no import)."""
    for name in _HTTP_MODULES:
        module = sys.modules.get(name)
        if module is not None and isinstance(http_client, (module.Client, module.AsyncClient)):
            return module
    return None


def _sdk_of(client: object) -> str | None:
    for cls in type(client).__mro__:
        root = cls.__module__.partition(".")[0]
        if root in _SDKS:
            return root
    return None


def _provider_hint(client: object, sdk: str) -> str | None:
    if sdk != "openai":
        return None
    try:
        from openai.lib.azure import BaseAzureClient
    except ImportError:  # pragma: no cover - an openai client implies openai
        return None
    return "azure" if isinstance(client, BaseAzureClient) else None


def _meter_factory(
    client: object, guard: Guard, options: MeterOptions
) -> Callable[[ModuleType], TransportMeter] | None:
    """The meter of an SDK client whose requests are not in its SDK's own wire format.

    ``anthropic.AnthropicBedrock`` sends each Messages call to Bedrock's runtime API
    (``/model/{modelId}/invoke``, ``invoke-with-response-stream``: an AWS event
    stream), signed: it is metered as Bedrock (:class:`BedrockDialect`), charged under
    ``aws``, and sent exactly as signed; a refusal is the SDK's ``RateLimitError``.
    ``None`` for every other client (the OpenAI / Anthropic meter).
    """
    if not any(cls.__module__.startswith("anthropic.lib.bedrock") for cls in type(client).__mro__):
        return None
    from payi_guard.meter.providers.bedrock_wire import BedrockDialect
    from payi_guard.meter.providers.meter import ProviderMeter

    def refuse(module: ModuleType, request: Any, exc: Any) -> Any:
        return refusal_response(module, request, exc, problem=False)

    def build(module: ModuleType) -> TransportMeter:
        return ProviderMeter(guard, options, module, (BedrockDialect(),), refuse)

    return build


def _origin(client: Any) -> tuple[str, str, int | None] | None:
    """The ``(scheme, host, port)`` an SDK client's ``base_url`` names, if it has one."""
    url: Any = getattr(client, "base_url", None)
    port = getattr(url, "port", None)
    if url is None or not isinstance(port, (int, type(None))):
        return None
    return (str(url.scheme), str(url.host), port)


def _guard_transports(
    http_client: Any, module: ModuleType, meter: TransportMeter
) -> tuple[Any, dict[Any, Any]]:
    classes = transport_classes(module)
    is_async = isinstance(http_client, module.AsyncClient)
    guarding = classes.async_transport if is_async else classes.transport
    original = http_client._transport
    mounts = dict(http_client._mounts)
    http_client._transport = guarding(original, meter)
    http_client._mounts = {
        pattern: None if transport is None else guarding(transport, meter)
        for pattern, transport in mounts.items()
    }
    return original, mounts


def _restore(http_client: Any, installation: _Installation) -> None:
    http_client._transport = installation.transport
    http_client._mounts = dict(installation.mounts)


def _install(
    http_client: Any,
    guard: Guard,
    options: MeterOptions,
    *,
    provider_hint: str | None,
    source: str,
    sdk: str | None,
    meter_factory: Callable[[ModuleType], TransportMeter] | None = None,
    origin: tuple[str, str, int | None] | None = None,
) -> None:
    module = _http_module(http_client)
    if module is None:
        raise TypeError(
            f"cannot guard {type(http_client).__name__}: expected an httpx or httpx2 "
            "Client/AsyncClient"
        )
    with _lock:
        existing = _installed.get(http_client)
        if existing is not None:
            if source == "wrap" and existing.source == "instrument":
                # Explicitly wrapped now: adopt the wrap's guard and keep it guarded
                # after uninstrument().
                _restore(http_client, existing)
                del _installed[http_client]
            elif source == "wrap" and existing.meter.guard is not guard:
                raise ValueError(
                    f"this {type(http_client).__name__} is already guarded by another "
                    "Guard (an SDK client made with the same http_client was wrapped): "
                    "its calls would be charged there; give each guard's clients their "
                    "own http_client"
                )
            else:
                origins = existing.meter.origins
                if origins is not None and origin is not None:
                    origins.add(origin)  # another SDK client on the same HTTP client
                elif origin is None:
                    existing.meter.origins = None  # the HTTP client itself: all its calls
                return
        if meter_factory is None:
            meter = TransportMeter(guard, options, module, provider_hint)
        else:
            meter = meter_factory(module)
        if origin is not None:
            meter.origins = {origin}
        original, mounts = _guard_transports(http_client, module, meter)
        _installed[http_client] = _Installation(original, mounts, source, meter, sdk)


# -- provider SDKs (payi_guard.meter.providers) ----------------------------------------------


def install_meter(
    http_client: Any,
    guard: Guard,
    options: MeterOptions,
    meter_factory: Callable[[ModuleType], TransportMeter],
    *,
    source: str,
    sdk: str,
) -> None:
    """Guard one httpx / httpx2 client of a provider SDK.

    The meter is the one ``meter_factory`` builds for the client's HTTP module.
    Idempotent; ``wrap`` takes over a client ``instrument`` guarded.

    Raises:
        TypeError: ``http_client`` is not an httpx or httpx2 client.
    """
    _install(
        http_client,
        guard,
        options,
        provider_hint=None,
        source=source,
        sdk=sdk,
        meter_factory=meter_factory,
    )


def installed_source(http_client: Any) -> str | None:
    """``wrap`` or ``instrument`` when ``http_client`` is guarded, else ``None``."""
    with _lock:
        installation = _installed.get(http_client)
    return None if installation is None else installation.source


def instrumenting() -> tuple[Guard, MeterOptions] | None:
    """The guard and options of the current ``instrument()``, if any."""
    current = _instrumentation
    return None if current is None else (current.guard, current.options)


def wrap(guard: Guard, client: Any, **options: Any) -> Any:
    """Guard one client and return it (the same object).

    Accepted clients: ``openai.OpenAI`` / ``AsyncOpenAI`` / ``AzureOpenAI`` /
    ``AsyncAzureOpenAI``, ``anthropic.Anthropic`` / ``AsyncAnthropic`` (and the other
    clients of those SDKs), and plain ``httpx`` / ``httpx2`` ``Client`` /
    ``AsyncClient`` objects aimed at any OpenAI-compatible (or Anthropic-compatible)
    ``base_url``; also ``google.genai`` ``Client`` / ``AsyncClient``, boto3
    ``bedrock-runtime`` clients, ``mistralai`` ``Mistral``, ``groq`` ``Groq`` /
    ``AsyncGroq`` and LiteLLM ``HTTPHandler`` / ``AsyncHTTPHandler`` objects
    (:mod:`payi_guard.meter.providers`; a refusal is then the SDK's own rate-limit
    exception). Wrapping twice does nothing more; wrapping a client ``instrument()``
    already guards makes it keep this guard after ``uninstrument()``. An SDK client's
    HTTP client may be the app's own, shared with other requests: only the requests the
    SDK builds, or sent to its ``base_url``'s host, are metered.

    The provider charged is ``openai`` for ``api.openai.com``, ``azure`` for Azure
    clients, ``*.openai.azure.com`` hosts and ``/openai/deployments/...`` paths,
    ``anthropic`` for the Messages API (``aws`` through ``AnthropicBedrock``, ``google``
    through ``AnthropicVertex``), the genai-prices provider whose API address the
    base URL is (``groq`` for ``https://api.groq.com/openai/v1``, ``deepseek``,
    ``openrouter``...), and ``openai-compatible`` for any other base URL.

    Args:
        guard: the guard that reserves and settles.
        client: the client.
        **options: ``include_usage`` (bool, default True: ask chat / legacy completions
            streams for their usage chunk, hidden again from the caller);
            ``skip_include_usage`` (URL prefixes where the option is never sent);
            ``retry_without_stream_options`` (bool, default True: resend once without
            the option when a server answers 400/422 naming it, and remember that base
            URL); ``provider`` (the provider name to charge under); ``payi`` (the Pay-i
            bridge: True, False, or None to follow Pay-i's instrumentation);
            ``estimate_mode`` (``"ratio"`` or ``"bytes"``); ``refusal`` (plain HTTP
            clients only: ``"raise"``, the default, raises the payi_guard exception
            from the request; ``"response"`` returns a 429/403/503 response with an
            ``application/problem+json`` body).

    Returns:
        ``client``, guarded.

    Raises:
        TypeError: ``client`` is not a supported client, or an option is unknown or of
            the wrong type.
        ValueError: an option value is out of range, or another guard already guards
            the client's HTTP client.
        MissingDependency: ``payi=True`` and the ``payi`` package is not installed.
    """
    sdk = _sdk_of(client)
    if sdk is not None:
        http_client = getattr(client, "_client", None)
        if _http_module(http_client) is None:
            what = type(client).__name__
            if http_client is not None and _sdk_of(http_client) is not None:
                raise TypeError(  # client.chat, client.messages: a resource of a client
                    f"cannot guard {what}: it is a resource of an SDK client; wrap the "
                    "client itself (guard.wrap(client), then client.chat...)"
                )
            raise TypeError(
                f"cannot guard {what}: its HTTP client is not an httpx or httpx2 client"
            )
        meter_options = MeterOptions.from_kwargs(options, refusal="sdk")
        PayiBridge(meter_options.payi)  # fails now, not at the first request
        install_status_error_hook(sdk, "wrap")
        _install(
            http_client,
            guard,
            meter_options,
            provider_hint=_provider_hint(client, sdk),
            source="wrap",
            sdk=sdk,
            meter_factory=_meter_factory(client, guard, meter_options),
            origin=_origin(client),
        )
        return client
    if _http_module(client) is not None:
        meter_options = MeterOptions.from_kwargs(options, refusal="raise")
        _install(client, guard, meter_options, provider_hint=None, source="wrap", sdk=None)
        return client
    if providers.wrap(guard, client, options):
        return client
    raise TypeError(
        f"wrap() expects an OpenAI or Anthropic client, a Google Gen AI, Bedrock runtime "
        f"(boto3), Mistral or Groq client, a LiteLLM HTTP handler, or an httpx/httpx2 "
        f"Client or AsyncClient, not {type(client).__module__}.{type(client).__qualname__}"
    )


def _guard_on_first_use(client: Any) -> None:
    http_client = getattr(client, "_client", None)
    if http_client is None:
        return
    with _lock:
        current = _instrumentation
        if current is None or http_client in _installed or _http_module(http_client) is None:
            return
        sdk = _sdk_of(client)
        _install(
            http_client,
            current.guard,
            current.options,
            provider_hint=_provider_hint(client, sdk) if sdk else None,
            source="instrument",
            sdk=sdk,
            meter_factory=_meter_factory(client, current.guard, current.options),
            origin=_origin(client),
        )


def _guarding_build_request(original: Callable[..., Any]) -> Callable[..., Any]:
    def _build_request(self: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
        http_client = getattr(self, "_client", None)
        if http_client is not None and http_client not in _installed:
            _guard_on_first_use(self)
        return original(self, options, *args, **kwargs)

    _build_request.__wrapped__ = original  # type: ignore[attr-defined]
    _build_request.__doc__ = original.__doc__
    return _build_request


def _chosen_sdks(sdks: object) -> list[str] | None:
    """Validate the ``sdks`` option of :func:`instrument`: SDK names, or ``None`` (all).

    Raises:
        TypeError: not a list of names.
        ValueError: an unknown name.
        MissingDependency: a named SDK is not installed.
    """
    if sdks is None:
        return None
    if isinstance(sdks, str):
        sdks = [sdks]
    if not isinstance(sdks, (list, tuple, set, frozenset)) or not all(
        isinstance(name, str) for name in sdks
    ):
        raise TypeError("sdks must be a list of SDK names")
    names = list(dict.fromkeys(sdks))
    known = (*_SDKS, *providers.SDK_MODULES)
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ValueError(f"unknown SDK(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for name in names:
        if name in _SDKS and importlib.util.find_spec(name) is None:
            raise MissingDependency(name, name)
        if name in providers.SDK_MODULES and not providers.installed(name):
            raise MissingDependency(providers.SDK_MODULES[name], providers.EXTRAS[name])
    return names


def instrument(guard: Guard, **options: Any) -> None:
    """Guard every client of the supported GenAI SDKs, created before or after this call.

    The SDKs: ``openai``, ``anthropic``, ``google-genai`` (``gemini``), ``boto3``
    ``bedrock-runtime`` (``bedrock``), ``mistralai`` (``mistral``), ``groq`` and
    ``litellm``; each one that is installed, or only those named in ``sdks``.
    Idempotent for the same guard and arguments. The user charged where no context names one is
    ``guard.default_user_id`` (``Guard.instrument(default_user_id=...)`` sets it).

    Args:
        guard: the guard.
        **options: as for :func:`wrap` (``refusal`` excepted), and ``sdks``: the SDKs
            to instrument, by the names above (default: every one installed).

    Raises:
        RuntimeError: another guard already instrumented the SDKs.
        ValueError: this guard did, with other ``sdks`` or options.
        MissingDependency: no supported SDK is installed, an SDK named in ``sdks`` is
            not (the message names the extra to install), or ``payi=True`` without
            the ``payi`` package.
        TypeError: an unknown option.
        ValueError: an option value is out of range.
    """
    global _instrumentation
    options = dict(options)
    sdks = _chosen_sdks(options.pop("sdks", None))
    meter_options = MeterOptions.from_kwargs(options, refusal="sdk")
    asked = (None if sdks is None else frozenset(sdks), options)
    with _lock:
        current = _instrumentation
        if current is not None:
            if current.guard is not guard:
                raise RuntimeError(
                    "the OpenAI/Anthropic SDKs are already instrumented by another Guard: "
                    "call its uninstrument() first"
                )
            if current.asked == asked:
                return
            raise ValueError(
                "this guard already instrumented the SDKs with other sdks or options: "
                "call uninstrument() first to change them"
            )
        PayiBridge(meter_options.payi)  # fails now, not at the first request
        state = _Instrumentation(guard, meter_options, asked)
        for sdk in _SDKS:
            if sdks is not None and sdk not in sdks:
                continue
            try:
                base_client = importlib.import_module(f"{sdk}._base_client")
            except ImportError:
                continue
            cls: type[Any] = base_client.BaseClient
            original = cls.__dict__[_PATCHED_METHOD]
            setattr(cls, _PATCHED_METHOD, _guarding_build_request(original))
            install_status_error_hook(sdk, "instrument")
            state.patches.append((cls, original, sdk))
        others = None if sdks is None else [name for name in sdks if name not in _SDKS]
        instrumented_providers = providers.instrument(guard, meter_options, others)
        if not state.patches and not instrumented_providers:
            raise MissingDependency("openai", "openai")
        _instrumentation = state


def uninstrument(guard: Guard) -> None:
    """Undo :func:`instrument` for ``guard`` (idempotent).

    Restores the SDKs' methods and the original transports of every client
    ``instrument`` guarded; clients guarded with :func:`wrap` stay guarded.
    """
    global _instrumentation
    with _lock:
        current = _instrumentation
        if current is None or current.guard is not guard:
            return
        for cls, original, sdk in current.patches:
            if getattr(cls.__dict__.get(_PATCHED_METHOD), "__wrapped__", None) is original:
                setattr(cls, _PATCHED_METHOD, original)
            # else: something wrapped the method after us; removing ours would drop theirs.
            # Ours is left in place, inert: it guards nothing while not instrumented.
            remove_status_error_hook(sdk, "instrument")
        wrapped_sdks: set[str] = set()
        for http_client, installation in list(_installed.items()):
            if installation.source == "instrument":
                _restore(http_client, installation)
                del _installed[http_client]
            elif installation.sdk is not None:
                wrapped_sdks.add(installation.sdk)
        for sdk in _SDKS:
            if sdk not in wrapped_sdks:
                remove_status_error_hook(sdk, "wrap")
        providers.uninstrument(guard)
        _instrumentation = None


def _http_client_of(client: Any) -> Any:
    if _sdk_of(client) is not None:
        return getattr(client, "_client", None)
    return providers.http_client_of(client)


def is_guarded(client: Any) -> bool:
    """Whether ``client`` (an SDK client or an httpx/httpx2 client) is guarded now."""
    found = providers.guarded_by(client)
    if found is not None:
        return True
    http_client = _http_client_of(client)
    if http_client is None:
        return False
    with _lock:
        return http_client in _installed


def guarded_by(client: Any) -> Guard | None:
    """The guard metering ``client``, or ``None`` when it is not guarded."""
    found = providers.guarded_by(client)
    if found is not None:
        return found
    http_client = _http_client_of(client)
    if http_client is None:
        return None
    with _lock:
        installation = _installed.get(http_client)
    return None if installation is None else installation.meter.guard
