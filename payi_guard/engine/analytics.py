"""The usage analytics a plan adds to the store (see :mod:`payi_guard.ledger.analytics`).

The tallies are the same as :func:`~payi_guard.ledger.analytics.call_tallies` and
:func:`~payi_guard.ledger.analytics.refusal_tallies` give; what depends only on the
subject and the UTC day (the owners' keys, the expiry, a refusal's whole tallies) is
made once per subject and day, not on every call.
"""

from __future__ import annotations

import functools

from payi_guard.engine.calls import CallRecord
from payi_guard.engine.plan import Plan
from payi_guard.ledger.analytics import call_fields, owners_of, prefix_of, refusal_tallies
from payi_guard.ledger.base import Tally, make_tally

__all__ = ["refused_tallies", "settled_tallies"]

_DAY = 86_400


@functools.lru_cache(maxsize=4096)
def _refusals(
    prefix: str, user_id: str, org_id: str | None, anonymous: bool, day: int, keep_days: int
) -> tuple[Tally, ...]:
    # Any time of the day gives the same tallies: their day and its expiry.
    owners = owners_of(user_id, org_id, anonymous)
    return refusal_tallies(prefix, owners, now=float(day * _DAY), keep_days=keep_days)


@functools.lru_cache(maxsize=4096)
def _day_keys(
    prefix: str, user_id: str, org_id: str | None, anonymous: bool, day: int, keep_days: int
) -> tuple[tuple[str, ...], float]:
    """The owners' tally keys for a UTC day, and when those tallies expire."""
    tallies = _refusals(prefix, user_id, org_id, anonymous, day, keep_days)
    return tuple(t.key for t in tallies), tallies[0].expires_at if tallies else 0.0


def _owners_day(plan: Plan, keep_days: int) -> tuple[str, str, str | None, bool, int, int]:
    """What a plan's tallies depend on besides the call: the owners and the UTC day.

    Made once per plan (its reserve and its commit ask).
    """
    known = plan.owners_day
    if known is not None and known[5] == keep_days:
        return known
    subject = plan.subject
    prefix = prefix_of(plan.charges[0].key)
    day = int(plan.now // _DAY)
    known = prefix, subject.user_id, subject.org_id, subject.anonymous, day, keep_days
    plan.owners_day = known
    return known


@functools.lru_cache(maxsize=4096)
def _field_names(model: str, use_case: str | None) -> tuple[str, ...]:
    """The names of :func:`~payi_guard.ledger.analytics.call_fields`, in its order."""
    return tuple(name for name, _ in call_fields(0, 0, 0, model, use_case))


def settled_tallies(plan: Plan, record: CallRecord, keep_days: int) -> tuple[Tally, ...]:
    """The tallies the commit of ``plan``'s call adds (its user's and org's day)."""
    if keep_days <= 0:
        return ()
    keys, until = _day_keys(*_owners_day(plan, keep_days))
    usage = record.usage
    cost = record.cost_nano
    tokens_in = max(usage.input_tokens, 0) if usage else 0
    tokens_out = max(usage.output_tokens, 0) if usage else 0
    # call_fields' values, in its order, under names made once per model and use case.
    c, n, i, o, mc, mn, uc, un = _field_names(plan.call.model, plan.attribution.use_case_name)
    fields = (
        (c, cost),
        (n, 1),
        (i, tokens_in),
        (o, tokens_out),
        (mc, cost),
        (mn, 1),
        (uc, cost),
        (un, 1),
    )
    if len(keys) == 1:  # the usual: a user of no org (no list comprehension's call)
        return (make_tally(keys[0], fields, until),)
    return tuple([make_tally(key, fields, until) for key in keys])


def refused_tallies(plan: Plan, keep_days: int) -> tuple[Tally, ...]:
    """The tallies a reserve of ``plan`` adds if it refuses (a refusal for each owner)."""
    if keep_days <= 0:
        return ()
    return _refusals(*_owners_day(plan, keep_days))
