"""The ASGI middleware: :class:`GuardMiddleware`.

A pure ASGI middleware (never Starlette's ``BaseHTTPMiddleware``, whose after-hook runs
before a streamed body ends): the request scope and the structlog binding stay in effect
until the app returns, i.e. after the last chunk of a streamed body was sent.

Ordering with Starlette's ``AuthenticationMiddleware``: the guard reads
``scope["user"]``, so authentication must run *before* it, i.e. be added *after* it
(``add_middleware`` puts each new middleware outside the previous ones)::

    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/api/*"])
    app.add_middleware(AuthenticationMiddleware, backend=TokenBackend())

In the wrong order the guard notices ``scope["user"]`` appearing inside it, logs one
``auth_middleware_order`` warning, and still charges GenAI calls made after that point
to the user, but the early gate of ``guarded_paths`` ran before the user was known.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send
from typing_extensions import Unpack

from payi_guard._ids import new_id
from payi_guard.context import RequestScope
from payi_guard.context.scope import request_var
from payi_guard.engine import Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    DuplicateUserHeader,
    InvalidUserId,
    StorageError,
)
from payi_guard.identity import KNOWN_USER_IDS, normalize_user_id
from payi_guard.web.asgi_send import GuardedSend, encode
from payi_guard.web.core import WebCore
from payi_guard.web.gate import store_gate_headers
from payi_guard.web.identify import (
    BOUND_KEY,
    LOGGED_KEY,
    ORDER_EVENT,
    pseudonym_of,
    rebind_user,
    request_id_of,
    split_user,
    structlog_vars,
    user_of_scope,
)
from payi_guard.web.options import WebOptionArgs
from payi_guard.web.problem import Problem

__all__ = ["GuardMiddleware"]

_REQUEST = request_var()
_UNREAD: Any = object()
"""The quick path did not read ``scope["user"]``."""

UserResolver = Callable[[Request], Any]
"""A resolver: given the Starlette ``Request``, return the user id, a ``(user_id, tier)``
pair, or ``None`` (may be async)."""


class _WatchedScope(dict[str, Any]):
    """A copy of the ASGI scope that mirrors writes back and reports ``scope["user"]``.

    Used only when ``scope["user"]`` is missing as the request enters the guard, to
    notice an authentication middleware that runs inside it. Every write is applied to
    the original scope too, so middleware outside the guard still sees what the app
    stores in it (route, endpoint, ...).
    """

    __slots__ = ("_on_user", "_origin")

    def __init__(self, origin: MutableMapping[str, Any], on_user: Callable[[Any], None]) -> None:
        super().__init__(origin)
        self._origin = origin
        self._on_user = on_user

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self._origin[key] = value
        if key == "user":
            self._on_user(value)

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        self._origin.pop(key, None)

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Update both copies (and report a ``user``)."""
        other = dict(*args, **kwargs)
        super().update(other)
        self._origin.update(other)
        if "user" in other:
            self._on_user(other["user"])

    def setdefault(self, key: str, default: Any = None) -> Any:
        """``dict.setdefault`` applied to both copies."""
        if key in self:
            return self[key]
        self[key] = default
        return default

    def pop(self, key: str, *default: Any) -> Any:
        """``dict.pop`` applied to both copies."""
        self._origin.pop(key, None)
        return super().pop(key, *default)


