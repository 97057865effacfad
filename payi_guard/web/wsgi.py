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
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from types import TracebackType
from typing import Any

from structlog.contextvars import bind_contextvars, reset_contextvars
from typing_extensions import Unpack

from payi_guard.context import RequestScope, request_scope
from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, InvalidUserId
from payi_guard.web.core import WebCore
from payi_guard.web.gate import gate_headers, store_gate_headers
from payi_guard.web.identify import mark_bound, request_id_of
from payi_guard.web.options import WebOptionArgs
from payi_guard.web.problem import AFTER_START_EVENT, Problem

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
        session_id: for the ``session`` anonymous strategy: given the environ, return
            the session/device id.
        **options: the shared options of :class:`~payi_guard.web.options.WebOptions`
            (``guarded_paths``, ``trust_user_header``, ``user_header``, ``block_status``,
            ``gate``, ``budget_headers``, ``on_invalid_user``, ``session_cookie``,
            ``request_id_header``, ``www_authenticate``), each documented there.
            ``guarded_paths`` match ``PATH_INFO``.

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
        session_id: Callable[[Environ], Any] | None = None,
        **options: Unpack[WebOptionArgs],
    ) -> None:
        self.app = app
        self.core = WebCore(guard, user=user, session_id=session_id, **options)
        request_id_header = self.core.options.request_id_header
        self._user_key = _environ_key(self.core.options.user_header)
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
        request_id = request_id_of(incoming)
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
                and core.gate.guarded(environ.get("PATH_INFO") or "/")
            ):
                gate = core.gate.check()
                problem = gate.problem
                store_gate_headers(rs, gate.headers)
            response = _Response(self, start_response, rs, request_id)
            if problem is not None:
                stack.close()
                return response.problem(problem, None)
            try:
                iterable = self.app(environ, response.start_response)
            except Exception as exc:
                problem = core.problems.problem_for(exc)
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
            resolver = core.options.user
            if resolver is not None:
                value = resolver(environ)
                if value is not None:
                    return core.identify.assign_user(rs, value, "resolver")
            header = core.identify.header_user(environ.get(self._user_key))
            if header is not None:
                return core.identify.assign_user(rs, header, "header")
        except InvalidUserId as exc:  # raised by the resolver itself
            return core.identify.invalid_user(exc, "resolver")
        if core.identify.wants_session():
            session_id = core.options.session_id
            if session_id is not None:
                session = session_id(environ)
            else:
                session = core.identify.session_from_cookie(environ.get("HTTP_COOKIE"))
            core.identify.set_session(rs, session)
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
        name = self._middleware.core.options.request_id_header
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
        return self._response._middleware.core.problems.problem_for(exc)

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
