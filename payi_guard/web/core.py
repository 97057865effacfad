"""The protocol-neutral core shared by the ASGI and WSGI middleware.

Everything here works on plain values (paths, header strings, a
:class:`~payi_guard.context.RequestScope`), never on a framework's request object, so
:class:`~payi_guard.web.GuardMiddleware`, :class:`~payi_guard.web.WSGIGuardMiddleware`
and the Flask and FastAPI conveniences are thin adapters around one :class:`WebCore`.

Where the user of a request comes from, in this order (the first source that names a
user wins; :func:`~payi_guard.set_user` later in the request always overrides):

1. the ``user=`` resolver given to the middleware;
2. ASGI ``scope["user"]`` when it is authenticated (Starlette's
   ``AuthenticationMiddleware``, which must run *outside* the guard middleware);
3. the ``xProxy-User-ID`` header, only with ``trust_user_header=True``;
4. :func:`~payi_guard.set_user` (the FastAPI dependency, any code inside the request);
5. Flask: the :class:`payi_guard.flask.PayiGuard` extension in ``before_request``.

Responses the guard writes itself are ``application/problem+json`` (RFC 9457):

* ``429`` (configurable): a block limit leaves the user nothing. Members ``type``,
  ``title``, ``status``, ``detail``, ``limit``, ``scope``, ``unit``, ``used``, ``max``,
  ``remaining``, ``resets_at``, ``retry_after`` and ``request_id``; headers
  ``Retry-After`` (whole seconds until the window resets, at least 1) and the IETF
  ``RateLimit-Policy`` / ``RateLimit`` fields (draft-ietf-httpapi-ratelimit-headers)::

      RateLimit-Policy: "daily";q=1000000;w=86400
      RateLimit: "daily";r=0;t=43200

  ``q`` (quota) and ``r`` (remaining) must be integers, so money limits are given in
  micro-USD (``q=1000000`` is $1.00; amounts are rounded down), request and token limits
  in requests and tokens. ``w`` is the length of the limit's calendar window in seconds
  (omitted when the limit cannot be told apart from another one of the same name), ``t``
  the seconds until it resets.
* ``401``: no user is known and the budgets file says ``anonymous: {strategy: reject}``.
* ``400``: a user id was refused; the body says why and never repeats the id.
* ``503``: the budget storage failed and ``on_storage_error`` is ``block``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any, Literal, cast

import structlog

from payi_guard import log as events
from payi_guard._ids import new_id
from payi_guard.config import GuardConfig, LimitSpec
from payi_guard.context import RequestScope, current_request, get_context
from payi_guard.engine import ANONYMOUS_USER, Guard, UserRequired
from payi_guard.exceptions import BudgetExceeded, InvalidUserId, StorageError
from payi_guard.usage import LimitUsage
from payi_guard.windows import window_at

__all__ = [
    "AFTER_START_EVENT",
    "INVALID_USER_EVENT",
    "MICRO_USD",
    "ORDER_EVENT",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "REQUEST_ID_HEADER",
    "UNTRUSTED_HEADER_EVENT",
    "USER_HEADER",
    "GateResult",
    "InvalidUserPolicy",
    "Problem",
    "WebCore",
    "is_guarded_request",
    "parse_cookie",
    "rebind_user",
    "user_of_scope",
]

USER_HEADER = "xProxy-User-ID"
"""The request header that names the user (Pay-i's name); honoured only when trusted."""

REQUEST_ID_HEADER = "X-Request-ID"
"""The request header whose valid value becomes the request id, echoed in the response."""

PROBLEM_CONTENT_TYPE = "application/problem+json"
"""The media type of every response the guard writes itself (RFC 9457)."""

PROBLEM_TYPE_BASE = "urn:payi-guard:problem:"
"""Prefix of the ``type`` member of the guard's problem documents."""

MICRO_USD = 1_000_000
"""``RateLimit`` quota units per US dollar: money limits are expressed in micro-USD."""

AFTER_START_EVENT = "budget_exceeded_after_start"
"""Logged when a refusal escapes the app after the response has started."""

ORDER_EVENT = "auth_middleware_order"
"""Logged once when ``scope["user"]`` appears inside the guard (auth added in the wrong order)."""

UNTRUSTED_HEADER_EVENT = "untrusted_user_header"
"""Logged at debug level when the user header is present but not trusted."""

INVALID_USER_EVENT = "invalid_user_id"
"""Logged when a source names an invalid user id (with the reason, never the id)."""

InvalidUserPolicy = Literal["reject", "anonymous"]

_BOUND_KEY = "payi_guard.web"
_HAS_IDENTITY: dict[type, bool] = {}
_GATE_HEADERS_KEY = "payi_guard.web.rate_headers"


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}\Z")
_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")
_COOKIE_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")