class GuardMiddleware:
    """Attribute every GenAI call of a request to its user; gate guarded paths early.

    For each HTTP request it opens a :func:`~payi_guard.context.request_scope` and binds
    ``user_id`` and ``request_id`` in structlog's context variables for the whole
    request, streamed body included (undone at the end); finds the user (see
    :mod:`payi_guard.web.identify` for the order of sources); gates ``guarded_paths`` before
    the app runs; turns a ``BudgetExceeded`` escaping the app into the same refusal
    response; and echoes the request id. WebSocket and lifespan scopes pass through
    untouched.

    Works with ``app.add_middleware(GuardMiddleware, guard=guard, ...)``.

    Args:
        app: the ASGI application.
        guard: the :class:`~payi_guard.engine.Guard` that holds the budgets.
        user: a resolver given the Starlette ``Request`` (built only when a resolver is
            set; the body is not available) that returns the user id, a
            ``(user_id, tier)`` pair (the user's plan, from the app's database) or
            ``None``; sync or async. A sync resolver runs on the event loop: keep it quick.
        session_id: for the ``session`` anonymous strategy: given the ``Request``,
            return the session/device id (sync or async). Without it, the id the guard
            keeps in Starlette's signed session (``SessionMiddleware``, added after the
            guard so it runs outside it); without either, the shared anonymous bucket.
        **options: the shared options of :class:`~payi_guard.web.options.WebOptions`
            (``guarded_paths``, ``trust_user_header``, ``user_header``, ``block_status``,
            ``gate``, ``budget_headers``, ``on_invalid_user``, ``request_id_header``,
            ``www_authenticate``), each documented there.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        guard: Guard,
        user: UserResolver | None = None,
        session_id: Callable[[Request], Any] | None = None,
        **options: Unpack[WebOptionArgs],
    ) -> None:
        self.app = app
        self.core = WebCore(guard, user=user, session_id=session_id, **options)
        user_header = self.core.options.user_header
        request_id_header = self.core.options.request_id_header
        self._user_key = user_header.lower().encode("latin-1")
        self._request_id_key = (
            request_id_header.lower().encode("latin-1") if request_id_header else None
        )
        self._warned_order = False
        opts = self.core.options
        self._sync_identify = opts.user is None and opts.session_id is None
        # structlog's own variables of ``user_id`` and ``request_id``, set per request.
        self._user_var, self._request_id_var = structlog_vars()
        pseudonymizer = guard.pseudonymizer
        self._logged = None if pseudonymizer is None else pseudonym_of(pseudonymizer)
        self._gate = self.core.gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id_raw = user_raw = None
        request_id_key, user_key = self._request_id_key, self._user_key
        for name, value in scope.get("headers", ()):
            if name == request_id_key:
                request_id_raw = value
            elif name == user_key:
                # Joined, so that the identifier sees (and refuses) a repeated header.
                user_raw = value if user_raw is None else user_raw + b"," + value
        request_id = (
            new_id() if request_id_raw is None else request_id_of(request_id_raw.decode("latin-1"))
        )
        # What ``with request_scope(request_id=...)`` does, without its object.
        rs = RequestScope(None, request_id)
        scope_token = _REQUEST.set(rs)
        # The request id is bound first: lines logged while the user is identified (an
        # invalid id refused with a 400) carry it, as the 400's body does.
        request_id_var = self._request_id_var
        request_token = request_id_var.set(request_id)
        try:
            if self._sync_identify:
                problem = None
                # The usual request: no user header, an authenticated user whose id was
                # seen before (valid as it is). Anything else: _identify_sync().
                scoped: object = _UNREAD
                if user_raw is None:
                    try:
                        scoped = user_of_scope(scope.get("user"))
                    except InvalidUserId as exc:
                        scoped = exc  # reported by _identify_sync()
                if type(scoped) is str and scoped in KNOWN_USER_IDS:
                    rs.user_id = scoped
                    rs.source = "scope"
                else:
                    # The user object is read once per request: what it gave is passed on.
                    problem = self._identify_sync(scope, rs, user_raw, scoped)
            else:
                problem = await self._identify(scope, rs, user_raw)
            rs.extra[BOUND_KEY] = True  # mark_bound(rs), inlined
            # bind_request() inlined: set/reset with tokens, so every write is undone
            # exactly, a user rebound later in the request included.
            user_var = self._user_var
            logged = self._logged
            if logged is None:
                user_token = user_var.set(rs.user_id)
            else:  # the guard pseudonymises: so do the request's log lines
                rs.extra[LOGGED_KEY] = logged
                user_token = user_var.set(None if rs.user_id is None else logged(rs.user_id))
            try:
                # One coroutine for the whole request: serving is inlined here.
                extra: list[tuple[bytes, bytes]] = (
                    [] if request_id_key is None else [(request_id_key, request_id.encode())]
                )
                # CORS preflights never make GenAI calls, and must not need a user.
                gate = self._gate
                path = scope["path"]
                if scope.get("root_path"):
                    path = _route_path(path, scope["root_path"])
                guarded = gate.decided.get(path)  # gate.guarded(path), its usual answer
                if guarded is None:
                    guarded = gate.guarded(path)
                if not guarded and path is not scope["path"]:
                    guarded = gate.guarded(scope["path"])  # a glob with the prefix in it
                guarded = guarded and scope["method"] != "OPTIONS"
                if problem is None and guarded:
                    # The cache gate does no I/O: no coroutine for it.
                    result = gate.check() if gate.sync else await gate.acheck()
                    problem = result.problem
                    if problem is None and result.headers:
                        store_gate_headers(rs, result.headers)
                response = GuardedSend(send, extra, guarded, (gate, rs))
                if problem is not None:
                    await self._send_problem(response, problem)
                    return
                app_scope: Scope = scope
                if "user" not in scope:
                    app_scope = _WatchedScope(scope, lambda user: self._late_user(rs, user))
                try:
                    await self.app(app_scope, receive, response.send_message)
                except Exception as exc:
                    if not await self._failed(exc, response, request_id):
                        await response.flush_errors()
                        raise
                    return
                if response.errors is not None:
                    await response.flush_errors()
                # An app that ended without a body message still gets its start sent.
                if response.held is not None:
                    await response.release()
            finally:
                user_var.reset(user_token)
        finally:
            request_id_var.reset(request_token)
            _REQUEST.reset(scope_token)

    async def _failed(self, exc: Exception, response: GuardedSend, request_id: str) -> bool:
        """The app raised ``exc``: answer the refusal it stands for (True), or not (False).

        False: the caller re-raises ``exc``.
        """
        core = self.core
        if not response.started:
            cause = _error_in(exc, (BudgetExceeded, InvalidUserId, StorageError))
            problem = None if cause is None else core.problems.problem_for(cause)
            if problem is None:
                return False
            # A held start is dropped; the RateLimit headers describe a success, and a
            # refusal brings its own.
            response.discard()
            response.rated = None
            await self._send_problem(response, problem)
            return True
        refusal = _error_in(exc, (BudgetExceeded,))
        if not isinstance(refusal, BudgetExceeded):
            return False
        core.refused_after_start(refusal, request_id)
        if not response.finished:
            await response.send_message(
                {"type": "http.response.body", "body": b"", "more_body": False}
            )
        return True

    @staticmethod
    async def _send_problem(response: GuardedSend, problem: Problem) -> None:
        await response.send_message(
            {
                "type": "http.response.start",
                "status": problem.status,
                "headers": encode(problem.all_headers()),
            }
        )
        await response.send_message({"type": "http.response.body", "body": problem.body})
        await response.flush_errors()  # the guard's own 503: sent, never held

    def _identify_sync(
        self,
        scope: Scope,
        rs: RequestScope,
        user_raw: bytes | None,
        scoped: object = _UNREAD,
    ) -> Problem | None:
        """:meth:`_identify` without a ``user=`` resolver or ``session_id=`` callable.

        Nothing to await then: no coroutine per request. ``scoped`` is what
        :func:`user_of_scope` already gave (or raised) for this request, if it was read.
        """
        identify = self.core.identify
        header = None
        if user_raw is not None:
            try:
                # Read (and refused when repeated) first, used last: the app's user wins.
                header = identify.header_user(user_raw.decode("latin-1"))
            except DuplicateUserHeader as exc:
                return identify.invalid_user(exc, "header")
        value = scoped
        if value is _UNREAD:
            try:
                value = user_of_scope(scope.get("user"))
            except InvalidUserId as exc:
                value = exc
        if isinstance(value, InvalidUserId):  # from the user object: labelled as _identify does
            return identify.invalid_user(value, "resolver")
        if value is not None:
            # rs.claim(value, source="scope") inlined: the scope is new (no tier) and
            # not shared yet (no lock).
            try:
                rs.user_id = normalize_user_id(value)
            except InvalidUserId as exc:
                return identify.invalid_user(exc, "scope")
            rs.source = "scope"
            return None
        if header is not None:
            return identify.assign_user(rs, header, "header")
        if identify.wants_session():
            # Starlette's SessionMiddleware (signed), when it runs outside the guard.
            identify.set_session(rs, identify.stored_session(scope.get("session")))
        return None

    async def _identify(
        self,
        scope: Scope,
        rs: RequestScope,
        user_raw: bytes | None,
    ) -> Problem | None:
        core = self.core
        request: Request | None = None
        try:
            # Read (and refused when repeated) first, used last: the app's user wins.
            header = (
                None if user_raw is None else core.identify.header_user(user_raw.decode("latin-1"))
            )
        except DuplicateUserHeader as exc:
            return core.identify.invalid_user(exc, "header")
        try:
            resolver = core.options.user
            if resolver is not None:
                request = Request(scope)
                value, tier = split_user(await _maybe_await(resolver(request)))
                if value is not None:
                    return core.identify.assign_user(rs, value, "resolver", tier)
            value = user_of_scope(scope.get("user"))
            if value is not None:
                return core.identify.assign_user(rs, value, "scope")
        except InvalidUserId as exc:  # raised by the resolver itself
            return core.identify.invalid_user(exc, "resolver")
        if header is not None:
            return core.identify.assign_user(rs, header, "header")
        if core.identify.wants_session():
            session_id = core.options.session_id
            if session_id is not None:
                session = await _maybe_await(session_id(request or Request(scope)))
            else:
                # Starlette's SessionMiddleware (signed), when it runs outside the guard.
                session = core.identify.stored_session(scope.get("session"))
            core.identify.set_session(rs, session)
        return None

    def _late_user(self, rs: RequestScope, user: object) -> None:
        """``scope["user"]`` was set inside the guard: warn once, still use the user."""
        if not self._warned_order:
            self._warned_order = True
            self.core.log.warning(
                ORDER_EVENT,
                detail=(
                    "scope['user'] was set by a middleware that runs inside GuardMiddleware, "
                    "so guarded paths were gated before the user was known. Add "
                    "AuthenticationMiddleware after GuardMiddleware: "
                    "app.add_middleware(GuardMiddleware, ...) first, then "
                    "app.add_middleware(AuthenticationMiddleware, ...)"
                ),
            )
        if rs.source is not None and rs.source != "header":
            return  # the app's authenticated user wins over the trusted header only
        value = user_of_scope(user)
        if value is None:
            return
        try:
            user_id = rs.set_user(value, source="scope")
        except InvalidUserId as exc:
            if self.core.identify.invalid_user(exc, "scope") is not None:
                raise
            return
        rebind_user(user_id)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _route_path(path: str, root_path: str) -> str:
    """``path`` without the ``root_path`` it starts with, as the app's routes see it.

    The prefix of a ``Mount`` or of a proxy (``--root-path``), as Starlette's
    ``get_route_path`` strips it.
    """
    if not path.startswith(root_path):
        return path
    rest = path[len(root_path) :]
    return rest if rest.startswith("/") else "/" if not rest else path


def _error_in(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The error of one of ``kinds`` behind ``exc``: itself, its cause, or a group's.

    Starlette's exception middleware turns a handled exception raised after the response
    started (from its point of view: the guard may still hold that start) into
    ``RuntimeError(...) from exc``; a task group raises its tasks' errors in a group.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kinds):
            return current
        seen.add(id(current))
        group = getattr(current, "exceptions", None)  # an exception group (Python 3.11+)
        if isinstance(group, (tuple, list)):
            # Calls made in a task group (asyncio.TaskGroup, anyio): the first of them.
            for inner in group:
                found = _error_in(inner, kinds) if isinstance(inner, BaseException) else None
                if found is not None:
                    return found
        current = current.__cause__
    return None
