"""Operator controls: adjust or reset a user's counters, and the history of both.

``guard.adjust(user_id, limit, amount)`` adds ``amount`` (negative gives budget back) to
the current window of one of the user's own limits; ``guard.reset(user_id, limit=None)``
zeroes the current window of one limit, or of all of them. Either is one atomic ledger
step (:meth:`~payi_guard.ledger.Ledger.adjust`) that also appends an entry per counter to
the user's journal, which :meth:`Operator.history` reads back as
:class:`~payi_guard.usage.BudgetAdjustment` objects. Each limit adjusted is logged as
``budget_adjusted``.

What they touch: the user's (or anonymous bucket's) own counters only, never the org's,
the global ones or a shared ``limit_ids`` counter. Limits of one user with the same unit
and period share one counter, so adjusting one adjusts them all. Calls in flight keep
their reservations: a reset zeroes what was settled, and a call that ends after it is
charged to the reset window. An adjustment may take a counter past its max on purpose;
the user is then refused until the window ends (or an operator gives budget back); a
call racing an adjustment is never admitted past max, because the ledger checks every
reserve against a state that includes every adjustment before it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from payi_guard import log as events
from payi_guard._ids import new_id
from payi_guard.config import MAX_AMOUNT
from payi_guard.engine.parts import Parts
from payi_guard.engine.plan import Counter, limit_usage
from payi_guard.engine.policy import BoundLimit, Subject
from payi_guard.exceptions import StorageError
from payi_guard.ledger._adjust import AdjustmentOutOfRange
from payi_guard.ledger.base import (
    MAX_UNITS,
    Adjustment,
    CounterState,
    JournalEntry,
    StorageOutcomeUnknown,
)
from payi_guard.ledger.keys import journal_key, parse_key
from payi_guard.money import (
    decimal_usd,
    display_amount,
    log_amount,
    parse_usd_change,
    shown_amount,
)
from payi_guard.usage import BudgetAdjustment, LimitUsage, Scope, Unit

__all__ = [
    "HISTORY_DAYS",
    "HISTORY_KEEP",
    "Operator",
    "OperatorPlan",
    "parse_amount",
]

HISTORY_KEEP = 100
"""The most adjustments a user's journal keeps (the newest)."""

HISTORY_DAYS = 90
"""Days a user's journal is kept after its last adjustment."""

_MAX_TEXT = 200
Op = Literal["adjust", "reset"]


