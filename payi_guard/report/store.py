"""``payi-guard report --from-store``: the report's rows from the store's analytics.

The store keeps, per user and org and per UTC day, spend, calls, tokens and refusals,
by model and use case (:mod:`payi_guard.ledger.analytics`), so a report by user needs no
log file. The rows have the log report's columns; what daily totals cannot give is left
empty (``-`` in a table, empty in CSV, ``null`` in JSON): the cost percentiles per call,
warnings, overruns, errors and operators' adjustments. With ``--by model``
or ``--by use_case`` the tokens are not split (the store keeps spend and calls per model
and use case), so those columns are 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

from payi_guard.ledger.analytics import analytics_owner, history_keys
from payi_guard.ledger.base import Ledger
from payi_guard.ledger.keys import owners_glob
from payi_guard.money import decimal_usd
from payi_guard.report.aggregate import GroupBy, Report, ReportRow, SortBy, _matcher
from payi_guard.usage import Scope

__all__ = ["store_report"]

_MAX_KEYS = 1_000_000


@dataclass(slots=True)
class _Totals:
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: int = 0
    refused: int = 0
    users: set[str] = field(default_factory=set)


def _row(key: str | None, t: _Totals, total: int) -> ReportRow:
    share = None
    if total:
        share = (Decimal(t.cost) * 100 / Decimal(total)).quantize(Decimal("0.0001"))
    return ReportRow(
        key=key,
        calls=t.calls,
        input_tokens=t.input_tokens,
        output_tokens=t.output_tokens,
        cost_usd=decimal_usd(t.cost),
        share_pct=share,
        p50_usd=None,
        p90_usd=None,
        p99_usd=None,
        percentiles_exact=None,  # the store keeps no costs per call
        blocked=t.refused,
        warned=None,  # the store keeps no record of these: left empty, never a 0
        overruns=None,
        errors=None,
        adjustments=None,  # in each user's journal, not in the day's tallies
        adjusted_usd=None,
    )


def _keep(patterns: Sequence[str]) -> Callable[[str], bool]:
    matcher = _matcher(patterns)
    return (lambda value: True) if matcher is None else matcher


def store_report(
    ledger: Ledger,
    prefix: str,
    *,
    now: float,
    days: int,
    by: GroupBy = "user",
    users: Sequence[str] = (),
    orgs: Sequence[str] = (),
    models: Sequence[str] = (),
    sort: SortBy = "cost",
    top: int | None = None,
) -> Report:
    """Build the report of the last ``days`` UTC days (today included) from the store.

    Rows come from the users' tallies (``--by org`` from the orgs' own). ``users``,
    ``orgs`` and ``models`` filter as in the log report (ids or globs); a model filter
    keeps only the spend and calls of those models.

    Raises:
        StorageError: the store could not be read.
    """
    scope: Scope = "org" if by == "org" else "user"
    # A user's spend is under its own tallies, the anonymous bucket's (and pseudonyms')
    # under the anonymous scope: a per-user report has both, as the log report does.
    scopes: list[Scope] = ["org"] if by == "org" else ["user", "anonymous"]
    wanted_days = {day for day, _ in history_keys(prefix, scope, "x", days, now)}
    keep_user, keep_org, keep_model = _keep(users), _keep(orgs), _keep(models)
    found = ledger.scan(owners_glob(prefix, scopes), now=now, limit=_MAX_KEYS)
    picked: list[tuple[str, str]] = []
    for key in found:
        parsed = analytics_owner(prefix, key)
        if parsed is None or parsed[2] not in wanted_days:
            continue
        owner = parsed[1]
        if parsed[0] == "anonymous":
            org = ""  # "anonymous:xyz" is a pseudonym, not an org's user
        else:
            org = owner if scope == "org" else owner.partition(":")[0] if ":" in owner else ""
        if scope == "user" and not keep_user(owner):
            continue
        if (orgs or scope == "org") and not keep_org(org):
            continue
        picked.append((owner, key))
    tallies = ledger.read_tallies([key for _, key in picked], now=now) if picked else ()
    groups: dict[str | None, _Totals] = {}
    every = _Totals()
    for (owner, _), fields in zip(picked, tallies, strict=True):
        every.users.add(owner)
        if by in ("user", "org") and not models:
            _add_whole(groups.setdefault(owner, _Totals()), fields)
            continue
        _add_split(groups, owner, fields, by, keep_model)
    total = sum(t.cost for t in groups.values())
    for t in groups.values():
        every.calls += t.calls
        every.input_tokens += t.input_tokens
        every.output_tokens += t.output_tokens
        every.refused += t.refused
    every.cost = total

    def order(item: tuple[str | None, _Totals]) -> tuple[object, ...]:
        key, t = item
        return (-(t.cost if sort == "cost" else t.calls), key is None, key or "")

    ordered = sorted(groups.items(), key=order)
    shown = ordered if top is None else ordered[:top]
    return Report(
        by=by,
        rows=tuple(_row(key, t, total) for key, t in shown),
        groups=len(ordered),
        totals=_row(None, every, total),
        users=len(every.users) if scope == "user" else 0,
        lines=len(picked),
        skipped=0,
        other_events=0,
        filtered_out=0,
        undated=0,
        source=f"the store's analytics, the last {days:,} days",
    )


def _add_whole(t: _Totals, fields: dict[str, int]) -> None:
    t.cost += fields.get("c", 0)
    t.calls += fields.get("n", 0)
    t.input_tokens += fields.get("i", 0)
    t.output_tokens += fields.get("o", 0)
    t.refused += fields.get("f", 0)


def _add_split(
    groups: dict[str | None, _Totals],
    owner: str,
    fields: dict[str, int],
    by: GroupBy,
    keep_model: Callable[[str], bool],
) -> None:
    """Spend and calls of the kept models, grouped by owner, model or use case."""
    if by == "use_case":
        # Use cases are not split by model: a model filter cannot apply to them.
        for name, value in fields.items():
            kind, _, case = name.partition(":")
            if kind in ("uc", "un"):
                t = groups.setdefault(case or None, _Totals())
                if kind == "uc":
                    t.cost += value
                else:
                    t.calls += value
        return
    for name, value in fields.items():
        kind, _, model = name.partition(":")
        if kind not in ("mc", "mn") or not keep_model(model):
            continue
        t = groups.setdefault(model if by == "model" else owner, _Totals())
        if kind == "mc":
            t.cost += value
        else:
            t.calls += value
