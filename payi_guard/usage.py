"""Read-only views of budgets: a limit, an adjustment.

One limit as it applies to one user (:class:`LimitUsage`), and one operator's adjustment of
a user's counter (:class:`BudgetAdjustment`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Literal

from payi_guard.money import decimal_text

__all__ = ["BudgetAdjustment", "LimitState", "LimitUsage", "Scope", "Unit"]

Unit = Literal["usd", "requests", "tokens"]
Scope = Literal["user", "org", "global", "anonymous", "limit_id"]
LimitState = Literal["ok", "warning", "exceeded"]


@dataclass(frozen=True, slots=True)
class LimitUsage:
    """How much of one limit has been used in its current window.

    Attributes:
        name: the YAML name of the limit, or ``scope:index`` for an inline limit.
        scope: whose counter this is: ``user``, ``org``, ``global``, ``anonymous``
            or ``limit_id`` (a shared counter named by ``limit_ids``).
        unit: ``"usd"``, ``"requests"`` or ``"tokens"``.
        used: settled plus pending (reserved, not yet settled) amount in this window.
            ``Decimal`` for ``usd``, ``int`` otherwise.
        max: the limit. Same type as ``used``.
        remaining: ``max - used``, never below zero.
        resets_at: when the current calendar window ends (timezone-aware).
        state: ``"exceeded"`` while the limit refuses calls (nothing remains, or less
            than the last call it refused needed: that user is blocked until a smaller
            call fits, budget is given back or the window ends), ``"warning"`` at or
            past ``warn_at``, else ``"ok"``.
        type: ``"block"`` (refuses calls) or ``"allow"`` (only logs overruns).
        counter: the owner of the counter (user id, org id, limit id or ``"*"``).
        window_start: when the current calendar window began (timezone-aware UTC), when
            known; not part of equality.
    """

    name: str
    scope: Scope
    unit: Unit
    used: Decimal | int
    max: Decimal | int
    remaining: Decimal | int
    resets_at: datetime
    state: LimitState
    type: Literal["block", "allow"] = "block"
    counter: str = ""
    window_start: datetime | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, object]:
        """Return a JSON-friendly dict (amounts as exact decimal strings, time as ISO 8601)."""
        return {
            "name": self.name,
            "scope": self.scope,
            "unit": self.unit,
            "used": decimal_text(self.used),
            "max": decimal_text(self.max),
            "remaining": decimal_text(self.remaining),
            "resets_at": self.resets_at.isoformat(),
            "state": self.state,
            "type": self.type,
            "counter": self.counter,
        }


@dataclass(frozen=True, slots=True)
class BudgetAdjustment:
    """One operator's change to one of a user's counters, as its history keeps it.

    Attributes:
        at: when it was made (aware UTC ``datetime``).
        op: ``"adjust"`` (an amount added) or ``"reset"`` (the window zeroed).
        user_id: whose counter.
        limits: the limits on that counter (every limit of the user with the same unit
            and period shares it), the one named first.
        unit: ``"usd"``, ``"requests"`` or ``"tokens"``.
        per: the calendar period of the counter.
        window_start: the first instant of the window adjusted (aware UTC).
        amount: what was added (negative: given back; a reset: minus what it held).
            ``Decimal`` for ``usd``, ``int`` otherwise.
        used: the counter's total right after (settled plus reserved).
        reason: why, as given.
        by: who, as given.
        adjustment_id: the id shared by every counter one call changed.
    """

    at: datetime
    op: Literal["adjust", "reset"]
    user_id: str
    limits: tuple[str, ...]
    unit: Unit
    per: str
    window_start: datetime
    amount: Decimal | int
    used: Decimal | int
    reason: str | None = None
    by: str | None = None
    adjustment_id: str = ""

    def as_dict(self) -> dict[str, object]:
        """Return a JSON-friendly dict (amounts as exact decimal strings, times in ISO 8601)."""
        return {
            "at": self.at.isoformat(),
            "op": self.op,
            "user_id": self.user_id,
            "limits": list(self.limits),
            "unit": self.unit,
            "per": self.per,
            "window_start": self.window_start.isoformat(),
            "amount": decimal_text(self.amount),
            "used": decimal_text(self.used),
            "reason": self.reason,
            "by": self.by,
            "adjustment_id": self.adjustment_id,
        }
