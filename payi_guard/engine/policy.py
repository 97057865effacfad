"""Who a call is charged to, and which limits apply to them.

:class:`Subjects` turns the attribution in effect into a :class:`Subject` (the user
charged, the org a composite id rolls up to, pseudonyms where configured, the anonymous
bucket where no user is known). :class:`Policy` holds everything derived from one
config and resolves a subject's limits: the user's own entry under ``users:``, else the
tier the request named (``set_user(..., tier=)``), else the tier the app's ``tier_of``
gives (cached, :mod:`~payi_guard.engine.tiers`), else ``default``; the org's;
``global``; and ``limit_ids`` as shared counters. A tier the file does not define is
logged (``tier_unknown``) and gets ``default``, never "no limits". A reload swaps the
whole :class:`Policy` at once (and with it the tier cache).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import cachetools

from payi_guard import log as events
from payi_guard.clock import Clock
from payi_guard.config import AnonymousPolicy, GuardConfig, LimitSpec
from payi_guard.context import Attribution, current_request
from payi_guard.engine.tiers import TierCache, TierSource, shown_tier
from payi_guard.exceptions import ConfigError, InvalidUserId, UserRequired
from payi_guard.identity import (
    ANONYMOUS_USER,
    Pseudonymizer,
    is_anonymous_id,
    normalize_user_id,
    org_of,
)
from payi_guard.ledger.keys import owner_tag
from payi_guard.pricing import PriceBook
from payi_guard.usage import LimitUsage, Scope
from payi_guard.windows import WindowCache

__all__ = [
    "ANONYMOUS_USER",
    "BoundLimit",
    "Policy",
    "Subject",
    "Subjects",
    "bucket_of",
    "is_anonymous_id",
]


@dataclass(frozen=True, slots=True)
class BoundLimit:
    """A limit as it applies to one owner: whose counter, which scope."""

    spec: LimitSpec
    scope: Scope
    owner: str


def bucket_of(anonymous_id: str, strategy: str) -> str:
    """The anonymous bucket an anonymous id (:func:`is_anonymous_id`) is charged to.

    Its own, ``anonymous:<session>``, only under ``strategy: session``; otherwise the one
    shared bucket, ``anonymous``, whatever follows the colon (else a caller who may
    name the id would open a bucket of its own with every new one).
    """
    return anonymous_id if strategy == "session" else ANONYMOUS_USER


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a call is charged to.

    Attributes:
        user_id: the id charged and logged (the pseudonym when pseudonymisation is on).
        org_id: the org charged and logged, for composite ids.
        policy_user: the real user id, used to look up the user's limits.
        policy_org: the real org id, used to look up the org's limits.
        anonymous: True when no user was known.
        tier: the tier assigned at run time (the request's, or ``tier_of``'s), when the
            user has no entry of their own under ``users:``.
    """

    user_id: str
    org_id: str | None
    policy_user: str | None
    policy_org: str | None
    anonymous: bool = False
    tier: str | None = None

    def owner_tags(self, limit_ids: Iterable[str]) -> list[str]:
        """The hash tags of every owner a call of this subject with ``limit_ids`` charges."""
        tags = [owner_tag("anonymous" if self.anonymous else "user", self.user_id)]
        tags.append(owner_tag("global", "*"))
        if self.org_id is not None:
            tags.append(owner_tag("org", self.org_id))
        tags.extend(owner_tag("limit_id", limit_id) for limit_id in limit_ids)
        return tags


