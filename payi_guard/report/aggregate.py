"""Aggregation: log events into per-group totals, percentiles and refusal counts.

:class:`ReportBuilder` reads lines (see :mod:`payi_guard.report` for the rules) into one
group per user, org, model or use case, and :meth:`ReportBuilder.build` returns the
sorted :class:`Report`.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Context as DecimalContext
from decimal import Decimal, DecimalException, Inexact, InvalidOperation
from fnmatch import translate
from typing import Any, Literal, cast

from payi_guard.identity import org_of
from payi_guard.log import (
    BUDGET_ADJUSTED,
    BUDGET_EXCEEDED,
    BUDGET_OVERRUN,
    BUDGET_WARNING,
    GENAI_CALL,
)
from payi_guard.report.percentiles import PERCENTILES, CostDistribution
from payi_guard.report.read import as_change, as_cost, as_key, as_tokens, decode_json, line_time

__all__ = [
    "KEY_FIELDS",
    "PAIRING_WINDOW",
    "GroupBy",
    "Report",
    "ReportBuilder",
    "ReportFilter",
    "ReportRow",
    "SortBy",
]

GroupBy = Literal["user", "org", "model", "use_case"]
SortBy = Literal["cost", "calls"]

PAIRING_WINDOW = 10_000
"""How many recent requests are remembered to pair ``budget_exceeded`` with refused calls."""

KEY_FIELDS: dict[str, str] = {
    "user": "user_id",
    "org": "org_id",
    "model": "model",
    "use_case": "use_case_name",
}
"""The log field each grouping reads."""

_BUDGET_EVENTS = frozenset((BUDGET_WARNING, BUDGET_EXCEEDED, BUDGET_OVERRUN))
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
# Sums run in a context that raises instead of rounding: a total is exact or the line
# that would have made it inexact is skipped.
_EXACT = DecimalContext(prec=100, traps=[Inexact, InvalidOperation])
_NANO = DecimalContext(prec=100)


# -------------------------------------------------------------------------------- filter


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool] | None:
    """A predicate true for a value equal to one pattern or matching one glob."""
    if not patterns:
        return None
    exact = frozenset(p for p in patterns if not any(c in p for c in "*?["))
    globs = [re.compile(translate(p)) for p in patterns if p not in exact]

    def matches(value: str) -> bool:
        return value in exact or any(g.match(value) for g in globs)

    return matches


@dataclass(frozen=True)
class ReportFilter:
    """Which events a report counts.

    Attributes:
        since: keep events at or after this instant (aware), if set.
        until: keep events strictly before this instant (aware), if set.
        users: user ids or globs (``acme:*``); an event matches any of them.
        orgs: org ids or globs.
        models: model names or globs.
    """

    since: datetime | None = None
    until: datetime | None = None
    users: tuple[str, ...] = ()
    orgs: tuple[str, ...] = ()
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            bound = getattr(self, name)
            if bound is not None and bound.tzinfo is None:
                raise ValueError(f"{name} must be timezone-aware")

    @property
    def has_time(self) -> bool:
        """True when a time bound is set."""
        return self.since is not None or self.until is not None


# --------------------------------------------------------------------------- aggregation


@dataclass(slots=True)
class _Group:
    key: str | None
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: Decimal = _ZERO
    blocked: int = 0
    warned: int = 0
    overruns: int = 0
    errors: int = 0
    adjustments: int = 0
    adjusted_usd: Decimal = _ZERO
    last_adjustment: str | None = None
    money_counted: bool = False
    costs: CostDistribution = field(default_factory=CostDistribution)


@dataclass(slots=True)
class _Pending:
    """Refusals of one (request_id, user_id) still waiting for their partner."""

    refused: int = 0
    exceeded: list[str | None] = field(default_factory=list)


@dataclass(frozen=True)
class ReportRow:
    """One line of the report (a group, or the totals).

    Attributes:
        key: the user id, org id, model or use case name; ``None`` when the events did
            not name one.
        calls: calls sent to a provider (refused calls excluded).
        input_tokens: input tokens over every ``genai_call`` line.
        output_tokens: output tokens over every ``genai_call`` line.
        cost_usd: the exact sum of ``cost_usd``.
        share_pct: ``cost_usd`` as a percentage of the report's total cost, rounded to
            four decimals; ``None`` when the total is zero.
        p50_usd: median cost per sent call; ``None`` without calls.
        p90_usd: 90th percentile cost per sent call.
        p99_usd: 99th percentile cost per sent call.
        percentiles_exact: False when the percentiles come from the histogram; ``None``
            when there are none (a store report).
        blocked: refusals (see the module documentation for the pairing rule).
        warned: ``budget_warning`` events (``None`` when not known: a store report).
        overruns: ``budget_overrun`` events (``None`` when not known).
        errors: calls whose outcome is ``error`` (``None`` when not known).
        adjustments: operators' actions (``budget_adjusted``: an ``adjust`` or a
            ``reset``, counted once however many limits it changed).
        adjusted_usd: what those actions added to the money counters (negative: gave
            back), each action counted once, on the first money limit it changed; apart
            from ``cost_usd``, which stays what the calls cost.
    """

    key: str | None
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: Decimal
    share_pct: Decimal | None
    p50_usd: Decimal | None
    p90_usd: Decimal | None
    p99_usd: Decimal | None
    percentiles_exact: bool | None
    blocked: int
    warned: int | None
    overruns: int | None
    errors: int | None
    adjustments: int | None = 0
    adjusted_usd: Decimal | None = _ZERO


@dataclass(frozen=True)
class Report:
    """The result of a report: sorted rows, totals and what was read.

    Attributes:
        by: what a row groups (``user``, ``org``, ``model``, ``use_case``).
        rows: the rows, sorted and cut to ``top``.
        groups: how many groups matched (before ``top``).
        totals: the totals over every matched group (not only the rows shown).
        users: distinct user ids among the matched events.
        lines: lines read, blank ones included.
        skipped: lines that were not a JSON object, or ``genai_call`` lines with an
            unusable ``cost_usd``.
        other_events: JSON objects that are not one of the events the report counts.
        filtered_out: counted events left out by the filters.
        undated: of those, events left out because a time bound was set and they had no
            readable ``timestamp``.
        source: where the figures come from when not from log lines (a store report:
            ``the store's analytics, the last 30 days``), else ``None``.
    """

    by: GroupBy
    rows: tuple[ReportRow, ...]
    groups: int
    totals: ReportRow
    users: int
    lines: int
    skipped: int
    other_events: int
    filtered_out: int
    undated: int
    source: str | None = None


class ReportBuilder:
    """Streams log lines into per-group aggregates.

    Feed it lines (bytes, one log line each) with :meth:`feed`, then call :meth:`build`.
    Memory grows with the number of groups and distinct users, never with the lines.

    Args:
        by: what a row groups.
        filters: which events count.

    Raises:
        ValueError: if ``by`` is not one of ``user``, ``org``, ``model``, ``use_case``.
    """

    def __init__(self, by: GroupBy = "user", filters: ReportFilter | None = None) -> None:
        if by not in KEY_FIELDS:
            raise ValueError(f"by must be one of {sorted(KEY_FIELDS)}, got {by!r}")
        self.by: GroupBy = by
        self.filters = filters or ReportFilter()
        self._match_user = _matcher(self.filters.users)
        self._match_org = _matcher(self.filters.orgs)
        self._match_model = _matcher(self.filters.models)
        self._has_time = self.filters.has_time
        self._groups: dict[str | None, _Group] = {}
        self._users: set[str] = set()
        self._pending: OrderedDict[tuple[object, str | None], _Pending] = OrderedDict()
        self._total_cost = _ZERO
        # Every adjustment's magnitude, summed: while it fits the exact context, so does
        # any signed sum of them (a group's, the total), so none of those can raise.
        self._adjusted_span = _ZERO
        self._all_costs = CostDistribution()
        self.lines = 0
        self.skipped = 0
        self.other_events = 0
        self.filtered_out = 0
        self.undated = 0

    def feed(self, lines: Iterable[bytes]) -> None:
        """Read log lines (each a ``bytes`` line, with or without its newline).

        Args:
            lines: the lines.
        """
        for line in lines:
            self.feed_line(line)

    def feed_line(self, line: bytes) -> None:
        """Read one log line.

        Args:
            line: the line, with or without its newline.
        """
        self.lines += 1
        start = line.find(b"{")
        if start < 0:
            if line.strip():
                self.skipped += 1
            return
        try:
            obj = decode_json((line[start:] if start else line).decode("utf-8"))
        except (ValueError, RecursionError):
            self.skipped += 1
            return
        if type(obj) is not dict:
            self.skipped += 1
            return
        event = obj.get("event")
        if event == GENAI_CALL:
            self._call(obj)
        elif event in _BUDGET_EVENTS:
            self._budget(obj, cast(str, event))
        elif event == BUDGET_ADJUSTED:
            self._adjusted(obj)
        else:
            self.other_events += 1

    def skip_line(self) -> None:
        """Count a line that could not be read at all (too long)."""
        self.lines += 1
        self.skipped += 1

    def _keep(self, obj: dict[str, Any], user: str | None, org: str | None) -> bool:
        filters = self.filters
        if self._has_time:
            when = line_time(obj.get("timestamp"))
            if when is None:
                self.undated += 1
                return False
            if (filters.since is not None and when < filters.since) or (
                filters.until is not None and when >= filters.until
            ):
                return False
        if self._match_user is not None and (user is None or not self._match_user(user)):
            return False
        if self._match_org is not None and (org is None or not self._match_org(org)):
            return False
        if self._match_model is not None:
            model = as_key(obj.get("model"))
            if model is None or not self._match_model(model):
                return False
        return True

    def _group(self, obj: dict[str, Any], user: str | None, org: str | None) -> _Group:
        by = self.by
        if by == "user":
            key = user
        elif by == "org":
            key = org
        else:
            key = as_key(obj.get(KEY_FIELDS[by]))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        return group

    @staticmethod
    def _org(obj: dict[str, Any], user: str | None) -> str | None:
        org = as_key(obj.get("org_id"))
        if org is None and user is not None:
            org = org_of(user)
        return org

    def _call(self, obj: dict[str, Any]) -> None:
        cost = as_cost(obj.get("cost_usd"))
        input_tokens = as_tokens(obj.get("input_tokens"))
        output_tokens = as_tokens(obj.get("output_tokens"))
        if cost is None or input_tokens is None or output_tokens is None:
            self.skipped += 1
            return
        user = as_key(obj.get("user_id"))
        org = self._org(obj, user)
        if not self._keep(obj, user, org):
            self.filtered_out += 1
            return
        try:
            total = _EXACT.add(self._total_cost, cost)
        except DecimalException:
            # Only a sum that would need more than 100 digits gets here: skip, never round.
            self.skipped += 1
            return
        self._total_cost = total
        group = self._group(obj, user, org)
        # Never raises: a group's sum has no more digits than the total.
        group.cost_usd = _EXACT.add(group.cost_usd, cost)
        group.input_tokens += input_tokens
        group.output_tokens += output_tokens
        if user is not None:
            self._users.add(user)
        outcome = obj.get("outcome")
        if outcome == "refused":
            group.blocked += 1
            self._pair(obj, user, group.key, refused=True)
            return
        if outcome == "error":
            group.errors += 1
        group.calls += 1
        nano = int(_NANO.to_integral_value(cost.scaleb(9, _NANO)))
        group.costs.add(nano)
        self._all_costs.add(nano)

    def _budget(self, obj: dict[str, Any], event: str) -> None:
        user = as_key(obj.get("user_id"))
        org = self._org(obj, user)
        if not self._keep(obj, user, org):
            self.filtered_out += 1
            return
        group = self._group(obj, user, org)
        if user is not None:
            self._users.add(user)
        if event == BUDGET_WARNING:
            group.warned += 1
        elif event == BUDGET_OVERRUN:
            group.overruns += 1
        else:
            self._pair(obj, user, group.key, refused=False)

    def _adjusted(self, obj: dict[str, Any]) -> None:
        """An operator's action: one line per limit it changed, sharing ``adjustment_id``."""
        amount = as_change(obj.get("amount"))
        if amount is None:
            self.skipped += 1
            return
        user = as_key(obj.get("user_id"))
        org = self._org(obj, user)
        if not self._keep(obj, user, org):
            self.filtered_out += 1
            return
        try:
            span = _EXACT.add(self._adjusted_span, _EXACT.abs(amount))
        except DecimalException:
            # An amount (or a sum) that would need more than 100 digits: skip, never round.
            self.skipped += 1
            return
        self._adjusted_span = span
        group = self._group(obj, user, org)
        if user is not None:
            self._users.add(user)
        action = as_key(obj.get("adjustment_id"))
        # The lines of one action are logged back to back: its id, remembered per group,
        # is enough to count it once. A line without an id is an action of its own.
        if action is None or action != group.last_adjustment:
            group.adjustments += 1
            group.last_adjustment = action
            group.money_counted = False
        if obj.get("unit") == "usd" and not group.money_counted:
            group.adjusted_usd = _EXACT.add(group.adjusted_usd, amount)
            group.money_counted = action is not None

    def _pair(self, obj: dict[str, Any], user: str | None, key: str | None, refused: bool) -> None:
        """Count a refusal once whether it was logged as a call, an event, or both."""
        request_id = as_key(obj.get("request_id"))
        if request_id is None:
            if not refused:
                self._groups[key].blocked += 1
            return
        pending_key = (request_id, user)
        pending = self._pending.get(pending_key)
        if pending is None:
            pending = self._pending[pending_key] = _Pending()
            if len(self._pending) > PAIRING_WINDOW:
                self._settle(self._pending.popitem(last=False)[1])
        else:
            self._pending.move_to_end(pending_key)
        if refused:
            if pending.exceeded:
                pending.exceeded.pop(0)  # its refusal is this call, already counted
            else:
                pending.refused += 1
        elif pending.refused:
            pending.refused -= 1  # the refused call was already counted
        else:
            pending.exceeded.append(key)
        if not pending.refused and not pending.exceeded:
            del self._pending[pending_key]

    def _settle(self, pending: _Pending) -> None:
        for key in pending.exceeded:
            self._groups[key].blocked += 1

    def build(self, *, sort: SortBy = "cost", top: int | None = None) -> Report:
        """Return the report of everything fed so far.

        Args:
            sort: ``cost`` or ``calls``, descending; ties are ordered by key.
            top: keep only the first ``top`` rows (totals still cover every group).

        Returns:
            The :class:`Report`.

        Raises:
            ValueError: if ``sort`` is unknown or ``top`` is below 1.
        """
        if sort not in ("cost", "calls"):
            raise ValueError(f"sort must be 'cost' or 'calls', got {sort!r}")
        if top is not None and top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        while self._pending:
            self._settle(self._pending.popitem(last=False)[1])
        total = self._total_cost
        groups = list(self._groups.values())

        def order(group: _Group) -> tuple[object, ...]:
            primary = group.cost_usd if sort == "cost" else Decimal(group.calls)
            return (_EXACT.minus(primary), group.key is None, group.key or "")

        groups.sort(key=order)
        shown = groups if top is None else groups[:top]
        rows = tuple(_row(g.key, g, g.costs, total) for g in shown)
        sums = _Group(None, cost_usd=total)
        for g in groups:
            sums.calls += g.calls
            sums.input_tokens += g.input_tokens
            sums.output_tokens += g.output_tokens
            sums.blocked += g.blocked
            sums.warned += g.warned
            sums.overruns += g.overruns
            sums.errors += g.errors
            sums.adjustments += g.adjustments
            sums.adjusted_usd = _EXACT.add(sums.adjusted_usd, g.adjusted_usd)
        return Report(
            by=self.by,
            rows=rows,
            groups=len(groups),
            totals=_row(None, sums, self._all_costs, total),
            users=len(self._users),
            lines=self.lines,
            skipped=self.skipped,
            other_events=self.other_events,
            filtered_out=self.filtered_out,
            undated=self.undated,
        )


def _from_nano(nano: int | None) -> Decimal | None:
    return None if nano is None else Decimal(nano).scaleb(-9, _NANO)


def _row(key: str | None, g: _Group, costs: CostDistribution, total: Decimal) -> ReportRow:
    share = None
    if total:
        share = (g.cost_usd * _HUNDRED / total).quantize(Decimal("0.0001"))
    p50, p90, p99 = (_from_nano(v) for v in costs.percentiles(PERCENTILES))
    return ReportRow(
        key=key,
        calls=g.calls,
        input_tokens=g.input_tokens,
        output_tokens=g.output_tokens,
        cost_usd=g.cost_usd,
        share_pct=share,
        p50_usd=p50,
        p90_usd=p90,
        p99_usd=p99,
        percentiles_exact=costs.exact,
        blocked=g.blocked,
        warned=g.warned,
        overruns=g.overruns,
        errors=g.errors,
        adjustments=g.adjustments,
        adjusted_usd=g.adjusted_usd,
    )
