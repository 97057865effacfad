"""The parts one :class:`~payi_guard.engine.guard.Guard` is made of, shared by its helpers.

:class:`Parts` holds the policy in effect (swapped whole on reload), who is charged
(:class:`~payi_guard.engine.policy.Subjects`), the counters' planner, the spent cache,
the storage and the clock; the guard, its readers (:mod:`~payi_guard.engine.views`) and
its operator controls (:mod:`~payi_guard.engine.operator`) all work on the same parts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from payi_guard import log as events
from payi_guard.clock import Clock
from payi_guard.config import GuardConfig
from payi_guard.engine.plan import Planner
from payi_guard.engine.policy import (
    ANONYMOUS_USER,
    Policy,
    Subject,
    Subjects,
    bucket_of,
    is_anonymous_id,
)
from payi_guard.engine.spent import SpentCache
from payi_guard.engine.storage import Storage
from payi_guard.engine.tiers import TierFunction, TierSource
from payi_guard.engine.watch import config_from
from payi_guard.exceptions import ConfigError
from payi_guard.identity import Pseudonymizer, normalize_user_id
from payi_guard.windows import WindowCache

__all__ = ["Parts"]


@dataclass(slots=True)
class Parts:
    """The guard's parts (see the module docstring).

    Attributes:
        policy: the policy of the config in effect (replaced on reload).
        subjects: resolves user ids to subjects.
        planner: builds counters and plans.
        spent: counters known to be spent.
        storage: the ledgers.
        clock: the time source.
        key_prefix: the prefix of every storage key.
        tier_of: the app's tier function, if it gave one.
        cache_size: the size of the policy caches (a reload builds a new policy).
    """

    policy: Policy
    subjects: Subjects
    planner: Planner
    spent: SpentCache
    storage: Storage
    clock: Clock
    key_prefix: str
    tier_of: TierSource | None
    cache_size: int

    @classmethod
    def build(
        cls,
        config: GuardConfig,
        *,
        storage: str | None,
        storage_options: Mapping[str, Any] | None,
        clock: Clock,
        key_prefix: str,
        pseudonymizer: Pseudonymizer | None,
        cache_size: int,
        spent_size: int,
        spent_ttl: float,
        tier_of: TierFunction | None,
    ) -> Parts:
        """Make the parts of a new guard (nothing is connected)."""
        source = None if tier_of is None else TierSource(tier_of)
        windows = WindowCache()
        spent = SpentCache(spent_size, clock, spent_ttl)
        return cls(
            policy=Policy(config, cache_size, clock, source),
            subjects=Subjects(pseudonymizer, cache_size, clock, windows),
            planner=Planner(key_prefix, windows, cache_size),
            spent=spent,
            # A store that lost its data lost the spent counters too.
            storage=Storage(storage or config.storage, storage_options, on_reset=spent.clear),
            clock=clock,
            key_prefix=key_prefix,
            tier_of=source,
            cache_size=cache_size,
        )

    def reload(
        self, source: GuardConfig | Mapping[str, Any] | str | os.PathLike[str] | None
    ) -> bool:
        """Put the config ``source`` names in effect, or keep the current one (logged).

        The new policy has its own caches (tiers included) and nothing is known spent.
        See :meth:`payi_guard.Guard.reload`.
        """
        log = events.get_logger()
        current = self.policy.config
        try:
            new = config_from(source, current)
        except (ConfigError, OSError) as exc:
            log.error(events.CONFIG_RELOAD_FAILED, error=str(exc), kept=current.source)
            return False
        moved = new.storage != current.storage and new.storage != self.storage.uri
        if moved:
            # The store in use stays until a restart: the config in effect says so.
            new = dataclasses.replace(new, storage=current.storage)
        self.policy = Policy(new, self.cache_size, self.clock, self.tier_of)
        self.spent.clear()
        if moved:
            log.warning(
                events.CONFIG_RELOADED,
                source=new.source,
                detail="the storage URI changed; it takes effect after a restart",
            )
        else:
            log.info(events.CONFIG_RELOADED, source=new.source)
        return True

    def user(self, user_id: object) -> Subject:
        """The subject a user id names (``None`` or ``anonymous``: the anonymous bucket).

        Raises:
            InvalidUserId: the id is invalid.
        """
        uid = ANONYMOUS_USER if user_id is None else normalize_user_id(user_id)
        if is_anonymous_id(uid):
            uid = bucket_of(uid, self.policy.config.anonymous.strategy)
        return self.subjects.by_id(uid)

    def close(self) -> None:
        """Stop ``tier_of``'s loop thread (if any) and close the sync storage client."""
        if self.tier_of is not None:
            self.tier_of.close()
        self.storage.close()
