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
from types import TracebackType
from typing import Any

from typing_extensions import Unpack

from payi_guard.context import RequestScope
from payi_guard.context.scope import request_var
from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, DuplicateUserHeader, InvalidUserId
from payi_guard.web.core import WebCore, with_headers
from payi_guard.web.gate import GateResult, store_gate_headers
from payi_guard.web.identify import (
    LogTokens,
    bind_request,
    logged_id,
    mark_bound,
    request_id_of,
    split_user,
    unbind_request,
)
from payi_guard.web.options import WebOptionArgs
from payi_guard.web.problem import Problem

__all__ = ["WSGIGuardMiddleware"]

_REQUEST = request_var()

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
        user: a resolver given the WSGI environ that returns the user id, a
            ``(user_id, tier)`` pair, or ``None``.
        session_id: for the ``session`` anonymous strategy: given the environ, return
            the session/device id (one the client cannot forge or renew at will). Without
            it anonymous requests share the anonymous bucket.
        **options: the shared options of :class:`~payi_guard.web.options.WebOptions`
            (``guarded_paths``, ``trust_user_header``, ``user_header``, ``block_status``,
            ``gate``, ``budget_headers``, ``on_invalid_user``, ``request_id_header``,
            ``www_authenticate``), each documented there.
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
        self.request_id_header = request_id_header
        """The response header that echoes the request id, or ``None``."""
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
        # What ``request_scope(request_id=...)`` and ``bind_request`` do, undone by
        # ``binding.close()`` (in this context) when the response ends.
        rs = RequestScope(None, request_id)
        binding = _Binding(rs)
        try:
            problem = self._identify(environ, rs)
            mark_bound(rs, core.guard)
            binding.bind_log(logged_id(rs, rs.user_id), request_id)
            guarded = (
                environ.get("REQUEST_METHOD") != "OPTIONS"  # CORS preflights
                and core.gate.guarded(environ.get("PATH_INFO") or "/")
            )
            if problem is None and guarded:
                gate = self._gate()
                problem = gate.problem
                store_gate_headers(rs, gate.headers)
            response = _Response(self, start_response, rs, request_id, hold=guarded)
            if problem is not None:
                binding.close()
                return response.problem(problem, None)
            try:
                iterable = self.app(environ, response.start_response)
            except Exception as exc:
                problem = core.problems.problem_for(exc)
                if problem is None:
                    raise
                binding.close()
                return response.problem(problem, sys.exc_info())
        except BaseException:
            binding.close()
            raise
        return _Body(context, iterable, binding, response)

    def _gate(self) -> GateResult:
        """The early gate of a guarded request, before the app runs.

        The Flask extension overrides it: there the user is only known inside the app,
        so it gates in ``before_request``.
        """
        return self.core.gate.check()

    def _identify(self, environ: Environ, rs: RequestScope) -> Problem | None:
        core = self.core
        try:
            # Read (and refused when repeated: servers join repeats with ",") first, used
            # last: the app's user wins.
            header = core.identify.header_user(environ.get(self._user_key))
        except DuplicateUserHeader as exc:
            return core.identify.invalid_user(exc, "header")
        try:
            resolver = core.options.user
            if resolver is not None:
                value, tier = split_user(resolver(environ))
                if value is not None:
                    return core.identify.assign_user(rs, value, "resolver", tier, fresh=True)
        except InvalidUserId as exc:  # raised by the resolver itself
            return core.identify.invalid_user(exc, "resolver")
        if header is not None:
            return core.identify.assign_user(rs, header, "header", fresh=True)
        if core.identify.wants_session():
            session_id = core.options.session_id
            if session_id is not None:
                core.identify.set_session(rs, session_id(environ))
        return None


class _Binding:
    """The request's context variables, set in its own context and reset there at its end.

    The request scope, and structlog's ``user_id`` and ``request_id``.
    """

    __slots__ = ("_log", "_scope")

    def __init__(self, rs: RequestScope) -> None:
        self._scope: contextvars.Token[RequestScope | None] | None = _REQUEST.set(rs)
        self._log: LogTokens | None = None

    def bind_log(self, user_id: str | None, request_id: str) -> None:
        """Bind ``user_id`` and ``request_id`` for the request's log lines."""
        self._log = bind_request(user_id, request_id)

    def close(self) -> None:
        """Reset what was set, last first; once (later calls do nothing)."""
        log, self._log = self._log, None
        if log is not None:
            unbind_request(log)
        scope, self._scope = self._scope, None
        if scope is not None:
            _REQUEST.reset(scope)


