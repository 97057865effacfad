"""The Django middleware: :class:`GuardMiddleware`.

Django is imported when the middleware is built (by Django, at start-up), never when
this module is imported.
"""

from __future__ import annotations

import contextvars
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

from payi_guard.context import RequestScope, current_request, request_scope
from payi_guard.django.body import AsyncBody, SyncBody, close_in_context, run_in_context
from payi_guard.django.conf import check_order, django_module, get_guard, read_settings
from payi_guard.exceptions import BudgetExceeded, InvalidUserId
from payi_guard.web.core import WebCore
from payi_guard.web.gate import store_gate_headers
from payi_guard.web.identify import (
    ORDER_EVENT,
    bind_request,
    logged_id,
    mark_bound,
    request_id_of,
    session_digest,
    split_user,
    structlog_vars,
    unbind_request,
)
from payi_guard.web.problem import Problem

if TYPE_CHECKING:
    from django.http import HttpRequest, HttpResponseBase

__all__ = ["GuardMiddleware"]

_NOTHING: Any = object()
_PROBLEM_ATTR = "_payi_guard_problem"

_ORDER_DETAIL = (
    "request.user is not set when GuardMiddleware runs, so requests are anonymous: put "
    "'payi_guard.django.GuardMiddleware' after "
    "'django.contrib.auth.middleware.AuthenticationMiddleware' in MIDDLEWARE"
)


