"""Who a request is for: user sources, invalid ids, anonymous sessions, request ids.

Where the user of a request comes from, in this order (the first source that names a
user wins; :func:`~payi_guard.set_user` later in the request always overrides):

1. the ``user=`` resolver given to the middleware;
2. ASGI ``scope["user"]`` when it is authenticated (Starlette's
   ``AuthenticationMiddleware``, which must run *outside* the guard middleware);
3. the ``xProxy-User-ID`` header, only with ``trust_user_header=True``;
4. :func:`~payi_guard.set_user` (the FastAPI dependency, any code inside the request);
5. Flask: the :class:`payi_guard.flask.PayiGuard` extension in ``before_request``.

A resolver (and Flask's ``user=`` callable, Django's ``PAYI_GUARD["user"]``) returns the
user id, or a ``(user_id, tier)`` pair naming the user's plan too (:func:`split_user`);
the tier is the request's, as with ``set_user(user_id, tier=...)``.

One rule everywhere: the app's authenticated user wins over the header (sources 4 and
5 run later and replace a header's user), and a trusted header that comes more than
once, or lists several users, is answered 400 whoever the request is for, whatever
``on_invalid_user`` says (:class:`~payi_guard.exceptions.DuplicateUserHeader`).

The ``session`` anonymous strategy charges a request that names no user to its
session's own bucket, and takes the session only from where the client cannot forge or
renew it at will: the app's ``session_id=`` callable, or the id the guard keeps in a
signed or server-side session (Starlette's ``SessionMiddleware``, Flask's ``session``)
under :data:`SESSION_KEY`. A session the guard has not seen before (a new visitor, or a
client that dropped its cookie) is charged to the shared anonymous bucket, and the id is
stored for its next request. A raw cookie is never read: a client could send a fresh one
with every request and never reach a limit.

Everything here works on plain values (header strings, a session mapping, a
:class:`~payi_guard.context.RequestScope`), never on a framework's request object.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import re
import secrets
from collections.abc import Callable, MutableMapping
from typing import Any

import structlog

from payi_guard._ids import new_id
from payi_guard.context import RequestScope, check_tier, current_request
from payi_guard.engine import Guard
from payi_guard.engine.policy import is_anonymous_id
from payi_guard.exceptions import DuplicateUserHeader, InvalidUserId
from payi_guard.web.options import WebOptions
from payi_guard.web.problem import Problem, Problems

__all__ = [
    "BOUND_KEY",
    "INVALID_USER_EVENT",
    "LOGGED_KEY",
    "ORDER_EVENT",
    "SESSION_KEY",
    "UNTRUSTED_HEADER_EVENT",
    "Identifier",
    "LogTokens",
    "bind_request",
    "is_guarded_request",
    "logged_id",
    "mark_bound",
    "pseudonym_of",
    "rebind_user",
    "request_id_of",
    "session_digest",
    "split_user",
    "structlog_vars",
    "unbind_request",
    "user_of_scope",
]

ORDER_EVENT = "auth_middleware_order"
"""Logged once when ``scope["user"]`` appears inside the guard (auth added in the wrong order)."""

UNTRUSTED_HEADER_EVENT = "untrusted_user_header"
"""Logged at debug level when the user header is present but not trusted."""

INVALID_USER_EVENT = "invalid_user_id"
"""Logged when a source names an invalid user id (with the reason, never the id)."""

SESSION_KEY = "payi_guard.session"
"""The key of a signed or server-side session under which the guard keeps its session id."""

BOUND_KEY = "payi_guard.web"
"""The request scope's ``extra`` key a guard middleware sets: the request is bound (internal)."""
LOGGED_KEY = "payi_guard.web.logged_user"
"""The request scope's ``extra`` key of the function giving the id log lines show (internal):
set only when the guard pseudonymises user ids."""
_SESSION_ID = re.compile(r"[0-9a-f]{32}\Z")
_HAS_IDENTITY: dict[type, bool] = {}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}\Z")


def user_of_scope(user: object) -> object | None:
    """Return the id of an authenticated Starlette-style user object, else ``None``.

    ``identity`` is used when the user class implements it, else ``display_name``
    (Starlette's ``SimpleUser`` only has the latter).

    Args:
        user: the value of ASGI ``scope["user"]``.

    Returns:
        The id (not yet validated), or ``None`` for a missing or unauthenticated user.
    """
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    cls = type(user)
    has_identity = _HAS_IDENTITY.get(cls)
    if has_identity is not False:
        try:
            identity: object = getattr(user, "identity", None)
        except NotImplementedError:  # starlette.authentication.BaseUser.identity
            # Remembered per class: raising on every request costs more than the rest.
            _HAS_IDENTITY[cls] = False
            identity = None
        else:
            _HAS_IDENTITY[cls] = True
        if identity is not None and identity != "":
            return identity
    name: object = getattr(user, "display_name", None)
    return None if name is None or name == "" else name


