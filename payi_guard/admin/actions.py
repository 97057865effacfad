"""The users page's operator actions: adjust or reset a user's budget, read their history.

Routes (relative to the mount point):

* ``POST /api/users/{user_id}/adjust``: JSON ``{"limit": "daily", "amount": "5",
  "reason": "..."}`` adds ``amount`` (dollars as a string or number for a money limit, a
  whole number otherwise; negative gives budget back) to the current window of one of
  the user's own limits (:meth:`Guard.aadjust <payi_guard.Guard.aadjust>`);
* ``POST /api/users/{user_id}/reset``: JSON ``{"limit": "daily", "reason": "..."}``
  (``limit`` optional: every limit of theirs) zeroes the current window(s);
* ``GET /api/users/{user_id}/adjustments``: the user's adjustments, newest first.

Both posts answer the limits changed, the user as the list shows them, and the history.
Who may post: a client with ``Authorization: Bearer <token>`` (``by`` in the body names
the operator, ``api`` otherwise), or the page itself: its session cookie, *and* the
session's CSRF token in ``X-CSRF-Token``, *and* a request the browser marks as coming
from this site (``Sec-Fetch-Site``/``Origin``). A form on another site can do none of the
three. The body must be JSON (``Content-Type: application/json``), at most 4 KiB.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from payi_guard.admin.directory import UserSummary
from payi_guard.admin.responses import problem, read_limited
from payi_guard.admin.security import TokenAuth, from_this_site
from payi_guard.engine import Guard
from payi_guard.exceptions import InvalidUserId, StorageError
from payi_guard.identity import normalize_user_id
from payi_guard.ledger import StorageOutcomeUnknown
from payi_guard.usage import LimitUsage

__all__ = ["MAX_ACTION_BYTES", "PAGE_OPERATOR", "Actions"]

MAX_ACTION_BYTES = 4096
"""The largest body an action accepts."""

PAGE_OPERATOR = "users page"
"""The ``by`` of an action made from the page (its session names no person)."""

_HISTORY_SHOWN = 50


class _Refusal(Exception):
    def __init__(self, response: Response) -> None:
        super().__init__(response.status_code)
        self.response = response


def _bad(detail: str) -> _Refusal:
    return _Refusal(problem(400, "invalid-action", "Invalid action", detail))


class Actions:
    """The handlers of the operator routes (see the module docstring).

    Args:
        guard: the guard whose users are adjusted.
        auth: the page's token and session checks.
        unauthorized: the 401 answer of the app.
        storage_failed: the 503 answer of the app.
    """

    def __init__(
        self,
        guard: Guard,
        auth: TokenAuth,
        unauthorized: Callable[[], Response],
        storage_failed: Callable[[], Response],
    ) -> None:
        self.guard = guard
        self._auth = auth
        self._unauthorized = unauthorized
        self._storage_failed = storage_failed

    # -- who asks ----------------------------------------------------------------------------

    def _operator(self, request: Request) -> str | None:
        """``None`` for a bearer client, :data:`PAGE_OPERATOR` for the page; else refuse."""
        if self._auth.bearer_ok(request):
            return None
        if not self._auth.session_ok(request):
            raise _Refusal(self._unauthorized())
        given = request.headers.get("x-csrf-token", "")
        if not from_this_site(request) or not self._auth.csrf_ok(request, given):
            raise _Refusal(
                problem(
                    403,
                    "forbidden",
                    "Forbidden",
                    "The action did not come from this users page (its CSRF token is "
                    "missing or wrong): nothing was changed. Reload the page and try again.",
                )
            )
        return PAGE_OPERATOR

    @staticmethod
    def _user(request: Request) -> str:
        try:
            return normalize_user_id(request.path_params["user_id"])
        except InvalidUserId as exc:
            raise _Refusal(
                problem(
                    400,
                    "invalid-user-id",
                    "Invalid user id",
                    f"The user id was refused: {exc.reason}.",
                )
            ) from None

    @staticmethod
    async def _body(request: Request) -> dict[str, Any]:
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise _Refusal(
                problem(
                    415,
                    "unsupported-media-type",
                    "Unsupported media type",
                    "Send the action as JSON with `Content-Type: application/json`.",
                )
            )
        body = await read_limited(request, MAX_ACTION_BYTES)
        if body is None:
            raise _Refusal(
                problem(
                    413,
                    "body-too-large",
                    "Body too large",
                    f"An action is at most {MAX_ACTION_BYTES} bytes.",
                )
            )
        try:
            document = json.loads(body, parse_float=Decimal)
        except (ValueError, RecursionError):
            raise _bad("The body is not JSON.") from None
        if not isinstance(document, dict):
            raise _bad('The body is a JSON object: {"limit": ..., "amount": ...}.')
        return document

    @staticmethod
    def _text(document: dict[str, Any], name: str) -> str | None:
        value = document.get(name)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _bad(f"`{name}` is a string.")
        return value

    # -- the routes --------------------------------------------------------------------------

    async def _answer(
        self, user_id: str, changed: list[LimitUsage], op: str, by: str | None
    ) -> Response:
        limits = await self.guard.ausage(user_id)
        history = await self.guard.aadjustments(user_id, limit=_HISTORY_SHOWN)
        return JSONResponse(
            {
                "op": op,
                "by": by,
                "changed": [usage.as_dict() for usage in changed],
                "user": UserSummary.of(user_id, limits, await self.guard.atier(user_id)).as_dict(),
                "adjustments": [entry.as_dict() for entry in history],
            }
        )

    async def _act(
        self,
        request: Request,
        op: str,
        change: Callable[[str, dict[str, Any], str | None], Awaitable[list[LimitUsage]]],
    ) -> Response:
        try:
            page = self._operator(request)
            user_id = self._user(request)
            document = await self._body(request)
            by = page if page is not None else (self._text(document, "by") or "api")
            changed = await change(user_id, document, by)
            return await self._answer(user_id, changed, op, by)
        except _Refusal as refusal:
            return refusal.response
        except (ValueError, TypeError) as exc:
            return problem(400, "invalid-action", "Invalid action", f"{exc}.")
        except StorageOutcomeUnknown:
            return problem(
                503,
                "outcome-unknown",
                "Outcome unknown",
                "The budget storage did not answer in time: the change may have been "
                "applied. Check the user's adjustments before trying again.",
            )
        except StorageError:
            return self._storage_failed()

    async def adjust(self, request: Request) -> Response:
        """``POST /api/users/{user_id}/adjust``: add to one limit's current window."""

        async def change(
            user_id: str, document: dict[str, Any], by: str | None
        ) -> list[LimitUsage]:
            limit = self._text(document, "limit")
            if limit is None:
                raise _bad("Name the `limit` to adjust.")
            amount = document.get("amount")
            if amount is None or isinstance(amount, (bool, list, dict)):
                raise _bad("Give the `amount` to add: dollars, or a whole number.")
            reason = self._text(document, "reason")
            return [await self.guard.aadjust(user_id, limit, amount, reason, by=by)]

        return await self._act(request, "adjust", change)

    async def reset(self, request: Request) -> Response:
        """``POST /api/users/{user_id}/reset``: zero one limit's window, or all of them."""

        async def change(
            user_id: str, document: dict[str, Any], by: str | None
        ) -> list[LimitUsage]:
            limit, reason = self._text(document, "limit"), self._text(document, "reason")
            return await self.guard.areset(user_id, limit, reason=reason, by=by)

        return await self._act(request, "reset", change)

    async def history(self, request: Request) -> Response:
        """``GET /api/users/{user_id}/adjustments``: the user's adjustments, newest first."""
        if not (self._auth.bearer_ok(request) or self._auth.session_ok(request)):
            return self._unauthorized()
        try:
            user_id = self._user(request)
            history = await self.guard.aadjustments(user_id)
        except _Refusal as refusal:
            return refusal.response
        except StorageError:
            return self._storage_failed()
        return JSONResponse(
            {"user_id": user_id, "adjustments": [entry.as_dict() for entry in history]}
        )
