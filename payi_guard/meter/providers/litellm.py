"""Calls made through the LiteLLM SDK (``payi-guard[litellm]``): metered once, never twice.

LiteLLM sends a call one of two ways, never both:

* its OpenAI, Azure and OpenAI-compatible routes go through the ``openai`` SDK, with an
  httpx client LiteLLM builds: ``instrument()`` guards it like any OpenAI client;
* every other route (Gemini / Vertex, Anthropic, Bedrock, Mistral, Groq, ...) goes
  through LiteLLM's own ``HTTPHandler`` / ``AsyncHTTPHandler`` clients. ``instrument()``
  guards each one's httpx client on its first ``post``, with a meter that reads every
  provider's own wire format: Gemini's, Bedrock's (LiteLLM signs those requests itself,
  so they go out unchanged), Mistral's and Groq's on their API hosts, and OpenAI's or
  Anthropic's for the rest.

Each request passes one guarding transport, so it is charged exactly once; LiteLLM's
callbacks and its own cost tracking are not involved (a callback cannot refuse a call,
and success callbacks run later, on a worker).

A refusal reaches the caller as ``litellm.RateLimitError`` (category
``litellm_rate_limit``; ``PermissionDeniedError`` for an unknown model) that is also the
payi_guard refusal: LiteLLM maps every error a provider route raises to its own
classes, and the guard's hook on that mapping (``litellm.main.exception_type``) gives
the refusal's class instead. The request never reaches the provider. LiteLLM's
``num_retries`` re-runs a refused call like any failed one: each attempt is refused
again before sending.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, PayiGuardError, StorageError, UnknownModelRefused
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.providers import gemini, groq, mistral
from payi_guard.meter.providers.bedrock_wire import BedrockDialect
from payi_guard.meter.providers.hooks import Patches
from payi_guard.meter.providers.meter import ProviderMeter
from payi_guard.meter.refusal import refusal_response, sdk_refusal
from payi_guard.meter.transport import TransportMeter

__all__ = [
    "guarded_by",
    "http_client_of",
    "instrument",
    "litellm_refusal",
    "refusal_in",
    "uninstrument",
    "wrap",
]

_DIALECTS: Final = (
    gemini.DIALECT,
    BedrockDialect(any_host=False),
    mistral.DIALECT.for_hosts(mistral.HOSTS),
    groq.DIALECT.for_hosts(groq.HOSTS),
)


def _raise(module: ModuleType, request: Any, exc: PayiGuardError) -> BaseException:
    # LiteLLM wraps whatever its handlers raise; its error mapping (hooked below) turns
    # the refusal found in that chain into the combined exception.
    return exc


def _factory(guard: Guard, options: MeterOptions) -> Callable[[ModuleType], TransportMeter]:
    def build(module: ModuleType) -> TransportMeter:
        return ProviderMeter(guard, options, module, _DIALECTS, _raise, fallback=True)

    return build


def refusal_in(exc: BaseException) -> PayiGuardError | None:
    """The payi_guard refusal an exception is or comes from, if any.

    The chain is followed through ``__cause__`` and ``__context__``, at any depth.
    """
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, PayiGuardError):
            return current
        pending.extend((current.__cause__, current.__context__))
    return None


def litellm_refusal(refusal: PayiGuardError, model: object, provider: object) -> BaseException:
    """The LiteLLM exception that is also ``refusal``.

    ``litellm.RateLimitError`` (category ``litellm_rate_limit``, type ``budget``) for a
    budget refusal, ``PermissionDeniedError`` for an unknown model,
    ``ServiceUnavailableError`` when the store failed closed, ``BadRequestError``
    otherwise.
    """
    import httpx
    from litellm import exceptions as litellm

    refusal = _plain(refusal)
    message = refusal.describe() if isinstance(refusal, BudgetExceeded) else str(refusal)
    request = httpx.Request("POST", "http://payi-guard.invalid/refused")
    response = refusal_response(httpx, request, refusal)
    error: BaseException
    if isinstance(refusal, BudgetExceeded):
        error = litellm.RateLimitError(
            message,
            llm_provider=provider,
            model=model,
            response=response,
            category="litellm_rate_limit",
            rate_limit_type="budget",
        )
    elif isinstance(refusal, UnknownModelRefused):
        error = litellm.PermissionDeniedError(
            message, llm_provider=provider, model=model, response=response
        )
    elif isinstance(refusal, StorageError):
        error = litellm.ServiceUnavailableError(
            message, llm_provider=provider, model=model, response=response
        )
    else:
        error = litellm.BadRequestError(
            message, model=model, llm_provider=provider, response=response
        )
    return sdk_refusal(error, refusal)


def _hooked_exception_type(original: Callable[..., Any]) -> Callable[..., Any]:
    def exception_type(*args: Any, **kwargs: Any) -> Any:
        exc = kwargs.get("original_exception", args[1] if len(args) > 1 else None)
        refusal = refusal_in(exc) if isinstance(exc, BaseException) else None
        if refusal is None:
            return original(*args, **kwargs)
        if refusal is exc and _is_litellm_error(exc):
            return exc  # already the combined exception (a retry of a refused call)
        model = kwargs.get("model", args[0] if args else None)
        provider = kwargs.get("custom_llm_provider", args[2] if len(args) > 2 else None)
        return litellm_refusal(refusal, model, provider)

    exception_type.__wrapped__ = original  # type: ignore[attr-defined]
    exception_type.__doc__ = original.__doc__
    return exception_type


def _is_litellm_error(exc: object) -> bool:
    import litellm

    return isinstance(exc, tuple(getattr(litellm, "LITELLM_EXCEPTION_TYPES", ())))


def _plain(refusal: PayiGuardError) -> PayiGuardError:
    """The payi_guard exception itself, out of an SDK's combined exception."""
    cls = next(
        c
        for c in type(refusal).__mro__
        if issubclass(c, PayiGuardError) and c.__module__ == PayiGuardError.__module__
    )
    if cls is type(refusal):
        return refusal
    plain: PayiGuardError = cls.__new__(cls, *refusal.args)
    plain.__dict__.update(refusal.__dict__)
    return plain


