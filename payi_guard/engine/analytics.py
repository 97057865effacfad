"""The usage analytics a plan adds to the store (see :mod:`payi_guard.ledger.analytics`)."""

from __future__ import annotations

from payi_guard.engine.calls import CallRecord
from payi_guard.engine.plan import Plan
from payi_guard.ledger.analytics import call_tallies, owners_of, prefix_of, refusal_tallies
from payi_guard.ledger.base import Tally

__all__ = ["refused_tallies", "settled_tallies"]


def settled_tallies(plan: Plan, record: CallRecord, keep_days: int) -> tuple[Tally, ...]:
    """The tallies the commit of ``plan``'s call adds (its user's and org's day)."""
    subject, usage = plan.subject, record.usage
    return call_tallies(
        prefix_of(plan.charges[0].key),
        owners_of(subject.user_id, subject.org_id, subject.anonymous),
        now=plan.now,
        keep_days=keep_days,
        cost=record.cost_nano,
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        model=plan.call.model,
        use_case=plan.attribution.use_case_name,
    )


def refused_tallies(plan: Plan, keep_days: int) -> tuple[Tally, ...]:
    """The tallies a reserve of ``plan`` adds if it refuses (a refusal for each owner)."""
    subject = plan.subject
    owners = owners_of(subject.user_id, subject.org_id, subject.anonymous)
    return refusal_tallies(
        prefix_of(plan.charges[0].key), owners, now=plan.now, keep_days=keep_days
    )
