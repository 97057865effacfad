"""``settings.PAYI_GUARD``: reading and checking it, and the one Guard it builds.

::

    PAYI_GUARD = {
        "config": BASE_DIR / "budgets.yaml",   # or a dict; or "guard": "myapp.llm.guard"
        "guarded_paths": ["/api/*"],
        "user": "myapp.auth.guard_user_id",      # optional: (request) -> id or (id, tier)
    }

Django is imported only when a function here is called, never when the module is.
"""

from __future__ import annotations

import importlib
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from payi_guard.engine import Guard
from payi_guard.exceptions import MissingDependency
from payi_guard.web.options import WebOptionArgs, WebOptions

__all__ = ["SETTING", "GuardSettings", "check_order", "get_guard", "read_settings"]

SETTING = "PAYI_GUARD"
"""The name of the Django setting."""

_WEB_KEYS = frozenset(WebOptionArgs.__annotations__)
_OWN_KEYS = frozenset({"config", "guard", "storage", "user", "session_id"})
_KEYS = _OWN_KEYS | _WEB_KEYS


def django_module(name: str) -> Any:
    """Import a Django module, or raise ``MissingDependency`` naming the ``django`` extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if exc.name is not None and (exc.name == "django" or exc.name.startswith("django.")):
            raise MissingDependency("django", "django") from exc
        raise


def _improperly_configured(message: str) -> Exception:
    error: type[Exception] = django_module("django.core.exceptions").ImproperlyConfigured
    return error(f"settings.{SETTING}: {message}")


@dataclass(frozen=True, slots=True)
class GuardSettings:
    """``settings.PAYI_GUARD``, checked.

    Attributes:
        config: the budgets YAML path or dict (``config``), or ``None``.
        guard: a ``Guard``, a callable returning one, or the dotted path of either
            (``guard``), or ``None``. Exactly one of ``config`` and ``guard`` is set.
        storage: a storage URI that replaces the one ``config`` names (``storage``; e.g.
            from the environment), or ``None``. Only with ``config``.
        user: the resolver named by ``user`` (``(request) -> user id or None``, sync or
            async), or ``None`` for the default, ``str(request.user.pk)``.
        session_id: the resolver named by ``session_id`` (``(request) -> session id or
            None``) for the ``session`` anonymous strategy, or ``None`` for Django's own
            session.
        web: the other options, passed on to :class:`~payi_guard.web.options.WebOptions`.
    """

    config: str | os.PathLike[str] | Mapping[str, Any] | None
    guard: object
    storage: str | None
    user: Callable[[Any], Any] | None
    session_id: Callable[[Any], Any] | None
    web: WebOptionArgs


def _callable_setting(settings: Mapping[str, Any], key: str) -> Callable[[Any], Any] | None:
    value = settings.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        import_string = django_module("django.utils.module_loading").import_string
        try:
            value = import_string(value)
        except ImportError as exc:
            raise _improperly_configured(
                f"{key!r} names {value!r}, which cannot be imported: {exc}"
            ) from exc
    if not callable(value):
        raise _improperly_configured(
            f"{key!r} must be the dotted path of a callable taking the request, "
            f"not {type(value).__name__}"
        )
    return cast(Callable[[Any], Any], value)


def read_settings() -> GuardSettings:
    """Read and check ``settings.PAYI_GUARD``.

    Returns:
        The checked settings (the guard itself is built by :func:`get_guard`).

    Raises:
        ImproperlyConfigured: the setting is missing, has an unknown key, names neither
            or both of ``config`` and ``guard``, or an option is invalid.
        MissingDependency: Django is not installed.
    """
    settings = django_module("django.conf").settings
    raw = getattr(settings, SETTING, None)
    if raw is None:
        raise _improperly_configured(
            "is missing: add PAYI_GUARD = {'config': BASE_DIR / 'budgets.yaml'} to the "
            "settings (see the payi_guard README, section Django)"
        )
    if not isinstance(raw, Mapping):
        raise _improperly_configured(f"must be a dict, not {type(raw).__name__}")
    if "session_cookie" in raw:
        raise _improperly_configured(
            "'session_cookie' does not apply to Django: the session strategy uses "
            "Django's own session (request.session); name a 'session_id' callable to "
            "use another id"
        )
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise _improperly_configured(
            f"unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
            f"{', '.join(sorted(_KEYS))}"
        )
    has_config, has_guard = raw.get("config") is not None, raw.get("guard") is not None
    if has_config == has_guard:
        raise _improperly_configured(
            "set exactly one of 'config' (the budgets YAML path, or a dict) and 'guard' "
            "(the dotted path of a Guard, or of a callable returning one)"
        )
    config = raw.get("config")
    if has_config and not isinstance(config, (str, os.PathLike, Mapping)):
        raise _improperly_configured(
            f"'config' must be a path or a dict, not {type(config).__name__}"
        )
    storage = raw.get("storage")
    if storage is not None and (not isinstance(storage, str) or not has_config):
        raise _improperly_configured(
            "'storage' must be a storage URI string, and goes with 'config' (a 'guard' "
            "names its own store)"
        )
    web = cast(WebOptionArgs, {key: raw[key] for key in _WEB_KEYS if key in raw})
    try:
        WebOptions(**web)
    except (TypeError, ValueError) as exc:
        raise _improperly_configured(str(exc)) from exc
    return GuardSettings(
        config=config,
        guard=raw.get("guard"),
        storage=storage,
        user=_callable_setting(raw, "user"),
        session_id=_callable_setting(raw, "session_id"),
        web=web,
    )


_OWN_PATHS = frozenset(
    {"payi_guard.django.GuardMiddleware", "payi_guard.django.middleware.GuardMiddleware"}
)
_AUTH_PATH = "django.contrib.auth.middleware.AuthenticationMiddleware"


def check_order(has_resolver: bool) -> None:
    """Refuse ``MIDDLEWARE`` that lists ``AuthenticationMiddleware`` after the guard.

    The guard reads ``request.user``, which ``AuthenticationMiddleware`` sets: listed
    after the guard it runs later, and every request would look anonymous. Not checked
    when a ``user`` callable names the user instead.

    Raises:
        ImproperlyConfigured: the order is wrong.
    """
    if has_resolver:
        return
    middleware = list(getattr(django_module("django.conf").settings, "MIDDLEWARE", None) or ())
    ours = [i for i, path in enumerate(middleware) if path in _OWN_PATHS]
    auth = [i for i, path in enumerate(middleware) if path == _AUTH_PATH]
    if ours and auth and min(auth) > min(ours):
        error: type[Exception] = django_module("django.core.exceptions").ImproperlyConfigured
        raise error(
            f"MIDDLEWARE lists {_AUTH_PATH!r} after {middleware[min(ours)]!r}: move the "
            "guard after it, so that request.user is known when the guard reads it"
        )


def _build(settings: GuardSettings) -> Guard:
    if isinstance(settings.config, Mapping):
        return Guard(config=dict(settings.config), storage=settings.storage)
    if settings.config is not None:
        return Guard.from_yaml(settings.config, storage=settings.storage)
    value = settings.guard
    if isinstance(value, str):
        import_string = django_module("django.utils.module_loading").import_string
        try:
            value = import_string(value)
        except ImportError as exc:
            raise _improperly_configured(f"'guard' cannot be imported: {exc}") from exc
    guard = value if isinstance(value, Guard) else value() if callable(value) else value
    if not isinstance(guard, Guard):
        raise _improperly_configured(
            f"'guard' must name a payi_guard Guard or a callable returning one, "
            f"not {type(guard).__name__}"
        )
    return guard


class _Holder:
    """The process's guard, built on first use; forgotten when the setting changes."""

    lock = threading.Lock()
    guard: Guard | None = None
    listening = False


def _forget(*, setting: str, **kwargs: Any) -> None:
    if setting == SETTING:
        with _Holder.lock:
            _Holder.guard = None


def get_guard() -> Guard:
    """Return the Guard that ``settings.PAYI_GUARD`` describes, one per process.

    The middleware uses this guard, and views wrap their GenAI clients with it::

        from payi_guard.django import get_guard

        llm = get_guard().wrap(openai.OpenAI())

    Built on the first call (a budgets file is read then); Django's
    ``override_settings`` of ``PAYI_GUARD`` makes the next call build a new one.

    Returns:
        The guard.

    Raises:
        ImproperlyConfigured: ``settings.PAYI_GUARD`` is missing or invalid.
        ConfigError: the budgets file or dict is invalid (the message names the line).
        MissingDependency: Django is not installed.
    """
    guard = _Holder.guard
    if guard is not None:
        return guard
    with _Holder.lock:
        if _Holder.guard is None:
            if not _Holder.listening:
                signals = django_module("django.core.signals")
                signals.setting_changed.connect(_forget, dispatch_uid="payi_guard.django")
                _Holder.listening = True
            _Holder.guard = _build(read_settings())
        return _Holder.guard
