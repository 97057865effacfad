"""Usage analytics in the store: per owner (user, org) and UTC day, written with the settle.

Each owner has one tally (:class:`~payi_guard.ledger.Tally`) per UTC day, keyed
``{prefix}:{<kind>:<owner>}:an:<YYYY-MM-DD>`` (the owner's hash tag, so it shares the
slot of the owner's counters), with integer fields:

* ``c`` spend (nano-USD, the ledger's unit), ``n`` calls, ``i`` input tokens,
  ``o`` output tokens, ``f`` refusals;
* ``mc:<model>`` / ``mn:<model>``: spend and calls by model;
* ``uc:<use case>`` / ``un:<use case>``: spend and calls by ``use_case_name`` (an empty
  name for calls without one).

The engine hands :func:`call_tallies` to the ledger's commit and :func:`refusal_tallies`
to its reserve, so they are written in the same atomic step (a retried commit adds
nothing). A day's tally lives ``keep_days`` days after that day ends, then the store
drops it (Redis: key expiry; SQLite: pruning; memory: sweeping).
:func:`read_history` and :func:`aread_history` read them back.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from payi_guard.ledger.base import AsyncLedger, Ledger, Tally
from payi_guard.ledger.keys import SCOPE_KINDS, owner_tag
from payi_guard.usage import Scope

__all__ = [
    "DEFAULT_KEEP_DAYS",
    "DayUsage",
    "History",
    "NamedUsage",
    "analytics_key",
    "analytics_owner",
    "aread_history",
    "call_fields",
    "call_tallies",
    "day_of",
    "history_keys",
    "owners_of",
    "prefix_of",
    "read_history",
    "refusal_tallies",
]

DEFAULT_KEEP_DAYS = 90
"""Days of analytics kept by default (the ``analytics_days`` config key)."""

_DAY = 86_400
_SCOPES: dict[str, Scope] = {kind: scope for scope, kind in SCOPE_KINDS.items()}


def day_of(now: float) -> str:
    """The UTC day of an epoch time, ``YYYY-MM-DD``."""
    return _day_text(int(now // _DAY))


@functools.lru_cache(maxsize=64)
def _day_text(day: int) -> str:
    # Called on every reserve and commit: the text of a day is made once.
    return datetime.fromtimestamp(day * _DAY, tz=timezone.utc).strftime("%Y-%m-%d")


def analytics_key(prefix: str, scope: Scope, owner: str, day: str) -> str:
    """The key of ``owner``'s tally for ``day`` (``YYYY-MM-DD``)."""
    return f"{prefix}:{{{owner_tag(scope, owner)}}}:an:{day}"


def prefix_of(key: str) -> str:
    """The key prefix a counter key was built with (what comes before ``:{``)."""
    return key.partition(":{")[0]


def owners_of(user_id: str, org_id: str | None, anonymous: bool) -> tuple[tuple[Scope, str], ...]:
    """Whose analytics a call of ``user_id`` adds to: the user (or bucket), and its org."""
    user: tuple[Scope, str] = ("anonymous" if anonymous else "user", user_id)
    return (user,) if org_id is None else (user, ("org", org_id))


def analytics_owner(prefix: str, key: str) -> tuple[Scope, str, str] | None:
    """``(scope, owner, day)`` of a tally key built with ``prefix``; ``None`` for others."""
    head = prefix + ":{"
    if not key.startswith(head):
        return None
    end = key.find("}", len(head))
    kind, sep, owner = key[len(head) : max(end, 0)].partition(":")
    tail = key[end + 1 :] if end >= 0 else ""
    scope = _SCOPES.get(kind)
    if not sep or not owner or scope is None or not tail.startswith(":an:"):
        return None
    day = tail[4:]
    if len(day) != 10 or day[4] != "-" or day[7] != "-":
        return None
    return scope, owner, day


def _expires_at(now: float, keep_days: int) -> float:
    day_start = now - now % _DAY
    return day_start + _DAY * (keep_days + 1)


def call_tallies(
    prefix: str,
    owners: Sequence[tuple[Scope, str]],
    *,
    now: float,
    keep_days: int,
    cost: int,
    input_tokens: int,
    output_tokens: int,
    model: str,
    use_case: str | None,
) -> tuple[Tally, ...]:
    """The tallies of one settled call, one per owner (none when ``keep_days`` is 0)."""
    if keep_days <= 0:
        return ()
    day, until = day_of(now), _expires_at(now, keep_days)
    fields = call_fields(cost, input_tokens, output_tokens, model, use_case)
    return tuple(
        Tally(analytics_key(prefix, scope, owner, day), fields, until) for scope, owner in owners
    )


