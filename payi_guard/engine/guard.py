"""The Guard: decides, reserves before each GenAI call, settles after it, logs everything.

Per call: attribution -> the user charged -> the limits that apply (user or tier or
default, the org of a composite id, global, ``limit_ids``; cached) -> an upper-bound
cost -> one atomic reserve over every counter -> the call -> commit of the actual cost
(or release on error). Counters are keyed by owner, unit and calendar window, so every
limit with the same unit and period shares one counter and one number per window.

:class:`Guard` is the facade over the engine's parts: :mod:`~payi_guard.engine.policy`
(who is charged, which limits apply), :mod:`~payi_guard.engine.plan` (counters and
charges), :mod:`~payi_guard.engine.bookkeeper` (the ledger and the logs),
:mod:`~payi_guard.engine.reservation`, :mod:`~payi_guard.engine.spent`,
:mod:`~payi_guard.engine.tiers` (plans from the app), :mod:`~payi_guard.engine.operator`
(operator controls) and :mod:`~payi_guard.engine.watch`. The sync and async paths share
every decision; only the ledger call (and the app's ``tier_of``) differs.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from payi_guard.clock import Clock, SystemClock
from payi_guard.config import GuardConfig, load_config, parse_config
from payi_guard.context import Attribution, get_context
from payi_guard.context.scope import request_user
from payi_guard.engine.bookkeeper import Bookkeeper
from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.observers import Observers
from payi_guard.engine.operator import HISTORY_KEEP, Operator
from payi_guard.engine.parts import Parts
from payi_guard.engine.plan import record_attribution
from payi_guard.engine.policy import Subject
from payi_guard.engine.reservation import Reservation
from payi_guard.engine.tiers import TierFunction
from payi_guard.engine.views import Planning, Views
from payi_guard.engine.watch import Watching
from payi_guard.exceptions import ConfigError
from payi_guard.identity import Pseudonymizer, normalize_user_id
from payi_guard.ledger.base import AsyncLedger, Ledger
from payi_guard.ledger.keys import check_prefix
from payi_guard.pricing import TokenUsage
from payi_guard.usage import BudgetAdjustment, LimitUsage

__all__ = ["Guard"]

Line = str | None
"""An operator's ``reason`` or ``by``: one printable line (at most 200 characters), or none."""


