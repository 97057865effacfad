"""A user's (or an org's) usage history: the JSON API and the user's page.

Routes (relative to the mount point):

* ``GET /api/users/{user_id}/history?days=30``: ``days`` (one entry per UTC day, oldest
  first: ``date``, ``cost_usd``, ``calls``, ``input_tokens``, ``output_tokens``,
  ``refused``), ``by_model`` and ``by_use_case`` (``name``, ``cost_usd``, ``calls``, most
  spent first), ``limits`` (each limit's current window, with its settled usage per
  UTC day where the window is made of whole UTC days: :mod:`payi_guard.admin.windows`),
  ``recent`` (the user's latest calls this process saw) and ``adjustments`` (the
  operators' journal). Money is a decimal string. ``days`` is a
  whole number from 1 to :data:`MAX_DAYS` (else 400, problem+json).
* ``GET /api/orgs/{org_id}/history?days=30``: the same figures for an org (no
  ``recent`` or ``adjustments``).
* ``GET /users/{user_id}``: the user's page (HTML), the last 30 days.

The figures come from the store's analytics (:mod:`payi_guard.ledger.analytics`), so
every host shows the same numbers; only ``recent`` is per process.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

from payi_guard.admin.recent import RecentCalls
from payi_guard.admin.responses import problem
from payi_guard.admin.security import TokenAuth
from payi_guard.admin.userpage import render_user_page
from payi_guard.admin.windows import aread_windows, window_dict
from payi_guard.engine import Guard, is_anonymous_id
from payi_guard.exceptions import InvalidUserId, StorageError
from payi_guard.identity import normalize_user_id
from payi_guard.ledger.analytics import History, NamedUsage, aread_history
from payi_guard.money import decimal_text, decimal_usd
from payi_guard.usage import Scope

__all__ = ["DEFAULT_DAYS", "MAX_DAYS", "UserPages", "history_dict"]

DEFAULT_DAYS = 30
"""Days of history the API and the page show by default."""

MAX_DAYS = 366
"""The most days one history request may ask for."""

_RECENT_SHOWN = 50


def _named(items: tuple[NamedUsage, ...]) -> list[dict[str, object]]:
    return [
        {"name": i.name, "cost_usd": decimal_text(decimal_usd(i.cost)), "calls": i.calls}
        for i in items
    ]


def history_dict(history: History) -> dict[str, object]:
    """The JSON form of a :class:`~payi_guard.ledger.analytics.History`."""
    return {
        "days": [
            {
                "date": day.date,
                "cost_usd": decimal_text(decimal_usd(day.cost)),
                "calls": day.calls,
                "input_tokens": day.input_tokens,
                "output_tokens": day.output_tokens,
                "refused": day.refused,
            }
            for day in history.days
        ],
        "by_model": _named(history.by_model),
        "by_use_case": _named(history.by_use_case),
        "cost_usd": decimal_text(decimal_usd(history.cost)),
        "calls": history.calls,
    }


class _Refusal(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _days(request: Request) -> int:
    given = request.query_params.getlist("days")
    if not given:
        return DEFAULT_DAYS
    raw = given[0]
    if len(given) > 1:
        detail = f"days must be given once, got {len(given)} values"
    elif not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
        detail = f"days must be a whole number from 1 to {MAX_DAYS}, got {raw[:40]!r}"
    else:
        return int(raw)
    raise _Refusal(problem(400, "invalid-parameter", "Invalid parameter", detail, parameter="days"))


def _id(request: Request, name: str, what: str) -> str:
    try:
        return normalize_user_id(request.path_params[name])
    except InvalidUserId as exc:
        raise _Refusal(
            problem(400, f"invalid-{what}-id", f"Invalid {what} id", f"Refused: {exc.reason}.")
        ) from exc


class UserPages:
    """The history API and the user page (see the module docstring).

    Args:
        guard: the guard whose store is read.
        auth: the app's token and session checks.
        recent: the ring of recent calls (an observer of ``guard``).
        unauthorized: the 401 answer of the app.
        storage_failed: the 503 answer of the app.
        title: the app's title.
    """

    def __init__(
        self,
        guard: Guard,
        auth: TokenAuth,
        recent: RecentCalls,
        unauthorized: Callable[[], Response],
        storage_failed: Callable[[], Response],
        title: str,
    ) -> None:
        self.guard = guard
        self._auth = auth
        self.recent = recent
        self._unauthorized = unauthorized
        self._storage_failed = storage_failed
        self._title = title

    def _allowed(self, request: Request) -> bool:
        return self._auth.bearer_ok(request) or self._auth.session_ok(request)

    async def _history(self, scope: Scope, owner: str, days: int) -> History:
        guard = self.guard
        return await aread_history(
            guard.async_ledger, guard.key_prefix, scope, owner, days=days, now=guard.clock.now()
        )

    async def user_history(self, request: Request) -> Response:
        """``GET /api/users/{user_id}/history``: a user's usage per day and breakdowns."""
        if not self._allowed(request):
            return self._unauthorized()
        try:
            user_id = _id(request, "user_id", "user")
            days = _days(request)
            scope = _scope_of(user_id)
            history = await self._history(scope, user_id, days)
            windows = await aread_windows(
                self.guard, await self.guard.ausage(user_id), {(scope, user_id): history}
            )
            adjustments = await self.guard.aadjustments(user_id)
        except _Refusal as refusal:
            return refusal.response
        except StorageError:
            return self._storage_failed()
        return JSONResponse(
            {
                "user_id": user_id,
                **history_dict(history),
                "limits": [window_dict(window) for window in windows],
                "recent": [c.as_dict() for c in self.recent.for_user(user_id, _RECENT_SHOWN)],
                "adjustments": [entry.as_dict() for entry in adjustments],
            }
        )

    async def org_history(self, request: Request) -> Response:
        """``GET /api/orgs/{org_id}/history``: an org's usage per day and breakdowns."""
        if not self._allowed(request):
            return self._unauthorized()
        try:
            org_id = _id(request, "org_id", "org")
            history = await self._history("org", org_id, _days(request))
        except _Refusal as refusal:
            return refusal.response
        except StorageError:
            return self._storage_failed()
        return JSONResponse({"org_id": org_id, **history_dict(history)})

    async def page(self, request: Request) -> Response:
        """``GET /users/{user_id}``: the user's page (signed out: back to the sign-in)."""
        if not self._allowed(request):
            return RedirectResponse("../", status_code=303)
        try:
            user_id = _id(request, "user_id", "user")
            scope = _scope_of(user_id)
            history = await self._history(scope, user_id, DEFAULT_DAYS)
            limits = await aread_windows(
                self.guard, await self.guard.ausage(user_id), {(scope, user_id): history}
            )
            adjustments = await self.guard.aadjustments(user_id)
        except _Refusal as refusal:
            return refusal.response
        except StorageError:
            return self._storage_failed()
        nonce = secrets.token_urlsafe(18)
        body = render_user_page(
            title=self._title,
            user_id=user_id,
            history=history,
            limits=limits,
            recent=self.recent.for_user(user_id, _RECENT_SHOWN),
            adjustments=[entry.as_dict() for entry in adjustments],
            nonce=nonce,
        )
        policy = (
            f"default-src 'none'; style-src 'nonce-{nonce}'; img-src 'self' data:; "
            "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
        )
        return HTMLResponse(body, headers={"content-security-policy": policy})


def _scope_of(user_id: str) -> Scope:
    """Whose tallies a user id's are: the anonymous bucket's (and pseudonyms') or a user's."""
    return "anonymous" if is_anonymous_id(user_id) else "user"
