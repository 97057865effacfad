"""The users page application: :class:`UsersApp` and :func:`users_app`."""

from __future__ import annotations

import html
import math
import secrets
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import resources
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from payi_guard.admin.actions import Actions
from payi_guard.admin.dedupe import RequestIds
from payi_guard.admin.directory import (
    UserDirectory,
    UserSummary,
    match_query,
    order_summaries,
    read_summaries,
)
from payi_guard.admin.history import UserPages
from payi_guard.admin.ingest import EventsEndpoint
from payi_guard.admin.listing import ListQuery, QueryError, to_csv
from payi_guard.admin.recent import RecentCalls
from payi_guard.admin.responses import problem as _problem
from payi_guard.admin.responses import read_limited as _read_limited
from payi_guard.admin.security import SESSION_COOKIE, SecurityHeaders, TokenAuth, from_this_site
from payi_guard.engine import Guard
from payi_guard.exceptions import InvalidUserId, StorageError
from payi_guard.identity import normalize_user_id

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

MIN_TOKEN_LENGTH = 16
"""The shortest access token accepted."""

DEFAULT_PAGE_SIZE = 100
"""Users per page (and the most users' usage one request reads)."""

MAX_BODY_BYTES = 1 << 20
"""The largest ``POST /api/events`` body accepted (1 MiB); larger ones get 413."""

MAX_BATCH = 1000
"""The most events one ``POST /api/events`` may carry."""

MAX_EXPORT = 5000
"""The most users one CSV export reads."""

DEFAULT_REQUEST_ID_TTL = 7 * 86400
"""Seconds a recorded ``request_id`` is remembered by default (a week)."""

_MAX_FORM_BYTES = 4096


def _invalid(exc: QueryError) -> Response:
    return _problem(
        400, "invalid-parameter", "Invalid parameter", str(exc), parameter=exc.parameter
    )


def _template(name: str) -> str:
    static = resources.files("payi_guard.admin").joinpath("static")
    return static.joinpath(name).read_text(encoding="utf-8")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat()


