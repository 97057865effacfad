"""Groq through ``groq`` (``payi-guard[groq]``).

What is metered (at the transport of the SDK's httpx client): ``chat.completions.create``
(plain and ``stream=True``, sync and async) and ``embeddings.create``. Audio, files and
batches pass through.

The wire is OpenAI-style (:mod:`payi_guard.meter.providers.chat`); a stream's usage is
the last chunk's ``x_groq.usage``, always sent, so nothing is injected into the request.
Prices are genai-prices' ``groq`` provider. A compound request (``compound-beta``) runs
several models and is charged as the model it names.

``groq`` is built like the OpenAI SDK, and refuses the same way: the transport answers
with a response that never left the process (429, ``x-should-retry: false``, which the
SDK obeys before its own retries), and the SDK's status-error hook turns it into
``groq.RateLimitError`` that is also the payi_guard refusal.
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
from payi_guard.meter.refusal import (
    install_status_error_hook,
    refusal_response,
    remove_status_error_hook,
)
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

PROVIDER: Final = "groq"
HOSTS: Final = ("api.groq.com",)
"""Groq's API hosts (LiteLLM's clients are shared by every provider)."""

DIALECT: Final = ChatDialect(
    PROVIDER,
    hosts=None,
    suffixes=((("chat", "completions"), "chat"), (("embeddings",), "embeddings")),
    caps=(
        ("gpt-oss", 65_536),
        ("qwen", 40_960),
        ("deepseek", 131_072),
        ("kimi", 16_384),
        ("compound", 8_192),
    ),
    default_cap=32_768,
)


def refuse(module: ModuleType, request: Any, exc: PayiGuardError) -> Any:
    """A synthesized refusal response, made ``groq.RateLimitError`` by the SDK's hook."""
    return refusal_response(module, request, exc)


def _factory(guard: Guard, options: MeterOptions) -> Callable[[ModuleType], TransportMeter]:
    def build(module: ModuleType) -> TransportMeter:
        return ProviderMeter(guard, options, module, (DIALECT,), refuse)

    return build


def http_client_of(client: Any) -> Any:
    """The httpx client of a ``Groq`` / ``AsyncGroq`` client."""
    return getattr(client, "_client", None)


def _guard(http_client: Any, guard: Guard, options: MeterOptions, source: str) -> None:
    from payi_guard.meter.clients import install_meter

    install_meter(http_client, guard, options, _factory(guard, options), source=source, sdk="groq")


def wrap(guard: Guard, client: Any, options: MeterOptions) -> None:
    """Guard a ``groq.Groq`` / ``AsyncGroq`` client."""
    http_client = http_client_of(client)
    if http_client is None:
        raise TypeError(f"cannot guard {type(client).__name__}: expected a Groq client")
    install_status_error_hook("groq", "wrap")
    _guard(http_client, guard, options, "wrap")


_patches = Patches()
_METHOD: Final = "_build_request"


def _guarding(original: Callable[..., Any]) -> Callable[..., Any]:
    def _build_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        from payi_guard.meter.clients import installed_source, instrumenting

        http_client = getattr(self, "_client", None)
        if http_client is not None and installed_source(http_client) is None:
            current = instrumenting()
            if current is not None:
                _guard(http_client, current[0], current[1], "instrument")
        return original(self, *args, **kwargs)

    _build_request.__wrapped__ = original  # type: ignore[attr-defined]
    _build_request.__doc__ = original.__doc__
    return _build_request


def _patch(module: ModuleType) -> None:
    _patches.replace(module.BaseClient, _METHOD, _guarding)
    install_status_error_hook("groq", "instrument")


def instrument(guard: Guard, options: MeterOptions) -> None:
    """Guard every ``groq`` client on its first request (once ``groq`` is imported)."""
    if _patches.start():
        _patches.when_imported("groq._base_client", _patch)


def uninstrument(guard: Guard) -> None:
    """Restore ``_build_request`` and drop the instrument's claim on the error hook."""
    if _patches.undo():
        remove_status_error_hook("groq", "instrument")
