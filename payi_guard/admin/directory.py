"""Who has counters, and where each of them stands: the data behind the users page.

Users are discovered from the ledger's keys, which the Guard builds as
``{prefix}:{<tag>}:{unit}:{per}:{window_start}`` with tag ``u:<user id>`` for users and
``a:<anonymous id>`` for anonymous buckets (:mod:`payi_guard.ledger.keys` owns the
format); one scan of those counters and of the analytics' tallies lists them all.
Usage is then read per user with :meth:`Guard.ausage`, so every figure is
exactly what the guard enforces; a page reads at most ``page_size`` users' usage.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Literal

from payi_guard.engine import is_anonymous_id
from payi_guard.exceptions import InvalidUserId
from payi_guard.identity import normalize_user_id
from payi_guard.ledger.analytics import analytics_owner
from payi_guard.ledger.keys import owners_glob, parse_key
from payi_guard.money import decimal_text
from payi_guard.usage import LimitState, LimitUsage, Scope

if TYPE_CHECKING:
    from payi_guard.engine import Guard

__all__ = [
    "SORTS",
    "STATES",
    "Directory",
    "UserDirectory",
    "UserSummary",
    "match_query",
    "order_summaries",
    "read_summaries",
    "user_of_key",
    "users_of_keys",
]

Sort = Literal["name", "spend", "state", "remaining", "limits", "org", "tier"]
SORTS: tuple[Sort, ...] = ("name", "spend", "state", "remaining", "limits", "org", "tier")
STATES: tuple[LimitState, ...] = ("ok", "warning", "exceeded")

_STATE_RANK: dict[str, int] = {"ok": 0, "warning": 1, "exceeded": 2}
_OWN_SCOPES: tuple[Scope, ...] = ("user", "anonymous")
_GLOB_CHARS = frozenset("*?[")
_READ_CONCURRENCY = 16


def _valid(owner: str) -> str | None:
    try:
        return normalize_user_id(owner)
    except InvalidUserId:
        return None


def _own_owner(prefix: str, key: str) -> str | None:
    parsed = parse_key(prefix, key)
    return parsed.owner if parsed is not None and parsed.scope in _OWN_SCOPES else None


def user_of_key(prefix: str, key: str) -> str | None:
    """Return the user (or anonymous bucket) id a counter key belongs to, else ``None``.

    Args:
        prefix: the guard's key prefix.
        key: a counter key.

    Returns:
        The owner of a user or anonymous counter, or ``None`` for other owners and keys
        that are not well formed (or whose id would not be accepted as a user id).
    """
    owner = _own_owner(prefix, key)
    return None if owner is None else _valid(owner)


def users_of_keys(prefix: str, keys: Iterable[str]) -> list[str]:
    """Return the sorted, distinct user ids of ``keys`` (see :func:`user_of_key`)."""
    owners = {owner for owner in (_own_owner(prefix, key) for key in keys) if owner is not None}
    # Each user has several counters: validate each id once, not once per key.
    return sorted(uid for uid in map(_valid, owners) if uid is not None)


def match_query(user_id: str, query: str) -> bool:
    """Tell whether ``user_id`` matches a filter: a glob if it has ``*?[``, else a substring.

    Both forms ignore case.
    """
    needle = query.lower()
    if _GLOB_CHARS.intersection(needle):
        return fnmatch.fnmatchcase(user_id.lower(), needle)
    return needle in user_id.lower()


@dataclass(frozen=True, slots=True)
class Directory:
    """The user ids found in storage at one moment.

    Attributes:
        user_ids: every id, sorted, each once.
        truncated: True when the scan stopped at its key limit (some users are missing).
        taken_at: when the scan ran (the guard's clock).
    """

    user_ids: tuple[str, ...]
    truncated: bool
    taken_at: float


class UserDirectory:
    """Discovers users from the ledger's keys and keeps the list for a few seconds.

    A page that loads its users page after page sees one consistent list, and storage
    is scanned at most once per ``ttl``.

    Args:
        guard: the guard whose storage is scanned.
        max_keys: the most counter keys one scan reads; beyond that the directory is
            marked truncated.
        ttl: seconds a scan is reused (0 scans on every call).
    """

    def __init__(self, guard: Guard, *, max_keys: int, ttl: float) -> None:
        self._guard = guard
        self._max_keys = max_keys
        self._ttl = ttl
        self._cached: Directory | None = None

    async def get(self) -> Directory:
        """Return the current directory, scanning storage when the cached one is stale.

        Raises:
            StorageError: the storage could not be scanned.
        """
        now = self._guard.clock.now()
        cached = self._cached
        if cached is not None and 0 <= now - cached.taken_at < self._ttl:
            return cached
        guard = self._guard
        glob = owners_glob(guard.key_prefix, _OWN_SCOPES)
        found_keys = await guard.async_ledger.scan(glob, now=now, limit=self._max_keys)
        truncated = len(found_keys) >= self._max_keys
        # Counters name those who spent in a live window, tallies those who spent in the
        # days analytics keep: a user is listed while either remains.
        owners: set[str] = set()
        for raw in found_keys:
            parsed = parse_key(guard.key_prefix, raw)
            if parsed is not None:
                owners.add(parsed.owner)
                continue
            tally = analytics_owner(guard.key_prefix, raw)
            if tally is not None:
                owners.add(tally[1])
        # Each user has several counters: validate each id once, not once per key.
        found = sorted(uid for uid in map(_valid, owners) if uid is not None)
        directory = Directory(tuple(found), truncated, now)
        self._cached = directory
        return directory


@dataclass(frozen=True, slots=True)
class UserSummary:
    """One user's limits and the figures the page shows and sorts by.

    Attributes:
        user_id: the user (or anonymous bucket) id.
        limits: every limit that applies, as :meth:`Guard.ausage` returns them.
        state: the worst state of all limits, where a soft (``allow``) limit past its
            max counts as ``warning``: it never refuses a call, so only a user whose
            calls are refused is ``exceeded``.
        blocked: True when a hard (``block``) limit is exceeded: new calls are refused.
        spend: the user's own money limit (user or anonymous scope) with the least
            headroom, hard limits first, whose ``used`` is the spend shown; ``None``
            without one.
        tier: the user's tier in the config (``default``, a tier name, ``custom`` for
            a list of their own, ``anonymous`` for a bucket).
    """

    user_id: str
    limits: tuple[LimitUsage, ...]
    state: LimitState
    blocked: bool
    spend: LimitUsage | None
    tier: str = "default"

    @property
    def org(self) -> str | None:
        """The org part of a composite id (``acme`` of ``acme:alice``), if any."""
        org, sep, _ = self.user_id.partition(":")
        return org if sep and not self.anonymous else None

    @classmethod
    def of(cls, user_id: str, limits: Sequence[LimitUsage], tier: str = "default") -> UserSummary:
        """Summarise ``limits`` of ``user_id``."""
        state: LimitState = "ok"
        for limit in limits:
            shown: LimitState = limit.state
            if shown == "exceeded" and limit.type != "block":
                shown = "warning"  # over a soft limit: calls still go through
            if _STATE_RANK[shown] > _STATE_RANK[state]:
                state = shown
        blocked = any(u.type == "block" and u.state == "exceeded" for u in limits)
        money = [u for u in limits if u.unit == "usd" and u.scope in _OWN_SCOPES]
        hard = [u for u in money if u.type == "block"]
        spend = min(hard or money, key=_headroom) if money else None
        return cls(user_id, tuple(limits), state, blocked, spend, tier)

    @property
    def anonymous(self) -> bool:
        """True for an anonymous bucket (``anonymous`` or ``anonymous:<session>``)."""
        return is_anonymous_id(self.user_id)

    def as_dict(self) -> dict[str, object]:
        """Return the JSON form: figures as strings with exact decimals (no exponent)."""
        spend = self.spend
        return {
            "user_id": self.user_id,
            "kind": "anonymous" if self.anonymous else "user",
            "org": self.org,
            "tier": self.tier,
            "state": self.state,
            "blocked": self.blocked,
            "spend_usd": None if spend is None else decimal_text(spend.used),
            "remaining_usd": None if spend is None else decimal_text(spend.remaining),
            "max_usd": None if spend is None else decimal_text(spend.max),
            "spend_limit": None if spend is None else spend.name,
            "limits": [limit.as_dict() for limit in self.limits],
        }


def _headroom(limit: LimitUsage) -> tuple[Decimal, Decimal, str]:
    """Sort key of the tightest limit: least remaining share, then least remaining."""
    maximum = Decimal(limit.max)
    share = Decimal(limit.remaining) / maximum if maximum > 0 else Decimal(0)
    return (share, Decimal(limit.remaining), limit.name)


async def read_summaries(guard: Guard, user_ids: Sequence[str]) -> list[UserSummary]:
    """Read the usage of ``user_ids`` (a few at a time) and summarise each.

    Args:
        guard: the guard.
        user_ids: the users, already validated.

    Returns:
        One summary per user, in the same order.

    Raises:
        StorageError: the storage could not be read.
    """
    gate = asyncio.Semaphore(_READ_CONCURRENCY)

    async def one(user_id: str) -> UserSummary:
        async with gate:
            return UserSummary.of(user_id, await guard.ausage(user_id), await guard.atier(user_id))

    return list(await asyncio.gather(*(one(uid) for uid in user_ids)))


def order_summaries(
    summaries: Iterable[UserSummary], sort: Sort, *, descending: bool
) -> list[UserSummary]:
    """Order summaries by ``sort``, as the users page orders its rows.

    ``spend`` and ``remaining`` are those of the tightest own money limit; a user
    without one has no spend (lowest) and unlimited remaining (highest). ``limits`` is
    the fullest of a user's limits (its share used, from 0 to 1), as the page's Limits
    column sorts. Ties keep user-id order (ascending), except under ``state``,
    ``spend`` and ``remaining``, where the bigger spender comes first, then the user id.
    """
    ordered = sorted(summaries, key=lambda s: s.user_id)
    if sort == "name":
        return ordered[::-1] if descending else ordered
    if sort == "org":
        return sorted(ordered, key=lambda s: s.org or "", reverse=descending)
    if sort == "tier":
        return sorted(ordered, key=lambda s: s.tier, reverse=descending)
    if sort == "limits":
        return sorted(ordered, key=_fullest, reverse=descending)
    ordered.sort(key=_spend_key, reverse=True)  # stable: the ties of the sort below
    if sort == "state":
        return sorted(ordered, key=lambda s: _STATE_RANK[s.state], reverse=descending)
    if sort == "spend":
        return sorted(ordered, key=_spend_key, reverse=descending)
    return sorted(ordered, key=_remaining_key, reverse=descending)


def _share(limit: LimitUsage) -> Decimal:
    """The share of ``limit`` used, from 0 (or a credit) to 1 (or more)."""
    used, most = Decimal(limit.used), Decimal(limit.max)
    if most <= 0:
        return Decimal(1) if used > 0 else Decimal(0)
    return max(Decimal(0), min(Decimal(1), used / most))


def _fullest(summary: UserSummary) -> Decimal:
    return max(map(_share, summary.limits), default=Decimal(0))


def _spend_key(summary: UserSummary) -> Decimal:
    return Decimal(-1) if summary.spend is None else Decimal(summary.spend.used)


def _remaining_key(summary: UserSummary) -> Decimal:
    return Decimal("Infinity") if summary.spend is None else Decimal(summary.spend.remaining)
