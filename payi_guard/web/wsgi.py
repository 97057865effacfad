"""The WSGI middleware: :class:`WSGIGuardMiddleware`.

A WSGI server calls the app, then iterates the response on the same thread, possibly
long after the app returned (a streamed body). Setting context variables around the app
call alone would lose the request's user before the body is produced, and leaving them
set would leak the user into the next request the thread serves. So each request gets
its own :class:`contextvars.Context`: the app call and *every* ``next()`` and
``close()`` of the response iterable run inside it with ``Context.run``, and nothing is
ever set in the server thread's own context.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Literal

from structlog.contextvars import bind_contextvars, reset_contextvars

from payi_guard.context import RequestScope, request_scope
from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, InvalidUserId
from payi_guard.web.core import (
    AFTER_START_EVENT,
    REQUEST_ID_HEADER,
    USER_HEADER,
    InvalidUserPolicy,
    Problem,
    WebCore,
    gate_headers,
    mark_bound,
    store_gate_headers,
)

__all__ = ["WSGIGuardMiddleware"]

Environ = dict[str, Any]
ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
StartResponse = Callable[..., Callable[[bytes], object]]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def _environ_key(header: str) -> str:
    return "HTTP_" + header.upper().replace("-", "_")


class WSGIGuardMiddleware:
    """Attribute every GenAI call of a WSGI request, streamed body included, to its user.

    For each request: a fresh :class:`contextvars.Context` holding a
    :func:`~payi_guard.context.request_scope` and the structlog binding of ``user_id``
    and ``request_id``; the user from the ``user=`` resolver (given the environ; e.g.
    ``lambda environ: environ.get("REMOTE_USER")``), else the trusted header; the early
    gate of ``guarded_paths``; a ``BudgetExceeded`` escaping the app (or raised before
    the first body chunk) becomes the refusal response; after the body started it is
    logged (``budget_exceeded_after_start``) and the body ends there.

    Args:
        app: the WSGI application.
        guard: the :class:`~payi_guard.engine.Guard` that holds the budgets.
        user: a resolver given the WSGI environ that returns the user id or ``None``.
        trust_user_header: honour the ``xProxy-User-ID`` header (only behind an
            authenticating proxy).
        user_header: the header that names the user.
        guarded_paths: globs of the paths (``PATH_INFO``) gated before the app runs.
        block_status: the status of a budget refusal.
        gate: ``"cache"`` (default: no storage round trip) or ``"storage"`` (read the
            counters on every guarded request); see :class:`~payi_guard.web.core.WebCore`.
        budget_headers: add the tightest limit's ``RateLimit`` headers to successful
            responses of guarded paths.
        on_invalid_user: ``"reject"`` (400) or ``"anonymous"``.
        session_id: for the ``session`` anonymous strategy: given the environ, return
            the session/device id.
        session_cookie: the cookie read for the ``session`` strategy when no
            ``session_id`` is given (its value is hashed).
        request_id_header: the request-id header honoured and echoed (``None``: off).
        www_authenticate: the ``WWW-Authenticate`` challenge of a 401.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    def __init__(
        self,
        app: WSGIApp,
        *,
        guard: Guard,
        user: Callable[[Environ], Any] | None = None,
        trust_user_header: bool = False,
        user_header: str = USER_HEADER,
        guarded_paths: Sequence[str] = (),
        block_status: int = 429,
        budget_headers: bool = False,
        gate: Literal["cache", "storage"] = "cache",
        on_invalid_user: InvalidUserPolicy = "reject",
        session_id: Callable[[Environ], Any] | None = None,
        session_cookie: str | None = "session_id",
        request_id_header: str | None = REQUEST_ID_HEADER,
        www_authenticate: str | None = None,
    ) -> None:
        self.app = app
        self.core = WebCore(
            guard,
            user=user,
            trust_user_header=trust_user_header,
            user_header=user_header,
            guarded_paths=guarded_paths,
            block_status=block_status,
            budget_headers=budget_headers,
            gate=gate,
            on_invalid_user=on_invalid_user,
            session_id=session_id,
            session_cookie=session_cookie,
            request_id_header=request_id_header,
            www_authenticate=www_authenticate,
        )
        self._user_key = _environ_key(user_header)
        self._request_id_key = _environ_key(request_id_header) if request_id_header else None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        """Serve one request inside its own context."""
        context = contextvars.copy_context()
        return context.run(self._begin, context, environ, start_response)

    def _begin(
        self, context: contextvars.Context, environ: Environ, start_response: StartResponse
    ) -> Iterable[bytes]:
        core = self.core
        incoming = environ.get(self._request_id_key) if self._request_id_key else None
        request_id = core.request_id(incoming)
        stack = ExitStack()
        try:
            rs = stack.enter_context(request_scope(request_id=request_id))
            problem = self._identify(environ, rs)
            mark_bound(rs)
            tokens = bind_contextvars(user_id=rs.user_id, request_id=request_id)
            stack.callback(reset_contextvars, **tokens)
            if (
                problem is None
                and environ.get("REQUEST_METHOD") != "OPTIONS"  # CORS preflights
                and core.guarded(environ.get("PATH_INFO") or "/")
            ):
                gate = core.check()
                problem = gate.problem
                store_gate_headers(rs, gate.headers)
            response = _Response(self, start_response, rs, request_id)
            if problem is not None:
                stack.close()
                return response.problem(problem, None)
            try:
                iterable = self.app(environ, response.start_response)
            except Exception as exc:
                problem = core.problem_for(exc)
                if problem is None:
                    raise
                stack.close()
                return response.problem(problem, sys.exc_info())
        except BaseException:
            stack.close()
            raise
        return _Body(context, iterable, stack, response)

    def _identify(self, environ: Environ, rs: RequestScope) -> Problem | None:
        core = self.core
        try:
            if core.resolver is not None:
                value = core.resolver(environ)
                if value is not None:
                    return core.assign_user(rs, value, "resolver")
            header = core.header_user(environ.get(self._user_key))
            if header is not None:
                return core.assign_user(rs, header, "header")
        except InvalidUserId as exc:  # raised by the resolver itself
            return core.invalid_user(exc, "resolver")
        if core.wants_session():
            if core.session_id is not None:
                session = core.session_id(environ)
            else:
                session = core.session_from_cookie(environ.get("HTTP_COOKIE"))
            core.set_session(rs, session)
        return None


