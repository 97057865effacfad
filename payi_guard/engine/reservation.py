"""An open reservation for one GenAI call: settled or released exactly once."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from decimal import Decimal

from payi_guard.context import Attribution
from payi_guard.engine.bookkeeper import Bookkeeper
from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.charges import charged_amounts
from payi_guard.engine.plan import Plan
from payi_guard.money import decimal_usd
from payi_guard.pricing import TokenUsage

__all__ = ["UNVERIFIED", "OtherModels", "Reservation"]

UNVERIFIED = "unverified"
"""The outcome of a call whose reported usage cannot be trusted (missing, negative,
not an integer): it is charged exactly what was reserved, never $0."""

OtherModels = Sequence[tuple[str, TokenUsage]]
"""Usage within one call billed at other models' prices, as ``(model, usage)`` pairs."""


class Reservation:
    """An open reservation for one GenAI call; settle or release it exactly once.

    ``settle``/``release`` (and their async twins) are idempotent: the first call wins,
    later calls return the same :class:`~payi_guard.CallRecord`. Reservations are made
    by :meth:`Guard.begin <payi_guard.Guard.begin>`.

    While the call is under way the guard renews the reservation, so it lasts as long
    as the call (a reservation dropped without being settled is no longer renewed and
    expires after ``reservation_ttl``). Once started, a settle or release completes and
    logs ``genai_call`` exactly once: an async one goes on when its caller is cancelled,
    and one the store did not take is retried in the background and logged when it
    gets through.

    Args:
        books: the bookkeeper that commits, releases and logs.
        plan: what was reserved.
        held: whether the ledger holds the reservation (False when storage failed and
            ``on_storage_error`` let the call through).
    """

    def __init__(self, books: Bookkeeper, plan: Plan, *, held: bool) -> None:
        self._books = books
        self._plan = plan
        self._held = held
        self._lock = threading.Lock()
        self._claimed = False
        self._record: CallRecord | None = None
        self._started = books.clock.monotonic()
        if held:
            books.live(plan, self)

    @property
    def user_id(self) -> str:
        """The user charged."""
        return self._plan.subject.user_id

    @property
    def org_id(self) -> str | None:
        """The org charged, if any."""
        return self._plan.subject.org_id

    @property
    def anonymous(self) -> bool:
        """Whether the call is charged to an anonymous bucket (no user is known)."""
        return self._plan.subject.anonymous

    @property
    def attribution(self) -> Attribution:
        """The attribution in effect when the call was reserved."""
        return self._plan.attribution

    @property
    def call(self) -> CallRequest:
        """The call this reservation is for."""
        return self._plan.call

    @property
    def reserved_usd(self) -> Decimal:
        """The amount reserved, in dollars."""
        return decimal_usd(self._plan.estimate_nano)

    @property
    def done(self) -> bool:
        """True once settled or released."""
        return self._record is not None

    @property
    def record(self) -> CallRecord | None:
        """The record of the settle or release, once done."""
        return self._record

    def _claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
        if self._held:
            self._books.ended(self._plan)
        return True

    def settle(
        self,
        usage: TokenUsage,
        *,
        outcome: str = "ok",
        response_model: str | None = None,
        other_models: OtherModels = (),
        price_context: Mapping[str, str] | None = None,
    ) -> CallRecord | None:
        """Charge the actual usage and log ``genai_call``.

        Args:
            usage: the tokens the provider reported (or the best estimate of them).
            outcome: ``ok``, ``incomplete`` or ``error`` (a partial stream), or
                :data:`UNVERIFIED`: the provider's usage cannot be trusted, so ``usage``
                is ignored and exactly the reservation is charged (its token bounds
                and its upper-bound cost; :meth:`settle_unverified` also logs why).
            response_model: the model the provider's response names. The call is priced
                as that model when it has a price (an Azure deployment, a dated
                version), unless the requested model's price is an override.
            other_models: usage billed at other models' prices (see
                :attr:`CallRecord.other_models`).
            price_context: the tier the provider's response says served the call
                (``{"service_tier": "priority"}``, ``{"speed": "fast"}``; empty for the
                standard tier): the call is priced at that tier; it replaces the
                request's context. ``None`` (the response says none) keeps the request's
                (:attr:`CallRequest.price_context`).

        Returns:
            The call record; for a reservation already settled or released, the first
            record (``None`` while that first settle is still pricing the call in another
            thread). The record is returned once the commit went through or was handed to
            the background retries.
        """
        if not self._claim():
            return self._record
        record, amounts = self._settling(
            usage, outcome, response_model, other_models, price_context
        )
        self._books.settle(self._plan, record, amounts)
        return record

    async def asettle(
        self,
        usage: TokenUsage,
        *,
        outcome: str = "ok",
        response_model: str | None = None,
        other_models: OtherModels = (),
        price_context: Mapping[str, str] | None = None,
    ) -> CallRecord | None:
        """Async :meth:`settle`; it completes even if the awaiting task is cancelled."""
        if not self._claim():
            return self._record
        record, amounts = self._settling(
            usage, outcome, response_model, other_models, price_context
        )
        await self._books.asettle(self._plan, record, amounts)
        return record

    def settle_unverified(
        self, problems: Sequence[str], *, response_model: str | None = None
    ) -> CallRecord | None:
        """Charge what was reserved because the provider's usage cannot be trusted.

        Logs ``usage_invalid`` with the ``problems``, then ``genai_call`` with outcome
        :data:`UNVERIFIED`, the reservation's token bounds and its cost.

        Args:
            problems: what is wrong with the usage (``"prompt_tokens: -8"``).
            response_model: the model the provider's response names, if any.

        Returns:
            As :meth:`settle`.
        """
        if not self._claim():
            return self._record
        self._books.usage_invalid(self._plan, problems, response_model)
        record, amounts = self._settling(TokenUsage(0, 0), UNVERIFIED, response_model, (), None)
        self._books.settle(self._plan, record, amounts)
        return record

    async def asettle_unverified(
        self, problems: Sequence[str], *, response_model: str | None = None
    ) -> CallRecord | None:
        """Async :meth:`settle_unverified`."""
        if not self._claim():
            return self._record
        self._books.usage_invalid(self._plan, problems, response_model)
        record, amounts = self._settling(TokenUsage(0, 0), UNVERIFIED, response_model, (), None)
        await self._books.asettle(self._plan, record, amounts)
        return record

    def release(self, *, outcome: str = "released") -> CallRecord | None:
        """Give the reservation back without charging; log ``genai_call``."""
        if not self._claim():
            return self._record
        record = self._released(outcome)
        if self._held:
            self._books.settle(self._plan, record, None)
        else:
            self._books.unreserved(self._plan, record)
        return record

    async def arelease(self, *, outcome: str = "released") -> CallRecord | None:
        """Async :meth:`release`; it completes even if the awaiting task is cancelled."""
        if not self._claim():
            return self._record
        record = self._released(outcome)
        if self._held:
            await self._books.asettle(self._plan, record, None)
        else:
            self._books.unreserved(self._plan, record)
        return record

    def _settling(
        self,
        usage: TokenUsage,
        outcome: str,
        response_model: str | None,
        other_models: OtherModels,
        price_context: Mapping[str, str] | None,
    ) -> tuple[CallRecord, list[int]]:
        """The record of a settle (kept at once) and the amounts to commit."""
        if outcome != UNVERIFIED:  # self._charge(), inline for the common case
            charged = usage
            amounts, cost, priced = charged_amounts(
                self._plan,
                usage,
                response_model=response_model,
                other_models=other_models,
                price_context=price_context,
            )
            if self._books.usage_too_large(self._plan, usage, amounts, cost, response_model):
                outcome = UNVERIFIED  # charged the reservation, as any untrusted report
                charged, (amounts, cost, priced) = self._charge(
                    usage, outcome, response_model, other_models, price_context
                )
        else:
            charged, (amounts, cost, priced) = self._charge(
                usage, outcome, response_model, other_models, price_context
            )
        # The tier charged, as the record keeps it: the response's, else the request's
        # (none for an unverified call).
        tier: tuple[tuple[str, str], ...] = ()
        if outcome != UNVERIFIED:
            context = self._plan.call.price_context if price_context is None else price_context
            if context:
                tier = tuple(sorted(context.items()))
        record = self._books.record_of(
            self._plan,
            charged,
            cost,
            priced,
            outcome,
            self._started,
            response_model=response_model,
            other_models=tuple(other_models),
            price_context=tier,
        )
        self._record = record
        return record, amounts

    def _released(self, outcome: str) -> CallRecord:
        record = self._books.record_of(self._plan, None, 0, True, outcome, self._started)
        self._record = record
        return record

    def _charge(
        self,
        usage: TokenUsage,
        outcome: str,
        response_model: str | None,
        other_models: OtherModels,
        price_context: Mapping[str, str] | None,
    ) -> tuple[TokenUsage, tuple[list[int], int, bool]]:
        """The usage charged and its amounts; :data:`UNVERIFIED` charges the reservation."""
        plan = self._plan
        if outcome != UNVERIFIED:
            amounts = charged_amounts(
                plan,
                usage,
                response_model=response_model,
                other_models=other_models,
                price_context=price_context,
            )
            return usage, amounts
        reserved = TokenUsage(plan.call.input_tokens, plan.call.max_output_tokens)
        amounts_reserved = [charge.amount for charge in plan.charges]
        return reserved, (amounts_reserved, plan.estimate_nano, plan.rates is not None)

    def __repr__(self) -> str:
        state = "done" if self.done else "open"
        return (
            f"Reservation(user_id={self.user_id!r}, model={self.call.model!r}, "
            f"reserved_usd={self.reserved_usd}, {state})"
        )
