"""Attribution context: who and what a GenAI call is charged to.

The API mirrors Pay-i's (``track_context``, ``@track``, the same keyword names) but the
state lives in :mod:`contextvars`, never in thread-locals, so concurrent asyncio tasks and
threads never see each other's user.

Nesting rules for :func:`track_context` and :func:`track`:

* ``None`` (or an omitted keyword) inherits the outer value;
* ``""``, ``[]`` and ``{}`` clear it;
* scalars: the inner value wins;
* ``limit_ids``: the ordered union, outer ids first, no duplicates;
* ``request_properties`` / ``use_case_properties``: merged, inner keys win.

A web request adds one more layer, a mutable :class:`RequestScope` opened by the
middleware (or :func:`request_scope`), that :func:`set_user` fills from anywhere inside
the request, thread pools included. The user an explicit ``track_context(user_id=...)``
names always wins over the request's user.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
from collections.abc import (
    AsyncGenerator,
    Callable,
    Generator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field, replace
from types import MappingProxyType, TracebackType
from typing import Any, ParamSpec, TypeVar, cast

from payi_guard.exceptions import NoRequestScope
from payi_guard.identity import DEFAULT_MAX_LENGTH, normalize_user_id, org_of
from payi_guard.threads import ContextThreadPoolExecutor, bind_context

__all__ = [
    "Attribution",
    "ContextThreadPoolExecutor",
    "RequestScope",
    "bind_context",
    "check_tier",
    "current_request",
    "get_context",
    "request_scope",
    "set_user",
    "track",
    "track_context",
]

P = ParamSpec("P")
R = TypeVar("R")

_EMPTY: Mapping[str, Any] = MappingProxyType({})

_SCALARS = (
    "user_id",
    "account_name",
    "use_case_name",
    "use_case_id",
    "use_case_version",
    "use_case_step",
)


@dataclass(frozen=True, slots=True)
class Attribution:
    """An immutable snapshot of the attribution in effect.

    Attributes:
        user_id: the user charged, or ``None`` when nothing names one yet.
        account_name: Pay-i account name.
        use_case_name: Pay-i use case name.
        use_case_id: Pay-i use case instance id.
        use_case_version: Pay-i use case version.
        use_case_step: Pay-i use case step.
        limit_ids: extra named limits the call is charged to, in order.
        request_properties: free-form properties of the request.
        use_case_properties: free-form properties of the use case.
        request_id: the id of the web request, when a request scope is open.
        tier: the tier the request named for its user (:func:`set_user`'s ``tier``);
            ``None`` when the user comes from ``track_context`` or no tier was named.
    """

    user_id: str | None = None
    account_name: str | None = None
    use_case_name: str | None = None
    use_case_id: str | None = None
    use_case_version: int | None = None
    use_case_step: str | None = None
    limit_ids: tuple[str, ...] = ()
    request_properties: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    use_case_properties: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)
    request_id: str | None = None
    tier: str | None = None

    @property
    def org_id(self) -> str | None:
        """The org of a composite ``org:user`` id, else ``None``."""
        return None if self.user_id is None else org_of(self.user_id)


@dataclass(frozen=True, slots=True)
class _Frame:
    """What ``track_context`` layers hold.

    The merged values, and whether the user was explicitly cleared (then the request's
    user does not show through either).
    """

    attribution: Attribution
    user_cleared: bool = False


_ROOT = _Frame(Attribution())
_frames: contextvars.ContextVar[_Frame] = contextvars.ContextVar(
    "payi_guard_attribution", default=_ROOT
)


class RequestScope:
    """The mutable per-request holder that middleware opens and :func:`set_user` fills.

    One object is shared by everything that runs inside the request, including code that
    runs in a thread pool on a copy of the request's context, so a user set there is seen
    by the request afterwards.

    Attributes:
        user_id: the request's user, or ``None`` until something names one.
        request_id: the request id (``X-Request-ID`` or generated).
        source: what named the user (``"scope"``, ``"resolver"``, ``"set_user"``, ...).
        tier: the user's tier named with it (``None``: the budgets file, ``tier_of`` or
            ``default`` decide).
        extra: free-form values an integration wants to keep for the request.
    """

    __slots__ = ("_lock", "_snapshot", "extra", "request_id", "source", "tier", "user_id")

    def __init__(self, user_id: str | None = None, request_id: str | None = None) -> None:
        self._lock = threading.Lock()
        self.user_id = user_id
        self.request_id = request_id
        self.source: str | None = "initial" if user_id is not None else None
        self.tier: str | None = None
        self.extra: dict[str, Any] = {}
        # (frame, user_id, request_id, tier, snapshot): get_context() is called on every
        # GenAI call and gate, so the merged snapshot is reused while nothing changed.
        self._snapshot: tuple[object, str | None, str | None, str | None, Attribution] | None = None

    def set_user(
        self, user_id: object, *, source: str = "set_user", tier: str | None = None
    ) -> str:
        """Validate and store the request's user (and tier); return the normalised id.

        Raises:
            InvalidUserId: the id is not valid.
            TypeError: ``tier`` is neither a string nor ``None``.
        """
        normalized = normalize_user_id(user_id)
        checked = check_tier(tier)
        with self._lock:
            self.user_id = normalized
            self.tier = checked
            self.source = source
        return normalized

    def __repr__(self) -> str:
        return f"RequestScope(user_id={self.user_id!r}, request_id={self.request_id!r})"


_request: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "payi_guard_request", default=None
)


def current_request() -> RequestScope | None:
    """Return the open :class:`RequestScope`, or ``None`` outside a request."""
    return _request.get()


class request_scope:
    """Open a request scope (the middleware does this for every request).

    Use it directly in workers, CLI jobs or tests that are not web requests but still
    want :func:`set_user` to work::

        with request_scope(request_id="job-42") as scope:
            set_user("acme:alice")

    Args:
        user_id: the initial user, if already known.
        request_id: an id to correlate log lines of this unit of work.

    Raises:
        InvalidUserId: ``user_id`` is not a valid user id.
    """

    __slots__ = ("_scope", "_token")

    def __init__(self, user_id: object = None, *, request_id: str | None = None) -> None:
        scope = RequestScope(request_id=request_id)
        if user_id is not None:
            scope.set_user(user_id, source="initial")
        self._scope = scope
        self._token: contextvars.Token[RequestScope | None] | None = None

    def __enter__(self) -> RequestScope:
        if self._token is not None:
            raise RuntimeError("a request_scope is entered once; open a new one instead")
        self._token = _request.set(self._scope)
        return self._scope

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _request.reset(self._token)


def check_tier(tier: object) -> str | None:
    """Return ``tier`` if it can name a tier: a string (``""`` is no tier) or ``None``.

    Whether the budgets file defines it is decided when limits are resolved (an unknown
    tier is logged and gets ``default``).

    Raises:
        TypeError: anything else (a tier is a name, never a list of limits).
    """
    if tier is None or tier == "":
        return None
    if isinstance(tier, str):
        return tier
    raise TypeError(
        f"a tier is the name of a tier under `tiers:` (a non-empty str) or None, "
        f"not {type(tier).__name__}"
    )


def set_user(user_id: object, *, tier: str | None = None) -> str:
    """Set the user of the current request (and their tier) from anywhere inside it.

    Works from async code, from sync code the framework runs in a thread pool (a sync
    FastAPI dependency) and from threads started with :func:`bind_context`.

    Args:
        user_id: the authenticated user (``str``, ``int`` or ``UUID``).
        tier: the user's plan, a tier under ``tiers:`` in the budgets file (from the
            app's own database, say). A user listed under ``users:`` keeps that entry;
            an unknown tier is logged and gets ``default``. Each call replaces both the
            user and the tier.

    Returns:
        The normalised user id.

    Raises:
        InvalidUserId: the id is not valid.
        TypeError: ``tier`` is neither a string nor ``None``.
        NoRequestScope: no request scope is open (add the middleware, or wrap the work in
            :func:`request_scope`; outside requests use :func:`track_context`).
    """
    scope = _request.get()
    if scope is None:
        raise NoRequestScope(
            "set_user() needs an open request scope: add GuardMiddleware / "
            "WSGIGuardMiddleware to the app, or wrap the work in "
            "payi_guard.context.request_scope(); outside a request use "
            "track_context(user_id=...)"
        )
    return scope.set_user(user_id, tier=tier)


def get_context() -> Attribution:
    """Return an immutable snapshot of the attribution in effect here.

    The user is the innermost ``track_context``/``@track`` user, else the request's user
    (middleware or :func:`set_user`), else ``None``. The request's tier comes along only
    with the request's user: a ``track_context`` user never inherits it.
    """
    frame = _frames.get()
    attribution = frame.attribution
    scope = _request.get()
    if scope is None:
        return attribution
    user_id, request_id, tier = scope.user_id, scope.request_id, scope.tier
    cached = scope._snapshot
    if (
        cached is not None
        and cached[0] is frame
        and cached[1] == user_id
        and cached[2] == request_id
        and cached[3] == tier
    ):
        return cached[4]
    if frame is _ROOT:
        # The common case in a request (no track_context): build directly, ~2x faster
        # than dataclasses.replace.
        snapshot = Attribution(
            user_id=user_id, request_id=request_id, tier=tier if user_id is not None else None
        )
    else:
        updates: dict[str, Any] = {}
        if attribution.user_id is None and not frame.user_cleared and user_id is not None:
            updates["user_id"] = user_id
            updates["tier"] = tier
        if request_id is not None:
            updates["request_id"] = request_id
        snapshot = replace(attribution, **updates) if updates else attribution
    scope._snapshot = (frame, user_id, request_id, tier, snapshot)
    return snapshot


def _normalize_limit_ids(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence):
        raise TypeError(f"limit_ids must be a list of strings, not {type(value).__name__}")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item:
            raise TypeError("limit_ids must contain non-empty strings")
        if item not in out:
            out.append(item)
    return tuple(out)


def _check_properties(name: str, value: object) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{name} keys must be strings")
    return value


@dataclass(frozen=True, slots=True)
class _Layer:
    """One validated set of keyword arguments, ready to merge onto a snapshot."""

    values: Mapping[str, Any]

    @classmethod
    def build(cls, kwargs: Mapping[str, Any]) -> _Layer:
        values: dict[str, Any] = {}
        for name, value in kwargs.items():
            if value is None:
                continue
            if name == "user_id":
                if callable(value):
                    raise TypeError(
                        "user_id must be a value, not a callable: a callable given to "
                        "@track is evaluated once, when the module is imported, so every "
                        "call would be charged to the same user. Name the user per request "
                        "with `with track_context(user_id=get_current_user_id()):` "
                        "or set_user() instead."
                    )
                values[name] = (
                    "" if value == "" else normalize_user_id(value, max_length=DEFAULT_MAX_LENGTH)
                )
            elif name == "use_case_version":
                if value != "" and (isinstance(value, bool) or not isinstance(value, int)):
                    raise TypeError(f"use_case_version must be an int, not {type(value).__name__}")
                values[name] = value
            elif name in _SCALARS:
                if not isinstance(value, str):
                    raise TypeError(f"{name} must be a string, not {type(value).__name__}")
                values[name] = value
            elif name == "limit_ids":
                values[name] = _normalize_limit_ids(value)
            elif name in ("request_properties", "use_case_properties"):
                values[name] = MappingProxyType(dict(_check_properties(name, value)))
            else:  # pragma: no cover - guarded by the keyword-only signatures
                raise TypeError(f"unknown attribution keyword {name!r}")
        return cls(values)

    def apply(self, frame: _Frame) -> _Frame:
        if not self.values:
            return frame
        base = frame.attribution
        user_cleared = frame.user_cleared
        if "user_id" in self.values:
            user_cleared = self.values["user_id"] == ""
        updates: dict[str, Any] = {}
        for name, value in self.values.items():
            if name in _SCALARS:
                updates[name] = None if value == "" else value
            elif name == "limit_ids":
                if not value:
                    updates[name] = ()
                else:
                    merged = list(base.limit_ids)
                    merged.extend(i for i in value if i not in merged)
                    updates[name] = tuple(merged)
            else:
                if not value:
                    updates[name] = _EMPTY
                else:
                    outer: Mapping[str, Any] = getattr(base, name)
                    updates[name] = MappingProxyType({**outer, **value})
        return _Frame(replace(base, **updates), user_cleared)


class track_context:
    """Attribute every GenAI call inside the block (sync ``with`` or ``async with``).

    Example::

        with track_context(user_id="acme:alice", use_case_name="summarize"):
            client.chat.completions.create(...)

    Args:
        user_id: the user charged (``str``, ``int`` or ``UUID``; ``org:user`` rolls up to
            the org).
        account_name: Pay-i account name.
        use_case_name: Pay-i use case name.
        use_case_id: Pay-i use case instance id.
        use_case_version: Pay-i use case version.
        use_case_step: Pay-i use case step.
        limit_ids: extra named limits to charge (merged with outer ones).
        request_properties: properties merged into the outer ones.
        use_case_properties: properties merged into the outer ones.

    Raises:
        InvalidUserId: ``user_id`` is not a valid user id.
        TypeError: a keyword has the wrong type, or ``user_id`` is a callable.
    """

    __slots__ = ("_layer", "_tokens")

    def __init__(
        self,
        *,
        user_id: object = None,
        account_name: str | None = None,
        use_case_name: str | None = None,
        use_case_id: str | None = None,
        use_case_version: int | None = None,
        use_case_step: str | None = None,
        limit_ids: Sequence[str] | None = None,
        request_properties: Mapping[str, Any] | None = None,
        use_case_properties: Mapping[str, Any] | None = None,
    ) -> None:
        self._layer = _Layer.build(
            {
                "user_id": user_id,
                "account_name": account_name,
                "use_case_name": use_case_name,
                "use_case_id": use_case_id,
                "use_case_version": use_case_version,
                "use_case_step": use_case_step,
                "limit_ids": limit_ids,
                "request_properties": request_properties,
                "use_case_properties": use_case_properties,
            }
        )
        self._tokens: list[contextvars.Token[_Frame]] = []

    def __enter__(self) -> Attribution:
        self._tokens.append(_frames.set(self._layer.apply(_frames.get())))
        return get_context()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _frames.reset(self._tokens.pop())

    async def __aenter__(self) -> Attribution:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)


def track(
    *,
    user_id: object = None,
    account_name: str | None = None,
    use_case_name: str | None = None,
    use_case_id: str | None = None,
    use_case_version: int | None = None,
    use_case_step: str | None = None,
    limit_ids: Sequence[str] | None = None,
    request_properties: Mapping[str, Any] | None = None,
    use_case_properties: Mapping[str, Any] | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so every GenAI call it makes carries static attribution.

    Works on sync, async, generator and async-generator functions; for generators the
    attribution is active during each step only, never between them.

    The keywords are those of :class:`track_context`. The values are fixed when the
    module is imported: name a per-request user with :class:`track_context` or
    :func:`set_user`, not here.

    Raises:
        TypeError: ``user_id`` is a callable (it would be evaluated once, at import), or
            another keyword has the wrong type.
        InvalidUserId: ``user_id`` is not a valid user id.
    """
    kwargs: dict[str, Any] = {
        "user_id": user_id,
        "account_name": account_name,
        "use_case_name": use_case_name,
        "use_case_id": use_case_id,
        "use_case_version": use_case_version,
        "use_case_step": use_case_step,
        "limit_ids": limit_ids,
        "request_properties": request_properties,
        "use_case_properties": use_case_properties,
    }
    _Layer.build(kwargs)  # validate now, at decoration time

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.isasyncgenfunction(fn):
            agen_fn = cast(Callable[..., AsyncGenerator[Any, Any]], fn)
            return cast(Callable[P, R], _tracked_async_generator(agen_fn, kwargs))

        if inspect.isgeneratorfunction(fn):
            gen_fn = cast(Callable[..., Generator[Any, Any, Any]], fn)

            @functools.wraps(fn)
            def gen_wrapper(*args: Any, **kw: Any) -> Generator[Any, Any, Any]:
                return (yield from _drive_generator(gen_fn(*args, **kw), kwargs))

            return cast(Callable[P, R], gen_wrapper)

        if inspect.iscoroutinefunction(fn):
            coro_fn = cast(Callable[..., Any], fn)

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kw: Any) -> Any:
                async with track_context(**kwargs):
                    return await coro_fn(*args, **kw)

            return cast(Callable[P, R], async_wrapper)

        @functools.wraps(fn)
        def sync_wrapper(*args: P.args, **kw: P.kwargs) -> R:
            with track_context(**kwargs):
                return fn(*args, **kw)

        return sync_wrapper

    return decorate


