"""The users page: who spends what against which limit, and manual usage events.

:func:`users_app` builds a small ASGI application (Starlette) that an application
mounts next to its own routes::

    from payi_guard.admin import users_app

    app.mount("/guard", users_app(guard, token=os.environ["PAYI_GUARD_ADMIN_TOKEN"]))

Routes (relative to the mount point):

* ``GET /``: the HTML page, or its sign-in form. The token is typed into the form
  (``POST /``), never put in the address: addresses end up in access logs and browser
  history, so ``/guard/?token=...`` is refused (400). Signing in sets an HttpOnly,
  SameSite=Strict session cookie. The page renders offline (no CDN, no external asset)
  and fits a phone's screen.
* ``POST /logout``: signs out; it takes the CSRF token the page embeds. Every form post
  must come from the page's own site (``Sec-Fetch-Site`` / ``Origin``), so another site
  can neither sign a user in nor out.
* ``GET /api/users``: users with their limits, as JSON (``q``, ``state``, ``sort``,
  ``order``, ``page``; see :meth:`UsersApp.list_users`).
* ``GET /api/users/{user_id}``: one user's limits.
* ``POST /api/users/{user_id}/adjust`` and ``POST /api/users/{user_id}/reset``: an
  operator adds to (or gives back from) one of a user's current windows, or zeroes them
  (:meth:`Guard.aadjust`, :meth:`Guard.areset`); ``GET /api/users/{user_id}/adjustments``
  is the user's history of both. The page offers them on each user ("Manage"); see
  :mod:`payi_guard.admin.actions` for who may post (the token, or the page's own session
  with its CSRF token).
* ``POST /api/events``: manual usage events from services in other languages (one
  event or a batch, see :meth:`UsersApp.post_events`), charged with
  :meth:`Guard.arecord`: all validated and priced before anything is charged, and each
  ``request_id`` charged once (see :mod:`payi_guard.admin.dedupe`).
* ``GET /healthz``: liveness, without authentication or data.

The API takes ``Authorization: Bearer <token>``; ``GET`` routes also accept the page's
session cookie, ``POST /api/events`` does not (a browser session cannot post events), and
the operator actions accept it only with the session's CSRF token.

Flask and other WSGI apps: serve this app with any ASGI server next to the WSGI app,
or mount it through a WSGI adapter such as ``a2wsgi`` (not a dependency)::

    from a2wsgi import ASGIMiddleware
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    app.wsgi_app = DispatcherMiddleware(
        app.wsgi_app, {"/guard": ASGIMiddleware(users_app(guard, token=token))}
    )

Users are discovered from the storage's counter keys (one ``SCAN``); see
:mod:`payi_guard.admin.directory` for how pages are cut. Money in the JSON is a decimal
string (``"0.000000034"``), never exponent notation.
"""

from __future__ import annotations

from payi_guard.admin.app import (
    DEFAULT_PAGE_SIZE,
    DEFAULT_REQUEST_ID_TTL,
    MAX_BATCH,
    MAX_BODY_BYTES,
    MIN_TOKEN_LENGTH,
    UsersApp,
    users_app,
)
from payi_guard.admin.security import SESSION_COOKIE

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_REQUEST_ID_TTL",
    "MAX_BATCH",
    "MAX_BODY_BYTES",
    "MIN_TOKEN_LENGTH",
    "SESSION_COOKIE",
    "UsersApp",
    "users_app",
]
