"""The users list's query (sort and filters) and its CSV export.

The page keeps the same parameters in its own address, so a view can be shared:
``q`` (a substring or glob of the user id), ``state`` (``ok|warning|exceeded``), ``org``,
``tier``, ``min_spend`` and ``max_spend`` (dollars, the spend the list shows),
``sort`` (:data:`~payi_guard.admin.directory.SORTS`), ``order`` (``asc|desc``) and
``page``. A value that is not valid is refused with a message that names it.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import cast

from starlette.requests import Request

from payi_guard.admin.directory import SORTS, STATES, Sort, UserSummary
from payi_guard.money import decimal_text

__all__ = ["CSV_COLUMNS", "ListQuery", "QueryError", "to_csv"]

CSV_COLUMNS = (
    "user_id",
    "org",
    "tier",
    "state",
    "blocked",
    "spend_usd",
    "max_usd",
    "remaining_usd",
    "spend_limit",
)
"""The columns of the CSV export, in order."""

_MAX_QUERY = 200
_MAX_PAGE = 1_000_000
_MAX_NAME = 128


class QueryError(ValueError):
    """A query parameter that is not valid (``parameter`` names it)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def _choice(
    request: Request, name: str, options: tuple[str, ...], default: str | None
) -> str | None:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    if value not in options:
        raise QueryError(name, f"{name} must be one of {', '.join(options)}")
    return value


def _name(request: Request, name: str) -> str | None:
    value = request.query_params.get(name) or None
    if value is not None and (len(value) > _MAX_NAME or not value.isprintable()):
        raise QueryError(name, f"{name} must be a printable name of at most {_MAX_NAME} characters")
    return value


def _dollars(request: Request, name: str) -> Decimal | None:
    raw = request.query_params.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = Decimal(raw.strip())
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value < 0 or len(raw) > 40:
        raise QueryError(name, f"{name} must be an amount of dollars of 0 or more, like 2.50")
    return value


@dataclass(frozen=True, slots=True)
class ListQuery:
    """The list's sort and filters, parsed from a request's query (see the module)."""

    q: str | None = None
    state: str | None = None
    org: str | None = None
    tier: str | None = None
    min_spend: Decimal | None = None
    max_spend: Decimal | None = None
    sort: Sort = "name"
    order: str = "asc"
    page: int = 1

    @classmethod
    def parse(cls, request: Request) -> ListQuery:
        """Read the query of ``request``.

        Raises:
            QueryError: a parameter is not valid.
        """
        q = request.query_params.get("q") or None
        if q is not None and len(q) > _MAX_QUERY:
            raise QueryError("q", f"q must be at most {_MAX_QUERY} characters")
        page_text = request.query_params.get("page", "1")
        if (
            not page_text.isascii()
            or not page_text.isdigit()
            or not 1 <= int(page_text) <= _MAX_PAGE
        ):
            raise QueryError("page", f"page must be a whole number from 1 to {_MAX_PAGE}")
        low, high = _dollars(request, "min_spend"), _dollars(request, "max_spend")
        if low is not None and high is not None and low > high:
            raise QueryError("min_spend", "min_spend must not be above max_spend")
        return cls(
            q=q,
            state=_choice(request, "state", STATES, None),
            org=_name(request, "org"),
            tier=_name(request, "tier"),
            min_spend=low,
            max_spend=high,
            sort=cast("Sort", _choice(request, "sort", SORTS, "name")),
            order=_choice(request, "order", ("asc", "desc"), "asc") or "asc",
            page=int(page_text),
        )

    @property
    def filters_usage(self) -> bool:
        """Whether a filter needs each user's usage (so it applies page by page)."""
        return any(v is not None for v in (self.state, self.tier, self.min_spend, self.max_spend))

    def keeps_id(self, user_id: str) -> bool:
        """The filters that need only the id: ``org``."""
        if self.org is None:
            return True
        org, sep, _ = user_id.partition(":")
        return bool(sep) and org == self.org

    def keeps(self, summary: UserSummary) -> bool:
        """Whether ``summary`` passes every filter but ``q``."""
        if self.state is not None and summary.state != self.state:
            return False
        if self.org is not None and summary.org != self.org:
            return False
        if self.tier is not None and summary.tier != self.tier:
            return False
        spend = Decimal(0) if summary.spend is None else Decimal(summary.spend.used)
        if self.min_spend is not None and spend < self.min_spend:
            return False
        return self.max_spend is None or spend <= self.max_spend

    def as_dict(self) -> dict[str, object]:
        """The query as the JSON answer echoes it."""
        return {
            "q": self.q,
            "state": self.state,
            "org": self.org,
            "tier": self.tier,
            "min_spend": None if self.min_spend is None else decimal_text(self.min_spend),
            "max_spend": None if self.max_spend is None else decimal_text(self.max_spend),
            "sort": self.sort,
            "order": self.order,
        }


def to_csv(summaries: Iterable[UserSummary]) -> str:
    """The CSV text of ``summaries`` (:data:`CSV_COLUMNS`; money as decimal strings)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for summary in summaries:
        row = summary.as_dict()
        writer.writerow(
            [
                _cell(row["user_id"]),
                _cell(row["org"]),
                _cell(row["tier"]),
                row["state"],
                "true" if row["blocked"] else "false",
                row["spend_usd"] or "",
                row["max_usd"] or "",
                row["remaining_usd"] or "",
                _cell(row["spend_limit"]),
            ]
        )
    return out.getvalue()


def _cell(value: object) -> str:
    """A text cell; one a spreadsheet would run as a formula is quoted with ``'``."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@") else text
