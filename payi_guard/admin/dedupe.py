"""Request ids already recorded by ``POST /api/events``, remembered in the guard's store.

A retried delivery must not charge an event twice. Each ``request_id`` that is recorded
leaves a marker: a one-unit counter under its own key, ``<prefix>:{req:<request_id>}:seen``
(the hash tag keeps each marker in one Redis Cluster slot; no user, org or limit key has
the ``req`` kind, so the users page never lists it). Markers live in the same store as the
budgets, so every process and host sharing the store sees them, for
``request_id_ttl`` seconds.

Recording a batch takes three steps on the store, whatever its size:

1. :meth:`RequestIds.check` reads every marker: already recorded ids are skipped, an id
   that another request is recording right now refuses the batch (409);
2. :meth:`RequestIds.claim` reserves the new markers, all or none, with the ledger's
   atomic check-and-add (``max`` 1): of two requests racing with one id, one wins;
3. after the events are charged, :meth:`RequestIds.confirm` settles their markers
   (:meth:`RequestIds.release` gives back those of events that were not charged).

A claim whose process died is given back after the config's ``reservation_ttl``, like any
reservation; an event charged just before such a death could then be charged again by a
retry that comes after that time.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from payi_guard.engine import Guard
from payi_guard.ledger import Charge

__all__ = ["Claim", "RequestIds"]

Seen = Literal["new", "recorded", "busy"]


@dataclass(frozen=True, slots=True)
class Claim:
    """Markers reserved for one batch: the ids, their keys, one reservation id."""

    reservation_id: str
    keys: tuple[str, ...]
    expires_at: float


class RequestIds:
    """The markers of recorded request ids, in a guard's store.

    Args:
        guard: the guard whose store (and key prefix) keeps the markers.
        ttl: seconds a recorded request id is remembered.
    """

    def __init__(self, guard: Guard, ttl: float) -> None:
        self.guard = guard
        self.ttl = ttl

    def key(self, request_id: str) -> str:
        """The marker key of ``request_id`` (a validated id: no braces, no spaces)."""
        return f"{self.guard.key_prefix}:{{req:{request_id}}}:seen"

    async def check(self, request_ids: Sequence[str]) -> list[Seen]:
        """Whether each id is new, already recorded, or being recorded right now.

        Raises:
            StorageError: the store could not be read.
        """
        if not request_ids:
            return []
        keys = [self.key(rid) for rid in request_ids]
        states = await self.guard.async_ledger.read(keys, now=self.guard.clock.now())
        return [
            "recorded" if state.settled else "busy" if state.pending else "new" for state in states
        ]

    async def claim(self, request_ids: Sequence[str]) -> tuple[Claim | None, int | None]:
        """Reserve the markers of ``request_ids``, all or none.

        Returns:
            The claim, or ``None`` and the index of an id another request claimed first.

        Raises:
            StorageError: the store could not be written.
        """
        now = self.guard.clock.now()
        claim = Claim(
            "events-" + secrets.token_hex(12),
            tuple(self.key(rid) for rid in request_ids),
            now + self.ttl,
        )
        if not claim.keys:
            return claim, None
        result = await self.guard.async_ledger.reserve(
            claim.reservation_id,
            [Charge(key, 1, 1, claim.expires_at) for key in claim.keys],
            now=now,
            ttl=self.guard.config.reservation_ttl,
        )
        if not result.ok:
            return None, result.refused
        return claim, None

    async def confirm(self, claim: Claim, keys: Sequence[str]) -> None:
        """Settle the markers of the charged events: their ids are now recorded.

        Raises:
            StorageError: the store could not be written.
        """
        if keys:
            await self.guard.async_ledger.commit(
                claim.reservation_id,
                [Charge(key, 1, None, claim.expires_at) for key in keys],
                now=self.guard.clock.now(),
            )

    async def release(self, claim: Claim, keys: Sequence[str]) -> None:
        """Give back the markers of events that were not charged.

        Raises:
            StorageError: the store could not be written.
        """
        if keys:
            await self.guard.async_ledger.release(
                claim.reservation_id, list(keys), now=self.guard.clock.now()
            )
