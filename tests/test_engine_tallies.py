"""The engine's cached analytics tallies equal the ledger's reference tallies."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.context import Attribution
from payi_guard.engine.analytics import refused_tallies, settled_tallies
from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.plan import Plan
from payi_guard.engine.policy import Subject
from payi_guard.ledger.analytics import call_tallies, owners_of, prefix_of, refusal_tallies
from payi_guard.ledger.base import Charge
from payi_guard.pricing import TokenUsage

_names = st.text(alphabet="abcXYZ09:_-.é", min_size=1, max_size=8)


def _plan(
    prefix: str, user: str, org: str | None, anonymous: bool, now: float, case: str | None
) -> Plan:
    subject = Subject(user, org, user, org, anonymous)
    charge = Charge(key=f"{prefix}:{{u:{user}}}:usd:day:0", amount=1, max=None, expires_at=1.0)
    policy: Any = None  # the tallies never read the policy
    return Plan(
        reservation_id="r",
        subject=subject,
        attribution=Attribution(user_id=user, use_case_name=case),
        call=CallRequest(model="m", provider="p"),
        policy=policy,
        counters=[],
        charges=[charge],
        estimate_nano=0,
        rates=None,
        now=now,
    )


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from(["pg", "app:pg", "x"]),
    user=_names,
    org=st.none() | _names,
    anonymous=st.booleans(),
    now=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    keep_days=st.integers(min_value=-1, max_value=400),
    case=st.none() | _names,
    model=_names,
    cost=st.integers(min_value=0, max_value=10**15),
    usage=st.none() | st.tuples(st.integers(-5, 10**9), st.integers(-5, 10**9)),
)
def test_cached_tallies_equal_the_reference(
    prefix: str,
    user: str,
    org: str | None,
    anonymous: bool,
    now: float,
    keep_days: int,
    case: str | None,
    model: str,
    cost: int,
    usage: tuple[int, int] | None,
) -> None:
    plan = _plan(prefix, user, org, anonymous, now, case)
    plan.call = CallRequest(model=model, provider="p")
    tokens = None if usage is None else TokenUsage(max(usage[0], 0), max(usage[1], 0))
    record = CallRecord(user, org, model, "p", tokens, cost, 0, "ok", 1.0, False)
    owners = owners_of(user, org, anonymous)
    assert prefix_of(plan.charges[0].key) == prefix
    expected = call_tallies(
        prefix,
        owners,
        now=now,
        keep_days=keep_days,
        cost=cost,
        input_tokens=tokens.input_tokens if tokens else 0,
        output_tokens=tokens.output_tokens if tokens else 0,
        model=model,
        use_case=case,
    )
    # Twice: the second answer comes from the caches.
    assert settled_tallies(plan, record, keep_days) == expected
    assert settled_tallies(plan, record, keep_days) == expected
    refused = refusal_tallies(prefix, owners, now=now, keep_days=keep_days)
    assert refused_tallies(plan, keep_days) == refused
    assert refused_tallies(plan, keep_days) == refused