def _drive_generator(
    gen: Generator[Any, Any, Any], kwargs: Mapping[str, Any]
) -> Generator[Any, Any, Any]:
    """Run each step of ``gen`` inside the attribution, and nothing in between."""
    to_send: Any = None
    to_throw: BaseException | None = None
    while True:
        try:
            with track_context(**kwargs):
                if to_throw is not None:
                    exc, to_throw = to_throw, None
                    item = gen.throw(exc)
                else:
                    item = gen.send(to_send)
        except StopIteration as stop:
            return stop.value
        try:
            to_send = yield item
        except GeneratorExit:
            with track_context(**kwargs):
                gen.close()
            raise
        except BaseException as exc:  # forwarded into the wrapped generator
            to_throw = exc


def _tracked_async_generator(
    fn: Callable[..., AsyncGenerator[Any, Any]], kwargs: Mapping[str, Any]
) -> Callable[..., AsyncGenerator[Any, Any]]:
    """Async twin of :func:`_drive_generator`, forwarding ``asend`` and ``athrow``."""

    @functools.wraps(fn)
    async def forwarding(*args: Any, **kw: Any) -> AsyncGenerator[Any, Any]:
        agen = fn(*args, **kw)
        to_send: Any = None
        to_throw: BaseException | None = None
        try:
            while True:
                try:
                    async with track_context(**kwargs):
                        if to_throw is not None:
                            exc, to_throw = to_throw, None
                            item = await agen.athrow(exc)
                        else:
                            item = await agen.asend(to_send)
                except StopAsyncIteration:
                    return
                try:
                    to_send = yield item
                except GeneratorExit:
                    raise
                except BaseException as exc:  # forwarded into the wrapped generator
                    to_throw = exc
        finally:
            async with track_context(**kwargs):
                await agen.aclose()

    return forwarding
