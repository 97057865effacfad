"""Flask integration: the :class:`PayiGuard` extension.

::

    from payi_guard.flask import PayiGuard

    PayiGuard(app, guard=guard, guarded_paths=["/api/*"])

It wraps ``app.wsgi_app`` in :class:`~payi_guard.web.WSGIGuardMiddleware` (one context
per request, streamed bodies included) and, because Flask's session and flask-login's
``current_user`` are only readable inside the app, names the user in ``before_request``:
the ``user=`` callable, else flask-login's ``current_user`` (when flask-login is
installed, set up on the app, and the user is authenticated: ``get_id()``), else
``session["user_id"]``. Guarded paths are gated right after, still before the view.

Nothing is recorded in ``teardown_request``: it runs twice for a response streamed with
``stream_with_context``. Costs are recorded by the metered GenAI calls themselves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from typing_extensions import Unpack

from payi_guard.context import current_request
from payi_guard.engine import Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    InvalidUserId,
    MissingDependency,
    StorageError,
)
from payi_guard.web.core import WebCore
from payi_guard.web.gate import GateResult, store_gate_headers
from payi_guard.web.identify import rebind_user, split_user
from payi_guard.web.options import WebOptionArgs
from payi_guard.web.problem import Problem
from payi_guard.web.wsgi import WSGIGuardMiddleware

if TYPE_CHECKING:
    import flask

__all__ = ["PayiGuard"]

_EXTENSION = "payi_guard"


def _flask() -> Any:
    try:
        return importlib.import_module("flask")
    except ImportError as exc:  # pragma: no cover - the flask extra installs it
        raise MissingDependency("flask", "flask") from exc


class PayiGuard:
    """The Flask extension: one request scope per request, the user from Flask's own auth.

    Use ``PayiGuard(app, guard=guard)`` or the factory pattern
    ``ext = PayiGuard(guard=guard); ext.init_app(app)``.

    Args:
        app: the Flask app (or ``None`` to call :meth:`init_app` later).
        guard: the :class:`~payi_guard.engine.Guard` that holds the budgets.
        user: a callable without arguments, called in ``before_request``, that returns
            the user id, a ``(user_id, tier)`` pair (the user's plan), or ``None``
            (replaces the flask-login / session defaults).
        session_key: the ``session`` key read when neither ``user`` nor flask-login
            names a user.
        session_id: for the ``session`` anonymous strategy: a callable without arguments
            that returns the session/device id (default: an id the extension keeps in
            Flask's signed ``session``; an app without a ``secret_key`` has no session,
            and its anonymous requests share the anonymous bucket).
        **options: the shared options of :class:`~payi_guard.web.options.WebOptions`
            (``guarded_paths``, ``trust_user_header``, ``user_header``, ``block_status``,
            ``gate``, ``budget_headers``, ``on_invalid_user``, ``request_id_header``,
            ``www_authenticate``), each documented there.
            ``guarded_paths`` are gated in ``before_request``, once the user is
            named, before the view runs.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        guard: Guard,
        user: Callable[[], Any] | None = None,
        session_key: str = "user_id",
        session_id: Callable[[], Any] | None = None,
        **options: Unpack[WebOptionArgs],
    ) -> None:
        if user is not None and not callable(user):
            raise TypeError("user= must be a callable without arguments, or None")
        if session_id is not None and not callable(session_id):
            raise TypeError("session_id= must be a callable without arguments, or None")
        self.guard = guard
        self.user = user
        self.session_key = session_key
        self.session_id = session_id
        # The core that gates in before_request: the user is only known there.
        self.core = WebCore(guard, **options)
        # The middleware opens the request, answers the guard's exceptions and holds the
        # start of guarded responses; it gates nothing (before_request does).
        self._middleware_options = options.copy()
        self._middleware_options.pop("budget_headers", None)
        self._middleware_options.pop("gate", None)
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Install the middleware, the ``before_request`` hook and the error handlers.

        Raises:
            RuntimeError: the extension is already installed on ``app``.
        """
        if _EXTENSION in app.extensions:
            raise RuntimeError("PayiGuard is already installed on this app")
        app.wsgi_app = _FlaskMiddleware(  # type: ignore[method-assign]
            app.wsgi_app, guard=self.guard, **self._middleware_options
        )
        app.before_request(self._before_request)
        app.register_error_handler(BudgetExceeded, self._handle_error)
        app.register_error_handler(InvalidUserId, self._handle_error)
        app.register_error_handler(StorageError, self._handle_error)
        app.extensions[_EXTENSION] = self

    # -- hooks ------------------------------------------------------------------------------

    def _find_user(self) -> object | None:
        if self.user is not None:
            found: object = self.user()
            return found
        fl = _flask()
        app = fl.current_app
        if getattr(app, "login_manager", None) is not None:
            try:
                flask_login = importlib.import_module("flask_login")
            except ImportError:  # pragma: no cover - login_manager implies flask-login
                flask_login = None
            if flask_login is not None:
                current = flask_login.current_user
                if current is not None and current.is_authenticated:
                    user_id: object = current.get_id()
                    return user_id
        value: object = fl.session.get(self.session_key)
        return value

    def _before_request(self) -> Any:
        rs = current_request()
        if rs is None:  # pragma: no cover - the middleware always opens one
            return None
        # The signed-in user wins over the trusted header the middleware read.
        if rs.source is None or rs.source == "header":
            tier: str | None = None
            try:
                value, tier = split_user(self._find_user())
            except InvalidUserId as exc:
                value = None
                problem = self.core.identify.invalid_user(exc, "flask")
                if problem is not None:
                    return _response(problem)
            if value is not None:
                problem = self.core.identify.assign_user(rs, value, "flask", tier)
                if problem is not None:
                    return _response(problem)
                if rs.user_id is not None:
                    rebind_user(rs.user_id)
        if rs.user_id is None and self.core.identify.wants_session():
            session = self.session_id() if self.session_id is not None else _stored_session()
            self.core.identify.set_session(rs, session)
        request = _flask().request
        if request.method != "OPTIONS" and self.core.gate.guarded(request.path):
            gate = self.core.gate.check()
            if gate.problem is not None:
                return _response(gate.problem)
            store_gate_headers(rs, gate.headers)
        return None

    def _handle_error(self, exc: Exception) -> Any:
        problem = self.core.problems.problem_for(exc)
        if problem is None:  # pragma: no cover - only registered for these classes
            raise exc
        return _response(problem)


def _stored_session() -> str | None:
    """The id the extension keeps in Flask's signed session (none without a secret key)."""
    fl = _flask()
    session = fl.session
    if fl.current_app.session_interface.is_null_session(session):
        return None
    return WebCore.stored_session(session)


class _FlaskMiddleware(WSGIGuardMiddleware):
    """The middleware under the extension: no early gate, the user is not known yet.

    Guarded paths are gated in ``before_request``; the middleware still holds their
    response start until the first body byte, so a refusal in a streamed body before it
    is answered with the refusal response.
    """

    def _gate(self) -> GateResult:
        return GateResult()


def _response(problem: Problem) -> flask.Response:
    response: flask.Response = _flask().Response(
        problem.body, status=problem.status, headers=problem.all_headers()
    )
    return response