class _Response:
    """The guard's ``start_response`` (adds its headers) and its problem responses."""

    __slots__ = ("_middleware", "_rs", "_start_response", "request_id")

    def __init__(
        self,
        middleware: WSGIGuardMiddleware,
        start_response: StartResponse,
        rs: RequestScope,
        request_id: str,
    ) -> None:
        self._middleware = middleware
        self._start_response = start_response
        self._rs = rs
        self.request_id = request_id

    def _own_headers(self) -> list[tuple[str, str]]:
        name = self._middleware.core.request_id_header
        return [] if name is None else [(name, self.request_id)]

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        present = {name.lower() for name, _ in headers}
        extra = [*self._own_headers(), *gate_headers(self._rs)]
        headers = headers + [h for h in extra if h[0].lower() not in present]
        if exc_info is None:
            return self._start_response(status, headers)
        return self._start_response(status, headers, exc_info)

    def problem(self, problem: Problem, exc_info: ExcInfo | Any) -> list[bytes]:
        headers = [*problem.all_headers(), *self._own_headers()]
        if exc_info is None or exc_info[0] is None:
            self._start_response(problem.wsgi_status(), headers)
        else:
            # Replaces headers the app set but the server has not sent yet (PEP 3333).
            self._start_response(problem.wsgi_status(), headers, exc_info)
        return [problem.body]


class _Body:
    """The response iterable: every step and the close run in the request's context."""

    __slots__ = ("_closed", "_context", "_iterable", "_iterator", "_response", "_sent", "_stack")

    def __init__(
        self,
        context: contextvars.Context,
        iterable: Iterable[bytes],
        stack: ExitStack,
        response: _Response,
    ) -> None:
        self._context = context
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._stack = stack
        self._response = response
        self._sent = False
        self._closed = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        return self._context.run(self._next)

    def _next(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        try:
            chunk = next(self._iterator)
        except StopIteration:
            raise
        except Exception as exc:
            problem = self._middleware_problem(exc)
            if problem is None:
                raise
            return self._refused(exc, problem)
        # Some servers send the headers on an empty chunk too (werkzeug does).
        self._sent = True
        return chunk

    def _middleware_problem(self, exc: Exception) -> Problem | None:
        return self._response._middleware.core.problem_for(exc)

    def _refused(self, exc: Exception, problem: Problem) -> bytes:
        if not self._sent:
            # Nothing was yielded yet, so the server cannot have sent the headers.
            self._sent = True
            self._iterator = iter(())
            return self._response.problem(problem, sys.exc_info())[0]
        if not isinstance(exc, BudgetExceeded):
            raise exc
        self._response._middleware.core.log.error(
            AFTER_START_EVENT,
            user_id=exc.user_id,
            limit=exc.limit.name,
            request_id=self._response.request_id,
            detail="a GenAI call was refused after the response started; the response was "
            "closed early",
        )
        raise StopIteration

    def close(self) -> None:
        """Close the app's iterable and end the request scope, in the request's context."""
        if not self._closed:
            self._closed = True
            self._context.run(self._close)

    def __del__(self) -> None:
        # A server that never calls close() (PEP 3333 says it must) would otherwise leave
        # the request scope to be finalized outside its context.
        if not self._closed:
            with contextlib.suppress(Exception):  # a finalizer has nowhere to report to
                self.close()

    def _close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            self._stack.close()
