"""The read-only view of one limit as it applies to one user: :class:`LimitUsage`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Literal

from payi_guard.money import decimal_text

__all__ = ["LimitState", "LimitUsage", "Scope", "Unit"]

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