def _text(value: object, what: str) -> str | None:
    """``reason`` or ``by``: ``None``, or a printable one-line string of at most 200."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a string or None, not {type(value).__name__}")
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise ValueError(f"{what} must be one printable line of at most {_MAX_TEXT} characters")
    return value or None


def parse_amount(unit: Unit, amount: object) -> int:
    """An operator's amount in ledger units: dollars for ``usd``, a whole count otherwise.

    Raises:
        ValueError: not a number of that kind (or finer than a nano-dollar).
    """
    if unit == "usd":
        units = parse_usd_change(amount)
    else:
        if isinstance(amount, bool):
            raise ValueError(f"an amount of {unit} must be a whole number")
        try:
            count = int(amount) if isinstance(amount, (int, str)) else None
        except ValueError:
            count = None
        if count is None:
            raise ValueError(
                f"an amount of {unit} must be a whole number, not {shown_amount(amount)}"
            )
        units = count
    if abs(units) > MAX_AMOUNT:
        raise ValueError(f"{shown_amount(amount)} is more than a counter holds")
    return units


@dataclass(frozen=True, slots=True)
class OperatorPlan:
    """An adjustment about to be made: the subject, the limits and counters it touches."""

    op: Op
    subject: Subject
    limits: list[BoundLimit]
    counters: list[Counter]
    adjustments: list[Adjustment]
    journal: str
    now: float
    adjustment_id: str
    reason: str | None
    by: str | None


class Operator:
    """Plans, applies and logs operators' adjustments; reads the users' histories.

    Args:
        parts: the guard's parts.
    """

    def __init__(self, parts: Parts) -> None:
        self._parts = parts
        self._log = events.get_logger()

    # -- the guard's methods ----------------------------------------------------------------

    def change(
        self,
        op: Op,
        subject: Subject,
        limit: str | None,
        amount: object,
        reason: object,
        by: object,
    ) -> list[LimitUsage]:
        """Plan and apply an ``adjust`` or a ``reset`` (sync), the user's tier resolved.

        Raises:
            ValueError: see :meth:`plan`; or a counter would go out of range.
            StorageError: the store failed; nothing was changed.
        """
        policy = self._parts.policy  # the plan the users page and usage() show
        subject = policy.with_tier(subject, policy.named_tier(subject), remember=False)
        return self.apply(self.plan(op, subject, limit, amount, reason, by))

    async def achange(
        self,
        op: Op,
        subject: Subject,
        limit: str | None,
        amount: object,
        reason: object,
        by: object,
    ) -> list[LimitUsage]:
        """Async :meth:`change`."""
        policy = self._parts.policy
        subject = await policy.awith_tier(subject, policy.named_tier(subject), remember=False)
        return await self.aapply(self.plan(op, subject, limit, amount, reason, by))

    def history(self, subject: Subject, limit: int) -> list[BudgetAdjustment]:
        """The subject's adjustments, newest first (sync)."""
        parts = self._parts
        entries = parts.storage.ledger.read_journal(
            self.journal_of(subject), now=parts.clock.now(), limit=limit
        )
        return self.read(subject, entries)

    async def ahistory(self, subject: Subject, limit: int) -> list[BudgetAdjustment]:
        """Async :meth:`history`."""
        parts = self._parts
        entries = await parts.storage.async_ledger.read_journal(
            self.journal_of(subject), now=parts.clock.now(), limit=limit
        )
        return self.read(subject, entries)

    # -- planning ---------------------------------------------------------------------------

    def plan(
        self,
        op: Op,
        subject: Subject,
        limit: str | None,
        amount: object,
        reason: object,
        by: object,
    ) -> OperatorPlan:
        """Plan an ``adjust`` (``amount`` added to ``limit``) or a ``reset``.

        Raises:
            ValueError: ``limit`` is not one of the user's own limits, no limit is named
                for an adjust, the amount is not a number of the limit's unit, or
                ``reason`` / ``by`` is not one short printable line.
            TypeError: ``reason`` or ``by`` is not a string.
        """
        reason, by = _text(reason, "reason"), _text(by, "by")
        everything = list(self._parts.policy.limits_for(subject))
        own = [b for b in everything if b.scope in ("user", "anonymous")]
        if limit is None:
            if op == "adjust":
                raise ValueError("adjust needs the name of the limit to change")
            chosen = own
        else:
            chosen = [_find(limit, subject, own, everything)]
        now = self._parts.clock.now()
        counters = self._parts.planner.counters(own, now)
        touched = [c for c in counters if any(b in chosen for b in c.limits)]
        units = 0 if op == "reset" else parse_amount(chosen[0].spec.unit, amount)
        adjustment_id = new_id()
        adjustments = [
            Adjustment(
                key=counter.key,
                amount=None if op == "reset" else units,
                expires_at=counter.expires_at,
                note=_note(op, adjustment_id, counter, chosen, reason, by),
            )
            for counter in touched
        ]
        return OperatorPlan(
            op=op,
            subject=subject,
            limits=chosen,
            counters=touched,
            adjustments=adjustments,
            journal=self.journal_of(subject),
            now=now,
            adjustment_id=adjustment_id,
            reason=reason,
            by=by,
        )

    # -- applying ------------------------------------------------------------------------

    def apply(self, plan: OperatorPlan) -> list[LimitUsage]:
        """Apply ``plan`` in one ledger step (sync); log it; return the limits after.

        Raises:
            StorageOutcomeUnknown: the store did not answer in time: the adjustment may
                have been applied (the user's history tells; it is not retried).
            StorageError: the store failed; nothing was changed (nothing is logged).
            ValueError: a counter would go out of range (nothing was changed).
        """
        if not plan.adjustments:
            return []
        try:
            entries = self._parts.storage.ledger.adjust(
                plan.adjustments,
                now=plan.now,
                journal=plan.journal,
                keep=HISTORY_KEEP,
                journal_expires_at=plan.now + HISTORY_DAYS * 86_400,
            )
        except StorageOutcomeUnknown as exc:
            raise _unknown(exc) from exc
        except AdjustmentOutOfRange:
            raise _out_of_range(plan) from None
        keys = [counter.key for counter in plan.counters]
        try:
            refused = _refused_of(keys, self._parts.storage.ledger.read(keys, now=plan.now))
        except StorageError:
            refused = {}  # the adjustment is made: say so, without the refusal marks
        return self._done(plan, entries, refused)

    async def aapply(self, plan: OperatorPlan) -> list[LimitUsage]:
        """Async :meth:`apply`."""
        if not plan.adjustments:
            return []
        try:
            entries = await self._parts.storage.async_ledger.adjust(
                plan.adjustments,
                now=plan.now,
                journal=plan.journal,
                keep=HISTORY_KEEP,
                journal_expires_at=plan.now + HISTORY_DAYS * 86_400,
            )
        except StorageOutcomeUnknown as exc:
            raise _unknown(exc) from exc
        except AdjustmentOutOfRange:
            raise _out_of_range(plan) from None
        keys = [counter.key for counter in plan.counters]
        try:
            refused = _refused_of(
                keys, await self._parts.storage.async_ledger.read(keys, now=plan.now)
            )
        except StorageError:
            refused = {}
        return self._done(plan, entries, refused)

    def _done(
        self, plan: OperatorPlan, entries: Sequence[JournalEntry], refused: Mapping[str, int]
    ) -> list[LimitUsage]:
        """Log the adjustment; the limits after it, as :meth:`Guard.usage` reads them.

        ``refused`` holds each counter's mark of the last call it refused (read after the
        adjustment): a limit that still refuses that call is shown ``exceeded``, as
        :meth:`Guard.usage` and the 429 show it.
        """
        self._parts.spent.forget(counter.key for counter in plan.counters)
        entry_of = {id(c): e for c, e in zip(plan.counters, entries, strict=True)}
        out: list[LimitUsage] = []
        for bound in plan.limits:
            counter = next(c for c in plan.counters if bound in c.limits)
            entry = entry_of[id(counter)]
            state = CounterState(entry.settled, entry.pending, refused.get(counter.key, 0))
            usage = limit_usage(bound, counter.window, state)
            out.append(usage)
            spec = bound.spec
            self._log.info(
                events.BUDGET_ADJUSTED,
                user_id=plan.subject.user_id,
                limit=spec.name,
                scope=bound.scope,
                unit=spec.unit,
                op=plan.op,
                amount=log_amount(spec.unit, entry.amount),
                used=log_amount(spec.unit, entry.settled + entry.pending),
                max=log_amount(spec.unit, spec.max),
                resets_at=counter.window.resets_at.isoformat(),
                reason=plan.reason,
                by=plan.by,
                adjustment_id=plan.adjustment_id,
            )
        return out

    # -- history -------------------------------------------------------------------------

    def journal_of(self, subject: Subject) -> str:
        """The key of the subject's adjustments journal."""
        scope: Scope = "anonymous" if subject.anonymous else "user"
        return journal_key(self._parts.key_prefix, scope, subject.user_id)

    def read(self, subject: Subject, entries: Sequence[JournalEntry]) -> list[BudgetAdjustment]:
        """The journal ``entries`` of ``subject`` as adjustments (unreadable ones skipped)."""
        out: list[BudgetAdjustment] = []
        for entry in entries:
            adjustment = _read_entry(self._parts.key_prefix, subject.user_id, entry)
            if adjustment is not None:
                out.append(adjustment)
        return out


