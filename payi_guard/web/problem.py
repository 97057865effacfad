"""The responses the guard writes itself, and the ``RateLimit`` fields that describe a limit.

Every response the guard writes is ``application/problem+json`` (RFC 9457):

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

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from typing import Any

from payi_guard.config import GuardConfig, LimitSpec
from payi_guard.context import get_context
from payi_guard.engine import Guard, UserRequired
from payi_guard.exceptions import BudgetExceeded, InvalidUserId, StorageError
from payi_guard.money import decimal_text
from payi_guard.usage import LimitUsage
from payi_guard.web.options import WebOptions
from payi_guard.windows import window_at

__all__ = [
    "AFTER_START_EVENT",
    "MICRO_USD",
    "PROBLEM_CONTENT_TYPE",
    "PROBLEM_TYPE_BASE",
    "Problem",
    "Problems",
    "json_amount",
    "json_number",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
"""The media type of every response the guard writes itself (RFC 9457)."""

PROBLEM_TYPE_BASE = "urn:payi-guard:problem:"
"""Prefix of the ``type`` member of the guard's problem documents."""

MICRO_USD = 1_000_000
"""``RateLimit`` quota units per US dollar: money limits are expressed in micro-USD."""

AFTER_START_EVENT = "budget_exceeded_after_start"
"""Logged when a refusal escapes the app after the response has started."""


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


def _money_units(value: Decimal | int, unit: str) -> int:
    """An amount as the integer ``RateLimit`` units: micro-USD for money."""
    if unit == "usd":
        return int((Decimal(value) * MICRO_USD).to_integral_value(rounding=ROUND_FLOOR))
    return int(value)


def json_amount(value: Decimal | int, unit: str) -> str | int:
    """An amount as people read it: a decimal string for money, an int for counts.

    Money is never a JSON number: a float would show ``6.3e-05`` and round; the string is
    exact (``"0.000063"``).
    """
    if unit == "usd":
        return decimal_text(value)
    return int(value)


def json_number(value: Decimal | int, unit: str) -> float | int:
    """An amount for a log field: a float for money (as ``cost_usd``), an int otherwise."""
    if unit == "usd":
        return float(value)
    return int(value)


def _sf_string(text: str) -> str:
    """A structured-field string (RFC 8941): quoted, backslash and quote escaped."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Problems:
    """Builds the problem responses and ``RateLimit`` fields of one app's middleware.

    Args:
        guard: the guard whose clock times ``Retry-After`` and whose config gives the
            limits' windows.
        options: ``block_status`` and ``www_authenticate`` shape the responses.
    """

    def __init__(self, guard: Guard, options: WebOptions) -> None:
        self.guard = guard
        self.options = options
        self._windows: dict[tuple[str, str, str], tuple[str, str] | None] = {}
        self._windows_of: GuardConfig | None = None

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

    @staticmethod
    def _request_id_member() -> dict[str, str]:
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
        block_status = self.options.block_status
        retry_after = self.retry_after(limit)
        unit = "USD" if limit.unit == "usd" else limit.unit
        resets = limit.resets_at.isoformat()
        used, max_, remaining = (
            json_amount(amount, limit.unit) for amount in (limit.used, limit.max, limit.remaining)
        )
        if limit.remaining > 0:
            # A call refused at reserve time: its upper-bound cost does not fit.
            detail = (
                f"The {limit.scope} limit {limit.name!r} has {remaining} {unit} left "
                f"({used} of {max_} used), not enough for this call; it resets at {resets}."
            )
        else:
            detail = (
                f"The {limit.scope} limit {limit.name!r} is used up ({used} of {max_} "
                f"{unit}); it resets at {resets}."
            )
        document: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + "budget-exceeded",
            "title": "Budget exceeded",
            "status": block_status,
            "detail": detail,
            "limit": limit.name,
            "scope": limit.scope,
            "unit": limit.unit,
            "used": used,
            "max": max_,
            "remaining": remaining,
            "resets_at": limit.resets_at.isoformat(),
            "retry_after": retry_after,
            **self._request_id_member(),
        }
        headers = [("Retry-After", str(retry_after)), *self.rate_limit_headers(limit)]
        return Problem.build(block_status, document, headers)

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
        if self.options.www_authenticate:
            headers.append(("WWW-Authenticate", self.options.www_authenticate))
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