class _Response:
    """The guard's ``start_response`` (adds its headers) and its problem responses.

    With ``hold`` (guarded paths), the app's ``start_response`` is kept back until the
    first non-empty body chunk, a ``write()``, or the end of the body (PEP 3333 only
    requires servers to wait for the first non-empty chunk, and some send the headers
    on an empty one): a refusal raised before the first body byte can then still become
    the refusal response, with one ``start_response`` call.

    Attributes:
        forwarded: the server's ``start_response`` was called.
        sent: a body byte went to the server.
    """

    __slots__ = (
        "_held",
        "_middleware",
        "_own",
        "_rs",
        "_server_write",
        "_start_response",
        "forwarded",
        "hold",
        "request_id",
        "sent",
    )

    def __init__(
        self,
        middleware: WSGIGuardMiddleware,
        start_response: StartResponse,
        rs: RequestScope,
        request_id: str,
        *,
        hold: bool,
    ) -> None:
        self._middleware = middleware
        self._start_response = start_response
        self._rs = rs
        self.request_id = request_id
        self.hold = hold
        self.forwarded = False
        self.sent = False
        self._held: tuple[str, list[tuple[str, str]]] | None = None
        self._server_write: Callable[[bytes], object] | None = None
        name = middleware.request_id_header
        self._own: list[tuple[str, str]] = [] if name is None else [(name, request_id)]

    @property
    def holding(self) -> bool:
        """True while the app's start is held back (guarded paths, no byte sent yet)."""
        return self.hold and not self.forwarded

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], object]:
        added = with_headers(headers, self._own)
        if added is not None:
            headers = added
        if self.holding:
            # Nothing reached the server: a later call (with exc_info) simply replaces it.
            self._held = (status, headers)
            return self._write
        return self._forward(status, headers, exc_info)

    def _forward(
        self, status: str, headers: list[tuple[str, str]], exc_info: ExcInfo | None = None
    ) -> Callable[[bytes], object]:
        self.forwarded = True
        if exc_info is None:
            self._server_write = self._start_response(status, headers)
        else:
            self._server_write = self._start_response(status, headers, exc_info)
        return self._server_write

    def release(self) -> None:
        """Call the server's ``start_response`` with the held start, if any."""
        held, self._held = self._held, None
        if held is not None:
            status, headers = held
            # budget_headers: read as the start goes out, so they count this request.
            rated = self._middleware.core.gate.response_headers(self._rs)
            added = with_headers(headers, list(rated)) if rated else None
            self._forward(status, headers if added is None else added)

    def _write(self, data: bytes) -> object:
        """The ``write()`` callable of a held start: sends the start first."""
        self.release()
        if self._server_write is None:  # pragma: no cover - only returned with a start
            raise RuntimeError("write() called before start_response()")
        if data:
            self.sent = True
        return self._server_write(data)

    def problem(self, problem: Problem, exc_info: ExcInfo | Any) -> list[bytes]:
        """Answer ``problem`` instead of the app's response (nothing of it was sent)."""
        headers = [*problem.all_headers(), *self._own]
        self._held = None
        if not self.forwarded or exc_info is None or exc_info[0] is None:
            self._forward(problem.wsgi_status(), headers)
        else:
            # Replaces headers the app set but the server has not sent yet (PEP 3333).
            self._forward(problem.wsgi_status(), headers, exc_info)
        return [problem.body]


class _Body:
    """The response iterable: every step and the close run in the request's context."""

    __slots__ = ("_binding", "_closed", "_context", "_iterable", "_iterator", "_response")

    def __init__(
        self,
        context: contextvars.Context,
        iterable: Iterable[bytes],
        binding: _Binding,
        response: _Response,
    ) -> None:
        self._context = context
        self._iterable = iterable
        self._iterator: Iterator[bytes] | None = None
        self._binding = binding
        self._response = response
        self._closed = False

    def __iter__(self) -> _Body:
        return self

    def __next__(self) -> bytes:
        return self._context.run(self._next)

    def _next(self) -> bytes:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        response = self._response
        while True:
            try:
                chunk = next(self._iterator)
            except StopIteration:
                response.release()  # an empty body: the start goes out now
                raise
            except Exception as exc:
                problem = self._middleware_problem(exc)
                if problem is None:
                    raise
                return self._refused(exc, problem)
            if chunk or not response.holding:
                break
            # An empty chunk carries no byte: keep holding the start.
        response.release()
        # Some servers send the headers on an empty chunk too (werkzeug does).
        response.sent = True
        return chunk

    def _middleware_problem(self, exc: Exception) -> Problem | None:
        return self._response._middleware.core.problems.problem_for(exc)

    def _refused(self, exc: Exception, problem: Problem) -> bytes:
        response = self._response
        if not response.sent:
            # Nothing was yielded yet, so the server cannot have sent the headers.
            response.sent = True
            self._iterator = iter(())
            return response.problem(problem, sys.exc_info())[0]
        if not isinstance(exc, BudgetExceeded):
            raise exc
        response._middleware.core.refused_after_start(exc, response.request_id)
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
            self._binding.close()