def _out_of_range(plan: OperatorPlan) -> ValueError:
    """The ledger's refusal of a counter out of range, in the limits' own units."""
    names = ", ".join(bound.spec.name for bound in plan.limits)
    most = f"{decimal_usd(MAX_UNITS):,}"
    return ValueError(
        f"{plan.op} {names}: a counter would go beyond what it can hold (${most} for "
        f"money, {MAX_UNITS:,} tokens or requests); nothing was changed"
    )


def _refused_of(keys: Sequence[str], states: Sequence[CounterState]) -> dict[str, int]:
    """Each counter's refusal mark (what the last call it refused needed), by key."""
    return {key: state.refused for key, state in zip(keys, states, strict=True)}


def _unknown(exc: StorageOutcomeUnknown) -> StorageOutcomeUnknown:
    return StorageOutcomeUnknown(
        f"{exc}; the adjustment may have been applied: read the user's history "
        "(guard.adjustments(), the users page) before trying again"
    )


def _find(
    name: str, subject: Subject, own: list[BoundLimit], everything: list[BoundLimit]
) -> BoundLimit:
    for bound in own:
        if bound.spec.name == name:
            return bound
    names = ", ".join(b.spec.name for b in own) or "none (the user has no limits of its own)"
    if any(b.spec.name == name for b in everything):
        raise ValueError(
            f"{name!r} is not one of {subject.user_id}'s own limits (an org's or a global "
            f"limit is shared: adjust a user's own limit); theirs: {names}"
        )
    raise ValueError(f"{subject.user_id} has no limit {name!r}; their limits: {names}")


def _note(
    op: Op,
    adjustment_id: str,
    counter: Counter,
    chosen: list[BoundLimit],
    reason: str | None,
    by: str | None,
) -> str:
    named = [b.spec.name for b in counter.limits if b in chosen]
    others = [b.spec.name for b in counter.limits if b not in chosen]
    document: dict[str, Any] = {"v": 1, "op": op, "id": adjustment_id, "limits": named + others}
    if reason is not None:
        document["reason"] = reason
    if by is not None:
        document["by"] = by
    return json.dumps(document, separators=(",", ":"))


def _read_entry(prefix: str, user_id: str, entry: JournalEntry) -> BudgetAdjustment | None:
    key = parse_key(prefix, entry.key)
    try:
        note = json.loads(entry.note)
    except ValueError:
        return None
    if key is None or not isinstance(note, dict) or note.get("op") not in ("adjust", "reset"):
        return None
    limits = note.get("limits")
    names = tuple(str(n) for n in limits) if isinstance(limits, list) else ()
    reason, by = note.get("reason"), note.get("by")
    return BudgetAdjustment(
        at=datetime.fromtimestamp(entry.at, tz=timezone.utc),
        op=note["op"],
        user_id=user_id,
        limits=names,
        unit=key.unit,
        per=key.per,
        window_start=datetime.fromtimestamp(key.window_start, tz=timezone.utc),
        amount=display_amount(key.unit, entry.amount),
        used=display_amount(key.unit, entry.settled + entry.pending),
        reason=reason if isinstance(reason, str) else None,
        by=by if isinstance(by, str) else None,
        adjustment_id=str(note.get("id", "")),
    )
