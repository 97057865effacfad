"""How a refused call reaches the caller: one exception, no SDK retry, provider untouched.

The guarding transport decides before sending; what the caller then sees depends on the
client:

* **OpenAI / Anthropic SDK clients** (wrapped or instrumented). The transport answers
  with a synthesized HTTP response that never left the process: status 429 for a budget
  refusal (:class:`~payi_guard.BudgetExceeded` and its subclass
  :class:`~payi_guard.UserRequired`), 403 for
  :class:`~payi_guard.UnknownModelRefused`, 503 for
  :class:`~payi_guard.StorageError` (fail closed), 400 for any other
  :class:`~payi_guard.PayiGuardError` (an undefined ``limit_ids`` entry). Every one
  carries ``x-should-retry: false``, which both SDKs obey before their status-based
  retry rules, so the SDK does not retry. The refusal itself travels in the response's
  ``extensions`` (a remote server cannot forge it), and a hook on the SDK's
  ``BaseClient._make_status_error_from_response`` turns the SDK's own status error into
  an exception whose class inherits **both** the SDK class the SDK chose
  (``openai.RateLimitError``, ``anthropic.PermissionDeniedError``, ...) and the
  payi_guard class (``BudgetExceeded`` with ``user_id``, ``limit``, ``retry_after``).

  Why not raise from the transport: openai 1.x/2.x wrap any exception a transport
  raises (other than their own) in ``APIConnectionError`` and retry it; openai 3.x and
  anthropic 2.x let their own error classes through but would still need one to be
  built from a response. A synthesized response is honoured the same way by every SDK
  version, and the hook is inert for any response the guard did not make.

* **Plain httpx / httpx2 clients** (``refusal="raise"``, the default): the transport
  raises the payi_guard exception itself; httpx passes it through unchanged.
  ``refusal="response"`` instead returns the synthesized response with an
  ``application/problem+json`` body, for code that prefers to handle statuses.

In every case :func:`payi_guard.is_refusal` is true for budget refusals and the provider
never sees the request.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

from payi_guard.exceptions import (
    BudgetExceeded,
    ConfigError,
    PayiGuardError,
    StorageError,
    UnknownModelRefused,
    UserRequired,
)

__all__ = [
    "REFUSAL_EXTENSION",
    "REFUSAL_HEADER",
    "install_status_error_hook",
    "refusal_kind",
    "refusal_of",
    "refusal_response",
    "refusal_status",
    "remove_status_error_hook",
    "sdk_refusal",
]

REFUSAL_EXTENSION: Final = "payi_guard.refusal"
"""Key of the synthesized response's ``extensions`` entry holding the refusal."""

REFUSAL_HEADER: Final = "x-payi-guard-refusal"
"""Header naming the refusal kind on a synthesized response (informative only)."""

_PROBLEM_TYPE_BASE: Final = "urn:payi-guard:"


def refusal_kind(exc: PayiGuardError) -> str:
    """Name the kind of refusal: ``budget_exceeded``, ``user_required``, ...

    Args:
        exc: the error the guard raised before sending.

    Returns:
        ``user_required``, ``budget_exceeded``, ``unknown_model``, ``storage_error``,
        ``config_error`` or ``refused``.
    """
    if isinstance(exc, UserRequired):
        return "user_required"
    if isinstance(exc, BudgetExceeded):
        return "budget_exceeded"
    if isinstance(exc, UnknownModelRefused):
        return "unknown_model"
    if isinstance(exc, StorageError):
        return "storage_error"
    if isinstance(exc, ConfigError):
        return "config_error"
    return "refused"


def refusal_status(exc: PayiGuardError) -> int:
    """The HTTP status a synthesized refusal carries (429, 403, 503 or 400)."""
    if isinstance(exc, BudgetExceeded):
        return 429
    if isinstance(exc, UnknownModelRefused):
        return 403
    if isinstance(exc, StorageError):
        return 503
    return 400


def _message(exc: PayiGuardError) -> str:
    return exc.describe() if isinstance(exc, BudgetExceeded) else str(exc)


def _sdk_body(exc: PayiGuardError, kind: str) -> dict[str, Any]:
    # Readable by both SDKs: OpenAI reads ``error.{message,type,code,param}``, Anthropic
    # ``type`` plus ``error.{type,message}``.
    return {
        "type": "error",
        "error": {"type": kind, "code": kind, "message": _message(exc), "param": None},
    }


def _problem_body(exc: PayiGuardError, kind: str, status: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": _PROBLEM_TYPE_BASE + kind,
        "title": kind.replace("_", " ").capitalize(),
        "status": status,
        "detail": _message(exc),
    }
    if isinstance(exc, BudgetExceeded):
        body["user_id"] = exc.user_id
        body["limit"] = exc.limit.as_dict()
        body["retry_after"] = exc.retry_after
    return body