class Subjects:
    """Resolves who is charged: user ids to :class:`Subject` objects, cached.

    Args:
        pseudonymizer: replaces user ids in counters and logs, if set.
        cache_size: how many users' subjects are kept.
        clock: the time source (a refused anonymous call's ``retry_after``).
        windows: the shared window cache.
    """

    def __init__(
        self,
        pseudonymizer: Pseudonymizer | None,
        cache_size: int,
        clock: Clock,
        windows: WindowCache,
    ) -> None:
        self._pseudonymizer = pseudonymizer
        self._cache_size = cache_size
        self._clock = clock
        self._windows = windows
        # user id -> Subject; plain dict reads and writes are atomic, and a Subject depends
        # only on the id and the pseudonymizer, so no lock and no invalidation are needed.
        self._subjects: dict[str, Subject] = {}

    def for_call(
        self, attribution: Attribution, default_user: str | None, anonymous: AnonymousPolicy
    ) -> Subject:
        """Return who a call made with ``attribution`` is charged to.

        Raises:
            UserRequired: no user is known (or the one named is the anonymous bucket,
                see :func:`is_anonymous_id`) and the anonymous strategy is ``reject``.
        """
        user = attribution.user_id or default_user
        if user is not None:
            known = self._subjects.get(user)  # every GenAI call comes here: no extra call
            if known is not None:
                return known
        return self.for_user(attribution.user_id, default_user, anonymous)

    def for_user(
        self, user_id: str | None, default_user: str | None, anonymous: AnonymousPolicy
    ) -> Subject:
        """:meth:`for_call` given only the attribution's (validated) ``user_id``.

        Raises:
            UserRequired: as :meth:`for_call`.
        """
        user = user_id or default_user
        if user is not None:
            known = self._subjects.get(user)  # only named users are kept: no anonymous id
            if known is not None:
                return known
            if not is_anonymous_id(user):
                return self.of(user)
        if anonymous.strategy == "reject":
            raise self._user_required()
        if user is not None:
            return self.by_id(bucket_of(user, anonymous.strategy))
        anon_id = ANONYMOUS_USER
        if anonymous.strategy == "session":
            scope = current_request()
            session = scope.extra.get("session_id") if scope is not None else None
            if session is not None:
                try:
                    anon_id = normalize_user_id(f"{ANONYMOUS_USER}:{session}")
                except InvalidUserId:
                    anon_id = ANONYMOUS_USER
        return Subject(anon_id, None, None, None, anonymous=True)

    def of(self, user: str) -> Subject:
        """Return the subject of a validated user id."""
        subject = self._subjects.get(user)
        if subject is not None:
            return subject
        org = org_of(user)
        if self._pseudonymizer is None:
            subject = Subject(user, org, user, org)
        else:
            charged = self._pseudonymizer(user)
            subject = Subject(charged, org_of(charged), user, org)
        if len(self._subjects) >= self._cache_size:
            self._subjects.clear()  # bounded; rebuilt from hot users in microseconds
        self._subjects[user] = subject
        return subject

    def by_id(self, user_id: str) -> Subject:
        """Return the subject a validated id names.

        ``anonymous`` (and ``anonymous:<session>``) is the anonymous bucket
        (:func:`is_anonymous_id`), as calls, the users page and
        :meth:`~payi_guard.Guard.usage` see it.
        """
        if is_anonymous_id(user_id):
            return Subject(user_id, None, None, None, anonymous=True)
        return self.of(user_id)

    def _user_required(self) -> UserRequired:
        now = self._clock.now()
        window = self._windows.get("day", "UTC", now)
        usage = LimitUsage(
            name="anonymous:reject",
            scope="anonymous",
            unit="requests",
            used=0,
            max=0,
            remaining=0,
            resets_at=window.resets_at,
            state="exceeded",
            type="block",
            counter=ANONYMOUS_USER,
        )
        return UserRequired(ANONYMOUS_USER, usage, window.end - now, message=None)


