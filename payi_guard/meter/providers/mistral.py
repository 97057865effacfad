"""Mistral through ``mistralai`` (``payi-guard[mistral]``).

What is metered (at the transport of the SDK's httpx2 clients): ``chat.complete`` /
``complete_async``, ``chat.stream`` / ``stream_async``, ``fim.*``, ``agents.complete``
/ ``stream`` and ``embeddings.create``. OCR, audio, batch jobs, files, fine-tuning and
the beta conversations API pass through.

The wire is OpenAI-style (:mod:`payi_guard.meter.providers.chat`): usage in the body's
``usage``, a stream's in its last chunk; ``prompt_tokens_details.cached_tokens`` are
cache reads. Prices are genai-prices' ``mistral`` provider. An agent call names an
agent, not a model: it is priced by the ``unknown_model`` policy.

A refusal is raised as ``mistralai.client.errors.SDKError`` (``status_code`` 429, 403
for an unknown model) that is also the payi_guard refusal. It is raised from the
transport, where the SDK's retry loop treats it as permanent: never retried, even with
a ``RetryConfig``.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from payi_guard.engine import Guard
from payi_guard.exceptions import PayiGuardError
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.providers.chat import ChatDialect
from payi_guard.meter.providers.hooks import Patches
from payi_guard.meter.providers.meter import ProviderMeter
from payi_guard.meter.refusal import refusal_response, sdk_refusal
from payi_guard.meter.transport import TransportMeter

__all__ = [
    "DIALECT",
    "HOSTS",
    "http_client_of",
    "instrument",
    "refuse",
    "uninstrument",
    "wrap",
]

PROVIDER: Final = "mistral"
HOSTS: Final = ("api.mistral.ai",)
"""Mistral's API hosts (LiteLLM's clients are shared by every provider)."""

DIALECT: Final = ChatDialect(
    PROVIDER,
    hosts=None,
    suffixes=(
        (("fim", "completions"), "completions"),
        (("agents", "completions"), "chat"),
        (("chat", "completions"), "chat"),
        (("embeddings",), "embeddings"),
    ),
    caps=(("codestral", 32_768), ("magistral", 40_000), ("ministral", 32_768)),
    default_cap=32_768,
)


def refuse(module: ModuleType, request: Any, exc: PayiGuardError) -> BaseException:
    """The ``SDKError`` (status 429 / 403 / 503 / 400) that is also the refusal."""
    from mistralai.client import errors

    response = refusal_response(module, request, exc)
    return sdk_refusal(errors.SDKError("API error occurred", response, response.text), exc)


def _factory(guard: Guard, options: MeterOptions) -> Callable[[ModuleType], TransportMeter]:
    def build(module: ModuleType) -> TransportMeter:
        return ProviderMeter(guard, options, module, (DIALECT,), refuse)

    return build


def http_client_of(client: Any) -> Any:
    """The sync httpx2 client of a ``Mistral`` client (``None`` if it has none)."""
    config = getattr(client, "sdk_configuration", None)
    return getattr(config, "client", None)


def _guard(http_client: Any, guard: Guard, options: MeterOptions, source: str) -> None:
    from payi_guard.meter.clients import install_meter

    install_meter(
        http_client, guard, options, _factory(guard, options), source=source, sdk="mistral"
    )


def wrap(guard: Guard, client: Any, options: MeterOptions) -> None:
    """Guard a ``mistralai`` ``Mistral`` client: its sync and async HTTP clients."""
    config = getattr(client, "sdk_configuration", None)
    if config is None:
        raise TypeError(f"cannot guard {type(client).__name__}: expected a mistralai Mistral")
    guarded = False
    for http_client in (config.client, config.async_client):
        if http_client is not None:
            _guard(http_client, guard, options, "wrap")
            guarded = True
    if not guarded:
        raise TypeError(f"cannot guard {type(client).__name__}: it has no HTTP client")


_patches = Patches()
_METHOD: Final = "_build_request_with_client"


def _guarding(original: Callable[..., Any]) -> Callable[..., Any]:
    def _build_request_with_client(self: Any, client: Any, *args: Any, **kwargs: Any) -> Any:
        from payi_guard.meter.clients import installed_source, instrumenting

        if client is not None and installed_source(client) is None:
            current = instrumenting()
            if current is not None:
                _guard(client, current[0], current[1], "instrument")
        return original(self, client, *args, **kwargs)

    _build_request_with_client.__wrapped__ = original  # type: ignore[attr-defined]
    _build_request_with_client.__doc__ = original.__doc__
    return _build_request_with_client


def instrument(guard: Guard, options: MeterOptions) -> None:
    """Guard the HTTP client of every ``mistralai`` request on its first use."""
    if _patches.start():
        _patches.when_imported(
            "mistralai.client.basesdk",
            lambda module: _patches.replace(module.BaseSDK, _METHOD, _guarding),
        )


def uninstrument(guard: Guard) -> None:
    """Restore the method ``instrument`` patched (clients are restored by the caller)."""
    _patches.undo()