def split_user(value: object) -> tuple[object | None, str | None]:
    """A resolver's answer as ``(user id, tier)``: an id alone, or a ``(user_id, tier)`` pair.

    Args:
        value: what the resolver returned (an id, ``None``, or a pair).

    Raises:
        TypeError: a tuple that is not a pair, or a tier that is not a name or ``None``.
    """
    if isinstance(value, tuple):
        if len(value) != 2:
            raise TypeError(
                "a user resolver returns the user id (or None), or a (user_id, tier) pair; "
                f"got a tuple of {len(value)}"
            )
        user, tier = value
        return user, check_tier(tier)
    return value, None


def session_digest(value: str) -> str:
    """Return the id an anonymous session is charged under: a digest of its key.

    A session key or cookie is often a credential, so it must reach neither storage keys
    nor log lines: only this digest does.

    Args:
        value: the session key or cookie value.

    Returns:
        24 hex digits (BLAKE2b, 12 bytes).
    """
    return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()


def request_id_of(incoming: str | None) -> str:
    """Return ``incoming`` when it is a safe id (1-128 of ``A-Za-z0-9._:+=/-``), else a new one.

    Args:
        incoming: the request's ``X-Request-ID`` header value, if any.

    Returns:
        The request id of this request.
    """
    if incoming is not None and _REQUEST_ID.match(incoming):
        return incoming
    return new_id()


LogTokens = tuple[contextvars.Token[Any], contextvars.Token[Any]]
"""What :func:`bind_request` returns and :func:`unbind_request` takes (internal)."""
_log_vars: tuple[contextvars.ContextVar[Any], contextvars.ContextVar[Any]] | None = None


def bind_request(user_id: str | None, request_id: str) -> LogTokens:
    """Bind ``user_id`` and ``request_id`` in structlog's context variables (internal).

    What ``structlog.contextvars.bind_contextvars(user_id=..., request_id=...)`` does,
    on the same variables (so ``merge_contextvars`` shows them the same way), at a
    fraction of the cost: the variables are looked up once, not per request. Undo it
    with :func:`unbind_request`.

    Returns:
        The tokens :func:`unbind_request` needs.
    """
    user_var, request_var = _log_vars or structlog_vars()
    return user_var.set(user_id), request_var.set(request_id)


def unbind_request(tokens: LogTokens) -> None:
    """Undo :func:`bind_request` exactly (a user rebound since included)."""
    user_token, request_token = tokens
    request_token.var.reset(request_token)
    user_token.var.reset(user_token)


def structlog_vars() -> tuple[contextvars.ContextVar[Any], contextvars.ContextVar[Any]]:
    """Structlog's context variables of ``user_id`` and ``request_id`` (internal).

    What :func:`bind_request` sets; a middleware may keep them and set them itself.
    """
    global _log_vars
    if _log_vars is not None:
        return _log_vars
    # structlog makes one variable per key on first use and keeps it; its tokens name it.
    tokens = structlog.contextvars.bind_contextvars(user_id=None, request_id=None)
    structlog.contextvars.reset_contextvars(**tokens)
    _log_vars = (tokens["user_id"].var, tokens["request_id"].var)
    return _log_vars


def rebind_user(user_id: str) -> None:
    """Rebind ``user_id`` in the structlog context of the current guarded request.

    The middleware binds ``user_id`` for the whole request and unbinds it at the end, so
    a user named later (by a dependency, ``before_request``) can be rebound in the same
    context and is still undone by the middleware. Outside a guarded request this does
    nothing, so it never leaves a value behind.

    Args:
        user_id: the normalised user id.
    """
    scope = current_request()
    if scope is not None and scope.extra.get(BOUND_KEY):
        structlog.contextvars.bind_contextvars(user_id=logged_id(scope, user_id))


def is_guarded_request() -> bool:
    """True inside a request served by the guard middleware (ASGI or WSGI)."""
    scope = current_request()
    return scope is not None and bool(scope.extra.get(BOUND_KEY))


def mark_bound(scope: RequestScope, guard: Guard | None = None) -> None:
    """Record that this request's ``user_id`` is bound by the middleware (internal).

    With a ``guard`` that pseudonymises user ids, the request's log lines show pseudonyms
    (:func:`logged_id`), as its ``genai_call`` lines do.
    """
    scope.extra[BOUND_KEY] = True
    if guard is not None and guard.pseudonymizer is not None:
        scope.extra[LOGGED_KEY] = pseudonym_of(guard.pseudonymizer)


