"""The Guard: decides, reserves before each GenAI call, settles after it, logs everything.

Per call: attribution -> the user charged -> the limits that apply (user or tier or
default, the org of a composite id, global, ``limit_ids``; cached) -> an upper-bound
cost -> one atomic reserve over every counter -> the call -> commit of the actual cost
(or release on error). Counters are keyed by owner, unit and calendar window, so every
limit with the same unit and period shares one counter and one number per window.

:class:`Guard` is the facade over the engine's parts: :mod:`~payi_guard.engine.policy`
(who is charged, which limits apply), :mod:`~payi_guard.engine.plan` (counters and
charges), :mod:`~payi_guard.engine.bookkeeper` (the ledger and the logs),
:mod:`~payi_guard.engine.reservation`, :mod:`~payi_guard.engine.spent` and
:mod:`~payi_guard.engine.watch`. The sync and async paths share every decision; only
the ledger call differs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from payi_guard import log as events
from payi_guard.clock import Clock, SystemClock
from payi_guard.config import GuardConfig, load_config, parse_config
from payi_guard.context import Attribution, get_context
from payi_guard.engine.bookkeeper import Bookkeeper
from payi_guard.engine.calls import CallRecord, CallRequest
from payi_guard.engine.observers import Observers
from payi_guard.engine.plan import Counter, Plan, Planner, blocking, limit_usage, usages_of
from payi_guard.engine.policy import ANONYMOUS_USER, BoundLimit, Policy, Subject, Subjects
from payi_guard.engine.reservation import Reservation
from payi_guard.engine.spent import SpentCache
from payi_guard.engine.storage import Storage
from payi_guard.engine.watch import ConfigWatcher
from payi_guard.exceptions import ConfigError, UnknownModelRefused
from payi_guard.identity import Pseudonymizer, normalize_user_id
from payi_guard.ledger.base import AsyncLedger, CounterState, Ledger
from payi_guard.ledger.keys import CounterKey, check_prefix, owners_glob, parse_key
from payi_guard.pricing import TokenUsage
from payi_guard.usage import LimitUsage, Scope
from payi_guard.windows import WindowCache

__all__ = ["Guard"]


class Guard:
    """Per-user budgets for GenAI calls: the one object an app configures.

    Args:
        config: a :class:`~payi_guard.config.GuardConfig`, a dict in the shape of the
            YAML file, YAML text, or ``None`` for no limits at all (tracking only).
        storage: the storage URI; overrides the config's ``storage``.
        clock: the time source (tests pass a :class:`~payi_guard.clock.FakeClock`).
        key_prefix: prefix of every storage key (several apps can share one Redis).
        pseudonymizer: replace user ids in counters and logs by keyed pseudonyms.
        policy_cache_size: how many users' resolved limits are cached.
        exhausted_cache_size: how many exhausted counters are remembered, so a blocked
            user is refused without a storage round trip.
        storage_options: extra keyword arguments for the storage client.

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
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if config is None:
            config = GuardConfig()
        elif not isinstance(config, GuardConfig):
            config = parse_config(config)
        self.key_prefix = check_prefix(key_prefix)
        self.clock: Clock = clock or SystemClock()
        self.pseudonymizer = pseudonymizer
        self._policy_cache_size = policy_cache_size
        self._policy = Policy(config, policy_cache_size, self.clock)
        windows = WindowCache()
        self._subjects = Subjects(pseudonymizer, policy_cache_size, self.clock, windows)
        self._planner = Planner(key_prefix, windows, policy_cache_size)
        self._spent = SpentCache(exhausted_cache_size)
        self._storage = Storage(storage or config.storage, storage_options)
        self._books = Bookkeeper(self._storage, self.clock, self._spent, lambda: self.config)
        self._default_user_id: str | None = None
        self._log = events.get_logger()
        self._watcher: ConfigWatcher | None = None

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
        return self._policy.config

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
        """Stop the file watcher and close the sync storage client."""
        self.stop_watching()
        self._storage.close()

    async def aclose(self) -> None:
        """Close both storage clients."""
        self.close()
        await self._storage.aclose()

    # -- reserving and settling ---------------------------------------------------------------

    def subject_for(self, attribution: Attribution | None = None) -> Subject:
        """Return who a call made with ``attribution`` (default: the current one) is charged to.

        Raises:
            UserRequired: no user is known and the anonymous strategy is ``reject``.
        """
        attribution = attribution if attribution is not None else get_context()
        anonymous = self._policy.config.anonymous
        return self._subjects.for_call(attribution, self._default_user_id, anonymous)

    def _plan(self, call: CallRequest, attribution: Attribution | None) -> Plan:
        bounds = (call.input_tokens, call.max_output_tokens, call.max_web_searches)
        if min(*bounds, call.max_file_searches) < 0:
            raise ValueError("token estimates must not be negative")
        attribution = attribution if attribution is not None else get_context()
        subject = self.subject_for(attribution)
        policy = self._policy
        try:
            return self._planner.for_call(policy, subject, attribution, call, self.clock.now())
        except UnknownModelRefused:
            self._books.unknown_model_refused(subject, attribution, call)
            raise

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
        plan = self._plan(call, attribution)
        return Reservation(self._books, plan, held=self._books.reserve(plan))

    async def abegin(
        self, call: CallRequest, attribution: Attribution | None = None
    ) -> Reservation:
        """Async :meth:`begin`: never blocks the event loop."""
        plan = self._plan(call, attribution)
        return Reservation(self._books, plan, held=await self._books.areserve(plan))

    # -- manual events ----------------------------------------------------------------------

    def _record_plan(
        self,
        user_id: object,
        model: str,
        provider: str,
        limit_ids: Sequence[str],
        use_case_name: str | None,
        request_id: str | None,
    ) -> Plan:
        uid = normalize_user_id(user_id)
        base = get_context()
        attribution = Attribution(
            user_id=uid,
            account_name=base.account_name,
            use_case_name=use_case_name if use_case_name is not None else base.use_case_name,
            use_case_id=base.use_case_id,
            limit_ids=tuple(dict.fromkeys([*base.limit_ids, *limit_ids])),
            request_id=request_id if request_id is not None else base.request_id,
        )
        subject = self._subjects.by_id(uid)
        policy, now = self._policy, self.clock.now()
        return self._planner.for_record(policy, subject, attribution, model, provider, now)

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
        """Charge a call that happened elsewhere (never refuses).

        The cost comes from the model's price unless ``cost_usd`` is given. Crossing a
        limit logs ``budget_overrun``; the call is logged as ``genai_call`` with outcome
        ``recorded``.

        Raises:
            InvalidUserId: the user id is invalid.
            ValueError: negative token counts or cost.
            ConfigError: ``limit_ids`` names an undefined limit.
        """
        plan = self._record_plan(user_id, model, provider, limit_ids, use_case_name, request_id)
        usage = TokenUsage(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        amounts, cost, priced = self._books.record_amounts(plan, usage, cost_usd)
        states = self._books.commit(plan, amounts)
        return self._books.recorded(plan, usage, cost, priced, states, amounts)

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
        plan = self._record_plan(user_id, model, provider, limit_ids, use_case_name, request_id)
        usage = TokenUsage(input_tokens, output_tokens, cache_read_tokens, cache_write_tokens)
        amounts, cost, priced = self._books.record_amounts(plan, usage, cost_usd)
        states = await self._books.acommit(plan, amounts)
        return self._books.recorded(plan, usage, cost, priced, states, amounts)

    # -- reading usage ---------------------------------------------------------------------------

    def _read_plan(
        self, subject: Subject, limit_ids: Sequence[str]
    ) -> tuple[list[BoundLimit], list[Counter]]:
        bound = self._policy.bindings(subject, limit_ids)
        return bound, self._planner.counters(bound, self.clock.now())

    def _usage_plan(
        self, user_id: object, limit_ids: Sequence[str]
    ) -> tuple[list[BoundLimit], list[Counter]]:
        uid = ANONYMOUS_USER if user_id is None else normalize_user_id(user_id)
        return self._read_plan(self._subjects.by_id(uid), limit_ids)

    def _gate_plan(self, attribution: Attribution | None) -> tuple[list[BoundLimit], list[Counter]]:
        attribution = attribution if attribution is not None else get_context()
        return self._read_plan(self.subject_for(attribution), attribution.limit_ids)

    def usage(self, user_id: object, *, limit_ids: Sequence[str] = ()) -> list[LimitUsage]:
        """Return every limit that applies to ``user_id`` with its current usage.

        Args:
            user_id: the user (``"anonymous"`` for the shared anonymous bucket).
            limit_ids: named limits to include as well.

        Returns:
            One :class:`~payi_guard.LimitUsage` per limit: the user's (or tier's or
            default), the org's for composite ids, the global ones, then ``limit_ids``.

        Raises:
            InvalidUserId: the user id is invalid.
            StorageError: the storage could not be read.
        """
        bound, counters = self._usage_plan(user_id, limit_ids)
        if not counters:
            return []
        states = self.ledger.read([c.key for c in counters], now=self.clock.now())
        return usages_of(bound, counters, states)

    async def ausage(self, user_id: object, *, limit_ids: Sequence[str] = ()) -> list[LimitUsage]:
        """Async :meth:`usage`."""
        bound, counters = self._usage_plan(user_id, limit_ids)
        if not counters:
            return []
        states = await self.async_ledger.read([c.key for c in counters], now=self.clock.now())
        return usages_of(bound, counters, states)

    async def acounter_keys(
        self, scopes: Sequence[Scope], *, limit: int
    ) -> tuple[list[CounterKey], bool]:
        """The counters in storage whose owners have one of ``scopes``, parsed.

        Reads at most ``limit`` keys (one ``SCAN`` pass on Redis); the flag is True when
        that cap was reached, so some counters may be missing.

        Raises:
            StorageError: the storage could not be scanned.
        """
        glob = owners_glob(self.key_prefix, scopes)
        keys = await self.async_ledger.scan(glob, now=self.clock.now(), limit=limit)
        parsed = (parse_key(self.key_prefix, key) for key in keys)
        return [key for key in parsed if key is not None], len(keys) >= limit

    def _cached_exhausted(self, attribution: Attribution | None) -> LimitUsage | None:
        attribution = attribution if attribution is not None else get_context()
        # subject_for runs first: an anonymous caller under `reject` is refused here.
        tags = self.subject_for(attribution).owner_tags(attribution.limit_ids)
        if not len(self._spent) or not self._spent.any_tag(tags):
            return None
        _, counters = self._gate_plan(attribution)
        now = self.clock.now()
        usages: list[LimitUsage] = []
        for counter in counters:
            spent = self._spent.get(counter.key, now)
            if spent is None:
                continue
            state = CounterState(settled=spent.settled, pending=0)
            usages.extend(limit_usage(b, counter.window, state) for b in counter.limits)
        return blocking(usages)

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
        if not read_storage:
            return self._cached_exhausted(attribution)
        bound, counters = self._gate_plan(attribution)
        if not counters:
            return None
        states = self.ledger.read([c.key for c in counters], now=self.clock.now())
        return blocking(usages_of(bound, counters, states))

    async def aexhausted_limit(
        self, attribution: Attribution | None = None, *, read_storage: bool = False
    ) -> LimitUsage | None:
        """Async :meth:`exhausted_limit`."""
        if not read_storage:
            return self._cached_exhausted(attribution)
        bound, counters = self._gate_plan(attribution)
        if not counters:
            return None
        states = await self.async_ledger.read([c.key for c in counters], now=self.clock.now())
        return blocking(usages_of(bound, counters, states))

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
        try:
            if source is None:
                if self.config.source is None:
                    raise ConfigError("this Guard was not built from a file: pass a source")
                new = load_config(self.config.source)
            elif isinstance(source, GuardConfig):
                new = source
            elif isinstance(source, Mapping):
                new = parse_config(source)
            else:
                new = load_config(os.fspath(source))
        except (ConfigError, OSError) as exc:
            self._log.error(events.CONFIG_RELOAD_FAILED, error=str(exc), kept=self.config.source)
            return False
        if new.storage != self.config.storage and new.storage != self.storage_uri:
            self._log.warning(
                events.CONFIG_RELOADED,
                detail="the storage URI changed; it takes effect after a restart",
            )
        self._policy = Policy(new, self._policy_cache_size, self.clock)
        self._spent.clear()
        self._log.info(events.CONFIG_RELOADED, source=new.source)
        return True

    def watch(self, interval: float = 2.0) -> None:
        """Reload the config file whenever it changes (polls its mtime in a daemon thread).

        Raises:
            ConfigError: the config was not loaded from a file.
        """
        if self.config.source is None:
            raise ConfigError("watch() needs a Guard built with Guard.from_yaml(path)")
        if self._watcher is None:
            self._watcher = ConfigWatcher(self.reload, self.config.source, interval)
            self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the file watcher started by :meth:`watch`."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

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
