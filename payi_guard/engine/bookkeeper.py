"""The books of the guard: plans carried through the ledger, and what happened, logged.

A :class:`Bookkeeper` reserves a plan (after the local spent-cache check), commits a
call's actual cost or releases it, all under the ``on_storage_error`` policy; it refuses
over-budget calls (``budget_exceeded``), remembers spent counters, and writes the
threshold events (``budget_warning``, ``budget_overrun``) and the ``genai_call`` line
(through :mod:`~payi_guard.engine.call_log`; prices from
:mod:`~payi_guard.engine.charges`). The guard plans; reservations and manual events
go through the bookkeeper to settle.

Faults (its collaborators do the work): commits and releases that fail or whose reply
was lost are retried with the same id until applied (:mod:`~payi_guard.engine.retry`),
and ``genai_call`` is written once, when the commit is applied (or given up: never
"failed" for a commit that may have been applied); a reserve whose outcome is unknown is
undone in the background; live calls' reservations are renewed
(:mod:`~payi_guard.engine.renewer`); async settles run to their end even when their
caller is cancelled (:mod:`~payi_guard.engine.detached`). A call whose upper bound is
more than a counter can hold is refused, never a storage error.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from payi_guard import log as events
from payi_guard._ids import new_id
from payi_guard.clock import Clock
from payi_guard.config import GuardConfig
from payi_guard.context import Attribution
from payi_guard.engine.analytics import refused_tallies, settled_tallies
from payi_guard.engine.call_log import BoundLog, CallLog
from payi_guard.engine.calls import CallRecord, CallRequest, make_call_record
from payi_guard.engine.charges import charged_amounts
from payi_guard.engine.detached import Detached
from payi_guard.engine.observers import CallRefused, Observers
from payi_guard.engine.plan import Counter, Plan, amounts_by_counter, limit_usage
from payi_guard.engine.policy import BoundLimit, Subject
from payi_guard.engine.renewer import Renewer
from payi_guard.engine.retry import Closer, Closing
from payi_guard.engine.spent import Spent, SpentCache
from payi_guard.engine.storage import Storage
from payi_guard.exceptions import BudgetExceeded, StorageError
from payi_guard.ledger.base import (
    MAX_UNITS,
    CapacityExceeded,
    Charge,
    CounterState,
    ReserveResult,
    StorageOutcomeUnknown,
    Tally,
    make_charge,
)
from payi_guard.money import cost_usd, log_amount, parse_usd
from payi_guard.pricing import TokenUsage

__all__ = ["Bookkeeper"]

CounterStates = tuple[CounterState, ...]
SettleParts = tuple[tuple[Charge, ...] | None, tuple[Tally, ...]]
"""A settle's charges (``None`` for a release) and its tallies."""

_BOUND_TOO_LARGE = "the call's upper bound (lower its max_tokens)"
_USAGE_TOO_LARGE = (f"usage: more than a counter can hold ({MAX_UNITS} units)",)