class Policy:
    """Everything derived from one config; swapped as a whole on reload.

    Args:
        config: the validated config.
        cache_size: how many subjects' resolved limits (and tiers) are cached.
        clock: the time source of the price book and the tier cache.
        tier_of: the app's tier function, if it gave one.

    Attributes:
        config: the config.
        prices: its price book.
    """

    def __init__(
        self,
        config: GuardConfig,
        cache_size: int,
        clock: Clock,
        tier_of: TierSource | None = None,
    ) -> None:
        self.config = config
        self.prices = PriceBook(config.prices, config.unknown_model, clock=clock)
        self._lock = threading.Lock()
        self._policies: cachetools.LRUCache[
            tuple[str, str | None, bool, str, str | None], tuple[BoundLimit, ...]
        ]
        self._policies = cachetools.LRUCache(maxsize=cache_size)
        self._tiers = (
            None
            if tier_of is None
            else TierCache(tier_of, config.tier_cache_ttl, cache_size, clock)
        )
        self._log = events.get_logger()
        # (user id, tier) -> the subject with that tier; plain dict reads and writes are
        # atomic, and a stale entry is only ever replaced by an equal one.
        self._with_tiers: dict[tuple[str, str | None], Subject] = {}
        # user id -> the tier its requests last named in this process, for what reads a
        # user's plan without a request (usage, tier, the users page).
        self._named: dict[str, str] = {}
        self._cache_size = cache_size

    # -- tiers assigned at run time -------------------------------------------------------

    def _assignable(self, subject: Subject) -> str | None:
        """The real id of a user whose tier is decided at run time, else ``None``."""
        user = subject.policy_user
        if subject.anonymous or user is None or user in self.config.users:
            return None  # the user's own entry under users: comes first
        return user

    def _name(self, subject: Subject, requested: str) -> None:
        """Remember that a request named ``requested`` as the tier of ``subject``'s user."""
        if self._named.get(subject.user_id) != requested:
            if len(self._named) >= self._cache_size:
                self._named.clear()  # bounded; active users are named again at once
            self._named[subject.user_id] = requested

    def named_tier(self, subject: Subject) -> str | None:
        """The tier the requests of ``subject``'s user last named in this process, if any.

        ``None`` for a user whose tier no request named, or whose ``users:`` entry decides.
        """
        if self._assignable(subject) is None:
            return None
        return self._named.get(subject.user_id)

    def _tiered(self, subject: Subject, tier: str | None) -> Subject:
        """``subject`` with ``tier`` (one object per user and tier, reused call after call)."""
        if tier == subject.tier:
            return subject
        key = (subject.user_id, tier)
        tiered = self._with_tiers.get(key)
        if tiered is None or tiered.policy_user != subject.policy_user:
            if len(self._with_tiers) >= self._cache_size:
                self._with_tiers.clear()  # bounded; hot users come back at once
            tiered = self._with_tiers[key] = replace(subject, tier=tier)
        return tiered

    def with_tier(
        self, subject: Subject, requested: str | None, *, remember: bool = True
    ) -> Subject:
        """``subject`` with its run-time tier: the request's, else ``tier_of``'s (sync).

        Args:
            subject: who is charged.
            requested: the tier the request named (``set_user(..., tier=)``), if any.
            remember: keep ``requested`` as the tier the user's requests named
                (:meth:`named_tier`); off for reads given a tier by their caller.
        """
        if self._tiers is None and requested == subject.tier:
            return subject  # what the steps below give then, without their two calls
        user = self._assignable(subject)
        if user is None:
            return subject
        tier = requested
        if tier is not None:
            if remember:
                self._name(subject, tier)
        elif self._tiers is not None:
            tier = self._tiers.lookup(user, subject.user_id)
        return self._tiered(subject, tier)

    async def awith_tier(
        self, subject: Subject, requested: str | None, *, remember: bool = True
    ) -> Subject:
        """Async :meth:`with_tier`: an app function is never run on the event loop."""
        if self._tiers is None and requested == subject.tier:
            return subject  # what the steps below give then, without their two calls
        user = self._assignable(subject)
        if user is None:
            return subject
        tier = requested
        if tier is not None:
            if remember:
                self._name(subject, tier)
        elif self._tiers is not None:
            tier = await self._tiers.alookup(user, subject.user_id)
        return self._tiered(subject, tier)

    def cached_tier(self, subject: Subject, requested: str | None) -> Subject | None:
        """:meth:`with_tier` without asking the app: ``None`` when that would be needed."""
        user = self._assignable(subject)
        if user is None:
            return subject
        tier = requested
        if tier is not None:
            self._name(subject, tier)
        elif self._tiers is not None:
            known, tier = self._tiers.peek(user)
            if not known:
                return None
        return self._tiered(subject, tier)

    # -- limits ---------------------------------------------------------------------------

    def limits_for(self, subject: Subject) -> tuple[BoundLimit, ...]:
        """The limits of a subject: its own (or tier's or default), its org's, global."""
        key = (
            subject.user_id,
            subject.policy_user,
            subject.anonymous,
            subject.org_id or "",
            subject.tier,
        )
        with self._lock:
            cached = self._policies.get(key)
        if cached is not None:
            return cached
        resolved = self._resolve(subject)
        with self._lock:
            self._policies[key] = resolved
        return resolved

    def _resolve(self, subject: Subject) -> tuple[BoundLimit, ...]:
        cfg = self.config
        bound: list[BoundLimit] = []
        if subject.anonymous:
            bound.extend(BoundLimit(s, "anonymous", subject.user_id) for s in cfg.anonymous.limits)
        else:
            bound.extend(BoundLimit(s, "user", subject.user_id) for s in self._user_specs(subject))
        if subject.policy_org is not None and subject.org_id is not None:
            org_specs = cfg.orgs.get(subject.policy_org, ())
            bound.extend(BoundLimit(s, "org", subject.org_id) for s in org_specs)
        bound.extend(BoundLimit(s, "global", "*") for s in cfg.global_limits)
        return tuple(bound)

    def _user_specs(self, subject: Subject) -> tuple[LimitSpec, ...]:
        cfg = self.config
        user = subject.policy_user
        if user is not None and user in cfg.users:
            return cfg.users[user]
        if subject.tier is None:
            return cfg.default
        specs = cfg.tiers.get(subject.tier)
        if specs is not None:
            return specs
        # Once per user and tier while cached: never "no limits" for a typo in a plan name.
        self._log.warning(
            events.TIER_UNKNOWN,
            user_id=subject.user_id,
            tier=shown_tier(subject.tier),
            tiers=sorted(cfg.tiers),
            detail="no such tier under `tiers:`: the user gets the `default` limits",
        )
        return cfg.default

    def limit_id_bindings(self, limit_ids: Iterable[str]) -> list[BoundLimit]:
        """The named limits ``limit_ids`` charge, each a counter shared across users.

        Raises:
            ConfigError: an id is not defined under ``limits:``.
        """
        out = []
        for limit_id in limit_ids:
            spec = self.config.limits.get(limit_id)
            if spec is None:
                known = ", ".join(sorted(self.config.limits)) or "none"
                raise ConfigError(
                    f"limit_ids names {limit_id!r}, which is not defined under `limits:` "
                    f"(defined: {known})",
                    file=self.config.source,
                    key="limit_ids",
                )
            out.append(BoundLimit(spec, "limit_id", limit_id))
        return out

    def bindings(self, subject: Subject, limit_ids: Sequence[str]) -> list[BoundLimit]:
        """Every limit a call of ``subject`` with ``limit_ids`` is charged to, in order.

        Raises:
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        bound = list(self.limits_for(subject))
        bound.extend(self.limit_id_bindings(limit_ids))
        return bound