def _guard_http(http_client: Any, guard: Guard, options: MeterOptions, source: str) -> None:
    from payi_guard.meter.clients import install_meter

    install_meter(
        http_client, guard, options, _factory(guard, options), source=source, sdk="litellm"
    )


def http_client_of(handler: Any) -> Any:
    """The httpx client of a LiteLLM ``HTTPHandler`` / ``AsyncHTTPHandler``."""
    return getattr(handler, "_client", None)


def wrap(guard: Guard, handler: Any, options: MeterOptions) -> None:
    """Guard one LiteLLM ``HTTPHandler`` / ``AsyncHTTPHandler`` (passed as ``client=``).

    LiteLLM itself has no client object: ``instrument()`` is how its calls are metered.
    """
    http_client = http_client_of(handler)
    if http_client is None:
        raise TypeError(
            f"cannot guard {type(handler).__name__}: pass a LiteLLM HTTPHandler or "
            "AsyncHTTPHandler, or call guard.instrument() to meter every LiteLLM call"
        )
    global _wrapped
    _guard_http(http_client, guard, options, "wrap")
    _wrapped = True
    _install_exception_hook()


def _on_first_use(http_client: Any) -> None:
    from payi_guard.meter.clients import installed_source, instrumenting

    if http_client is None or installed_source(http_client) is not None:
        return
    current = instrumenting()
    if current is not None:
        _guard_http(http_client, current[0], current[1], "instrument")


def _guarding_post(original: Callable[..., Any]) -> Callable[..., Any]:
    def post(self: Any, *args: Any, **kwargs: Any) -> Any:
        _on_first_use(self.client)
        return original(self, *args, **kwargs)

    post.__wrapped__ = original  # type: ignore[attr-defined]
    post.__doc__ = original.__doc__
    return post


def _guarding_single(original: Callable[..., Any]) -> Callable[..., Any]:
    # After a connection error LiteLLM resends once through a fresh client.
    def single_connection_request(self: Any, *args: Any, **kwargs: Any) -> Any:
        _on_first_use(kwargs.get("client"))
        return original(self, *args, **kwargs)

    single_connection_request.__wrapped__ = original  # type: ignore[attr-defined]
    single_connection_request.__doc__ = original.__doc__
    return single_connection_request


_patches = Patches()
_hook = Patches()
_wrapped = False


def _install_exception_hook() -> None:
    if _hook.start():
        _hook.when_imported(
            "litellm.main",
            lambda module: _hook.replace(module, "exception_type", _hooked_exception_type),
        )


def _patch_handlers(module: ModuleType) -> None:
    _patches.replace(module.HTTPHandler, "post", _guarding_post)
    _patches.replace(module.AsyncHTTPHandler, "post", _guarding_post)
    _patches.replace(module.AsyncHTTPHandler, "single_connection_request", _guarding_single)


def instrument(guard: Guard, options: MeterOptions) -> None:
    """Guard LiteLLM's HTTP handlers on first use and map refusals to LiteLLM's errors.

    The patches wait until LiteLLM is imported: importing it takes seconds, so
    ``instrument`` never does.
    """
    if _patches.start():
        _patches.when_imported("litellm.llms.custom_httpx.http_handler", _patch_handlers)
    _install_exception_hook()


def uninstrument(guard: Guard) -> None:
    """Restore LiteLLM's handlers, and its error mapping unless a handler was wrapped."""
    _patches.undo()
    if not _wrapped:
        _hook.undo()


def guarded_by(client: Any) -> Guard | None:
    """Handlers are looked up through their httpx client (see :func:`http_client_of`)."""
    return None