@dataclass(frozen=True, slots=True)
class Problem:
    """A complete ``application/problem+json`` response, ready for any protocol.

    Attributes:
        status: the HTTP status code.
        document: the problem document (JSON members).
        headers: extra headers (``Retry-After``, ``RateLimit``, ...), without
            ``Content-Type`` and ``Content-Length``.
        body: the encoded document.
    """

    status: int
    document: Mapping[str, Any]
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @classmethod
    def build(
        cls, status: int, document: Mapping[str, Any], headers: Iterable[tuple[str, str]] = ()
    ) -> Problem:
        """Encode ``document`` and return the problem.

        Args:
            status: the HTTP status code.
            document: JSON-serialisable members.
            headers: extra response headers.

        Returns:
            The problem with its body encoded as UTF-8 JSON.
        """
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(status, dict(document), tuple(headers), body)

    def all_headers(self) -> list[tuple[str, str]]:
        """Return every response header: content type, length and the extra ones."""
        return [
            ("Content-Type", PROBLEM_CONTENT_TYPE),
            ("Content-Length", str(len(self.body))),
            *self.headers,
        ]

    def wsgi_status(self) -> str:
        """Return the WSGI status line (``"429 Too Many Requests"``)."""
        return f"{self.status} {_REASONS.get(self.status, 'Error')}"


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    402: "Payment Required",
    403: "Forbidden",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class GateResult:
    """What the early budget gate decided for one request.

    Attributes:
        problem: the response to send instead of running the app, or ``None`` to run it.
        headers: ``RateLimit`` headers to add to a successful response
            (``budget_headers=True`` only).
    """

    problem: Problem | None = None
    headers: tuple[tuple[str, str], ...] = ()


_PASS = GateResult()


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
            identity = getattr(user, "identity", None)
        except NotImplementedError:  # starlette.authentication.BaseUser.identity
            # Remembered per class: raising on every request costs more than the rest.
            _HAS_IDENTITY[cls] = False
            identity = None
        else:
            _HAS_IDENTITY[cls] = True
        if identity is not None and identity != "":
            return cast(object, identity)
    name: object = getattr(user, "display_name", None)
    return None if name is None or name == "" else name


def parse_cookie(header: str | None, name: str) -> str | None:
    """Return the value of cookie ``name`` in a ``Cookie`` header, else ``None``.

    Args:
        header: the raw ``Cookie`` request header.
        name: the cookie name.

    Returns:
        The value with surrounding quotes removed, or ``None`` when absent or empty.
    """
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            return value or None
    return None


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
    if scope is not None and scope.extra.get(_BOUND_KEY):
        structlog.contextvars.bind_contextvars(user_id=user_id)


def is_guarded_request() -> bool:
    """True inside a request served by the guard middleware (ASGI or WSGI)."""
    scope = current_request()
    return scope is not None and bool(scope.extra.get(_BOUND_KEY))


def mark_bound(scope: RequestScope) -> None:
    """Record that this request's ``user_id`` is bound by the middleware (internal)."""
    scope.extra[_BOUND_KEY] = True


