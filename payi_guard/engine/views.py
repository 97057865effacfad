"""Planning calls and reading budgets: plans, manual events, usage, exhausted limits.

:class:`Planning` turns a call (or a manual event) and its subject into a plan, with
the subject's tier resolved (the request's, else ``tier_of``'s), and carries manual
events through the books. :class:`Views` answers what ``Guard.usage``,
``Guard.exhausted_limit`` and the users page ask, sync and async, on the guard's
:class:`~payi_guard.engine.parts.Parts`; the cache-only gate never asks the app for a
tier (an unknown tier there lets the call decide).
"""

from __future__ import annotations

from collections.abc import Sequence

from payi_guard.context import Attribution
from payi_guard.engine.bookkeeper import Bookkeeper
from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.parts import Parts
from payi_guard.engine.plan import Counter, Plan, blocking, usages_of
from payi_guard.engine.policy import BoundLimit, Subject
from payi_guard.exceptions import UnknownModelRefused
from payi_guard.pricing import TokenUsage
from payi_guard.usage import LimitUsage

__all__ = ["Planning", "Views"]


class Planning:
    """Plans the guard's calls and charges its manual events.

    Args:
        parts: the guard's parts.
        books: the guard's bookkeeper.
    """

    def __init__(self, parts: Parts, books: Bookkeeper) -> None:
        self._parts = parts
        self._books = books

    def tiered(self, subject: Subject, attribution: Attribution) -> Subject:
        """``subject`` with the tier ``attribution`` names or ``tier_of`` gives (sync)."""
        return self._parts.policy.with_tier(subject, attribution.tier)

    async def atiered(self, subject: Subject, attribution: Attribution) -> Subject:
        """Async :meth:`tiered`: the app's function never runs on the event loop."""
        return await self._parts.policy.awith_tier(subject, attribution.tier)

    def call(self, call: CallRequest, attribution: Attribution, subject: Subject) -> Plan:
        """The plan of a call's reservation.

        Raises:
            ValueError: a negative token estimate.
            UnknownModelRefused: no price is known and ``unknown_model`` is ``block``
                (logged).
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        bounds = (call.input_tokens, call.max_output_tokens, call.max_web_searches)
        if min(*bounds, call.max_file_searches) < 0:
            raise ValueError("token estimates must not be negative")
        parts = self._parts
        try:
            return parts.planner.for_call(
                parts.policy, subject, attribution, call, parts.clock.now()
            )
        except UnknownModelRefused:
            self._books.unknown_model_refused(subject, attribution, call)
            raise

    def _record_plan(self, attribution: Attribution, subject: Subject, call: CallRequest) -> Plan:
        parts = self._parts
        return parts.planner.for_record(
            parts.policy, subject, attribution, call.model, call.provider, parts.clock.now()
        )

    def record(
        self, attribution: Attribution, call: CallRequest, usage: TokenUsage, cost_usd: object
    ) -> CallRecord:
        """Charge a manual event (sync); see :meth:`payi_guard.Guard.record`."""
        subject = self._parts.policy.with_tier(self._parts.user(attribution.user_id), None)
        plan = self._record_plan(attribution, subject, call)
        return self._books.record(plan, usage, cost_usd)

    async def arecord(
        self, attribution: Attribution, call: CallRequest, usage: TokenUsage, cost_usd: object
    ) -> CallRecord:
        """Async :meth:`record`."""
        subject = await self._parts.policy.awith_tier(self._parts.user(attribution.user_id), None)
        plan = self._record_plan(attribution, subject, call)
        return await self._books.arecord(plan, usage, cost_usd)


class Views:
    """Reads a guard's counters (see the module docstring).

    Args:
        parts: the guard's parts.
    """

    def __init__(self, parts: Parts) -> None:
        self._parts = parts

    def _plan(
        self, subject: Subject, limit_ids: Sequence[str]
    ) -> tuple[list[BoundLimit], list[Counter]]:
        parts = self._parts
        bound = parts.policy.bindings(subject, limit_ids)
        return bound, parts.planner.counters(bound, parts.clock.now())

    def tier(self, subject: Subject) -> str:
        """The plan ``subject`` is charged under (:meth:`Guard.tier`)."""
        policy = self._parts.policy
        tiered = policy.with_tier(subject, policy.named_tier(subject), remember=False)
        return self.plan_of(subject, tiered)

    async def atier(self, subject: Subject) -> str:
        """Async :meth:`tier`."""
        policy = self._parts.policy
        tiered = await policy.awith_tier(subject, policy.named_tier(subject), remember=False)
        return self.plan_of(subject, tiered)

    def plan_of(self, subject: Subject, tiered: Subject) -> str:
        """The name of the plan ``subject`` is charged under (``tiered``: with its tier).

        ``anonymous``; the tier its ``users:`` entry names, or ``custom`` for limits of
        its own; the tier its requests last named in this process, else the tier
        ``tier_of`` gives, when that tier is defined; else ``default``.
        """
        config = self._parts.policy.config
        if subject.anonymous:
            return "anonymous"
        user = subject.policy_user
        if user is not None:
            named = config.user_tiers.get(user)
            if named is not None:
                return named
            if user in config.users:
                return "custom"
        tier = tiered.tier
        return tier if tier is not None and tier in config.tiers else "default"

    def usage(
        self, subject: Subject, limit_ids: Sequence[str], tier: str | None
    ) -> list[LimitUsage]:
        """Every limit of ``subject`` (with ``tier`` if the request names one), read now."""
        parts = self._parts
        if tier is None:
            tier = parts.policy.named_tier(subject)
        tiered = parts.policy.with_tier(subject, tier, remember=False)
        bound, counters = self._plan(tiered, limit_ids)
        if not counters:
            return []
        states = parts.storage.ledger.read([c.key for c in counters], now=parts.clock.now())
        return usages_of(bound, counters, states)

    async def ausage(
        self, subject: Subject, limit_ids: Sequence[str], tier: str | None
    ) -> list[LimitUsage]:
        """Async :meth:`usage`."""
        parts = self._parts
        if tier is None:
            tier = parts.policy.named_tier(subject)
        tiered = await parts.policy.awith_tier(subject, tier, remember=False)
        bound, counters = self._plan(tiered, limit_ids)
        if not counters:
            return []
        keys = [c.key for c in counters]
        states = await parts.storage.async_ledger.read(keys, now=parts.clock.now())
        return usages_of(bound, counters, states)

    def nothing_to_find(self) -> bool:
        """Whether the spent cache can refuse no one, whatever the attribution.

        True when nothing is spent in this process and no caller is refused for want of
        a user (the anonymous strategy is not ``reject``): a gate answers without
        building the caller's attribution or subject.
        """
        parts = self._parts
        return not parts.spent.tags and parts.policy.config.anonymous.strategy != "reject"

    def cached_exhausted(self, subject: Subject, attribution: Attribution) -> LimitUsage | None:
        """The exhausted limit the spent cache knows of (no I/O, ``tier_of`` not asked)."""
        return self.cached_exhausted_of(subject, attribution.limit_ids, attribution.tier)

    def request_exhausted(
        self, user_id: str | None, tier: str | None, default_user: str | None
    ) -> LimitUsage | None:
        """:meth:`cached_exhausted` of a request's own user and tier, with no other layer.

        What it answers for the attribution ``get_context()`` gives in a request scope
        that no ``track_context`` layer changes, without that snapshot.

        Raises:
            UserRequired: no user is known and anonymous calls are rejected.
        """
        parts = self._parts
        subject = parts.subjects.for_user(user_id, default_user, parts.policy.config.anonymous)
        if not parts.spent.tags:  # nothing spent in this process: no further call
            return None
        return self.cached_exhausted_of(subject, (), tier)

    def cached_exhausted_of(
        self, subject: Subject, limit_ids: tuple[str, ...], tier: str | None
    ) -> LimitUsage | None:
        """:meth:`cached_exhausted` given only what it reads of the attribution."""
        parts = self._parts
        spent = parts.spent
        if not spent.tags or not spent.any_tag(subject.owner_tags(limit_ids)):
            return None
        tiered = parts.policy.cached_tier(subject, tier)
        if tiered is None:
            return None  # the tier is not known without asking the app: the call decides
        _, counters = self._plan(tiered, limit_ids)
        return spent.exhausted(counters, parts.clock.now())

    def exhausted(
        self, subject: Subject, attribution: Attribution, read_storage: bool
    ) -> LimitUsage | None:
        """The exhausted block limit of ``subject``: from the spent cache, or the store."""
        if not read_storage:
            return self.cached_exhausted(subject, attribution)
        parts = self._parts
        subject = parts.policy.with_tier(subject, attribution.tier)
        bound, counters = self._plan(subject, attribution.limit_ids)
        if not counters:
            return None
        states = parts.storage.ledger.read([c.key for c in counters], now=parts.clock.now())
        return blocking(usages_of(bound, counters, states))

    async def aexhausted(
        self, subject: Subject, attribution: Attribution, read_storage: bool
    ) -> LimitUsage | None:
        """Async :meth:`exhausted`."""
        if not read_storage:
            return self.cached_exhausted(subject, attribution)
        parts = self._parts
        subject = await parts.policy.awith_tier(subject, attribution.tier)
        bound, counters = self._plan(subject, attribution.limit_ids)
        if not counters:
            return None
        keys = [c.key for c in counters]
        states = await parts.storage.async_ledger.read(keys, now=parts.clock.now())
        return blocking(usages_of(bound, counters, states))