def refusal_response(
    module: ModuleType, request: Any, exc: PayiGuardError, *, problem: bool = False
) -> Any:
    """Synthesize the response that stands for a refused call.

    Args:
        module: ``httpx`` or ``httpx2`` (the response is built with its classes).
        request: the request that was refused (set as the response's ``request``).
        exc: the refusal.
        problem: write an ``application/problem+json`` body (for plain clients) instead
            of the SDK error body.

    Returns:
        A ``module.Response`` with ``x-should-retry: false``, ``retry-after`` for budget
        refusals, :data:`REFUSAL_HEADER`, and the refusal in
        ``extensions[REFUSAL_EXTENSION]``.
    """
    kind = refusal_kind(exc)
    status = refusal_status(exc)
    body = _problem_body(exc, kind, status) if problem else _sdk_body(exc, kind)
    headers = {
        "content-type": "application/problem+json" if problem else "application/json",
        "x-should-retry": "false",
        REFUSAL_HEADER: kind,
    }
    if isinstance(exc, BudgetExceeded):
        headers["retry-after"] = str(exc.retry_after)
    return module.Response(
        status,
        headers=headers,
        content=json.dumps(body, separators=(",", ":")).encode("utf-8"),
        request=request,
        extensions={REFUSAL_EXTENSION: exc},
    )


def refusal_of(response: Any) -> PayiGuardError | None:
    """Return the refusal a synthesized response stands for, or ``None`` for any other."""
    extensions = getattr(response, "extensions", None)
    if not isinstance(extensions, dict):
        return None
    refusal = extensions.get(REFUSAL_EXTENSION)
    return refusal if isinstance(refusal, PayiGuardError) else None


# -- SDK exceptions ---------------------------------------------------------------------

_mixed_lock = threading.Lock()
_mixed: dict[tuple[type[BaseException], type[PayiGuardError]], type[BaseException]] = {}


def _mixed_class(
    sdk_class: type[BaseException], refusal_class: type[PayiGuardError]
) -> type[BaseException]:
    key = (sdk_class, refusal_class)
    with _mixed_lock:
        cls = _mixed.get(key)
        if cls is None:
            name = f"{refusal_class.__name__}As{sdk_class.__name__}"
            cls = type(
                name,
                (sdk_class, refusal_class),
                {
                    "__module__": __name__,
                    "__qualname__": name,
                    "__doc__": (
                        f"A {refusal_class.__name__} refusal raised as the SDK's "
                        f"{sdk_class.__module__}.{sdk_class.__qualname__}."
                    ),
                },
            )
            _mixed[key] = cls
        return cls


def sdk_refusal(sdk_error: BaseException, refusal: PayiGuardError) -> BaseException:
    """Combine the SDK's status error and the guard's refusal into one exception.

    The result is an instance of a class inheriting both ``type(sdk_error)`` and
    ``type(refusal)``, carrying the attributes of both (the SDK's ``response``,
    ``status_code``, ``body``... and the refusal's ``user_id``, ``limit``,
    ``retry_after``...). No constructor runs, so it works whatever the SDK version's
    constructor signatures are.

    Args:
        sdk_error: the exception the SDK built from the synthesized response.
        refusal: the guard's exception.

    Returns:
        The combined exception (its message is the SDK's).
    """
    cls = _mixed_class(type(sdk_error), type(refusal))
    combined = cls.__new__(cls, *sdk_error.args)
    combined.__dict__.update(refusal.__dict__)
    combined.__dict__.update(sdk_error.__dict__)
    return combined


# -- the status-error hook ------------------------------------------------------------------

_HOOK_METHOD: Final = "_make_status_error_from_response"
_hooks_lock = threading.Lock()
_hooks: dict[str, tuple[type[Any], Callable[..., Any], set[str]]] = {}


def _hooked(original: Callable[..., Any]) -> Callable[..., Any]:
    def _make_status_error_from_response(self: Any, response: Any) -> Any:
        error = original(self, response)
        refusal = refusal_of(response)
        if refusal is None or isinstance(error, type(refusal)):
            return error
        return sdk_refusal(error, refusal)

    _make_status_error_from_response.__wrapped__ = original  # type: ignore[attr-defined]
    _make_status_error_from_response.__doc__ = original.__doc__
    return _make_status_error_from_response


def install_status_error_hook(sdk: str, owner: str) -> bool:
    """Make an SDK raise the combined refusal exceptions (idempotent, reference counted).

    Patches ``BaseClient._make_status_error_from_response`` of ``openai`` or
    ``anthropic`` once, whatever the number of owners; every client class of that SDK
    (Azure, Bedrock, ... included) goes through it.

    Args:
        sdk: ``"openai"`` or ``"anthropic"``.
        owner: who needs the hook (``"wrap"`` or ``"instrument"``); the hook stays until
            every owner removed it.

    Returns:
        True when the SDK is importable and hooked, False when it is not installed.
    """
    with _hooks_lock:
        entry = _hooks.get(sdk)
        if entry is not None:
            entry[2].add(owner)
            return True
        try:
            base_client: ModuleType = __import__(f"{sdk}._base_client", fromlist=["BaseClient"])
        except ImportError:
            return False
        cls: type[Any] = base_client.BaseClient
        original = cls.__dict__[_HOOK_METHOD]
        setattr(cls, _HOOK_METHOD, _hooked(original))
        _hooks[sdk] = (cls, original, {owner})
        return True


def remove_status_error_hook(sdk: str, owner: str) -> None:
    """Drop ``owner``'s claim on the hook; restore the SDK once no owner is left."""
    with _hooks_lock:
        entry = _hooks.get(sdk)
        if entry is None:
            return
        cls, original, owners = entry
        owners.discard(owner)
        if not owners:
            current = cls.__dict__.get(_HOOK_METHOD)
            if getattr(current, "__wrapped__", None) is original:
                setattr(cls, _HOOK_METHOD, original)
            # else: another library wrapped it after us; ours stays, inert for any
            # response the guard did not synthesize.
            del _hooks[sdk]