def call_fields(
    cost: int, input_tokens: int, output_tokens: int, model: str, use_case: str | None
) -> tuple[tuple[str, int], ...]:
    """The fields one settled call adds to each owner's tally of its day."""
    case = use_case or ""
    return (
        ("c", cost),
        ("n", 1),
        ("i", max(input_tokens, 0)),
        ("o", max(output_tokens, 0)),
        (f"mc:{model}", cost),
        (f"mn:{model}", 1),
        (f"uc:{case}", cost),
        (f"un:{case}", 1),
    )


def refusal_tallies(
    prefix: str, owners: Sequence[tuple[Scope, str]], *, now: float, keep_days: int
) -> tuple[Tally, ...]:
    """The tallies of one refused call (``f`` + 1 per owner)."""
    if keep_days <= 0:
        return ()
    day, until = day_of(now), _expires_at(now, keep_days)
    return tuple(
        Tally(analytics_key(prefix, scope, owner, day), (("f", 1),), until)
        for scope, owner in owners
    )


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One UTC day of an owner's usage (money in nano-USD)."""

    date: str
    cost: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    refused: int = 0


@dataclass(frozen=True, slots=True)
class NamedUsage:
    """Spend and calls of one model or use case over the days read."""

    name: str
    cost: int
    calls: int


@dataclass(frozen=True, slots=True)
class History:
    """An owner's usage over the last days, oldest day first.

    Attributes:
        days: one entry per day, days without calls included (zeros).
        by_model: spend and calls per model, most spent first.
        by_use_case: the same per ``use_case_name`` (``""``: calls without one).
    """

    days: tuple[DayUsage, ...]
    by_model: tuple[NamedUsage, ...] = field(default=())
    by_use_case: tuple[NamedUsage, ...] = field(default=())

    @property
    def cost(self) -> int:
        """Total spend over the days, nano-USD."""
        return sum(day.cost for day in self.days)

    @property
    def calls(self) -> int:
        """Total calls over the days."""
        return sum(day.calls for day in self.days)


def history_keys(
    prefix: str, scope: Scope, owner: str, days: int, now: float
) -> list[tuple[str, str]]:
    """``(day, key)`` of the last ``days`` UTC days up to ``now``'s, oldest first."""
    today = datetime.fromtimestamp(now, tz=timezone.utc).date()
    out = []
    for back in range(days - 1, -1, -1):
        day = (today - timedelta(days=back)).isoformat()
        out.append((day, analytics_key(prefix, scope, owner, day)))
    return out


def _ranked(totals: dict[str, list[int]]) -> tuple[NamedUsage, ...]:
    items = [NamedUsage(name, cost, calls) for name, (cost, calls) in totals.items()]
    return tuple(sorted(items, key=lambda u: (-u.cost, -u.calls, u.name)))


def _history(days: list[tuple[str, str]], tallies: Sequence[dict[str, int]]) -> History:
    out: list[DayUsage] = []
    models: dict[str, list[int]] = {}
    cases: dict[str, list[int]] = {}
    for (day, _), fields in zip(days, tallies, strict=True):
        get = fields.get
        out.append(DayUsage(day, get("c", 0), get("n", 0), get("i", 0), get("o", 0), get("f", 0)))
        for name, value in fields.items():
            kind, sep, rest = name.partition(":")
            target = {"mc": models, "mn": models, "uc": cases, "un": cases}.get(kind)
            if not sep or target is None:
                continue
            totals = target.setdefault(rest, [0, 0])
            totals[0 if kind[1] == "c" else 1] += value
    return History(tuple(out), _ranked(models), _ranked(cases))


def read_history(
    ledger: Ledger, prefix: str, scope: Scope, owner: str, *, days: int, now: float
) -> History:
    """Read ``owner``'s last ``days`` UTC days (one ledger read)."""
    keys = history_keys(prefix, scope, owner, days, now)
    return _history(keys, ledger.read_tallies([key for _, key in keys], now=now))


async def aread_history(
    ledger: AsyncLedger, prefix: str, scope: Scope, owner: str, *, days: int, now: float
) -> History:
    """Async :func:`read_history`."""
    keys = history_keys(prefix, scope, owner, days, now)
    return _history(keys, await ledger.read_tallies([key for _, key in keys], now=now))
