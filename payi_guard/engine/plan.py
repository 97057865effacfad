"""Planning: from a subject's limits to the counters a call charges, and what it reserves.

Everything here is pure data and arithmetic, shared by the sync and async paths: only
the ledger call that follows differs. Counters are keyed by owner, unit and calendar
window (:mod:`payi_guard.ledger.keys`), so every limit of one owner with the same unit
and period shares one counter and one number per window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

from payi_guard._ids import new_id
from payi_guard.context import Attribution, get_context
from payi_guard.engine.calls import CallRequest
from payi_guard.engine.policy import BoundLimit, Policy, Subject
from payi_guard.exceptions import UnknownModel, UnknownModelRefused
from payi_guard.identity import normalize_user_id
from payi_guard.ledger.base import Charge, CounterState, make_charge
from payi_guard.ledger.keys import counter_key
from payi_guard.money import display_amount
from payi_guard.pricing import Rates
from payi_guard.usage import LimitState, LimitUsage, Unit
from payi_guard.windows import Window, WindowCache

__all__ = [
    "Counter",
    "Plan",
    "Planner",
    "amounts_by_counter",
    "blocking",
    "limit_usage",
    "record_attribution",
    "usages_of",
]

_COUNTER_GRACE_SECONDS = 3600


@dataclass(slots=True)
class Counter:
    """One deduplicated counter of a call: its key, window and the limits on it."""

    key: str
    unit: Unit
    window: Window
    limits: list[BoundLimit] = field(default_factory=list)
    enforced_max: int | None = None  # the smallest max of its block limits, set when built
    expires_at: float = 0.0

    def refusing_limit(self) -> BoundLimit:
        """The block limit with the smallest max: the one a refusal names."""
        blocking = [b for b in self.limits if b.spec.blocks]
        return min(blocking, key=lambda b: b.spec.max)


@dataclass(slots=True)
class Plan:
    """A reservation about to be made (or a manual event about to be committed)."""

    reservation_id: str
    subject: Subject
    attribution: Attribution
    call: CallRequest
    policy: Policy
    counters: list[Counter]
    charges: list[Charge]
    estimate_nano: int
    rates: Rates | None
    now: float
    owners_day: tuple[str, str, str | None, bool, int, int] | None = None
    """What the plan's usage analytics depend on (set by :mod:`~payi_guard.engine.analytics`)."""


def amounts_by_counter(counters: Iterable[Counter], usd: int, tokens: int) -> list[int]:
    """What one call adds to each counter: ``usd`` nano-USD, ``tokens``, or 1 request."""
    by_unit = {"usd": usd, "tokens": tokens, "requests": 1}
    return [by_unit[c.unit] for c in counters]


def limit_usage(bound: BoundLimit, window: Window, state: CounterState) -> LimitUsage:
    """The :class:`~payi_guard.LimitUsage` of one limit, given its counter's state.

    The limit is ``exceeded`` while it refuses calls: nothing remains, or the last call
    its counter refused needs more than remains (``state.refused``, written by that
    refusal in the store, so every process and host reads the same). A smaller call
    that fits, a give-back or a new window makes it admit calls again, and say so.
    """
    spec = bound.spec
    used = state.used
    remaining = max(0, spec.max - used)
    status: LimitState = "ok"
    if used >= spec.max or (state.refused > 0 and spec.max - used < state.refused):
        status = "exceeded"
    elif spec.warn_at is not None and used * spec.warn_at.denominator >= (
        spec.max * spec.warn_at.numerator
    ):
        status = "warning"
    return LimitUsage(
        name=spec.name,
        scope=bound.scope,
        unit=spec.unit,
        used=display_amount(spec.unit, used),
        max=display_amount(spec.unit, spec.max),
        remaining=display_amount(spec.unit, remaining),
        resets_at=window.resets_at,
        state=status,
        type=spec.type,
        counter=bound.owner,
        window_start=datetime.fromtimestamp(window.start, tz=timezone.utc),
    )


def usages_of(
    bound: Sequence[BoundLimit], counters: Sequence[Counter], states: Sequence[CounterState]
) -> list[LimitUsage]:
    """One :class:`~payi_guard.LimitUsage` per bound limit, in order."""
    state_of = {c.key: s for c, s in zip(counters, states, strict=True)}
    counter_of = {id(b): c for c in counters for b in c.limits}
    out = []
    for b in bound:
        counter = counter_of[id(b)]
        out.append(limit_usage(b, counter.window, state_of[counter.key]))
    return out


def record_attribution(
    user_id: object,
    limit_ids: Sequence[str],
    use_case_name: str | None,
    request_id: str | None,
) -> Attribution:
    """The attribution of a manual event: its user, over the context in effect.

    Raises:
        InvalidUserId: the user id is invalid.
    """
    base = get_context()
    return Attribution(
        user_id=normalize_user_id(user_id),
        account_name=base.account_name,
        use_case_name=use_case_name if use_case_name is not None else base.use_case_name,
        use_case_id=base.use_case_id,
        limit_ids=tuple(dict.fromkeys([*base.limit_ids, *limit_ids])),
        request_id=request_id if request_id is not None else base.request_id,
    )