def _money_units(value: Decimal | int, unit: str) -> int:
    """An amount as the integer ``RateLimit`` units: micro-USD for money."""
    if unit == "usd":
        return int((Decimal(value) * MICRO_USD).to_integral_value(rounding=ROUND_FLOOR))
    return int(value)


def _json_number(value: Decimal | int, unit: str) -> float | int:
    if unit == "usd":
        return float(value)
    return int(value)


def _sf_string(text: str) -> str:
    """A structured-field string (RFC 8941): quoted, backslash and quote escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _check_header_name(option: str, value: str) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"{option} must be an HTTP header name, not {value!r}")
    return value


class WebCore:
    """Options and decisions of the guard middleware, independent of ASGI or WSGI.

    Build it once per app (the middleware does); every method is safe to call from many
    threads and tasks at once.

    Args:
        guard: the :class:`~payi_guard.engine.Guard` that holds the budgets.
        user: a resolver called with the request (the adapter decides the type: a
            Starlette ``Request`` for ASGI, the environ for WSGI) that returns the user
            id or ``None``.
        trust_user_header: honour the ``user_header`` request header. Only for apps
            behind their own authenticating proxy: otherwise anyone could spend someone
            else's budget.
        user_header: the header that names the user.
        guarded_paths: ``fnmatch``-style globs (``"/api/*"``, ``"/chat"``; ``*`` also
            matches ``/``) of the paths gated before the app runs (``OPTIONS``
            requests, i.e. CORS preflights, never are). Default: none, so only the
            refusal of each GenAI call applies.
        block_status: the status of a budget refusal (429 by default).
        gate: how guarded paths are checked before the app runs: ``"cache"`` (default)
            asks the guard's local "spent until the window ends" cache, with no storage
            round trip; ``"storage"`` reads the user's counters from the store (one round
            trip, exact across processes). Either way each GenAI call is still reserved
            atomically, so a user the cache does not know to be spent is refused at the
            call, with the same response.
        budget_headers: add the ``RateLimit`` headers of the user's tightest limit to
            successful responses of guarded paths (one storage read per request, made
            by the gate anyway).
        on_invalid_user: ``"reject"`` answers 400 when a source names an invalid user
            id; ``"anonymous"`` treats the request as anonymous instead.
        session_id: for the ``session`` anonymous strategy: a callable given the request
            that returns the session or device id, or ``None``.
        session_cookie: for the ``session`` strategy without ``session_id``: the cookie
            whose (hashed) value identifies an anonymous session; ``None`` disables it.
        request_id_header: the request-id header honoured and echoed; ``None`` to only
            generate ids (still logged, not echoed).
        www_authenticate: the ``WWW-Authenticate`` challenge sent with a 401.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        user: Callable[[Any], Any] | None = None,
        trust_user_header: bool = False,
        user_header: str = USER_HEADER,
        guarded_paths: Sequence[str] = (),
        block_status: int = 429,
        budget_headers: bool = False,
        gate: Literal["cache", "storage"] = "cache",
        on_invalid_user: InvalidUserPolicy = "reject",
        session_id: Callable[[Any], Any] | None = None,
        session_cookie: str | None = "session_id",
        request_id_header: str | None = REQUEST_ID_HEADER,
        www_authenticate: str | None = None,
    ) -> None:
        if not isinstance(guard, Guard):
            raise TypeError(f"guard= must be a payi_guard Guard, not {type(guard).__name__}")
        if user is not None and not callable(user):
            raise TypeError("user= must be a callable that returns the user id, or None")
        if session_id is not None and not callable(session_id):
            raise TypeError("session_id= must be a callable that returns a session id, or None")
        if isinstance(guarded_paths, str):
            raise TypeError(f"guarded_paths must be a list of globs, like [{guarded_paths!r}]")
        patterns = tuple(guarded_paths)
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError("guarded_paths must contain non-empty strings")
        if isinstance(block_status, bool) or not isinstance(block_status, int):
            raise TypeError("block_status must be an int")
        if not 400 <= block_status <= 599:
            raise ValueError(f"block_status must be a 4xx or 5xx status, not {block_status}")
        if on_invalid_user not in ("reject", "anonymous"):
            raise ValueError(
                f"on_invalid_user must be 'reject' or 'anonymous', not {on_invalid_user!r}"
            )
        if session_cookie is not None and not _COOKIE_NAME.match(session_cookie):
            raise ValueError(f"session_cookie must be a cookie name, not {session_cookie!r}")
        _check_header_name("user_header", user_header)
        if request_id_header is not None:
            _check_header_name("request_id_header", request_id_header)

        self.guard = guard
        self.resolver = user
        self.trust_user_header = bool(trust_user_header)
        self.user_header = user_header
        self.guarded_paths = patterns
        self.block_status = block_status
        self.budget_headers = bool(budget_headers)
        if gate not in ("cache", "storage"):
            raise ValueError(f"gate must be 'cache' or 'storage', not {gate!r}")
        self.read_storage = gate == "storage"
        self.on_invalid_user: InvalidUserPolicy = on_invalid_user
        self.session_id = session_id
        self.session_cookie = session_cookie
        self.request_id_header = request_id_header
        self.www_authenticate = www_authenticate
        self.log = events.get_logger()
        # fnmatchcase semantics: paths are case-sensitive on every platform.
        self._paths = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            if patterns
            else None
        )
        self._windows: dict[tuple[str, str, str], tuple[str, str] | None] = {}
        self._windows_of: GuardConfig | None = None

    # -- request ids and paths ------------------------------------------------------------

    def guarded(self, path: str) -> bool:
        """Return True if ``path`` matches one of ``guarded_paths``."""
        return self._paths is not None and self._paths.match(path) is not None

    @staticmethod
    def request_id(incoming: str | None) -> str:
        """Return ``incoming`` when it is a safe id (1-128 of ``A-Za-z0-9._:+=/-``), else a new one.

        Args:
            incoming: the request's ``X-Request-ID`` header value, if any.

        Returns:
            The request id of this request.
        """
        if incoming is not None and _REQUEST_ID.match(incoming):
            return incoming
        return new_id()

    # -- users ----------------------------------------------------------------------------

    def assign_user(self, scope: RequestScope, value: object, source: str) -> Problem | None:
        """Validate ``value`` and make it the request's user.

        Args:
            scope: the request scope.
            value: the id a source produced.
            source: which source (``resolver``, ``scope``, ``header``, ...), for logs.

        Returns:
            ``None`` when the user was set (or the invalid id was dropped under
            ``on_invalid_user="anonymous"``), else the 400 problem to answer.
        """
        try:
            scope.set_user(value, source=source)
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
        self.log.warning(
            INVALID_USER_EVENT,
            reason=exc.reason,
            source=source,
            fallback=self.on_invalid_user == "anonymous",
        )
        if self.on_invalid_user == "anonymous":
            return None
        return self.invalid_user_problem(exc)

    def header_user(self, value: str | None) -> str | None:
        """Return the user named by the user header when it is trusted, else ``None``.

        An untrusted header is ignored (a debug line says so), so a client can never
        name the user it spends for.
        """
        if value is None:
            return None
        if self.trust_user_header:
            return value
        self.log.debug(
            UNTRUSTED_HEADER_EVENT,
            header=self.user_header,
            detail="ignored: pass trust_user_header=True only behind an authenticating proxy",
        )
        return None

    def wants_session(self) -> bool:
        """True when the guard's anonymous strategy is ``session``."""
        return self.guard.config.anonymous.strategy == "session"

    def session_from_cookie(self, cookie_header: str | None) -> str | None:
        """Derive an anonymous session id from the ``session_cookie`` cookie.

        The cookie value is hashed: a session cookie is often a credential, and it must
        reach neither storage keys nor log lines.
        """
        if self.session_cookie is None:
            return None
        value = parse_cookie(cookie_header, self.session_cookie)
        if value is None:
            return None
        return hashlib.blake2b(value.encode(), digest_size=12).hexdigest()

    @staticmethod
    def set_session(scope: RequestScope, session: object) -> None:
        """Store the session id the ``session`` strategy charges anonymous calls to."""
        if session is not None and session != "":
            scope.extra["session_id"] = str(session)

    # -- the gate -------------------------------------------------------------------------

    def _usage_owner(self) -> tuple[str, tuple[str, ...]]:
        attribution = get_context()
        subject = self.guard.subject_for(attribution)
        owner = subject.user_id if subject.anonymous else (subject.policy_user or subject.user_id)
        return owner, attribution.limit_ids

    def evaluate(self) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        """Read the current user's budget once (sync).

        Returns:
            The exhausted block limit (``None`` when the user may spend) and, with
            ``budget_headers``, the ``RateLimit`` headers of the tightest limit.

        Raises:
            UserRequired: no user is known and anonymous calls are rejected.
            StorageError: the storage failed.
            ConfigError: ``limit_ids`` in the context names an undefined limit.
        """
        if self.budget_headers:
            owner, limit_ids = self._usage_owner()
            return self._verdict(self.guard.usage(owner, limit_ids=limit_ids))
        return self.guard.exhausted_limit(get_context(), read_storage=self.read_storage), ()

    async def aevaluate(self) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        """Async :meth:`evaluate`; never blocks the event loop."""
        if self.budget_headers:
            owner, limit_ids = self._usage_owner()
            return self._verdict(await self.guard.ausage(owner, limit_ids=limit_ids))
        return (
            await self.guard.aexhausted_limit(get_context(), read_storage=self.read_storage),
            (),
        )

    def check(self) -> GateResult:
        """Gate the current request before the app runs (sync; the WSGI twin).

        Returns:
            What to do: answer a problem, or run the app (with optional headers).

        Raises:
            ConfigError: ``limit_ids`` in the context names an undefined limit.
        """
        try:
            limit, headers = self.evaluate()
        except BudgetExceeded as exc:  # UserRequired: anonymous calls are rejected
            return GateResult(self.problem_for_refusal(exc))
        except StorageError as exc:
            return self.storage_failed(exc)
        return self._result(limit, headers)

    async def acheck(self) -> GateResult:
        """Async :meth:`check` (the ASGI twin); never blocks the event loop."""
        if not self.budget_headers and not self.read_storage:
            # The cache gate does no I/O: answer without another coroutine hop.
            return self.check()
        try:
            limit, headers = await self.aevaluate()
        except BudgetExceeded as exc:
            return GateResult(self.problem_for_refusal(exc))
        except StorageError as exc:
            return self.storage_failed(exc)
        return self._result(limit, headers)

    def _result(self, limit: LimitUsage | None, headers: tuple[tuple[str, str], ...]) -> GateResult:
        if limit is not None:
            return GateResult(self.refuse(limit))
        return GateResult(headers=headers) if headers else _PASS

    def _verdict(
        self, usages: Sequence[LimitUsage]
    ) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        exhausted = [u for u in usages if u.type == "block" and u.state == "exceeded"]
        if exhausted:
            # The limit that resets last is the honest Retry-After.
            return max(exhausted, key=lambda u: u.resets_at), ()
        tightest = _tightest(usages)
        if tightest is None:
            return None, ()
        return None, self.rate_limit_headers(tightest)

    def refused_user(self) -> str:
        """The id a refusal of the current request is logged and raised with."""
        try:
            return self.guard.subject_for(get_context()).user_id
        except BudgetExceeded:
            return ANONYMOUS_USER

    def refuse(self, limit: LimitUsage) -> Problem:
        """Log ``budget_exceeded`` for the gate and return the refusal problem."""
        context = get_context()
        self.log.warning(
            events.BUDGET_EXCEEDED,
            user_id=self.refused_user(),
            limit=limit.name,
            scope=limit.scope,
            unit=limit.unit,
            used=_json_number(limit.used, limit.unit),
            max=_json_number(limit.max, limit.unit),
            resets_at=limit.resets_at.isoformat(),
            request_id=context.request_id,
            source="gate",
        )
        return self.budget_problem(limit)

    def storage_failed(self, exc: StorageError) -> GateResult:
        """Log a gate storage failure and apply ``on_storage_error`` (503 or pass)."""
        policy = self.guard.config.on_storage_error
        self.log.error(
            events.STORAGE_ERROR,
            op="gate",
            error=str(exc),
            error_type=type(exc).__name__,
            policy=policy,
        )
        if policy == "allow":
            return _PASS
        return GateResult(self.storage_problem())

    # -- problems -------------------------------------------------------------------------

    def problem_for(self, exc: BaseException) -> Problem | None:
        """Return the problem response for an exception the guard answers, else ``None``.

        ``UserRequired`` -> 401, ``BudgetExceeded`` -> ``block_status``,
        ``InvalidUserId`` -> 400, ``StorageError`` -> 503.
        """
        if isinstance(exc, BudgetExceeded):
            return self.problem_for_refusal(exc)
        if isinstance(exc, InvalidUserId):
            return self.invalid_user_problem(exc)
        if isinstance(exc, StorageError):
            return self.storage_problem()
        return None

    def problem_for_refusal(self, exc: BudgetExceeded) -> Problem:
        """The 401 (``UserRequired``) or budget problem of a refusal."""
        if isinstance(exc, UserRequired):
            return self.user_required_problem()
        return self.budget_problem(exc.limit)

    def _request_id_member(self) -> dict[str, str]:
        request_id = get_context().request_id
        return {} if request_id is None else {"request_id": request_id}

    def retry_after(self, limit: LimitUsage) -> int:
        """Whole seconds until ``limit`` resets, at least 1 (from the guard's clock)."""
        return max(1, math.ceil(limit.resets_at.timestamp() - self.guard.clock.now()))

    def budget_problem(self, limit: LimitUsage) -> Problem:
        """Build the refusal response of an exhausted limit.

        Args:
            limit: the limit that leaves the user nothing.

        Returns:
            The ``block_status`` problem with ``Retry-After`` and ``RateLimit`` headers.
        """
        retry_after = self.retry_after(limit)
        unit = "USD" if limit.unit == "usd" else limit.unit
        resets = limit.resets_at.isoformat()
        if limit.remaining > 0:
            # A call refused at reserve time: its upper-bound cost does not fit.
            detail = (
                f"The {limit.scope} limit {limit.name!r} has {limit.remaining} {unit} left "
                f"({limit.used} of {limit.max} used), not enough for this call; it resets "
                f"at {resets}."
            )
        else:
            detail = (
                f"The {limit.scope} limit {limit.name!r} is used up ({limit.used} of "
                f"{limit.max} {unit}); it resets at {resets}."
            )
        document: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + "budget-exceeded",
            "title": "Budget exceeded",
            "status": self.block_status,
            "detail": detail,
            "limit": limit.name,
            "scope": limit.scope,
            "unit": limit.unit,
            "used": _json_number(limit.used, limit.unit),
            "max": _json_number(limit.max, limit.unit),
            "remaining": _json_number(limit.remaining, limit.unit),
            "resets_at": limit.resets_at.isoformat(),
            "retry_after": retry_after,
            **self._request_id_member(),
        }
        headers = [("Retry-After", str(retry_after)), *self.rate_limit_headers(limit)]
        return Problem.build(self.block_status, document, headers)

    def user_required_problem(self) -> Problem:
        """The 401 answered when anonymous calls are rejected and no user is known."""
        document = {
            "type": PROBLEM_TYPE_BASE + "user-required",
            "title": "Authentication required",
            "status": 401,
            "detail": "This request needs an authenticated user: anonymous GenAI calls are "
            "not allowed.",
            **self._request_id_member(),
        }
        headers = []
        if self.www_authenticate:
            headers.append(("WWW-Authenticate", self.www_authenticate))
        return Problem.build(401, document, headers)

    def invalid_user_problem(self, exc: InvalidUserId) -> Problem:
        """The 400 answered for a refused user id (the reason only, never the id)."""
        document = {
            "type": PROBLEM_TYPE_BASE + "invalid-user-id",
            "title": "Invalid user id",
            "status": 400,
            "detail": f"The user id of this request was refused: {exc.reason}.",
            **self._request_id_member(),
        }
        return Problem.build(400, document)

    def storage_problem(self) -> Problem:
        """The 503 answered when the budget storage failed and the policy is ``block``."""
        document = {
            "type": PROBLEM_TYPE_BASE + "storage-unavailable",
            "title": "Budget storage unavailable",
            "status": 503,
            "detail": "The budget of this request cannot be checked right now; try again shortly.",
            **self._request_id_member(),
        }
        return Problem.build(503, document)

    # -- RateLimit fields -----------------------------------------------------------------

    def rate_limit_headers(self, limit: LimitUsage) -> tuple[tuple[str, str], ...]:
        """Return the ``RateLimit-Policy`` and ``RateLimit`` headers of ``limit``.

        Args:
            limit: the limit to describe.

        Returns:
            Two ``(name, value)`` pairs; see the module docstring for the units.
        """
        name = _sf_string(limit.name)
        policy = f"{name};q={_money_units(limit.max, limit.unit)}"
        window = self._window_seconds(limit)
        if window is not None:
            policy += f";w={window}"
        remaining = max(0, _money_units(limit.remaining, limit.unit))
        current = f"{name};r={remaining};t={self.retry_after(limit)}"
        return (("RateLimit-Policy", policy), ("RateLimit", current))

    def _window_seconds(self, limit: LimitUsage) -> int | None:
        config = self.guard.config
        if self._windows_of is not config:
            # A reload swaps the config object: forget what the old one said.
            self._windows = {}
            self._windows_of = config
        key = (limit.name, limit.unit, str(limit.max))
        try:
            found = self._windows[key]
        except KeyError:
            found = self._windows[key] = _period_of(config, limit)
        if found is None:
            return None
        per, tz = found
        window = window_at(per, limit.resets_at.timestamp() - 1, tz)  # type: ignore[arg-type]
        return window.end - window.start