class Bookkeeper:
    """Reserves, commits and releases plans in the ledger, and logs every outcome.

    Args:
        storage: the ledgers.
        clock: the time source.
        spent: the cache of counters known to be spent.
        config: returns the config in effect (its ``on_storage_error`` decides failures).
    """

    def __init__(
        self,
        storage: Storage,
        clock: Clock,
        spent: SpentCache,
        config: Callable[[], GuardConfig],
    ) -> None:
        self.storage = storage
        self.clock = clock
        self._spent = spent
        self._config = config
        self._log = BoundLog()
        self.observers = Observers()
        self.calls = CallLog(self._log, self.observers)
        self._closer = Closer(storage, clock, self._close_failed)
        self.renewer = Renewer(storage, clock, lambda: self._config().reservation_ttl)
        self._detached = Detached()
        # An in-process store's settles may run at once (see Detached.run).
        self._inline_settles = storage.in_process

    def close(self) -> None:
        """Stop renewing; retry what waits for four socket timeouts more, then give it up."""
        self.renewer.close()
        self._closer.retrier.close(timeout=4 * self.storage.timeout)

    async def aclose(self) -> None:
        """Let this event loop's settles finish (bounded), then :meth:`close`."""
        await self._detached.drain(timeout=8 * self.storage.timeout + 1.0)
        self.close()

    # -- reserving ---------------------------------------------------------------------------

    def reserve(self, plan: Plan) -> bool:
        """Reserve a plan's charges; return whether the ledger holds them.

        Raises:
            BudgetExceeded: a block limit could be crossed, or the call's bound is more
                than a counter can hold; nothing was reserved.
            StorageError: storage failed and ``on_storage_error`` is ``block``.
        """
        self._check_bound(plan)
        if self._spent.tags:  # anything spent at all (no __len__ call)
            self._check_spent(plan)
        if not plan.charges:
            return True
        ttl = plan.policy.config.reservation_ttl
        try:
            result = self.storage.ledger.reserve(
                plan.reservation_id,
                plan.charges,
                now=plan.now,
                ttl=ttl,
                tallies=refused_tallies(plan, self._config().analytics_days),
            )
        except CapacityExceeded as exc:  # a max the config let through
            amount = plan.charges[exc.index].amount
            self._refuse_capacity(plan, exc.index, amount, _BOUND_TOO_LARGE)
        except Exception as exc:
            return self._held_after_failure(plan, exc)
        except BaseException:
            self._undo_reserve(plan)
            raise
        if not result.ok:
            self._interpret_reserve(plan, result)
        return True

    async def areserve(self, plan: Plan) -> bool:
        """Async :meth:`reserve`: never blocks the event loop."""
        self._check_bound(plan)
        if self._spent.tags:  # anything spent at all (no __len__ call)
            self._check_spent(plan)
        if not plan.charges:
            return True
        ttl = plan.policy.config.reservation_ttl
        try:
            result = await self.storage.async_ledger.reserve(
                plan.reservation_id,
                plan.charges,
                now=plan.now,
                ttl=ttl,
                tallies=refused_tallies(plan, self._config().analytics_days),
            )
        except CapacityExceeded as exc:  # a max the config let through
            amount = plan.charges[exc.index].amount
            self._refuse_capacity(plan, exc.index, amount, _BOUND_TOO_LARGE)
        except Exception as exc:
            return self._held_after_failure(plan, exc)
        except BaseException:  # cancelled: the reserve may be applied, nobody will settle it
            self._undo_reserve(plan)
            raise
        if not result.ok:
            self._interpret_reserve(plan, result)
        return True

    def _check_bound(self, plan: Plan) -> None:
        """Refuse a call whose upper bound no counter can hold (:meth:`_check_capacity`)."""
        for index, charge in enumerate(plan.charges):
            if charge.amount > MAX_UNITS:
                self._refuse_capacity(plan, index, charge.amount, _BOUND_TOO_LARGE)

    def _check_spent(self, plan: Plan) -> None:
        """Refuse without a round trip when a counter is known to be spent for its window."""
        if not self._spent.tags:
            return
        now = plan.now
        refusing: list[tuple[Counter, CounterState, int]] = []
        for counter, charge in zip(plan.counters, plan.charges, strict=True):
            if charge.max is None:
                continue
            spent = self._spent.get(counter.key, now)
            if spent is not None and spent.settled + charge.amount > charge.max:
                refusing.append(
                    (counter, CounterState(settled=spent.settled, pending=0), charge.amount)
                )
        if refusing:
            self._refuse(plan, *_resets_last(refusing))

    def _interpret_reserve(self, plan: Plan, result: ReserveResult) -> None:
        if result.ok:
            return
        index = result.refused if result.refused is not None else 0
        refusing = [(plan.counters[index], result.states[index], plan.charges[index].amount)]
        # Every limit the call does not fit, not only the first the store found: the
        # refusal names the one that resets last (the honest Retry-After).
        for other, (counter, charge, state) in enumerate(
            zip(plan.counters, plan.charges, result.states, strict=True)
        ):
            if (
                other != index
                and charge.max is not None
                and state.used + charge.amount > charge.max
            ):
                refusing.append((counter, state, charge.amount))
        for counter, state, _ in refusing:
            self._remember_spent(counter, state)
        self._refuse(plan, *_resets_last(refusing))

    def _remember_spent(self, counter: Counter, state: CounterState) -> None:
        limit = counter.enforced_max
        if limit is not None and state.settled >= limit:
            self._spent.add(counter.key, Spent(float(counter.window.end), state.settled, counter))

    def _check_capacity(self, plan: Plan, amounts: Sequence[int], what: str) -> None:
        """Refuse ``amounts`` that no counter can hold (``max_tokens=1e14``, a huge cost).

        The ledger cannot take such an amount: a refusal before anything is sent,
        whatever ``on_storage_error`` says, never a storage error. Whether the counter's
        limits block or allow, no limit can account for the call; the refusal names the
        smallest block limit (the smallest limit when none blocks).
        """
        for index, amount in enumerate(amounts):
            if amount > MAX_UNITS:
                self._refuse_capacity(plan, index, amount, what)

    def usage_too_large(
        self,
        plan: Plan,
        usage: TokenUsage,
        amounts: Sequence[int],
        cost: int,
        response_model: str | None,
    ) -> bool:
        """Whether a settle's usage is more than a counter can hold (then logged as invalid).

        Such a report (a corrupt or hostile body) cannot be counted, nor its cost: it is
        not trusted, and the caller charges the reservation instead.
        """
        largest = max(
            cost,
            usage.input_tokens,
            usage.output_tokens,
            usage.cache_read_tokens,
            usage.cache_write_tokens,
            usage.cache_write_1h_tokens,
            *amounts,
        )
        if largest <= MAX_UNITS:
            return False
        self.usage_invalid(plan, _USAGE_TOO_LARGE, response_model)
        return True

    def _refuse_capacity(self, plan: Plan, index: int, amount: int, what: str) -> None:
        counter = plan.counters[index]
        bound = min(counter.limits, key=lambda b: (not b.spec.blocks, b.spec.max))
        state = CounterState(settled=0, pending=0)  # not read: nothing was sent
        detail = f"{what} is more than a counter can hold ({MAX_UNITS} units)"
        self._refuse(plan, counter, state, amount, bound=bound, detail=detail)

    def _refuse(
        self,
        plan: Plan,
        counter: Counter,
        state: CounterState,
        needed: int,
        *,
        bound: BoundLimit | None = None,
        detail: str | None = None,
    ) -> None:
        bound = counter.refusing_limit() if bound is None else bound
        usage = limit_usage(bound, counter.window, state)
        extra = {} if detail is None else {"detail": detail}
        self._log.warning(
            events.BUDGET_EXCEEDED,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            limit=bound.spec.name,
            scope=bound.scope,
            unit=bound.spec.unit,
            used=log_amount(bound.spec.unit, state.used),
            max=log_amount(bound.spec.unit, bound.spec.max),
            needed=log_amount(bound.spec.unit, needed),
            resets_at=counter.window.resets_at.isoformat(),
            model=plan.call.model,
            request_id=plan.attribution.request_id,
            **extra,
        )
        if self.observers:
            call = plan.call
            self.observers.call_refused(
                CallRefused(
                    plan.subject.user_id,
                    plan.subject.org_id,
                    usage,
                    call.model,
                    call.provider,
                    call.endpoint,
                )
            )
        retry_after = max(1.0, counter.window.end - plan.now)
        raise BudgetExceeded(plan.subject.user_id, usage, retry_after)

    def unknown_model_refused(
        self, subject: Subject, attribution: Attribution, call: CallRequest
    ) -> None:
        """Log a call refused because its model has no price (``unknown_model: block``)."""
        self._log.warning(
            events.UNKNOWN_MODEL,
            user_id=subject.user_id,
            org_id=subject.org_id,
            model=call.model,
            provider=call.provider,
            unknown_model="block",
            outcome="refused",
            request_id=attribution.request_id,
            detail="refused: no price is known for this model; add it under `prices:` or "
            "change `unknown_model`",
        )

    # -- storage failures ----------------------------------------------------------------------

    def _storage_failed(self, op: str, exc: BaseException, user_id: str, **extra: Any) -> None:
        self._log.error(
            events.STORAGE_ERROR,
            op=op,
            error=str(exc),
            error_type=type(exc).__name__,
            policy=self._config().on_storage_error,
            user_id=user_id,
            storage=self.storage.shown,
            **extra,
        )

    def _close_failed(self, job: Closing, exc: BaseException) -> None:
        retried = isinstance(exc, StorageError)
        self._storage_failed(job.op, exc, job.user_id, retried=retried)

    def _held_after_failure(self, plan: Plan, exc: BaseException) -> bool:
        unknown = isinstance(exc, StorageOutcomeUnknown)
        self._storage_failed("reserve", exc, plan.subject.user_id, outcome_unknown=unknown)
        if unknown:
            # It may have been applied (or be applied later): release its id until that
            # gets through, so it never holds budget the caller does not know about.
            self._undo_reserve(plan, exc)
        if self._config().on_storage_error == "block":
            if isinstance(exc, StorageError):
                raise exc
            raise StorageError(f"storage failed during reserve: {exc}") from exc
        return False

    def _undo_reserve(self, plan: Plan, failure: BaseException | None = None) -> None:
        """Release a reserve whose outcome is unknown, in the background.

        The plan gets a fresh id: the call, if it goes on unreserved, commits under that
        one, which the release of the old id cannot cancel. ``failure``: the storage
        error that left the outcome unknown (``None``: the caller was cancelled).
        """
        keys = [c.key for c in plan.charges]
        self._closer.undo_reserve(plan.reservation_id, keys, plan.subject.user_id, failure)
        plan.reservation_id = new_id()

    # -- settling ------------------------------------------------------------------------------

    def usage_invalid(
        self, plan: Plan, problems: Sequence[str], response_model: str | None
    ) -> None:
        """Log ``usage_invalid``: the provider's usage cannot be trusted."""
        self._log.warning(
            events.USAGE_INVALID,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            model=plan.call.model,
            response_model=response_model,
            provider=plan.call.provider,
            endpoint=plan.call.endpoint,
            reason="; ".join(problems),
            reserved_usd=cost_usd(plan.estimate_nano),
            request_id=plan.attribution.request_id,
            detail="the provider's usage cannot be trusted: the call is charged what was reserved",
        )

    def record_amounts(
        self, plan: Plan, usage: TokenUsage, dollars: object
    ) -> tuple[list[int], int, bool]:
        """:meth:`amounts` of a manual event, whose cost may be given in ``dollars``.

        Raises:
            ValueError: ``dollars`` is negative or not a number.
        """
        if dollars is None:
            amounts, cost, priced = charged_amounts(plan, usage)
            if not priced:
                self._log.warning(
                    events.UNKNOWN_MODEL,
                    model=plan.call.model,
                    provider=plan.call.provider,
                    user_id=plan.subject.user_id,
                    org_id=plan.subject.org_id,
                    request_id=plan.attribution.request_id,
                    unknown_model=self._config().unknown_model.action,
                    outcome="recorded",
                    detail="recorded without a USD cost: no price is known for this model",
                )
            return amounts, cost, priced
        cost = parse_usd(dollars)
        return amounts_by_counter(plan.counters, cost, usage.total_tokens), cost, True

    def _closing_parts(
        self, plan: Plan, record: CallRecord, amounts: list[int] | None
    ) -> SettleParts:
        """The charges (``None`` for a release) and the tallies of a settle."""
        if amounts is None:
            return None, ()
        tallies = settled_tallies(plan, record, self._config().analytics_days)
        charges: list[Charge] = []  # a loop: no list comprehension's call on 3.11
        for ch, amount in zip(plan.charges, amounts, strict=True):
            charges.append(make_charge(ch.key, amount, None, ch.expires_at))
        return tuple(charges), tallies

    def _closing(
        self,
        plan: Plan,
        record: CallRecord,
        amounts: list[int] | None,
        parts: SettleParts | None = None,
        started: float | None = None,
    ) -> Closing:
        """The commit (``amounts``) or release of ``plan``; logged once, when it ends."""

        def applied(states: CounterStates) -> None:
            self.after_commit(plan, record, states, amounts)

        def abandoned(unknown: bool) -> None:
            self.calls.call(plan, record, ledger="unknown" if unknown else "failed")

        charges, tallies = parts or self._closing_parts(plan, record, amounts)
        keys = tuple([c.key for c in plan.charges])
        job = Closing(
            "release" if amounts is None else "commit",
            plan.reservation_id,
            keys,
            charges,
            plan.subject.user_id,
            applied,
            abandoned,
            tallies=tallies,
        )
        if started is not None:
            job.started = started
        return job

    def settle(self, plan: Plan, record: CallRecord, amounts: list[int] | None) -> None:
        """Commit ``amounts`` (``None``: release) and log ``record``.

        Logged now, or once the retries got it through: a store that fails makes the
        retrier take over (this never raises for it). The first attempt is made here;
        only one that fails makes the :class:`~payi_guard.engine.retry.Closing` the
        retries go on with (counting that attempt, from when it started).
        """
        if not plan.charges:
            self.after_commit(plan, record, (), amounts)
            return
        parts = self._closing_parts(plan, record, amounts)
        started = time.monotonic()
        try:
            ledger = self.storage.ledger
            now = self.clock.now()
            charges, tallies = parts
            if charges is None:
                keys = tuple([c.key for c in plan.charges])
                states = ledger.release(plan.reservation_id, keys, now=now)
            else:
                states = ledger.commit(plan.reservation_id, charges, now=now, tallies=tallies)
        except BaseException as exc:
            job = self._closing(plan, record, amounts, parts, started)
            job.attempts = 1
            self._closer.run(job, exc)
            return
        self.after_commit(plan, record, states, amounts)

    async def asettle(self, plan: Plan, record: CallRecord, amounts: list[int] | None) -> None:
        """Async :meth:`settle`: it runs to its end even if the caller is cancelled."""
        if not plan.charges:
            self.after_commit(plan, record, (), amounts)
            return
        await self._detached.run(
            self._closer.arun(self._closing(plan, record, amounts)), inline=self._inline_settles
        )

    def unreserved(self, plan: Plan, record: CallRecord) -> None:
        """Log the end of a call the ledger held nothing for (nothing to release)."""
        self.after_commit(plan, record, (), None)

    def live(self, plan: Plan, owner: object) -> None:
        """Renew ``plan``'s reservation while ``owner`` (its call) is under way."""
        if plan.charges:
            keys: list[str] = []  # a loop: no list comprehension's call on 3.11
            for charge in plan.charges:
                keys.append(charge.key)
            self.renewer.add(plan.reservation_id, keys, owner, plan.subject.user_id)

    def ended(self, plan: Plan) -> None:
        """Stop renewing ``plan``'s reservation: its call ended."""
        if plan.charges:
            self.renewer.discard(plan.reservation_id)

    def record(self, plan: Plan, usage: TokenUsage, dollars: object) -> CallRecord:
        """Commit and log a manual event (see :meth:`Guard.record`); its record.

        Raises:
            BudgetExceeded: its cost is more than a counter can hold.
            ValueError: ``dollars`` is negative or not a number.
        """
        record, amounts = self._record_of(plan, usage, dollars)
        self.settle(plan, record, amounts)
        return record

    async def arecord(self, plan: Plan, usage: TokenUsage, dollars: object) -> CallRecord:
        """Async :meth:`record`."""
        record, amounts = self._record_of(plan, usage, dollars)
        await self.asettle(plan, record, amounts)
        return record

    def _record_of(
        self, plan: Plan, usage: TokenUsage, dollars: object
    ) -> tuple[CallRecord, list[int]]:
        amounts, cost, priced = self.record_amounts(plan, usage, dollars)
        self._check_capacity(plan, amounts, "the recorded cost")
        record = self.record_of(plan, usage, cost, priced, "recorded", self.clock.monotonic())
        return record, amounts

    # -- records and what they log ---------------------------------------------------------------

    def record_of(
        self,
        plan: Plan,
        usage: TokenUsage | None,
        cost: int,
        priced: bool,
        outcome: str,
        started: float,
        *,
        response_model: str | None = None,
        other_models: tuple[tuple[str, TokenUsage], ...] = (),
        price_context: tuple[tuple[str, str], ...] = (),
    ) -> CallRecord:
        """The record of a call settled (or released) now, reserved at ``started``."""
        latency_ms = (self.clock.monotonic() - started) * 1000.0
        subject, call = plan.subject, plan.call
        return make_call_record(
            subject.user_id,
            subject.org_id,
            call.model,
            call.provider,
            usage,
            cost,
            plan.estimate_nano,
            outcome,
            round(latency_ms, 3),
            call.stream,
            priced,
            response_model,
            other_models,
            price_context,
        )

    def after_commit(
        self,
        plan: Plan,
        record: CallRecord,
        states: CounterStates,
        amounts: Sequence[int] | None,
    ) -> None:
        """Log what a commit (or release) caused: thresholds crossed, the call itself."""
        calls = self.calls
        if states and amounts is not None:
            for counter, state, amount in zip(plan.counters, states, amounts, strict=True):
                if amount > 0:
                    calls.thresholds(plan, counter, state, amount)
                limit = counter.enforced_max
                if limit is not None and state.settled >= limit:
                    self._remember_spent(counter, state)
        calls.call(plan, record)


def _resets_last(
    refusing: list[tuple[Counter, CounterState, int]],
) -> tuple[Counter, CounterState, int]:
    """Of the counters a call does not fit, the one whose window ends last."""
    return max(refusing, key=lambda item: item[0].window.end)
