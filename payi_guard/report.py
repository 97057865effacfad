"""``payi-guard report``: per-user spend, calls and budget events from payi_guard's logs.

The report reads the JSON lines that payi_guard's structlog events produce (one object per
line, as :func:`payi_guard.log.configure_json` writes them) and prints one row per user, org,
model or use case: calls, tokens, the exact cost, its share of the total, the p50/p90/p99
cost per call and the budget events (blocked, warned, overruns) with the error count.

Reading rules:

* A line is parsed from its first ``{``, so a JSON object after a plain-text prefix
  (``2026-11-27 12:00:00 {...}``) is read too. A line that is not a JSON object, or a
  ``genai_call`` whose ``cost_usd`` is unusable (not a number, negative, not finite, over
  one billion USD), is *skipped* and counted. Blank lines count as read, not as skipped.
  JSON objects of other events are *other events*, also counted. Reading never
  stops on a bad line.
* ``cost_usd`` is parsed as :class:`~decimal.Decimal` and summed exactly: a total equals the
  exact decimal sum of the lines' values. A missing or ``null`` ``cost_usd`` counts as zero;
  a numeric string is accepted.
* ``calls`` counts the calls sent to a provider: every ``genai_call`` whose ``outcome`` is
  not ``refused``. Tokens and cost add up every ``genai_call`` line (a refused call costs
  nothing), so the totals reconcile with the ledger.
* ``blocked`` counts refusals once each: every ``genai_call`` with ``outcome == "refused"``,
  plus every ``budget_exceeded`` event that is not paired with one. A ``budget_exceeded``
  and a refused call pair when they carry the same ``request_id`` and ``user_id`` and are
  logged within :data:`PAIRING_WINDOW` of each other (they are logged back to back by the
  request that was refused). A ``budget_exceeded`` without a ``request_id`` (a refusal at
  the web gate, before any call) always counts.
* ``warned`` and ``overruns`` count ``budget_warning`` and ``budget_overrun`` events;
  ``errors`` counts calls with ``outcome == "error"``.
* Budget events carry no model or use case: with ``--by model`` or ``--by use_case`` they
  land in the ``(none)`` row unless the line names one, and ``--model`` drops them. With
  ``--by org`` (and ``--org``) the org is ``org_id``, else the first segment of a
  composite ``user_id`` (``acme`` for ``acme:alice``).
* ``--since`` is inclusive and ``--until`` exclusive, compared with the line's
  ``timestamp`` (ISO 8601 or epoch seconds; a timestamp without an offset is UTC). With
  either option, events without a readable timestamp are left out (and counted); without
  a time option every event is kept.

Percentiles are nearest-rank over the cost of sent calls. They are exact (to the
nano-USD) for a group of up to :data:`EXACT_SAMPLES` calls; past that a group switches to
a fixed-size log-bucket histogram over integer nano-USD whose answers are within
:data:`PERCENTILE_RELATIVE_ERROR` (about 0.2 %) of the true value, marked ``~`` in the table
and ``percentiles_exact: false`` in CSV and JSON. Memory grows with the number of groups
(at most about 110 KB each), never with the number of lines.

Run it as ``payi-guard report LOG... [options]`` or ``python -m payi_guard.report``.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import sys
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import Context as DecimalContext
from decimal import Decimal, DecimalException, Inexact, InvalidOperation
from fnmatch import translate
from typing import IO, Any, BinaryIO, Literal, TextIO, cast

from payi_guard.clock import Clock, SystemClock
from payi_guard.identity import org_of
from payi_guard.log import BUDGET_EXCEEDED, BUDGET_OVERRUN, BUDGET_WARNING, GENAI_CALL

__all__ = [
    "EXACT_SAMPLES",
    "MAX_LINE_BYTES",
    "PAIRING_WINDOW",
    "PERCENTILE_RELATIVE_ERROR",
    "CostDistribution",
    "GroupBy",
    "Report",
    "ReportBuilder",
    "ReportFilter",
    "ReportRow",
    "add_report_parser",
    "main",
    "parse_time_bound",
    "run_report",
    "summary",
    "write_csv",
    "write_json",
    "write_table",
]

GroupBy = Literal["user", "org", "model", "use_case"]
SortBy = Literal["cost", "calls"]
OutputFormat = Literal["table", "csv", "json"]

EXACT_SAMPLES = 10_000
"""A group keeps every call cost (exact percentiles) up to this many calls."""

_SUB_BITS = 8
_SUB = 1 << _SUB_BITS
PERCENTILE_RELATIVE_ERROR = 1 / (1 << (_SUB_BITS + 1))
"""Worst relative error of a percentile once a group has more than EXACT_SAMPLES calls."""

PAIRING_WINDOW = 10_000
"""How many recent requests are remembered to pair ``budget_exceeded`` with refused calls."""

MAX_LINE_BYTES = 1 << 20
"""Longer lines are skipped without being held in memory whole."""

_KEY_FIELDS: dict[str, str] = {
    "user": "user_id",
    "org": "org_id",
    "model": "model",
    "use_case": "use_case_name",
}
_GROUP_NOUNS: dict[str, tuple[str, str]] = {
    "user": ("user", "users"),
    "org": ("org", "orgs"),
    "model": ("model", "models"),
    "use_case": ("use case", "use cases"),
}
_BUDGET_EVENTS = frozenset((BUDGET_WARNING, BUDGET_EXCEEDED, BUDGET_OVERRUN))
_ZERO = Decimal(0)
_HUNDRED = Decimal(100)
_MAX_COST = Decimal(1_000_000_000)
# Sums run in a context that raises instead of rounding: a total is exact or the line
# that would have made it inexact is skipped.
_EXACT = DecimalContext(prec=100, traps=[Inexact, InvalidOperation])
_NANO = DecimalContext(prec=100)
_PERCENTILES = (50, 90, 99)


_DECODE = json.JSONDecoder(parse_float=Decimal).decode


# ---------------------------------------------------------------------------- percentiles


def _bucket_index(nano: int) -> int:
    """Histogram bucket of a non-negative nano-USD value.

    Values below ``2 * _SUB`` get a bucket each; above, each power of two is split into
    ``_SUB`` equal buckets, so a bucket is never wider than ``1/_SUB`` of its lower bound.
    """
    if nano < 2 * _SUB:
        return nano
    shift = nano.bit_length() - 1 - _SUB_BITS
    return ((shift + 1) << _SUB_BITS) + (nano >> shift) - _SUB


def _bucket_bounds(index: int) -> tuple[int, int]:
    """Smallest and largest nano-USD value of a histogram bucket."""
    if index < 2 * _SUB:
        return index, index
    shift = (index >> _SUB_BITS) - 1
    mantissa = (index & (_SUB - 1)) + _SUB
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class CostDistribution:
    """Nearest-rank percentiles of per-call costs (integer nano-USD) in bounded memory.

    Up to ``exact_limit`` values are kept as they are, so percentiles are exact. The next
    value moves them into a histogram of at most about 14,000 counters whose percentiles
    are within :data:`PERCENTILE_RELATIVE_ERROR` of the exact ones (and never outside the
    exact minimum and maximum).

    Args:
        exact_limit: how many values are kept before switching to the histogram.

    Raises:
        ValueError: if ``exact_limit`` is negative.
    """

    __slots__ = ("_counts", "_exact", "_exact_limit", "count", "maximum", "minimum")

    def __init__(self, exact_limit: int = EXACT_SAMPLES) -> None:
        if exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {exact_limit}")
        self._exact_limit = exact_limit
        self._exact: array[int] | None = array("q")
        self._counts: array[int] = array("q")
        self.count = 0
        self.minimum = 0
        self.maximum = 0

    @property
    def exact(self) -> bool:
        """True while every value is kept, so percentiles are exact."""
        return self._exact is not None

    def add(self, nano: int) -> None:
        """Record one cost.

        Args:
            nano: the cost in nano-USD, between 0 and 2**62.

        Raises:
            ValueError: if ``nano`` is out of range.
        """
        if not 0 <= nano < 1 << 62:
            raise ValueError(f"a cost must be between 0 and 2**62 nano-USD, got {nano}")
        if self.count == 0 or nano < self.minimum:
            self.minimum = nano
        if nano > self.maximum:
            self.maximum = nano
        self.count += 1
        exact = self._exact
        if exact is not None:
            exact.append(nano)
            if len(exact) <= self._exact_limit:
                return
            self._exact = None
            for value in exact:
                self._count(value)
            return
        self._count(nano)

    def _count(self, nano: int) -> None:
        index = _bucket_index(nano)
        counts = self._counts
        if index >= len(counts):
            counts.frombytes(bytes(counts.itemsize * (index + 1 - len(counts))))
        counts[index] += 1

    def percentiles(self, ps: Sequence[int] = _PERCENTILES) -> list[int | None]:
        """Return the nearest-rank percentiles ``ps`` (each 1..100), in nano-USD.

        Args:
            ps: the percentiles wanted.

        Returns:
            One value per percentile, ``None`` for all when nothing was recorded.

        Raises:
            ValueError: if a percentile is outside 1..100.
        """
        for p in ps:
            if not 1 <= p <= 100:
                raise ValueError(f"a percentile must be between 1 and 100, got {p}")
        n = self.count
        if n == 0:
            return [None for _ in ps]
        ranks = [-(-p * n // 100) for p in ps]
        if self._exact is not None:
            ordered = sorted(self._exact)
            return [ordered[rank - 1] for rank in ranks]
        return [self._rank_in_histogram(rank) for rank in ranks]

    def _rank_in_histogram(self, rank: int) -> int:
        if rank == self.count:
            return self.maximum
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                low, high = _bucket_bounds(index)
                middle = (low + high) // 2
                return min(max(middle, self.minimum), self.maximum)
        return self.maximum  # pragma: no cover - counts always add up to self.count


# --------------------------------------------------------------------------- time bounds

_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?",
    re.IGNORECASE,
)


def _parse_iso(text: str) -> datetime | None:
    """Parse an ISO 8601 date or datetime; a value without an offset is UTC."""
    value = text.strip()
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        # Python 3.10's fromisoformat knows only 3 or 6 fraction digits and "+HH:MM".
        parsed_or_none = _parse_iso_slow(text.strip())
        if parsed_or_none is None:
            return None
        parsed = parsed_or_none
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed


def _parse_iso_slow(text: str) -> datetime | None:
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = timezone.utc
    if offset and offset.upper() != "Z":
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        minutes = int(digits[:2]) * 60 + (int(digits[2:4]) if len(digits) > 2 else 0)
        tz = timezone(sign * timedelta(minutes=minutes))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_time_bound(text: str) -> datetime | timedelta:
    """Parse a ``--since`` / ``--until`` value.

    Args:
        text: an ISO 8601 date (``2026-11-27``, midnight UTC), datetime
            (``2026-11-27T12:00:00Z``; UTC when it has no offset), or an age: a count and
            one of ``s``, ``m``, ``h``, ``d``, ``w`` (``24h``, ``7d``).

    Returns:
        An aware ``datetime``, or the ``timedelta`` to subtract from now for an age.

    Raises:
        ValueError: if the value is neither.
    """
    stripped = text.strip()
    relative = _RELATIVE.fullmatch(stripped)
    if relative is not None:
        return timedelta(seconds=int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)])
    parsed = _parse_iso(stripped) if stripped else None
    if parsed is None:
        raise ValueError(
            f"{text!r} is not a time: use an ISO 8601 date or datetime "
            "(2026-11-27, 2026-11-27T12:00:00Z) or an age such as 30m, 24h, 7d, 2w"
        )
    return parsed


def _line_time(value: object) -> datetime | None:
    """The instant of a line's ``timestamp`` (ISO 8601 string or epoch seconds)."""
    if isinstance(value, str):
        return _parse_iso(value) if value else None
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return None


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
        percentiles_exact: False when the percentiles come from the histogram.
        blocked: refusals (see the module documentation for the pairing rule).
        warned: ``budget_warning`` events.
        overruns: ``budget_overrun`` events.
        errors: calls whose outcome is ``error``.
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
    percentiles_exact: bool
    blocked: int
    warned: int
    overruns: int
    errors: int


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