def pseudonym_of(pseudonymizer: Callable[[str], str]) -> Callable[[str], str]:
    """The id log lines show for a user id: its pseudonym (internal; cached).

    The anonymous bucket is never pseudonymised, as :class:`~payi_guard.Guard` charges it.
    """

    @functools.lru_cache(maxsize=4096)
    def logged(user_id: str) -> str:
        return user_id if is_anonymous_id(user_id) else pseudonymizer(user_id)

    return logged


def logged_id(scope: RequestScope, user_id: str | None) -> str | None:
    """The id the request's log lines show for ``user_id`` (see :func:`mark_bound`)."""
    logged = scope.extra.get(LOGGED_KEY)
    return user_id if logged is None or user_id is None else logged(user_id)


class Identifier:
    """Names the user of a request: validates ids, trusts or ignores the header, sessions.

    Args:
        guard: the guard whose anonymous strategy decides whether sessions matter.
        options: the middleware's options.
        problems: builds the 400 of a refused id.
        log: where refused ids and ignored headers are logged.
    """

    def __init__(self, guard: Guard, options: WebOptions, problems: Problems, log: Any) -> None:
        self.guard = guard
        self.options = options
        self.problems = problems
        self.log = log

    def assign_user(
        self,
        scope: RequestScope,
        value: object,
        source: str,
        tier: str | None = None,
        *,
        fresh: bool = False,
    ) -> Problem | None:
        """Validate ``value`` and make it the request's user (with ``tier``, if named).

        Args:
            scope: the request scope.
            value: the id a source produced.
            source: which source (``resolver``, ``scope``, ``header``, ...), for logs.
            tier: the user's tier, when the source named one.
            fresh: the caller opened ``scope`` and nothing else holds it yet
                (:meth:`RequestScope.claim <payi_guard.context.RequestScope.claim>`).

        Returns:
            ``None`` when the user was set (or the invalid id was dropped under
            ``on_invalid_user="anonymous"``), else the 400 problem to answer.
        """
        try:
            if fresh:
                scope.claim(value, source=source, tier=tier)
            else:
                scope.set_user(value, source=source, tier=tier)
        except InvalidUserId as exc:
            return self.invalid_user(exc, source)
        return None

    def invalid_user(self, exc: InvalidUserId, source: str) -> Problem | None:
        """Log a refused id (its reason, never the id) and apply ``on_invalid_user``.

        Args:
            exc: the refusal.
            source: which source named the id.

        Returns:
            The 400 problem, or ``None`` under ``on_invalid_user="anonymous"``.
        """
        # Two users named at once is never a reason to fall back to anonymity.
        anonymous = self.options.on_invalid_user == "anonymous" and not isinstance(
            exc, DuplicateUserHeader
        )
        self.log.warning(INVALID_USER_EVENT, reason=exc.reason, source=source, fallback=anonymous)
        if anonymous:
            return None
        return self.problems.invalid_user_problem(exc)

    def header_user(self, value: str | None) -> str | None:
        """Return the user named by the user header when it is trusted, else ``None``.

        An untrusted header is ignored (a debug line says so), so a client can never
        name the user it spends for.

        Args:
            value: the header's value; several occurrences joined with ``,`` (as WSGI
                servers and Django join them).

        Raises:
            DuplicateUserHeader: the trusted header came more than once, or lists
                several users (``,`` is never part of a user id).
        """
        if value is None:
            return None
        if self.options.trust_user_header:
            if "," in value:
                raise DuplicateUserHeader(self.options.user_header)
            return value
        self.log.debug(
            UNTRUSTED_HEADER_EVENT,
            header=self.options.user_header,
            detail="ignored: pass trust_user_header=True only behind an authenticating proxy",
        )
        return None

    def wants_session(self) -> bool:
        """True when the guard's anonymous strategy is ``session``."""
        return self.guard.config.anonymous.strategy == "session"

    @staticmethod
    def stored_session(session: MutableMapping[str, Any] | None) -> str | None:
        """Return the id this guard keeps in a signed or server-side session, else ``None``.

        A session that has no id yet gets one for its next request, and this request
        gets ``None``: it is charged to the shared anonymous bucket. So a client that
        drops its cookie, or never sends one back, gains nothing.

        Args:
            session: the request's session mapping (Starlette's ``scope["session"]``,
                Flask's ``session``), or ``None`` when the app has none.

        Returns:
            The session id, or ``None``.
        """
        if session is None:
            return None
        value = session.get(SESSION_KEY)
        if isinstance(value, str) and _SESSION_ID.match(value):
            return value
        session[SESSION_KEY] = secrets.token_hex(16)
        return None

    @staticmethod
    def set_session(scope: RequestScope, session: object) -> None:
        """Store the session id the ``session`` strategy charges anonymous calls to."""
        if session is not None and session != "":
            scope.extra["session_id"] = str(session)