def _tightest(usages: Sequence[LimitUsage]) -> LimitUsage | None:
    """The block limit with the smallest share left (ties: the one that resets first)."""
    best: LimitUsage | None = None
    best_key: tuple[Decimal, float] | None = None
    for usage in usages:
        if usage.type != "block":
            continue
        share = Decimal(usage.remaining) / Decimal(usage.max) if usage.max else Decimal(0)
        key = (share, usage.resets_at.timestamp())
        if best_key is None or key < best_key:
            best, best_key = usage, key
    return best


def _all_specs(config: GuardConfig) -> Iterable[LimitSpec]:
    yield from config.limits.values()
    yield from config.default
    for specs in config.tiers.values():
        yield from specs
    for specs in config.users.values():
        yield from specs
    for specs in config.orgs.values():
        yield from specs
    yield from config.global_limits
    yield from config.anonymous.limits


def _period_of(config: GuardConfig, limit: LimitUsage) -> tuple[str, str] | None:
    """Find the period and zone of ``limit``; ``None`` if several specs could match."""
    found: set[tuple[str, str]] = set()
    for spec in _all_specs(config):
        if spec.name == limit.name and spec.unit == limit.unit and spec.max_display() == limit.max:
            found.add((spec.per, spec.timezone))
    if len(found) == 1:
        return found.pop()
    return None


def gate_headers(scope: RequestScope) -> tuple[tuple[str, str], ...]:
    """Return the ``RateLimit`` headers the gate stored for this request (internal)."""
    headers: tuple[tuple[str, str], ...] = scope.extra.get(_GATE_HEADERS_KEY, ())
    return headers


def store_gate_headers(scope: RequestScope, headers: tuple[tuple[str, str], ...]) -> None:
    """Keep the gate's ``RateLimit`` headers for the response (internal)."""
    if headers:
        scope.extra[_GATE_HEADERS_KEY] = headers