def blocking(usages: Iterable[LimitUsage]) -> LimitUsage | None:
    """The exhausted block limit that resets last (the honest ``Retry-After``), if any.

    Exhausted: nothing remains. A limit ``exceeded`` only because the last call it
    refused needed more than remains is not: a smaller call may still fit (a gate that
    refused on it would never let that call through to clear the state).
    """
    exhausted = [
        u for u in usages if u.type == "block" and u.state == "exceeded" and not u.remaining
    ]
    if not exhausted:
        return None
    return max(exhausted, key=lambda u: u.resets_at)


class Planner:
    """Builds counters and plans; caches the counters of hot subjects.

    Args:
        key_prefix: the prefix of every storage key.
        windows: the shared window cache.
        cache_size: how many (subject, limit ids) counter sets are kept.
    """

    def __init__(self, key_prefix: str, windows: WindowCache, cache_size: int) -> None:
        self._prefix = key_prefix
        self._windows = windows
        self._cache_size = cache_size
        self._cache: dict[
            tuple[int, str, bool, str | None, tuple[str, ...], str | None],
            tuple[Policy, float, float, list[Counter]],
        ] = {}

    def counters(self, bound: Sequence[BoundLimit], now: float) -> list[Counter]:
        """The counters of ``bound`` in the windows current at ``now``, deduplicated."""
        by_key: dict[str, Counter] = {}
        for b in bound:
            window = self._windows.get(b.spec.per, b.spec.timezone, now)
            key = counter_key(self._prefix, b.scope, b.owner, b.spec.unit, b.spec.per, window.start)
            counter = by_key.get(key)
            if counter is None:
                counter = by_key[key] = Counter(
                    key, b.spec.unit, window, expires_at=float(window.end + _COUNTER_GRACE_SECONDS)
                )
            counter.limits.append(b)
        for counter in by_key.values():
            maxes = [b.spec.max for b in counter.limits if b.spec.blocks]
            counter.enforced_max = min(maxes) if maxes else None
        return list(by_key.values())

    def call_counters(
        self, policy: Policy, subject: Subject, limit_ids: tuple[str, ...], now: float
    ) -> list[Counter]:
        """The counters a call charges, reused while every window stays current.

        Counters (keys, windows, limits) depend only on the config, the subject, the
        limit ids and the windows in effect, so they are rebuilt only when one of those
        changes: most calls skip the key formatting and window lookups.
        """
        key = (
            id(policy),
            subject.user_id,
            subject.anonymous,
            subject.org_id,
            limit_ids,
            subject.tier,
        )
        cached = self._cache.get(key)
        if cached is not None and cached[0] is policy and cached[1] <= now < cached[2]:
            return cached[3]
        counters = self.counters(policy.bindings(subject, limit_ids), now)
        if counters:
            start = max(c.window.start for c in counters)
            end = min(c.window.end for c in counters)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # bounded; hot subjects come back at once
            self._cache[key] = (policy, float(start), float(end), counters)
        return counters

    def for_call(
        self,
        policy: Policy,
        subject: Subject,
        attribution: Attribution,
        call: CallRequest,
        now: float,
    ) -> Plan:
        """Plan the reservation of a call: its counters, charges and upper-bound cost.

        Raises:
            UnknownModelRefused: no price is known and ``unknown_model`` is ``block``.
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        counters = self.call_counters(policy, subject, attribution.limit_ids, now)
        rates: Rates | None
        try:
            rates = policy.prices.rates(call.model, call.provider, price_context=call.price_context)
        except UnknownModel:
            if policy.config.unknown_model.action == "block":
                raise UnknownModelRefused(call.model, call.provider) from None
            rates = None
        estimate = (
            0
            if rates is None
            else rates.upper_bound_nano(
                call.input_tokens,
                call.max_output_tokens,
                cache_writes=call.cache_writes,
                web_searches=call.max_web_searches,
                file_searches=call.max_file_searches,
            )
        )
        # amounts_by_counter(), in the one pass that makes the charges.
        by_unit = {"usd": estimate, "tokens": call.input_tokens + call.max_output_tokens}
        by_unit["requests"] = 1
        charges: list[Charge] = []  # a loop: no list comprehension's call on 3.11
        for c in counters:
            charges.append(make_charge(c.key, by_unit[c.unit], c.enforced_max, c.expires_at))
        return Plan(
            new_id(), subject, attribution, call, policy, counters, charges, estimate, rates, now
        )

    def for_record(
        self,
        policy: Policy,
        subject: Subject,
        attribution: Attribution,
        model: str,
        provider: str,
        now: float,
    ) -> Plan:
        """Plan a manual event: nothing is reserved, every counter is only added to.

        Raises:
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        bound = policy.bindings(subject, attribution.limit_ids)
        rates: Rates | None
        try:
            rates = policy.prices.rates(model, provider)
        except UnknownModel:
            rates = None
        counters = self.counters(bound, now)
        charges = [Charge(c.key, 0, None, c.expires_at) for c in counters]
        return Plan(
            reservation_id="record-" + new_id(),
            subject=subject,
            attribution=attribution,
            call=CallRequest(model=model, provider=provider, endpoint="record"),
            policy=policy,
            counters=counters,
            charges=charges,
            estimate_nano=0,
            rates=rates,
            now=now,
        )