def _as_key(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _as_tokens(value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value if value >= 0 else 0
    if isinstance(value, Decimal) and value.is_finite() and value >= 0 and value % 1 == 0:
        return int(value)
    return 0


def _as_cost(value: object) -> Decimal | None:
    """The cost of a line, or None when it is unusable."""
    if value is None:
        return _ZERO
    if isinstance(value, Decimal):
        cost = value
    elif isinstance(value, int) and not isinstance(value, bool):
        cost = Decimal(value)
    elif isinstance(value, str):
        try:
            cost = Decimal(value.strip())
        except InvalidOperation:
            return None
    else:
        return None
    if not cost.is_finite() or cost < 0 or cost > _MAX_COST:
        return None
    return cost


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
        if by not in _KEY_FIELDS:
            raise ValueError(f"by must be one of {sorted(_KEY_FIELDS)}, got {by!r}")
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
            obj = _DECODE((line[start:] if start else line).decode("utf-8"))
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
        else:
            self.other_events += 1

    def skip_line(self) -> None:
        """Count a line that could not be read at all (too long)."""
        self.lines += 1
        self.skipped += 1

    def _keep(self, obj: dict[str, Any], user: str | None, org: str | None) -> bool:
        filters = self.filters
        if self._has_time:
            when = _line_time(obj.get("timestamp"))
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
            model = _as_key(obj.get("model"))
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
            key = _as_key(obj.get(_KEY_FIELDS[by]))
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(key)
        return group

    @staticmethod
    def _org(obj: dict[str, Any], user: str | None) -> str | None:
        org = _as_key(obj.get("org_id"))
        if org is None and user is not None:
            org = org_of(user)
        return org

    def _call(self, obj: dict[str, Any]) -> None:
        cost = _as_cost(obj.get("cost_usd"))
        if cost is None:
            self.skipped += 1
            return
        user = _as_key(obj.get("user_id"))
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
        group.input_tokens += _as_tokens(obj.get("input_tokens"))
        group.output_tokens += _as_tokens(obj.get("output_tokens"))
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
        user = _as_key(obj.get("user_id"))
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

    def _pair(self, obj: dict[str, Any], user: str | None, key: str | None, refused: bool) -> None:
        """Count a refusal once whether it was logged as a call, an event, or both."""
        request_id = _as_key(obj.get("request_id"))
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
    p50, p90, p99 = (_from_nano(v) for v in costs.percentiles(_PERCENTILES))
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
    )


# -------------------------------------------------------------------------------- output


def _plain(value: Decimal) -> str:
    """Exact fixed-point text of a Decimal, without trailing fractional zeros."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _money(value: Decimal) -> str:
    """``$1,234.004200``: exact, at least six decimals, more only when they are not zero."""
    text = format(value, ",f")
    whole, _, fraction = text.partition(".")
    fraction = fraction.rstrip("0").ljust(6, "0")
    return f"${whole}.{fraction}"


_FIELDS = (
    "calls",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "share_pct",
    "p50_usd",
    "p90_usd",
    "p99_usd",
    "percentiles_exact",
    "blocked",
    "warned",
    "overruns",
    "errors",
)


def _json_value(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _plain(value)  # a raw JSON number token: exact, unlike a float
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def write_json(report: Report, out: TextIO) -> None:
    """Write the rows as a JSON array of objects (money as exact JSON numbers).

    Args:
        report: the report.
        out: the text stream.
    """
    key_field = _KEY_FIELDS[report.by]
    if not report.rows:
        out.write("[]\n")
        return
    out.write("[\n")
    for index, row in enumerate(report.rows):
        items = [(key_field, row.key), ("key", row.key)]
        items += [(name, getattr(row, name)) for name in _FIELDS]
        body = ", ".join(f"{json.dumps(k)}: {_json_value(v)}" for k, v in items)
        out.write("  {" + body + ("}\n" if index == len(report.rows) - 1 else "},\n"))
    out.write("]\n")


def _csv_value(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        return _plain(value)
    return str(value)


def write_csv(report: Report, out: TextIO) -> None:
    """Write a header row and one row per group.

    Args:
        report: the report.
        out: the text stream.
    """
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([_KEY_FIELDS[report.by], *_FIELDS])
    for row in report.rows:
        writer.writerow([_csv_value(row.key)] + [_csv_value(getattr(row, n)) for n in _FIELDS])


def _table_cells(row: ReportRow, label: str) -> list[str]:
    def money(value: Decimal | None) -> str:
        if value is None:
            return "-"
        return _money(value) if row.percentiles_exact else "~" + _money(value)

    if row.share_pct is None:
        share = "-"
    elif row.cost_usd and row.share_pct < Decimal("0.05"):
        share = "<0.1%"  # not 0.0%: the group did spend
    else:
        share = f"{row.share_pct:.1f}%"
    return [
        label,
        f"{row.calls:,}",
        f"{row.input_tokens:,}",
        f"{row.output_tokens:,}",
        _money(row.cost_usd),
        share,
        money(row.p50_usd),
        money(row.p90_usd),
        money(row.p99_usd),
        f"{row.blocked:,}",
        f"{row.warned:,}",
        f"{row.overruns:,}",
        f"{row.errors:,}",
    ]


def _plural(count: int, words: tuple[str, str]) -> str:
    return f"{count:,} {words[0] if count == 1 else words[1]}"


def summary(report: Report) -> str:
    """One line of totals and of what was read (the table footer; stderr otherwise).

    Args:
        report: the report.

    Returns:
        The line, without a newline.
    """
    totals = report.totals
    noun = _GROUP_NOUNS[report.by]
    parts = [f"total {_money(totals.cost_usd)} over {_plural(totals.calls, ('call', 'calls'))}"]
    parts.append(_plural(report.users, ("user", "users")))
    if report.by != "user":
        parts.append(_plural(report.groups, noun))
    if len(report.rows) < report.groups:
        parts.append(f"showing top {len(report.rows):,} of {_plural(report.groups, noun)}")
    read = (
        f"{_plural(report.lines, ('line', 'lines'))} read: {report.skipped:,} skipped, "
        f"{_plural(report.other_events, ('other event', 'other events'))}, "
        f"{report.filtered_out:,} filtered out"
    )
    if report.undated:
        read += f" ({report.undated:,} without a timestamp)"
    return ", ".join(parts) + "; " + read


def write_table(report: Report, out: TextIO) -> None:
    """Write an aligned table, a totals row and the summary line.

    Args:
        report: the report.
        out: the text stream.
    """
    header = [_KEY_FIELDS[report.by], "calls", "in_tokens", "out_tokens", "cost_usd", "share"]
    header += ["p50", "p90", "p99", "blocked", "warned", "overruns", "errors"]
    body = [_table_cells(row, "(none)" if row.key is None else row.key) for row in report.rows]
    totals = _table_cells(report.totals, "TOTAL")
    widths = [max(len(r[i]) for r in [header, totals, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    out.write(line(header) + "\n")
    for cells in body:
        out.write(line(cells) + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(line(totals) + "\n")
    out.write(summary(report) + "\n")
    if any(not r.percentiles_exact for r in (*report.rows, report.totals)):
        out.write(
            f"~ percentile from a histogram, within {PERCENTILE_RELATIVE_ERROR:.2%} "
            f"(groups of more than {EXACT_SAMPLES:,} calls)\n"
        )


# ------------------------------------------------------------------------------- reading


def _open(path: str, stdin: BinaryIO | None) -> IO[bytes]:
    """Open a log (``-`` is stdin), decompressing gzip whatever the file name."""
    if path == "-":
        stream: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
    else:
        stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
    peek = getattr(stream, "peek", None)
    if peek is None:
        stream = io.BufferedReader(cast(io.RawIOBase, stream))
        peek = cast(io.BufferedReader, stream).peek
    if peek(2)[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
    return stream


def _lines(stream: IO[bytes], builder: ReportBuilder) -> Iterator[bytes]:
    """The lines of a stream, never holding more than MAX_LINE_BYTES of one line."""
    readline = stream.readline
    while True:
        line = readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:
                rest = readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            builder.skip_line()
            continue
        yield line


class _Usage(Exception):
    """A bad argument or an unreadable file: exit status 2 with this message."""


def _read(paths: Sequence[str], builder: ReportBuilder, stdin: BinaryIO | None) -> None:
    for path in paths:
        if path != "-":
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise _Usage(f"cannot read {path!r}: {exc.strerror or exc}") from None
    for path in paths:
        try:
            stream = _open(path, stdin)
            try:
                builder.feed(_lines(stream, builder))
            finally:
                if path != "-":
                    stream.close()
        except (OSError, EOFError, zlib.error) as exc:
            name = "stdin" if path == "-" else repr(path)
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            raise _Usage(f"cannot read {name}: {reason}") from None


# ----------------------------------------------------------------------------------- CLI


def _time_arg(text: str) -> datetime | timedelta:
    try:
        return parse_time_bound(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _top_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


_DESCRIPTION = """\
Per-user spend from payi_guard's JSON logs (genai_call, budget_warning, budget_exceeded
and budget_overrun events). Costs are summed exactly. Lines that are not JSON are skipped
and counted, never fatal. Memory grows with the number of groups, not of lines.
"""

_EPILOG = f"""\
calls counts calls sent to a provider; blocked counts each refusal once (a refused
genai_call and the budget_exceeded of the same request_id and user are one refusal).
--since is inclusive, --until exclusive; with either, lines without a timestamp are left
out. p50/p90/p99 are nearest-rank costs per call: exact for a group of up to
{EXACT_SAMPLES:,} calls, within {PERCENTILE_RELATIVE_ERROR:.2%} for a larger one (marked ~).
csv and json write the summary line to stderr.
"""


def _configure(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "logs", nargs="+", metavar="LOG", help="log files (gzip is detected), or - for stdin"
    )
    parser.add_argument(
        "--since",
        type=_time_arg,
        metavar="WHEN",
        help="only events at or after WHEN: 2026-11-27, 2026-11-27T12:00Z, or an age: 24h, 7d",
    )
    parser.add_argument(
        "--until", type=_time_arg, metavar="WHEN", help="only events before WHEN (same forms)"
    )
    parser.add_argument(
        "--user",
        action="append",
        default=[],
        metavar="ID",
        help="only this user id or glob (acme:*); repeat for several",
    )
    parser.add_argument(
        "--org", action="append", default=[], metavar="ID", help="only this org id or glob"
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="NAME", help="only this model or glob"
    )
    parser.add_argument(
        "--by",
        choices=tuple(_KEY_FIELDS),
        default="user",
        help="what a row groups (default: user)",
    )
    parser.add_argument(
        "--sort",
        choices=("cost", "calls"),
        default="cost",
        help="descending order of the rows, ties by key (default: cost)",
    )
    parser.add_argument("--top", type=_top_arg, metavar="N", help="only the first N rows")
    parser.add_argument(
        "--format",
        choices=("table", "csv", "json"),
        default="table",
        help="output format (default: table)",
    )
    parser.set_defaults(func=run_report)
    return parser


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``report`` sub-command.

    The parser's defaults set ``func`` to :func:`run_report`, so a CLI can dispatch with
    ``args.func(args)``.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers()`` returned.

    Returns:
        The ``report`` parser.
    """
    parser = subparsers.add_parser(
        "report",
        help="per-user spend, calls and budget events from the logs",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return _configure(parser)


def _resolve(bound: datetime | timedelta | None, now: datetime) -> datetime | None:
    if isinstance(bound, timedelta):
        return now - bound
    return bound


def run_report(
    args: argparse.Namespace,
    *,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Clock | None = None,
) -> int:
    """Run ``payi-guard report`` with parsed arguments.

    Args:
        args: the namespace from the ``report`` parser (``logs``, ``since``, ``until``,
            ``user``, ``org``, ``model``, ``by``, ``sort``, ``top``, ``format``).
        stdin: the binary stream ``-`` reads (default: ``sys.stdin.buffer``).
        stdout: where the report goes (default: ``sys.stdout``).
        stderr: where errors, and the summary of csv and json, go (default: ``sys.stderr``).
        clock: the clock ages such as ``24h`` count back from.

    Returns:
        0 on success (skipped lines included), 2 for a bad argument or an unreadable file.
    """
    out = stdout if stdout is not None else sys.stdout
    err = stderr if stderr is not None else sys.stderr
    now = datetime.fromtimestamp((clock or SystemClock()).now(), tz=timezone.utc)
    try:
        filters = ReportFilter(
            since=_resolve(args.since, now),
            until=_resolve(args.until, now),
            users=tuple(args.user),
            orgs=tuple(args.org),
            models=tuple(args.model),
        )
        if filters.since and filters.until and filters.since >= filters.until:
            raise _Usage("--since must be before --until")
        builder = ReportBuilder(args.by, filters)
        _read(args.logs, builder, stdin)
    except _Usage as exc:
        err.write(f"payi-guard report: error: {exc}\n")
        return 2
    report = builder.build(sort=args.sort, top=args.top)
    if args.format == "table":
        write_table(report, out)
    else:
        (write_csv if args.format == "csv" else write_json)(report, out)
        err.write(f"payi-guard report: {summary(report)}\n")
    out.flush()
    return 0


def main(
    argv: Sequence[str] | None = None,
    *,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    clock: Clock | None = None,
) -> int:
    """Run the report as a program: ``python -m payi_guard.report LOG... [options]``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).
        stdin: see :func:`run_report`.
        stdout: see :func:`run_report`.
        stderr: see :func:`run_report`; argparse's own messages go to ``sys.stderr``.
        clock: see :func:`run_report`.

    Returns:
        The exit status.
    """
    parser = _configure(
        argparse.ArgumentParser(
            prog="payi-guard report",
            description=_DESCRIPTION,
            epilog=_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
    )
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return run_report(args, stdin=stdin, stdout=stdout, stderr=stderr, clock=clock)
    except BrokenPipeError:
        # The reader (``| head``) went away: not an error, and no traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