class UsersApp:
    """The users page and the events endpoint; :func:`users_app` is the way to build it.

    Args:
        guard: the guard whose users are shown and charged.
        token: the access token (at least :data:`MIN_TOKEN_LENGTH` characters).
        title: the page title.
        page_size: users per page, and the most users' usage one request reads.
        max_body_bytes: the largest events body accepted.
        max_batch: the most events per request.
        max_keys: the most counter keys one discovery scan reads.
        directory_ttl: seconds a discovery scan is reused.
        session_ttl: seconds a page session lasts.
        request_id_ttl: seconds a recorded event ``request_id`` is remembered (an event
            with the same id in that time is not charged again).

    Raises:
        ValueError: an argument is out of range, the token is too short, or the guard
            pseudonymises user ids.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        token: str,
        title: str = "payi_guard users",
        page_size: int = DEFAULT_PAGE_SIZE,
        max_body_bytes: int = MAX_BODY_BYTES,
        max_batch: int = MAX_BATCH,
        max_keys: int = 200_000,
        directory_ttl: float = 5.0,
        session_ttl: float = 12 * 3600,
        request_id_ttl: float = DEFAULT_REQUEST_ID_TTL,
    ) -> None:
        if not isinstance(guard, Guard):
            raise ValueError(f"guard must be a payi_guard.Guard, got {type(guard).__name__}")
        if not isinstance(token, str) or len(token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"token must be a string of at least {MIN_TOKEN_LENGTH} characters")
        if any(c.isspace() or not c.isprintable() for c in token):
            raise ValueError("token must not contain whitespace or control characters")
        if guard.pseudonymizer is not None:
            raise ValueError(
                "the users page cannot list the users of a Guard that pseudonymises ids: "
                "its counters are keyed by pseudonyms, which do not lead back to users"
            )
        for name, value, low in (
            ("page_size", page_size, 1),
            ("max_body_bytes", max_body_bytes, 1024),
            ("max_batch", max_batch, 1),
            ("max_keys", max_keys, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        for name, seconds in (("directory_ttl", directory_ttl), ("session_ttl", session_ttl)):
            if not isinstance(seconds, (int, float)) or not 0 <= seconds < math.inf:
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if (
            isinstance(request_id_ttl, bool)
            or not isinstance(request_id_ttl, (int, float))
            or not 0 < request_id_ttl < math.inf
        ):
            raise ValueError("request_id_ttl must be a finite number of seconds > 0")
        self.guard = guard
        self.title = str(title)
        self.page_size = page_size
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch
        self.directory = UserDirectory(guard, max_keys=max_keys, ttl=float(directory_ttl))
        self._auth = TokenAuth(token, guard, float(session_ttl))
        self._request_ids = RequestIds(guard, float(request_id_ttl))
        self._actions = Actions(guard, self._auth, self._unauthorized, self._storage_failed)
        self._page = _template("users.html").replace("__TITLE__", html.escape(self.title))
        self._login_page = _template("login.html").replace("__TITLE__", html.escape(self.title))
        self.recent = RecentCalls(guard.clock.now)
        guard.observers.add(self.recent)
        self._pages = UserPages(
            guard, self._auth, self.recent, self._unauthorized, self._storage_failed, self.title
        )
        self._events = EventsEndpoint(
            guard,
            self._auth,
            self._request_ids,
            self._unauthorized,
            self._storage_failed,
            max_body_bytes=max_body_bytes,
            max_batch=max_batch,
        )

    def asgi(self) -> ASGIApp:
        """Return the Starlette application serving every route."""
        return Starlette(
            routes=[
                Route("/", self.page, methods=["GET"]),
                Route("/", self.sign_in, methods=["POST"]),
                Route("/logout", self.sign_out, methods=["POST"]),
                Route("/healthz", self.health, methods=["GET"]),
                Route("/api/users", self.list_users, methods=["GET"]),
                Route("/api/users.csv", self.export_csv, methods=["GET"]),
                Route("/api/users/{user_id}", self.get_user, methods=["GET"]),
                Route("/api/users/{user_id}/adjust", self._actions.adjust, methods=["POST"]),
                Route("/api/users/{user_id}/reset", self._actions.reset, methods=["POST"]),
                Route("/api/users/{user_id}/adjustments", self._actions.history, methods=["GET"]),
                Route("/api/users/{user_id}/history", self._pages.user_history, methods=["GET"]),
                Route("/api/orgs/{org_id}/history", self._pages.org_history, methods=["GET"]),
                Route("/users/{user_id}", self._pages.page, methods=["GET"]),
                Route("/api/events", self.post_events, methods=["POST"]),
            ],
            middleware=[Middleware(SecurityHeaders)],
        )

    # -- the HTML page ----------------------------------------------------------------------

    def _html(
        self, template: str, status: int = 200, message: str = "", csrf: str = ""
    ) -> HTMLResponse:
        nonce = secrets.token_urlsafe(18)
        body = (
            template.replace("__NONCE__", nonce)
            .replace("__MESSAGE__", html.escape(message))
            .replace("__CSRF__", html.escape(csrf))
        )
        policy = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
            "connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; "
            "frame-ancestors 'none'"
        )
        return HTMLResponse(body, status, headers={"content-security-policy": policy})

    def _signed_in(self, request: Request) -> Response:
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(
            SESSION_COOKIE,
            self._auth.new_session(),
            max_age=int(self._auth.ttl),
            path=self._cookie_path(request),
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @staticmethod
    def _cookie_path(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/") + "/"

    async def page(self, request: Request) -> Response:
        """``GET /``: the page, or the sign-in form (401) without a valid session.

        A ``?token=`` in the address is refused (400, the form instead): an address ends
        up in access logs, proxies and browser history, so the token is only taken from
        the form (``POST /``) or an ``Authorization: Bearer`` header.
        """
        if "token" in request.query_params:
            return self._html(
                self._login_page,
                400,
                "The token goes in this form, not in the address: addresses end up in "
                "access logs and browser history. Enter it below.",
            )
        if self._auth.session_ok(request) or self._auth.bearer_ok(request):
            return self._html(self._page, csrf=self._auth.csrf_token(request))
        return self._html(self._login_page, 401)

    def _refused(self, what: str) -> Response:
        return self._html(
            self._login_page,
            403,
            f"{what} refused: the request did not come from this page. Use the page's own form.",
        )

    async def sign_in(self, request: Request) -> Response:
        """``POST /``: the sign-in form (``token`` field, URL-encoded), from this site."""
        if not from_this_site(request):
            return self._refused("Sign-in")
        body = await _read_limited(request, _MAX_FORM_BYTES)
        if body is None:
            return self._html(self._login_page, 413, "That request is too large.")
        form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=8)
        candidates = form.get("token", [])
        if len(candidates) == 1 and self._auth.token_ok(candidates[0]):
            return self._signed_in(request)
        return self._html(self._login_page, 401, "That token is not valid.")

    async def sign_out(self, request: Request) -> Response:
        """``POST /logout``: end the session; takes the page's CSRF token, from this site.

        A post from another site, or without the session's CSRF token, changes nothing
        (403): otherwise any site could sign the user out. Without a valid session there
        is nothing to end: the answer goes back to the sign-in form.
        """
        if not from_this_site(request):
            return self._refused("Sign-out")
        body = await _read_limited(request, _MAX_FORM_BYTES)
        form = parse_qs((body or b"").decode("utf-8", "replace"), max_num_fields=8)
        if not self._auth.session_ok(request):
            return RedirectResponse("./", status_code=303)
        given = form.get("csrf", [])
        if len(given) != 1 or not self._auth.csrf_ok(request, given[0]):
            return self._refused("Sign-out")
        response = RedirectResponse("./", status_code=303)
        response.delete_cookie(
            SESSION_COOKIE, path=self._cookie_path(request), httponly=True, samesite="strict"
        )
        return response

    async def health(self, request: Request) -> Response:
        """``GET /healthz``: 200 while the app runs (no authentication, no data)."""
        return JSONResponse({"status": "ok"})

    # -- the API ----------------------------------------------------------------------------

    def _unauthorized(self) -> Response:
        return _problem(
            401,
            "unauthorized",
            "Unauthorized",
            "Send the access token as `Authorization: Bearer <token>`.",
            headers={"www-authenticate": 'Bearer realm="payi_guard"'},
        )

    @staticmethod
    def _storage_failed() -> Response:
        return _problem(
            503,
            "storage-unavailable",
            "Budget storage unavailable",
            "The budget storage cannot be read right now; try again shortly.",
        )

    async def list_users(self, request: Request) -> Response:
        """``GET /api/users``: users with their limits.

        Query parameters: see :class:`~payi_guard.admin.listing.ListQuery` (``q``,
        ``state``, ``org``, ``tier``, ``min_spend``, ``max_spend``, ``sort``, ``order``,
        ``page``); an invalid one is a 400 naming it.

        Pages are cut from the user ids in order, so a request never reads more than
        ``page_size`` users' usage however many users there are. ``sort=name`` (and
        ``q``, ``org``) order and filter across all pages; the other sorts and filters
        need each user's usage, so they apply to the users of the requested page, and
        the response says so with ``"scope": "page"`` (``"all"`` when the order and
        filter hold across every page, as they do whenever a single page holds every
        matching user). ``spend`` and ``remaining`` are those of the user's own money
        limit with the least headroom.
        """
        if not (self._auth.bearer_ok(request) or self._auth.session_ok(request)):
            return self._unauthorized()
        try:
            query = ListQuery.parse(request)
        except QueryError as exc:
            return _invalid(exc)
        try:
            directory = await self.directory.get()
            ids = self._ids(directory.user_ids, query)
            pages = max(1, math.ceil(len(ids) / self.page_size))
            start = (query.page - 1) * self.page_size
            summaries = await read_summaries(self.guard, ids[start : start + self.page_size])
        except StorageError:
            return self._storage_failed()
        summaries = [s for s in summaries if query.keeps(s)]
        summaries = order_summaries(summaries, query.sort, descending=query.order == "desc")
        whole = pages == 1 or (query.sort == "name" and not query.filters_usage)
        return JSONResponse(
            {
                "users": [s.as_dict() for s in summaries],
                "page": query.page,
                "pages": pages,
                "page_size": self.page_size,
                "total": len(ids),
                "truncated": directory.truncated,
                **query.as_dict(),
                "scope": "all" if whole else "page",
                "now": _iso(self.guard.clock.now()),
            }
        )

    @staticmethod
    def _ids(user_ids: Sequence[str], query: ListQuery) -> list[str]:
        ids = [uid for uid in user_ids if query.keeps_id(uid)]
        if query.q is not None:
            ids = [uid for uid in ids if match_query(uid, query.q)]
        if query.sort == "name" and query.order == "desc":
            ids.reverse()
        return ids

    async def export_csv(self, request: Request) -> Response:
        """``GET /api/users.csv``: the users the list's query selects, as CSV.

        Same parameters as :meth:`list_users` but ``page``: every matching user (up to
        :data:`MAX_EXPORT`; beyond, the answer has ``X-Truncated: true``), filtered and
        sorted as a whole.
        """
        if not (self._auth.bearer_ok(request) or self._auth.session_ok(request)):
            return self._unauthorized()
        try:
            query = ListQuery.parse(request)
        except QueryError as exc:
            return _invalid(exc)
        try:
            directory = await self.directory.get()
            ids = self._ids(directory.user_ids, query)
            summaries = await read_summaries(self.guard, ids[:MAX_EXPORT])
        except StorageError:
            return self._storage_failed()
        summaries = [s for s in summaries if query.keeps(s)]
        summaries = order_summaries(summaries, query.sort, descending=query.order == "desc")
        truncated = len(ids) > MAX_EXPORT or directory.truncated
        return Response(
            to_csv(summaries),
            media_type="text/csv; charset=utf-8",
            headers={
                "content-disposition": 'attachment; filename="users.csv"',
                "x-truncated": "true" if truncated else "false",
                "cache-control": "no-store",
            },
        )

    async def get_user(self, request: Request) -> Response:
        """``GET /api/users/{user_id}``: one user's limits (a valid id always has some view)."""
        if not (self._auth.bearer_ok(request) or self._auth.session_ok(request)):
            return self._unauthorized()
        try:
            user_id = normalize_user_id(request.path_params["user_id"])
        except InvalidUserId as exc:
            return _problem(
                400, "invalid-user-id", "Invalid user id", f"The user id was refused: {exc.reason}."
            )
        try:
            limits = await self.guard.ausage(user_id)
        except StorageError:
            return self._storage_failed()
        summary = UserSummary.of(user_id, limits, await self.guard.atier(user_id)).as_dict()
        return JSONResponse({**summary, "now": _iso(self.guard.clock.now())})

    async def post_events(self, request: Request) -> Response:
        """``POST /api/events``: see :meth:`EventsEndpoint.post_events`."""
        return await self._events.post_events(request)