class GuardMiddleware:
    """Attribute every GenAI call of a Django request to its user; gate guarded paths.

    Add it to ``MIDDLEWARE`` after ``AuthenticationMiddleware`` (and after any
    middleware that logs users in, such as ``RemoteUserMiddleware``), and configure it
    with ``settings.PAYI_GUARD``::

        MIDDLEWARE = [
            ...,
            "django.contrib.sessions.middleware.SessionMiddleware",
            "django.contrib.auth.middleware.AuthenticationMiddleware",
            "payi_guard.django.GuardMiddleware",
        ]
        PAYI_GUARD = {"config": BASE_DIR / "budgets.yaml", "guarded_paths": ["/api/*"]}

    Sync and async capable: under WSGI it runs sync, under ASGI async (unless a
    middleware inside it is sync only), and sync and async views both see the request's
    attribution. For each request:

    * its own :class:`contextvars.Context`, holding a
      :func:`~payi_guard.context.request_scope` and the structlog binding of ``user_id``
      and ``request_id``, in which the view, every step of a streamed body and the
      response's ``close`` run;
    * the user: the ``user`` callable of the settings, else ``request.user.pk`` when the
      user is authenticated, else the ``xProxy-User-ID`` header when
      ``trust_user_header`` is on; else the request is anonymous and the budgets'
      ``anonymous`` strategy applies (``session``: Django's session, checked by its
      backend, never the raw cookie; only a digest of its key is used);
    * ``guarded_paths`` (globs over ``request.path_info``) are gated before the view;
    * a ``BudgetExceeded`` raised by the view becomes the refusal response (429
      ``application/problem+json`` with ``Retry-After``, ``RateLimit-Policy`` and
      ``RateLimit``), ``UserRequired`` a 401, ``InvalidUserId`` a 400,
      ``StorageError`` a 503;
    * a ``StreamingHttpResponse`` (sync or async iterator) is held until its first
      chunk exists, so a refusal before it is the same problem response, never an
      empty 200; a refusal later ends the body and is logged
      (``budget_exceeded_after_start``). The request ends when the body ends or the
      response is closed.

    Args:
        get_response: the next handler (Django passes it).

    Raises:
        ImproperlyConfigured: ``settings.PAYI_GUARD`` is missing or invalid, or
            ``MIDDLEWARE`` lists ``AuthenticationMiddleware`` after the guard.
        MissingDependency: Django is not installed.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        asgiref_sync = django_module("asgiref.sync")
        settings = read_settings()
        check_order(has_resolver=settings.user is not None)
        self.get_response = get_response
        self.core = WebCore(
            get_guard(),
            user=settings.user,
            session_id=settings.session_id,
            **settings.web,
        )
        options = self.core.options
        self._user_header = options.user_header
        self._request_id_header = options.request_id_header
        self._warned_order = False
        self._sync_to_async = asgiref_sync.sync_to_async
        self._async_to_sync = asgiref_sync.async_to_sync
        is_coroutine = asgiref_sync.iscoroutinefunction
        self._user_is_async = bool(options.user is not None and is_coroutine(options.user))
        self._session_is_async = bool(
            options.session_id is not None and is_coroutine(options.session_id)
        )
        self._lazy_object = django_module("django.utils.functional").LazyObject
        self._async = bool(is_coroutine(get_response))
        if self._async:
            asgiref_sync.markcoroutinefunction(self)

    # -- entry points ---------------------------------------------------------------------

    def __call__(self, request: HttpRequest) -> Any:
        """Serve one request (returns a coroutine when the handler is async)."""
        context = contextvars.copy_context()
        if self._async:
            return run_in_context(context, self._aserve(context, request))
        return context.run(self._serve, context, request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> Any:
        """Answer the guard's exceptions raised by the view with the problem response.

        Returns:
            The response, or ``None`` to let Django handle any other exception.
        """
        problem = self.core.problems.problem_for(exception)
        if problem is None:
            return None
        rs = current_request()
        return self._problem_response(problem, None if rs is None else rs.request_id)

    # -- one request ------------------------------------------------------------------------

    def _open(self, request: HttpRequest, stack: ExitStack) -> tuple[RequestScope, str]:
        incoming = request.headers.get(self._request_id_header) if self._request_id_header else None
        request_id = request_id_of(incoming)
        rs = stack.enter_context(request_scope(request_id=request_id))
        # The request id is bound first: lines logged while the user is identified (an
        # invalid id refused with a 400) carry it, as the 400's body does.
        request_var = structlog_vars()[1]
        stack.callback(request_var.reset, request_var.set(request_id))
        return rs, request_id

    def _bind(self, rs: RequestScope, request_id: str, stack: ExitStack) -> None:
        mark_bound(rs, self.core.guard)
        tokens = bind_request(logged_id(rs, rs.user_id), request_id)
        stack.callback(unbind_request, tokens)

    def _gated(self, request: HttpRequest) -> bool:
        # CORS preflights never make GenAI calls, and must not need a user.
        return request.method != "OPTIONS" and self.core.gate.guarded(request.path_info)

    def _serve(self, context: contextvars.Context, request: HttpRequest) -> HttpResponseBase:
        with ExitStack() as stack:
            rs, request_id = self._open(request, stack)
            problem = self._identify(request, rs)
            self._bind(rs, request_id, stack)
            if problem is None and self._gated(request):
                gate = self.core.gate.check()
                problem = gate.problem
                store_gate_headers(rs, gate.headers)
            if problem is not None:
                return self._problem_response(problem, request_id)
            response: HttpResponseBase = self.get_response(request)
            self._add_headers(response, request_id)
            checks = self.core.gate
            if not _streams(response):
                self._add_rate(response, checks.response_headers(rs))
                return response
            if response.is_async:  # type: ignore[attr-defined]
                chunks, problem = self._collect(response)
                if problem is not None:
                    return self._problem_response(problem, request_id)
                response.streaming_content = chunks  # type: ignore[attr-defined]
                self._add_rate(response, checks.response_headers(rs))
                return response
            first, content, problem = self._read_ahead(response)
            if problem is not None:
                return self._problem_response(problem, request_id)
            self._add_rate(response, checks.response_headers(rs))
            return self._stream(response, context, first, content, stack.pop_all(), request_id)

    async def _aserve(self, context: contextvars.Context, request: HttpRequest) -> HttpResponseBase:
        with ExitStack() as stack:
            rs, request_id = self._open(request, stack)
            problem = await self._aidentify(request, rs)
            self._bind(rs, request_id, stack)
            if problem is None and self._gated(request):
                gate = await self.core.gate.acheck()
                problem = gate.problem
                store_gate_headers(rs, gate.headers)
            if problem is not None:
                return self._problem_response(problem, request_id)
            response: HttpResponseBase = await self.get_response(request)
            self._add_headers(response, request_id)
            checks = self.core.gate
            if not _streams(response):
                self._add_rate(response, await checks.aresponse_headers(rs))
                return response
            first, content, problem = await self._aread_ahead(response)
            if problem is not None:
                return self._problem_response(problem, request_id)
            self._add_rate(response, await checks.aresponse_headers(rs))
            return self._stream(response, context, first, content, stack.pop_all(), request_id)

    # -- who the request is for -------------------------------------------------------------

    def _header_user(self, request: HttpRequest) -> tuple[str | None, Problem | None]:
        """The trusted header's user (used last), or the problem of a repeated or invalid one.

        Read first, whoever the request is for: a request carrying the header twice (or
        several users in it) is a 400 even when a resolver or a signed-in user names it.
        """
        identify = self.core.identify
        try:
            return identify.header_user(request.headers.get(self._user_header)), None
        except InvalidUserId as exc:
            return None, identify.invalid_user(exc, "header")

    def _identify(self, request: HttpRequest, rs: RequestScope) -> Problem | None:
        identify = self.core.identify
        options = self.core.options
        header, problem = self._header_user(request)
        if problem is not None:
            return problem
        try:
            if options.user is not None:
                value, tier = split_user(self._call(options.user, self._user_is_async, request))
                if value is not None:
                    return identify.assign_user(rs, value, "resolver", tier)
            value = self._user_of(getattr(request, "user", _NOTHING), options.user is None)
            if value is not None:
                return identify.assign_user(rs, value, "django")
            if header is not None:
                return identify.assign_user(rs, header, "header")
        except InvalidUserId as exc:  # the resolver's id
            return identify.invalid_user(exc, "resolver")
        if identify.wants_session():
            if options.session_id is not None:
                session = self._call(options.session_id, self._session_is_async, request)
            else:
                session = _session_of(request, loaded=False)
            identify.set_session(rs, session)
        return None

    async def _aidentify(self, request: HttpRequest, rs: RequestScope) -> Problem | None:
        identify = self.core.identify
        options = self.core.options
        header, problem = self._header_user(request)
        if problem is not None:
            return problem
        try:
            if options.user is not None:
                resolved = await self._acall(options.user, self._user_is_async, request)
                value, tier = split_user(resolved)
                if value is not None:
                    return identify.assign_user(rs, value, "resolver", tier)
            value = await self._auser_of(request, options.user is None)
            if value is not None:
                return identify.assign_user(rs, value, "django")
            if header is not None:
                return identify.assign_user(rs, header, "header")
        except InvalidUserId as exc:  # the resolver's id
            return identify.invalid_user(exc, "resolver")
        if identify.wants_session():
            if options.session_id is not None:
                session = await self._acall(options.session_id, self._session_is_async, request)
            else:
                session_store = getattr(request, "session", None)
                if session_store is not None:
                    await session_store.akeys()  # loads it: see _session_of
                session = _session_of(request, loaded=True)
            identify.set_session(rs, session)
        return None

    def _call(
        self, resolver: Callable[[HttpRequest], Any], is_async: bool, request: HttpRequest
    ) -> Any:
        if is_async:
            return self._async_to_sync(resolver)(request)
        return resolver(request)

    async def _acall(
        self, resolver: Callable[[HttpRequest], Any], is_async: bool, request: HttpRequest
    ) -> Any:
        if is_async:
            awaitable: Awaitable[Any] = resolver(request)
            return await awaitable
        # A sync resolver may read request.user or the database: never on the event loop.
        return await self._sync_to_async(resolver, thread_sensitive=True)(request)

    async def _auser_of(self, request: HttpRequest, warn_missing: bool) -> object | None:
        """Async :meth:`_user_of` of ``request.user``, without blocking the event loop."""
        user = getattr(request, "user", _NOTHING)
        if isinstance(user, self._lazy_object):
            # AuthenticationMiddleware's lazy user: loading it reads the session and the
            # database. A user a login middleware assigned is used as it is: Django's
            # alogin() updates request.user but not what request.auser() cached.
            auser = getattr(request, "auser", None)
            if auser is not None:
                user = await auser()
            else:
                resolve = self._sync_to_async(self._user_of, thread_sensitive=True)
                return await resolve(user, warn_missing)  # type: ignore[no-any-return]
        return self._user_of(user, warn_missing)

    def _user_of(self, user: Any, warn_missing: bool) -> object | None:
        """``user.pk`` of an authenticated Django user, else ``None``."""
        if user is _NOTHING:
            if warn_missing and not self._warned_order:
                self._warned_order = True
                self.core.log.warning(ORDER_EVENT, detail=_ORDER_DETAIL)
            return None
        if user is None or not getattr(user, "is_authenticated", False):
            return None
        pk: object | None = getattr(user, "pk", None)
        return pk

    # -- responses ------------------------------------------------------------------------

    def _problem_response(self, problem: Problem, request_id: str | None) -> HttpResponseBase:
        http = django_module("django.http")
        response: HttpResponseBase = http.HttpResponse(problem.body, status=problem.status)
        for name, value in problem.all_headers():
            response[name] = value
        if self._request_id_header is not None and request_id is not None:
            response[self._request_id_header] = request_id
        setattr(response, _PROBLEM_ATTR, True)
        return response

    def _add_headers(self, response: HttpResponseBase, request_id: str) -> None:
        if self._request_id_header is not None and not response.has_header(self._request_id_header):
            response[self._request_id_header] = request_id

    @staticmethod
    def _add_rate(response: HttpResponseBase, headers: tuple[tuple[str, str], ...]) -> None:
        """The ``RateLimit`` headers (``budget_headers``), read once the view has spent."""
        if getattr(response, _PROBLEM_ATTR, False):
            return  # they describe a success; a problem brings its own
        for name, value in headers:
            if not response.has_header(name):
                response[name] = value

    # -- streamed bodies ------------------------------------------------------------------

    def _close_refused(self, response: HttpResponseBase, exc: Exception) -> Problem | None:
        """Close a streamed response whose first chunk raised; return the guard's problem.

        Closing runs the view's clean-up now (its generator, files); Django sends
        ``request_finished`` again when it closes the problem response, which its
        receivers allow.
        """
        response.close()
        return self.core.problems.problem_for(exc)

    def _collect(self, response: Any) -> tuple[list[bytes], Problem | None]:
        """Read a whole async body for a sync server, in one event loop, as Django does."""
        warnings.warn(
            "StreamingHttpResponse must consume asynchronous iterators in order to serve "
            "them synchronously. Use a synchronous iterator instead.",
            Warning,
            stacklevel=3,
        )
        content = response.streaming_content

        async def collect() -> list[bytes]:
            return [chunk async for chunk in content]

        try:
            chunks: list[bytes] = self._async_to_sync(collect)()
        except Exception as exc:
            problem = self._close_refused(response, exc)
            if problem is None:
                raise
            return [], problem
        return chunks, None

    def _read_ahead(self, response: Any) -> tuple[Any, Iterator[bytes], Problem | None]:
        """Read the first chunk of a sync body (in the request's context)."""
        content: Iterator[bytes] = response.streaming_content
        try:
            return next(content, _NOTHING), content, None
        except Exception as exc:
            problem = self._close_refused(response, exc)
            if problem is None:
                raise
            return _NOTHING, content, problem

    async def _aread_ahead(self, response: Any) -> tuple[Any, Any, Problem | None]:
        """Read the first chunk of a body for an async server (a sync one in a thread)."""
        content = response.streaming_content
        try:
            if response.is_async:
                first = await anext(content, _NOTHING)
            else:
                first = await self._sync_to_async(next, thread_sensitive=True)(content, _NOTHING)
        except Exception as exc:
            close = self._sync_to_async(self._close_refused, thread_sensitive=True)
            problem = await close(response, exc)
            if problem is None:
                raise
            return _NOTHING, content, problem
        return first, content, None

    def _stream(
        self,
        response: Any,
        context: contextvars.Context,
        first: Any,
        content: Iterator[bytes] | AsyncIterator[bytes],
        stack: ExitStack,
        request_id: str,
    ) -> HttpResponseBase:
        """Serve the rest of a streamed body in the request's context; end it at the end."""
        end = stack.close
        if first is _NOTHING:
            end()
            response.streaming_content = ()
            return response  # type: ignore[no-any-return]

        def on_refusal(exc: BudgetExceeded) -> None:
            self.core.refused_after_start(exc, request_id)

        body: SyncBody | AsyncBody
        if isinstance(content, Iterator):
            body = SyncBody(context, first, content, end, on_refusal)
        else:
            body = AsyncBody(context, first, content, end, on_refusal)
        response.streaming_content = body
        close_in_context(response, context, end)
        return response  # type: ignore[no-any-return]


def _streams(response: HttpResponseBase) -> bool:
    # A FileResponse may be sent with the server's file wrapper, bypassing
    # streaming_content: reading ahead would lose its first block. Files make no GenAI
    # calls anyway.
    return bool(response.streaming) and getattr(response, "file_to_stream", None) is None


def _session_of(request: HttpRequest, *, loaded: bool) -> str | None:
    """A digest of the request's Django session key, once its backend vouched for it.

    The key is what the client sent until the session is loaded: loading it asks the
    backend, which drops a key it does not know (or whose signature fails). A client can
    therefore not open a new anonymous bucket by sending made-up cookies.
    """
    session = getattr(request, "session", None)
    if session is None:
        return None
    if not loaded:
        session.keys()  # loads the session; an unknown key becomes None
    key: str | None = session.session_key
    return None if not key else session_digest(key)
