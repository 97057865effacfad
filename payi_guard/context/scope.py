"""Attribution state: the snapshot type, the per-request scope and reading what applies.

:class:`Attribution` is what a GenAI call is charged to; ``track_context`` layers (see
:mod:`payi_guard.context.track`) and the request's :class:`RequestScope` (opened by the
middleware or :class:`request_scope`, filled by :func:`set_user`) make it up, and
:func:`get_context` merges them.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType, TracebackType
from typing import Any

from payi_guard.exceptions import NoRequestScope
from payi_guard.identity import normalize_user_id, org_of

__all__ = [
    "Attribution",
    "RequestScope",
    "check_tier",
    "current_request",
    "get_context",
    "request_scope",
    "request_user",
    "request_var",
    "set_user",
]

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

    __slots__ = ("_snapshot", "extra", "request_id", "source", "tier", "user_id")

    def __init__(self, user_id: str | None = None, request_id: str | None = None) -> None:
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
        checked = None if tier is None else check_tier(tier)
        with _WRITE_LOCK:
            self.user_id = normalized
            self.tier = checked
            self.source = source
        return normalized

    def claim(self, user_id: object, *, source: str, tier: str | None = None) -> str:
        """:meth:`set_user` for the code that opened this scope, before it is shared.

        The same checks and result, without the lock: nothing else can hold the scope
        yet (a middleware naming the user of the request it just opened).

        Raises:
            InvalidUserId: the id is not valid.
            TypeError: ``tier`` is neither a string nor ``None``.
        """
        normalized = normalize_user_id(user_id)
        self.tier = None if tier is None else check_tier(tier)
        self.user_id = normalized
        self.source = source
        return normalized

    def __repr__(self) -> str:
        return f"RequestScope(user_id={self.user_id!r}, request_id={self.request_id!r})"


_request: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "payi_guard_request", default=None
)

# Serialises set_user() writes, so the user, tier and source of a scope always come from
# one call. Shared by every scope: a write holds it for three stores, and a lock per
# request would cost more than all of them.
_WRITE_LOCK = threading.Lock()


def current_request() -> RequestScope | None:
    """Return the open :class:`RequestScope`, or ``None`` outside a request."""
    return _request.get()


def request_var() -> contextvars.ContextVar[RequestScope | None]:
    """The context variable that holds the open request scope (internal).

    What :class:`request_scope` sets and resets; a middleware keeps it and sets and
    resets it itself, once per request, without the context manager object.
    """
    return _request


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


def request_user() -> tuple[str | None, str | None] | None:
    """The request's ``(user_id, tier)`` when that is all the attribution here holds.

    That is: a request scope is open and no ``track_context``/``@track`` layer applies,
    so :func:`get_context` would return the request's user and tier (the tier only with
    a user), its request id, and nothing else. ``None`` otherwise: ask
    :func:`get_context`. For checks that need only the user (the early gate) and so can
    skip building the snapshot.
    """
    if _frames.get() is not _ROOT:
        return None
    scope = _request.get()
    if scope is None:
        return None
    user_id = scope.user_id
    return user_id, (scope.tier if user_id is not None else None)


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
        # The common case in a request (no track_context).
        snapshot = _request_attribution(user_id, request_id, tier if user_id is not None else None)
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


# The slot descriptors of Attribution: setting them directly is what its frozen
# dataclass __init__ does through object.__setattr__, without the per-field name lookups
# and the two default factories (tests check that every field is set, as the class does).
_slots = Attribution.__dict__
_set_user_id = _slots["user_id"].__set__
_set_account_name = _slots["account_name"].__set__
_set_use_case_name = _slots["use_case_name"].__set__
_set_use_case_id = _slots["use_case_id"].__set__
_set_use_case_version = _slots["use_case_version"].__set__
_set_use_case_step = _slots["use_case_step"].__set__
_set_limit_ids = _slots["limit_ids"].__set__
_set_request_properties = _slots["request_properties"].__set__
_set_use_case_properties = _slots["use_case_properties"].__set__
_set_request_id = _slots["request_id"].__set__
_set_tier = _slots["tier"].__set__


def _request_attribution(
    user_id: str | None, request_id: str | None, tier: str | None
) -> Attribution:
    """``Attribution(user_id=user_id, request_id=request_id, tier=tier)``, at half the cost."""
    snapshot: Attribution = object.__new__(Attribution)
    _set_user_id(snapshot, user_id)
    _set_account_name(snapshot, None)
    _set_use_case_name(snapshot, None)
    _set_use_case_id(snapshot, None)
    _set_use_case_version(snapshot, None)
    _set_use_case_step(snapshot, None)
    _set_limit_ids(snapshot, ())
    _set_request_properties(snapshot, _EMPTY)
    _set_use_case_properties(snapshot, _EMPTY)
    _set_request_id(snapshot, request_id)
    _set_tier(snapshot, tier)
    return snapshot