def users_app(
    guard: Guard,
    *,
    token: str,
    title: str = "payi_guard users",
    page_size: int = DEFAULT_PAGE_SIZE,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_batch: int = MAX_BATCH,
    max_keys: int = 200_000,
    directory_ttl: float = 5.0,
    session_ttl: float = 12 * 3600,
    request_id_ttl: float = DEFAULT_REQUEST_ID_TTL,
) -> ASGIApp:
    """Build the users page and events endpoint as an ASGI app to mount.

    Args:
        guard: the guard whose users are shown and charged.
        token: the access token (at least 16 characters; keep it secret).
        title: the page title.
        page_size: users per page, and the most users' usage one request reads.
        max_body_bytes: the largest ``POST /api/events`` body (larger: 413).
        max_batch: the most events one request may carry.
        max_keys: the most counter keys one user-discovery scan reads; beyond, the
            listing is marked ``truncated``.
        directory_ttl: seconds the discovered user list is reused (0: scan every time).
        session_ttl: seconds a page session (cookie) lasts.
        request_id_ttl: seconds a recorded event ``request_id`` is remembered in the
            store (default: a week); within it, an event with the same id is reported as
            a ``duplicate`` and not charged again, by every process sharing the store.

    Returns:
        The ASGI application.

    Raises:
        ValueError: the token is shorter than 16 characters, a setting is out of range,
            or the guard pseudonymises user ids.
    """
    return UsersApp(
        guard,
        token=token,
        title=title,
        page_size=page_size,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        max_keys=max_keys,
        directory_ttl=directory_ttl,
        session_ttl=session_ttl,
        request_id_ttl=request_id_ttl,
    ).asgi()