class Guard:
    """Per-user budgets for GenAI calls: the one object an app configures.

    Args:
        config: a :class:`~payi_guard.config.GuardConfig`, a dict in the shape of the
            YAML file, YAML text, or ``None`` for no limits at all (tracking only).
        storage: the storage URI; overrides the config's ``storage``.
        clock: the time source (tests pass a :class:`~payi_guard.clock.FakeClock`).
        key_prefix: prefix of every storage key (several apps can share one Redis).
        pseudonymizer: replace user ids in counters and logs by keyed pseudonyms.
        policy_cache_size: how many users' resolved limits (and tiers) are cached.
        exhausted_cache_size: how many exhausted counters are remembered, so a blocked
            user is refused without a storage round trip.
        exhausted_cache_ttl: the most seconds such a counter is trusted (an operator's
            adjustment made in another process is seen within it).
        storage_options: extra keyword arguments for the storage client.
        tier_of: ``fn(user_id) -> tier name | None``, sync or async: the tier of a user
            not listed under ``users:`` (the app's plans; cached ``tier_cache_ttl``
            seconds; a failure is logged and gives ``default``). A tier named by the
            request (``set_user(..., tier=)``) comes first.

    Raises:
        ConfigError: the config is invalid.

    Nothing is connected or patched at construction: the storage is opened on first use.
    """

    def __init__(
        self,
        config: GuardConfig | Mapping[str, Any] | str | None = None,
        *,
        storage: str | None = None,
        clock: Clock | None = None,
        key_prefix: str = "pg",
        pseudonymizer: Pseudonymizer | None = None,
        policy_cache_size: int = 10_000,
        exhausted_cache_size: int = 10_000,
        exhausted_cache_ttl: float = 5.0,
        storage_options: Mapping[str, Any] | None = None,
        tier_of: TierFunction | None = None,
    ) -> None:
        if config is None:
            config = GuardConfig()
        elif not isinstance(config, GuardConfig):
            config = parse_config(config)
        self.key_prefix = check_prefix(key_prefix)
        self.clock: Clock = clock or SystemClock()
        self.pseudonymizer = pseudonymizer
        self._parts = Parts.build(
            config,
            storage=storage,
            storage_options=storage_options,
            clock=self.clock,
            key_prefix=key_prefix,
            pseudonymizer=pseudonymizer,
            cache_size=policy_cache_size,
            spent_size=exhausted_cache_size,
            spent_ttl=exhausted_cache_ttl,
            tier_of=tier_of,
        )
        self._storage = self._parts.storage
        # The config in effect, read in C (no Python frame): what the `config` property gives.
        config_now = functools.partial(operator.attrgetter("policy.config"), self._parts)
        self._books = Bookkeeper(self._storage, self.clock, self._parts.spent, config_now)
        self._planning = Planning(self._parts, self._books)
        self._views = Views(self._parts)
        self._operator = Operator(self._parts)
        self._default_user_id: str | None = None
        self._watching = Watching()

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], **kwargs: Any) -> Guard:
        """Build a Guard from a budgets YAML file.

        Args:
            path: the file.
            **kwargs: any keyword argument of :class:`Guard`.

        Raises:
            ConfigError: the file is missing or invalid (the message names file and line).
        """
        return cls(load_config(os.fspath(path)), **kwargs)

    @property
    def config(self) -> GuardConfig:
        """The config in effect."""
        return self._parts.policy.config

    @property
    def storage_uri(self) -> str:
        """The storage URI in use."""
        return self._storage.uri

    @property
    def default_user_id(self) -> str | None:
        """The user charged when no context names one (set by :meth:`instrument`)."""
        return self._default_user_id

    @default_user_id.setter
    def default_user_id(self, value: object) -> None:
        self._default_user_id = None if value is None else normalize_user_id(value)

    @property
    def observers(self) -> Observers:
        """Who is told of every call and refusal (:mod:`payi_guard.otel` adds itself here)."""
        return self._books.observers

    # -- storage ------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The synchronous ledger (opened on first use)."""
        return self._storage.ledger

    @property
    def async_ledger(self) -> AsyncLedger:
        """The async ledger (opened on first use; shares counters with :attr:`ledger`)."""
        return self._storage.async_ledger

    def close(self) -> None:
        """Stop the watcher, renewals, retries and ``tier_of``'s loop; close sync storage."""
        self.stop_watching()
        self._books.close()
        self._parts.close()

    async def aclose(self) -> None:
        """Let this event loop's settles finish, then close both storage clients."""
        await self._books.aclose()
        self.close()
        await self._storage.aclose()

    # -- reserving and settling ---------------------------------------------------------------

    def subject_for(self, attribution: Attribution | None = None) -> Subject:
        """Return who a call made with ``attribution`` (default: the current one) is charged to.

        Raises:
            UserRequired: no user is known and the anonymous strategy is ``reject``.
        """
        attribution = attribution if attribution is not None else get_context()
        anonymous = self.config.anonymous
        return self._parts.subjects.for_call(attribution, self._default_user_id, anonymous)

    def begin(self, call: CallRequest, attribution: Attribution | None = None) -> Reservation:
        """Reserve the upper-bound cost of a call before it is sent (sync).

        Args:
            call: what is known about the call.
            attribution: the attribution to charge; defaults to :func:`get_context`.

        Returns:
            An open :class:`Reservation`: settle or release it when the call ends.

        Raises:
            BudgetExceeded: a block limit could be crossed; nothing was reserved.
            UserRequired: no user is known and anonymous calls are rejected.
            UnknownModelRefused: no price is known and ``unknown_model`` is ``block``.
            StorageError: storage failed and ``on_storage_error`` is ``block``.
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        attribution = attribution if attribution is not None else get_context()
        parts = self._parts  # subject_for(), then Planning.tiered(), inline: fewer calls
        anonymous = parts.policy.config.anonymous
        subject = parts.subjects.for_call(attribution, self._default_user_id, anonymous)
        subject = parts.policy.with_tier(subject, attribution.tier)
        plan = self._planning.call(call, attribution, subject)
        return Reservation(self._books, plan, held=self._books.reserve(plan))

    async def abegin(
        self, call: CallRequest, attribution: Attribution | None = None
    ) -> Reservation:
        """Async :meth:`begin`: never blocks the event loop."""
        attribution = attribution if attribution is not None else get_context()
        parts = self._parts  # subject_for(), then Planning.atiered(), inline: fewer calls
        anonymous = parts.policy.config.anonymous
        subject = parts.subjects.for_call(attribution, self._default_user_id, anonymous)
        subject = await parts.policy.awith_tier(subject, attribution.tier)
        plan = self._planning.call(call, attribution, subject)
        return Reservation(self._books, plan, held=await self._books.areserve(plan))

    # -- manual events ----------------------------------------------------------------------

    def record(
        self,
        *,
        user_id: object,
        model: str,
        provider: str = "openai",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: Decimal | str | float | int | None = None,
        limit_ids: Sequence[str] = (),
        use_case_name: str | None = None,
        request_id: str | None = None,
    ) -> CallRecord:
        """Charge a call that happened elsewhere (never refused for the budget).

        The cost is the model's price unless ``cost_usd`` is given. Crossing a limit
        logs ``budget_overrun``; the call is logged as ``genai_call`` (``recorded``).

        Raises:
            BudgetExceeded: the cost is more than a counter can hold (about $9 million).
            InvalidUserId: the user id is invalid.
            ValueError: negative token counts or cost.
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        attribution = record_attribution(user_id, limit_ids, use_case_name, request_id)
        usage = TokenUsage(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        return self._planning.record(attribution, CallRequest(model, provider), usage, cost_usd)

    async def arecord(
        self,
        *,
        user_id: object,
        model: str,
        provider: str = "openai",
        input_tokens: int = 0,
        output_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        cost_usd: Decimal | str | float | int | None = None,
        limit_ids: Sequence[str] = (),
        use_case_name: str | None = None,
        request_id: str | None = None,
    ) -> CallRecord:
        """Async :meth:`record`."""
        attribution = record_attribution(user_id, limit_ids, use_case_name, request_id)
        usage = TokenUsage(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        return await self._planning.arecord(
            attribution, CallRequest(model, provider), usage, cost_usd
        )

    # -- reading usage ---------------------------------------------------------------------------

    def usage(
        self, user_id: object, *, limit_ids: Sequence[str] = (), tier: str | None = None
    ) -> list[LimitUsage]:
        """Return every limit that applies to ``user_id`` with its current usage.

        Args:
            user_id: the user (``"anonymous"`` for the shared anonymous bucket).
            limit_ids: named limits to include as well.
            tier: the user's tier as a request names it (else the tier the user's
                requests last named in this process, else ``tier_of``'s).

        Returns:
            One :class:`~payi_guard.LimitUsage` per limit: the user's (or tier's or
            default), the org's for composite ids, the global ones, then ``limit_ids``.

        Raises:
            InvalidUserId: the user id is invalid.
            StorageError: the storage could not be read.
        """
        return self._views.usage(self._parts.user(user_id), limit_ids, tier)

    async def ausage(
        self, user_id: object, *, limit_ids: Sequence[str] = (), tier: str | None = None
    ) -> list[LimitUsage]:
        """Async :meth:`usage`."""
        return await self._views.ausage(self._parts.user(user_id), limit_ids, tier)

    def tier(self, user_id: object) -> str:
        """Return the plan ``user_id``'s calls are charged under.

        ``anonymous``, its ``users:`` tier or ``custom``, the tier its requests last named
        in this process, ``tier_of``'s tier, or ``default``.
        """
        return self._views.tier(self._parts.user(user_id))

    async def atier(self, user_id: object) -> str:
        """Async :meth:`tier`: the app's ``tier_of`` never runs on the event loop."""
        return await self._views.atier(self._parts.user(user_id))

    def exhausted_limit(
        self, attribution: Attribution | None = None, *, read_storage: bool = False
    ) -> LimitUsage | None:
        """Return the block limit that leaves this user nothing, or ``None`` (for gates).

        By default only this process's "spent until the window ends" cache is consulted:
        no storage round trip, a few microseconds. It knows every counter this process
        saw reach its max (its own settles, and refusals that read a spent counter); a
        user spent by another process is still refused at the GenAI call itself.
        ``read_storage=True`` reads the counters from the store instead (one round trip)
        and also reports counters whose pending reservations fill them.

        Of several exhausted limits the one that resets last is returned (the honest
        ``Retry-After``).

        Raises:
            UserRequired: no user is known and anonymous calls are rejected.
            StorageError: the storage could not be read (``read_storage=True``).
        """
        if not read_storage and self._views.nothing_to_find():
            return None  # whatever the attribution: none is built
        if attribution is None:
            plain = None if read_storage else request_user()
            if plain is not None:  # a request's own user (a gate): no snapshot is built
                return self._views.request_exhausted(plain[0], plain[1], self._default_user_id)
            attribution = get_context()
        subject = self.subject_for(attribution)  # refuses an anonymous caller under `reject`
        return self._views.exhausted(subject, attribution, read_storage)

    async def aexhausted_limit(
        self, attribution: Attribution | None = None, *, read_storage: bool = False
    ) -> LimitUsage | None:
        """Async :meth:`exhausted_limit`."""
        if not read_storage and self._views.nothing_to_find():
            return None
        attribution = attribution if attribution is not None else get_context()
        subject = self.subject_for(attribution)
        return await self._views.aexhausted(subject, attribution, read_storage)

    # -- operator controls ---------------------------------------------------------------------

    def adjust(
        self, user_id: object, limit: str, amount: object, reason: Line = None, *, by: Line = None
    ) -> LimitUsage:
        """Add ``amount`` to the current window of one of the user's own limits (atomic).

        A negative amount gives budget back (the counter may go below zero: a credit
        for the rest of the window); a positive one may take it past max, and the user
        is then refused. Limits with the same unit and period share one counter, so the
        others move too. Calls in flight keep their reservations. Logged as
        ``budget_adjusted``; kept in the user's history (:meth:`adjustments`). The org's
        and global limits are never adjusted through a user.

        Args:
            user_id: the user (``"anonymous"`` for the anonymous bucket).
            limit: the name of one of the user's limits (``daily``, ``user:0``).
            amount: dollars for a money limit (``Decimal``, ``str`` or ``int``, exact to
                the nano-dollar), a whole number for requests and tokens.
            reason: why (one printable line, at most 200 characters).
            by: who (same form).

        Returns:
            The limit's usage right after.

        Raises:
            InvalidUserId: the user id is invalid.
            ValueError: no such limit of the user's own, or a bad amount, reason or by.
            StorageError: the store failed; nothing was changed.
        """
        subject = self._parts.user(user_id)
        return self._operator.change("adjust", subject, limit, amount, reason, by)[0]

    async def aadjust(
        self, user_id: object, limit: str, amount: object, reason: Line = None, *, by: Line = None
    ) -> LimitUsage:
        """Async :meth:`adjust`."""
        subject = self._parts.user(user_id)
        return (await self._operator.achange("adjust", subject, limit, amount, reason, by))[0]

    def reset(
        self, user_id: object, limit: str | None = None, *, reason: Line = None, by: Line = None
    ) -> list[LimitUsage]:
        """Zero the current window of one of the user's own limits, or of all (atomic).

        Calls in flight keep their reservations and are charged to the reset window when
        they end. Arguments, logs and errors as for :meth:`adjust`.

        Returns:
            The usage of each limit reset, right after.
        """
        return self._operator.change("reset", self._parts.user(user_id), limit, 0, reason, by)

    async def areset(
        self, user_id: object, limit: str | None = None, *, reason: Line = None, by: Line = None
    ) -> list[LimitUsage]:
        """Async :meth:`reset`."""
        subject = self._parts.user(user_id)
        return await self._operator.achange("reset", subject, limit, 0, reason, by)

    def adjustments(self, user_id: object, *, limit: int = HISTORY_KEEP) -> list[BudgetAdjustment]:
        """The user's adjustments and resets, newest first (the last 100, for 90 days).

        Raises:
            InvalidUserId: the user id is invalid.
            StorageError: the storage could not be read.
        """
        return self._operator.history(self._parts.user(user_id), limit)

    async def aadjustments(
        self, user_id: object, *, limit: int = HISTORY_KEEP
    ) -> list[BudgetAdjustment]:
        """Async :meth:`adjustments`."""
        return await self._operator.ahistory(self._parts.user(user_id), limit)

    # -- configuration changes ------------------------------------------------------------------

    def reload(
        self, source: GuardConfig | Mapping[str, Any] | str | os.PathLike[str] | None = None
    ) -> bool:
        """Swap in a new config atomically; a bad one keeps the old config.

        Args:
            source: a config object, a dict, or a path; default: the file the current
                config came from.

        Returns:
            True if the new config is in effect, False if it was refused (the reason is
            logged as ``config_reload_failed``).
        """
        return self._parts.reload(source)

    def watch(self, interval: float = 2.0) -> None:
        """Reload the config file whenever it changes (polls its mtime in a daemon thread).

        Raises:
            ConfigError: the config was not loaded from a file.
        """
        if self.config.source is None:
            raise ConfigError("watch() needs a Guard built with Guard.from_yaml(path)")
        self._watching.start(self.reload, self.config.source, interval)

    def stop_watching(self) -> None:
        """Stop the file watcher started by :meth:`watch`."""
        self._watching.stop()

    # -- SDK integration -----------------------------------------------------------------------
    # The contract puts wrap() and instrument() on Guard, but the meter sits above the
    # engine (it imports it): these import it when called, never at module level.

    def wrap(self, client: Any, **options: Any) -> Any:
        """Guard one client and return it.

        OpenAI, Anthropic, ``google.genai``, boto3 ``bedrock-runtime``, ``mistralai``,
        ``groq``, a LiteLLM ``HTTPHandler``, or a plain httpx / httpx2 client.

        See :func:`payi_guard.meter.wrap` for the options.
        """
        from payi_guard.meter import wrap

        return wrap(self, client, **options)

    def instrument(self, default_user_id: object = None, **options: Any) -> Guard:
        """Guard every client of the installed GenAI SDKs, existing and future (idempotent).

        OpenAI, Anthropic, Gemini (``google-genai``), Bedrock (``boto3``), Mistral, Groq
        and LiteLLM; ``sdks=[...]`` picks some.

        Args:
            default_user_id: the user charged where no context names one (before any
                anonymous strategy applies), like Pay-i's ``payi_instrument()``.
            **options: see :func:`payi_guard.meter.instrument`.

        Returns:
            The guard itself.
        """
        from payi_guard.meter import instrument

        if default_user_id is not None:
            self.default_user_id = default_user_id
        instrument(self, **options)
        return self

    def uninstrument(self) -> None:
        """Undo :meth:`instrument` (idempotent)."""
        from payi_guard.meter import uninstrument

        uninstrument(self)

    def __repr__(self) -> str:
        return f"Guard(storage={self._storage.shown!r}, source={self.config.source!r})"
