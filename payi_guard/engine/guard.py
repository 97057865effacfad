"""The Guard: decides, reserves before each GenAI call, settles after it, logs everything.

Per call: attribution -> the user charged -> the limits that apply (user or tier or
default, the org of a composite id, global, ``limit_ids``; cached) -> an upper-bound
cost -> one atomic reserve over every counter -> the call -> commit of the actual cost
(or release on error). Counters are keyed by owner, unit and calendar window, so every
limit with the same unit and period shares one counter and one number per window.

The sync and async paths share every decision; only the ledger call differs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any

import cachetools

from payi_guard import log as events
from payi_guard._ids import new_id
from payi_guard.clock import Clock, SystemClock
from payi_guard.config import NANO_USD, GuardConfig, LimitSpec, load_config, parse_config
from payi_guard.context import Attribution, current_request, get_context
from payi_guard.exceptions import (
    BudgetExceeded,
    ConfigError,
    InvalidUserId,
    PayiGuardError,
    StorageError,
)
from payi_guard.identity import Pseudonymizer, normalize_user_id, org_of
from payi_guard.ledger.base import AsyncLedger, Charge, CounterState, Ledger, ReserveResult
from payi_guard.pricing import PriceBook, Rates, TokenUsage, UnknownModel
from payi_guard.usage import LimitState, LimitUsage, Scope, Unit
from payi_guard.windows import Window, WindowCache

if TYPE_CHECKING:
    from payi_guard.ledger.memory import MemoryLedger

__all__ = [
    "ANONYMOUS_USER",
    "BoundLimit",
    "CallRecord",
    "CallRequest",
    "Guard",
    "Reservation",
    "Subject",
    "UnknownModelRefused",
    "UserRequired",
]

ANONYMOUS_USER = "anonymous"
"""The user id that calls with no known user are charged to (``shared`` strategy)."""

_COUNTER_GRACE_SECONDS = 3600
_SCOPE_TAG: Mapping[Scope, str] = {
    "user": "u",
    "org": "o",
    "global": "g",
    "anonymous": "a",
    "limit_id": "l",
}


class UserRequired(BudgetExceeded):
    """A call with no known user was refused (anonymous strategy ``reject``).

    The middleware answers it with 401; through an SDK it arrives like any refusal.
    """


class UnknownModelRefused(PayiGuardError):
    """A call was refused because no price is known for its model (``unknown_model: block``).

    Attributes:
        model: the model name.
        provider: the provider.
    """

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        super().__init__(
            f"no price is known for model {model!r} (provider {provider!r}) and "
            "unknown_model is 'block': add it under `prices:` in the budgets file, or set "
            "`unknown_model` to 'allow' or to a fallback price"
        )


@dataclass(frozen=True, slots=True)
class BoundLimit:
    """A limit as it applies to one owner: whose counter, which scope."""

    spec: LimitSpec
    scope: Scope
    owner: str


@dataclass(frozen=True, slots=True)
class Subject:
    """Who a call is charged to.

    Attributes:
        user_id: the id charged and logged (the pseudonym when pseudonymisation is on).
        org_id: the org charged and logged, for composite ids.
        policy_user: the real user id, used to look up the user's limits.
        policy_org: the real org id, used to look up the org's limits.
        anonymous: True when no user was known.
    """

    user_id: str
    org_id: str | None
    policy_user: str | None
    policy_org: str | None
    anonymous: bool = False


@dataclass(frozen=True, slots=True)
class CallRequest:
    """What the meter knows about a GenAI call before it is sent.

    Attributes:
        model: the model (or Azure deployment) name.
        provider: ``openai``, ``anthropic``, ``azure`` or ``openai-compatible``.
        endpoint: ``chat``, ``responses``, ``embeddings``, ``completions`` or
            ``anthropic_messages``.
        input_tokens: an upper bound of the input tokens.
        max_output_tokens: an upper bound of the output tokens.
        stream: whether the response is streamed.
        cache_writes: whether the call may write a prompt cache (Anthropic
            ``cache_control``); cache-write rates then bound the input price.
        price_context: request facts that select a price variant, such as
            ``{"service_tier": "priority"}``.
    """

    model: str
    provider: str = "openai"
    endpoint: str = "chat"
    input_tokens: int = 0
    max_output_tokens: int = 0
    stream: bool = False
    cache_writes: bool = True
    price_context: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """The outcome of a settled, released or recorded call (what ``genai_call`` logs).

    Attributes:
        user_id: the user charged.
        org_id: the org charged, if any.
        model: the model.
        provider: the provider.
        usage: the token usage charged (``None`` for a release).
        cost_nano: the amount charged to the ledger, nano-USD.
        reserved_nano: the amount that was reserved before the call, nano-USD.
        outcome: ``ok``, ``error``, ``incomplete``, ``released`` or ``recorded``.
        latency_ms: wall time from reserve to settle.
        stream: whether the call streamed.
        priced: False when no price was known and nothing was charged in USD.
    """

    user_id: str
    org_id: str | None
    model: str
    provider: str
    usage: TokenUsage | None
    cost_nano: int
    reserved_nano: int
    outcome: str
    latency_ms: float
    stream: bool
    priced: bool = True

    @property
    def cost_usd(self) -> Decimal:
        """The amount charged, in dollars, exactly."""
        return Decimal(self.cost_nano) / NANO_USD


def _usd(nano: int) -> float:
    """Dollars as the float whose shortest repr is exactly ``nano`` / 1e9 (< $1e6)."""
    return float(Decimal(nano) / NANO_USD)


def _display(unit: Unit, amount: int) -> Decimal | int:
    return Decimal(amount) / NANO_USD if unit == "usd" else amount


def _log_number(unit: Unit, amount: int) -> float | int:
    return _usd(amount) if unit == "usd" else amount


@dataclass(slots=True)
class _Counter:
    """One deduplicated counter of a call: its key, window and the limits on it."""

    key: str
    unit: Unit
    window: Window
    limits: list[BoundLimit] = field(default_factory=list)
    enforced_max: int | None = None  # the smallest max of its block limits, set when built
    expires_at: float = 0.0

    def refusing_limit(self) -> BoundLimit:
        """The block limit with the smallest max: the one a refusal names."""
        blocking = [b for b in self.limits if b.spec.blocks]
        return min(blocking, key=lambda b: b.spec.max)


@dataclass(frozen=True, slots=True)
class _Spent:
    """A counter known to be spent for the rest of its window."""

    until: float
    settled: int
    counter: _Counter


def _tag_of(key: str) -> str:
    start = key.index("{") + 1
    return key[start : key.index("}", start)]


class _SpentCache:
    """Counters whose settled total reached their max: refused locally until the window ends.

    Settled totals only grow within a window, so an entry is never wrong until ``until``
    (a reload clears the cache, since limits may have changed). Entries are indexed by
    owner tag too, so a gate can tell in one dict lookup per owner that a user has nothing
    spent. Bounded: the oldest entries go first.
    """

    def __init__(self, maxsize: int) -> None:
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._items: dict[str, _Spent] = {}
        self._tags: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: str, spent: _Spent) -> None:
        with self._lock:
            if key not in self._items:
                tag = _tag_of(key)
                self._tags[tag] = self._tags.get(tag, 0) + 1
                while len(self._items) >= self._maxsize:
                    self._drop(next(iter(self._items)))
            self._items[key] = spent

    def _drop(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            tag = _tag_of(key)
            left = self._tags[tag] - 1
            if left:
                self._tags[tag] = left
            else:
                del self._tags[tag]

    def get(self, key: str, now: float) -> _Spent | None:
        spent = self._items.get(key)
        if spent is None:
            return None
        if now >= spent.until:
            with self._lock:
                if self._items.get(key) is spent:
                    self._drop(key)
            return None
        return spent

    def any_tag(self, tags: Iterable[str]) -> bool:
        known = self._tags
        return any(tag in known for tag in tags)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._tags.clear()


class _Runtime:
    """Everything derived from one config; swapped as a whole on reload."""

    def __init__(self, config: GuardConfig, policy_cache_size: int, clock: Clock) -> None:
        self.config = config
        self.prices = PriceBook(config.prices, config.unknown_model, clock=clock)
        self._lock = threading.Lock()
        self._policies: cachetools.LRUCache[
            tuple[str, str | None, bool, str], tuple[BoundLimit, ...]
        ]
        self._policies = cachetools.LRUCache(maxsize=policy_cache_size)

    def limits_for(self, subject: Subject) -> tuple[BoundLimit, ...]:
        key = (subject.user_id, subject.policy_user, subject.anonymous, subject.org_id or "")
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
            user = subject.policy_user
            specs = cfg.users[user] if user is not None and user in cfg.users else cfg.default
            bound.extend(BoundLimit(s, "user", subject.user_id) for s in specs)
        if subject.policy_org is not None and subject.org_id is not None:
            org_specs = cfg.orgs.get(subject.policy_org, ())
            bound.extend(BoundLimit(s, "org", subject.org_id) for s in org_specs)
        bound.extend(BoundLimit(s, "global", "*") for s in cfg.global_limits)
        return tuple(bound)

    def limit_id_bindings(self, limit_ids: Iterable[str]) -> list[BoundLimit]:
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


@dataclass(slots=True)
class _Plan:
    """A reservation about to be made: pure data, shared by the sync and async paths."""

    reservation_id: str
    subject: Subject
    attribution: Attribution
    call: CallRequest
    runtime: _Runtime
    counters: list[_Counter]
    charges: list[Charge]
    estimate_nano: int
    rates: Rates | None
    now: float


class Reservation:
    """An open reservation for one GenAI call; settle or release it exactly once.

    ``settle``/``release`` (and their async twins) are idempotent: the first call wins,
    later calls return the same :class:`CallRecord`.
    """

    def __init__(self, guard: Guard, plan: _Plan, *, held: bool) -> None:
        self._guard = guard
        self._plan = plan
        self._held = held
        self._lock = threading.Lock()
        self._claimed = False
        self._record: CallRecord | None = None
        self._started = guard.clock.monotonic()

    @property
    def user_id(self) -> str:
        """The user charged."""
        return self._plan.subject.user_id

    @property
    def org_id(self) -> str | None:
        """The org charged, if any."""
        return self._plan.subject.org_id

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
        return Decimal(self._plan.estimate_nano) / NANO_USD

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
            return True

    def settle(self, usage: TokenUsage, *, outcome: str = "ok") -> CallRecord | None:
        """Charge the actual usage and log ``genai_call``.

        Args:
            usage: the tokens the provider reported (or the best estimate of them).
            outcome: ``ok``, ``incomplete`` or ``error`` (a partial stream).

        Returns:
            The call record; for a reservation already settled or released, the first
            record, or ``None`` while that first settle is still running in another thread.
        """
        if not self._claim():
            return self._record
        amounts, cost, priced = self._guard._actual_amounts(self._plan, usage)
        states = self._guard._commit_sync(self._plan, amounts)
        return self._finish(usage, cost, priced, outcome, states, amounts)

    async def asettle(self, usage: TokenUsage, *, outcome: str = "ok") -> CallRecord | None:
        """Async :meth:`settle`."""
        if not self._claim():
            return self._record
        amounts, cost, priced = self._guard._actual_amounts(self._plan, usage)
        states = await self._guard._commit_async(self._plan, amounts)
        return self._finish(usage, cost, priced, outcome, states, amounts)

    def release(self, *, outcome: str = "released") -> CallRecord | None:
        """Give the reservation back without charging; log ``genai_call``."""
        if not self._claim():
            return self._record
        ok = self._guard._release_sync(self._plan, self._held)
        return self._finish(None, 0, True, outcome, () if ok else None, None)

    async def arelease(self, *, outcome: str = "released") -> CallRecord | None:
        """Async :meth:`release`."""
        if not self._claim():
            return self._record
        ok = await self._guard._release_async(self._plan, self._held)
        return self._finish(None, 0, True, outcome, () if ok else None, None)

    def _finish(
        self,
        usage: TokenUsage | None,
        cost: int,
        priced: bool,
        outcome: str,
        states: tuple[CounterState, ...] | None,
        amounts: list[int] | None,
    ) -> CallRecord:
        latency_ms = (self._guard.clock.monotonic() - self._started) * 1000.0
        record = CallRecord(
            user_id=self._plan.subject.user_id,
            org_id=self._plan.subject.org_id,
            model=self._plan.call.model,
            provider=self._plan.call.provider,
            usage=usage,
            cost_nano=cost,
            reserved_nano=self._plan.estimate_nano,
            outcome=outcome,
            latency_ms=round(latency_ms, 3),
            stream=self._plan.call.stream,
            priced=priced,
        )
        self._record = record
        self._guard._after_commit(self._plan, record, states, amounts)
        return record

    def __repr__(self) -> str:
        state = "done" if self.done else "open"
        return (
            f"Reservation(user_id={self.user_id!r}, model={self.call.model!r}, "
            f"reserved_usd={self.reserved_usd}, {state})"
        )


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
        if not key_prefix or any(c in key_prefix for c in "{} \n"):
            raise ValueError("key_prefix must be non-empty without braces or whitespace")
        self.clock: Clock = clock or SystemClock()
        self.key_prefix = key_prefix
        self.pseudonymizer = pseudonymizer
        self._storage_uri = storage or config.storage
        self._storage_options = dict(storage_options or {})
        self._policy_cache_size = policy_cache_size
        self._runtime = _Runtime(config, policy_cache_size, self.clock)
        self._windows = WindowCache()
        self._spent = _SpentCache(exhausted_cache_size)
        self._counter_cache: dict[
            tuple[int, str, bool, str | None, tuple[str, ...]],
            tuple[_Runtime, float, float, list[_Counter]],
        ] = {}
        # user id -> Subject; plain dict reads and writes are atomic, and a Subject depends
        # only on the id and the pseudonymizer, so no lock and no invalidation are needed.
        self._subjects: dict[str, Subject] = {}
        self._ledger_lock = threading.RLock()
        self._ledger: Ledger | None = None
        self._async_ledger: AsyncLedger | None = None
        self._default_user_id: str | None = None
        self._log = events.get_logger()
        self._watcher: _Watcher | None = None
        self._instrumented = False

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
        return self._runtime.config

    @property
    def storage_uri(self) -> str:
        """The storage URI in use."""
        return self._storage_uri

    @property
    def default_user_id(self) -> str | None:
        """The user charged when no context names one (set by :meth:`instrument`)."""
        return self._default_user_id

    @default_user_id.setter
    def default_user_id(self, value: object) -> None:
        self._default_user_id = None if value is None else normalize_user_id(value)

    # -- storage ------------------------------------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        """The synchronous ledger (opened on first use)."""
        ledger = self._ledger
        if ledger is None:
            with self._ledger_lock:
                if self._ledger is None:
                    from payi_guard.ledger.factory import open_ledger

                    self._ledger = open_ledger(self._storage_uri, **self._storage_options)
                ledger = self._ledger
        return ledger

    @property
    def async_ledger(self) -> AsyncLedger:
        """The async ledger (opened on first use; shares counters with :attr:`ledger`)."""
        ledger = self._async_ledger
        if ledger is None:
            with self._ledger_lock:
                if self._async_ledger is None:
                    from payi_guard.ledger.factory import open_async_ledger

                    shared: MemoryLedger | None = None
                    if self._storage_uri.startswith("memory"):
                        shared = self.ledger  # type: ignore[assignment]
                    self._async_ledger = open_async_ledger(
                        self._storage_uri, shared=shared, **self._storage_options
                    )
                ledger = self._async_ledger
        return ledger

    def close(self) -> None:
        """Stop the file watcher and close the sync storage client."""
        self.stop_watching()
        if self._ledger is not None:
            self._ledger.close()

    async def aclose(self) -> None:
        """Close both storage clients."""
        self.close()
        if self._async_ledger is not None:
            await self._async_ledger.aclose()

    # -- who is charged -----------------------------------------------------------------------

    def subject_for(self, attribution: Attribution | None = None) -> Subject:
        """Return who a call made with ``attribution`` (default: the current one) is charged to.

        Raises:
            UserRequired: no user is known and the anonymous strategy is ``reject``.
        """
        attribution = attribution if attribution is not None else get_context()
        user = attribution.user_id or self._default_user_id
        if user is not None:
            return self._subject_of(user)
        anonymous = self._runtime.config.anonymous
        if anonymous.strategy == "reject":
            raise UserRequired(ANONYMOUS_USER, self._reject_usage(), message=None)
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

    def _subject_of(self, user: str) -> Subject:
        subject = self._subjects.get(user)
        if subject is not None:
            return subject
        org = org_of(user)
        if self.pseudonymizer is None:
            subject = Subject(user, org, user, org)
        else:
            charged = self.pseudonymizer(user)
            subject = Subject(charged, org_of(charged), user, org)
        if len(self._subjects) >= self._policy_cache_size:
            self._subjects.clear()  # bounded; rebuilt from hot users in microseconds
        self._subjects[user] = subject
        return subject

    def _subject_by_id(self, user_id: str) -> Subject:
        """Return the subject a validated id names.

        ``anonymous`` (and ``anonymous:<session>``) is the anonymous bucket, as the users
        page and :meth:`usage` show it.
        """
        if user_id == ANONYMOUS_USER or user_id.startswith(ANONYMOUS_USER + ":"):
            return Subject(user_id, None, None, None, anonymous=True)
        return self._subject_of(user_id)

    def _reject_usage(self) -> LimitUsage:
        window = self._windows.get("day", "UTC", self.clock.now())
        return LimitUsage(
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

    # -- planning (pure) ----------------------------------------------------------------------

    def _counters(self, bound: Sequence[BoundLimit], now: float) -> list[_Counter]:
        by_key: dict[str, _Counter] = {}
        for b in bound:
            window = self._windows.get(b.spec.per, b.spec.timezone, now)
            tag = f"{_SCOPE_TAG[b.scope]}:{b.owner}"
            key = f"{self.key_prefix}:{{{tag}}}:{b.spec.unit}:{b.spec.per}:{window.start}"
            counter = by_key.get(key)
            if counter is None:
                counter = by_key[key] = _Counter(
                    key, b.spec.unit, window, expires_at=float(window.end + _COUNTER_GRACE_SECONDS)
                )
            counter.limits.append(b)
        for counter in by_key.values():
            maxes = [b.spec.max for b in counter.limits if b.spec.blocks]
            counter.enforced_max = min(maxes) if maxes else None
        return list(by_key.values())

    def _call_counters(
        self, runtime: _Runtime, subject: Subject, limit_ids: tuple[str, ...], now: float
    ) -> list[_Counter]:
        """The counters a call charges, reused while every window stays current.

        Counters (keys, windows, limits) depend only on the config, the subject, the
        limit ids and the windows in effect, so they are rebuilt only when one of those
        changes: most calls skip the key formatting and window lookups.
        """
        key = (id(runtime), subject.user_id, subject.anonymous, subject.org_id, limit_ids)
        cached = self._counter_cache.get(key)
        if cached is not None and cached[0] is runtime and cached[1] <= now < cached[2]:
            return cached[3]
        bound = list(runtime.limits_for(subject))
        bound.extend(runtime.limit_id_bindings(limit_ids))
        counters = self._counters(bound, now)
        if counters:
            start = max(c.window.start for c in counters)
            end = min(c.window.end for c in counters)
            if len(self._counter_cache) >= self._policy_cache_size:
                self._counter_cache.clear()  # bounded; hot subjects come back at once
            self._counter_cache[key] = (runtime, float(start), float(end), counters)
        return counters

    def _plan(self, call: CallRequest, attribution: Attribution | None) -> _Plan:
        if call.input_tokens < 0 or call.max_output_tokens < 0:
            raise ValueError("token estimates must not be negative")
        attribution = attribution if attribution is not None else get_context()
        subject = self.subject_for(attribution)
        runtime = self._runtime
        now = self.clock.now()
        counters = self._call_counters(runtime, subject, attribution.limit_ids, now)
        rates: Rates | None
        try:
            rates = runtime.prices.rates(
                call.model, call.provider, price_context=call.price_context
            )
        except UnknownModel:
            if runtime.config.unknown_model.action == "block":
                raise UnknownModelRefused(call.model, call.provider) from None
            rates = None
        estimate = (
            0
            if rates is None
            else rates.upper_bound_nano(
                call.input_tokens, call.max_output_tokens, cache_writes=call.cache_writes
            )
        )
        amounts = {
            "usd": estimate,
            "tokens": call.input_tokens + call.max_output_tokens,
            "requests": 1,
        }
        charges = [
            Charge(key=c.key, amount=amounts[c.unit], max=c.enforced_max, expires_at=c.expires_at)
            for c in counters
        ]
        return _Plan(
            reservation_id=new_id(),
            subject=subject,
            attribution=attribution,
            call=call,
            runtime=runtime,
            counters=counters,
            charges=charges,
            estimate_nano=estimate,
            rates=rates,
            now=now,
        )

    def _check_exhausted(self, plan: _Plan) -> None:
        """Refuse without a round trip when a counter is known to be spent for its window."""
        if not len(self._spent):
            return
        now = plan.now
        for counter, charge in zip(plan.counters, plan.charges, strict=True):
            if charge.max is None:
                continue
            spent = self._spent.get(counter.key, now)
            if spent is not None and spent.settled + charge.amount > charge.max:
                state = CounterState(settled=spent.settled, pending=0)
                self._refuse(plan, counter, state, charge.amount)

    def _interpret_reserve(self, plan: _Plan, result: ReserveResult) -> None:
        if result.ok:
            return
        index = result.refused if result.refused is not None else 0
        counter = plan.counters[index]
        state = result.states[index]
        self._remember_exhaustion(counter, state)
        self._refuse(plan, counter, state, plan.charges[index].amount)

    def _remember_exhaustion(self, counter: _Counter, state: CounterState) -> None:
        limit = counter.enforced_max
        if limit is not None and state.settled >= limit:
            self._spent.add(counter.key, _Spent(float(counter.window.end), state.settled, counter))

    def _refuse(self, plan: _Plan, counter: _Counter, state: CounterState, needed: int) -> None:
        bound = counter.refusing_limit()
        limit_usage = self._limit_usage(bound, counter.window, state)
        self._log.warning(
            events.BUDGET_EXCEEDED,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            limit=bound.spec.name,
            scope=bound.scope,
            unit=bound.spec.unit,
            used=_log_number(bound.spec.unit, state.used),
            max=_log_number(bound.spec.unit, bound.spec.max),
            needed=_log_number(bound.spec.unit, needed),
            resets_at=counter.window.resets_at.isoformat(),
            model=plan.call.model,
            request_id=plan.attribution.request_id,
        )
        retry_after = max(1.0, counter.window.end - plan.now)
        raise BudgetExceeded(plan.subject.user_id, limit_usage, retry_after)

    def _limit_usage(self, bound: BoundLimit, window: Window, state: CounterState) -> LimitUsage:
        spec = bound.spec
        used = state.used
        remaining = max(0, spec.max - used)
        status: LimitState = "ok"
        if used >= spec.max:
            status = "exceeded"
        elif spec.warn_at is not None and used * spec.warn_at.denominator >= (
            spec.max * spec.warn_at.numerator
        ):
            status = "warning"
        return LimitUsage(
            name=spec.name,
            scope=bound.scope,
            unit=spec.unit,
            used=_display(spec.unit, used),
            max=_display(spec.unit, spec.max),
            remaining=_display(spec.unit, remaining),
            resets_at=window.resets_at,
            state=status,
            type=spec.type,
            counter=bound.owner,
        )

    def _actual_amounts(self, plan: _Plan, usage: TokenUsage) -> tuple[list[int], int, bool]:
        priced = plan.rates is not None
        cost = 0
        if plan.rates is not None:
            cost = plan.runtime.prices.cost_with(plan.rates, usage)
        amounts = {"usd": cost, "tokens": usage.total_tokens, "requests": 1}
        return [amounts[c.unit] for c in plan.counters], cost, priced

    def _actual_charges(self, plan: _Plan, amounts: Sequence[int]) -> list[Charge]:
        return [
            Charge(key=ch.key, amount=amount, max=None, expires_at=ch.expires_at)
            for ch, amount in zip(plan.charges, amounts, strict=True)
        ]

    # -- storage calls with the failure policy -------------------------------------------------

    def _storage_failed(self, op: str, exc: BaseException, plan: _Plan | None) -> None:
        self._log.error(
            events.STORAGE_ERROR,
            op=op,
            error=str(exc),
            error_type=type(exc).__name__,
            policy=self._runtime.config.on_storage_error,
            user_id=plan.subject.user_id if plan is not None else None,
            storage=_redact_uri(self._storage_uri),
        )

    def _held_after_failure(self, plan: _Plan, exc: BaseException) -> bool:
        self._storage_failed("reserve", exc, plan)
        if self._runtime.config.on_storage_error == "block":
            if isinstance(exc, StorageError):
                raise exc
            raise StorageError(f"storage failed during reserve: {exc}") from exc
        return False

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
        self._check_exhausted(plan)
        held = True
        if plan.charges:
            try:
                result = self.ledger.reserve(
                    plan.reservation_id,
                    plan.charges,
                    now=plan.now,
                    ttl=plan.runtime.config.reservation_ttl,
                )
            except Exception as exc:
                held = self._held_after_failure(plan, exc)
            else:
                self._interpret_reserve(plan, result)
        return Reservation(self, plan, held=held)

    async def abegin(
        self, call: CallRequest, attribution: Attribution | None = None
    ) -> Reservation:
        """Async :meth:`begin`: never blocks the event loop."""
        plan = self._plan(call, attribution)
        self._check_exhausted(plan)
        held = True
        if plan.charges:
            try:
                result = await self.async_ledger.reserve(
                    plan.reservation_id,
                    plan.charges,
                    now=plan.now,
                    ttl=plan.runtime.config.reservation_ttl,
                )
            except Exception as exc:
                held = self._held_after_failure(plan, exc)
            else:
                self._interpret_reserve(plan, result)
        return Reservation(self, plan, held=held)

    def _commit_sync(self, plan: _Plan, amounts: Sequence[int]) -> tuple[CounterState, ...] | None:
        if not plan.charges:
            return ()
        try:
            return self.ledger.commit(
                plan.reservation_id, self._actual_charges(plan, amounts), now=self.clock.now()
            )
        except Exception as exc:
            self._storage_failed("commit", exc, plan)
            return None

    async def _commit_async(
        self, plan: _Plan, amounts: Sequence[int]
    ) -> tuple[CounterState, ...] | None:
        if not plan.charges:
            return ()
        try:
            return await self.async_ledger.commit(
                plan.reservation_id, self._actual_charges(plan, amounts), now=self.clock.now()
            )
        except Exception as exc:
            self._storage_failed("commit", exc, plan)
            return None

    def _release_sync(self, plan: _Plan, held: bool) -> bool:
        """Release; return False when the storage failed (logged)."""
        if not plan.charges or not held:
            return True
        try:
            self.ledger.release(
                plan.reservation_id, [c.key for c in plan.charges], now=self.clock.now()
            )
        except Exception as exc:
            self._storage_failed("release", exc, plan)
            return False
        return True

    async def _release_async(self, plan: _Plan, held: bool) -> bool:
        """Async :meth:`_release_sync`."""
        if not plan.charges or not held:
            return True
        try:
            await self.async_ledger.release(
                plan.reservation_id, [c.key for c in plan.charges], now=self.clock.now()
            )
        except Exception as exc:
            self._storage_failed("release", exc, plan)
            return False
        return True

    # -- after a commit: warnings, overruns, the genai_call line --------------------------

    def _after_commit(
        self,
        plan: _Plan,
        record: CallRecord,
        states: tuple[CounterState, ...] | None,
        amounts: Sequence[int] | None,
    ) -> None:
        if states and amounts is not None:
            for counter, state, amount in zip(plan.counters, states, amounts, strict=True):
                self._threshold_events(plan, counter, state, amount)
                self._remember_exhaustion(counter, state)
        self._log_call(plan, record, ledger_ok=states is not None)

    def _threshold_events(
        self, plan: _Plan, counter: _Counter, state: CounterState, amount: int
    ) -> None:
        after = state.settled
        before = after - amount
        if amount <= 0:
            return
        for bound in counter.limits:
            spec = bound.spec
            if spec.warn_at is not None:
                threshold_num = spec.max * spec.warn_at.numerator
                den = spec.warn_at.denominator
                # The one commit that moves the settled total across the threshold logs
                # it; settled totals only grow, so that is once per window, fleet-wide.
                if before * den < threshold_num <= after * den:
                    self._threshold_log(events.BUDGET_WARNING, plan, bound, counter, after)
            if before <= spec.max < after:
                self._threshold_log(events.BUDGET_OVERRUN, plan, bound, counter, after)

    def _threshold_log(
        self, event: str, plan: _Plan, bound: BoundLimit, counter: _Counter, used: int
    ) -> None:
        spec = bound.spec
        self._log.warning(
            event,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            limit=spec.name,
            scope=bound.scope,
            unit=spec.unit,
            type=spec.type,
            used=_log_number(spec.unit, used),
            max=_log_number(spec.unit, spec.max),
            resets_at=counter.window.resets_at.isoformat(),
            request_id=plan.attribution.request_id,
        )

    def _log_call(self, plan: _Plan, record: CallRecord, *, ledger_ok: bool) -> None:
        usage = record.usage
        attribution = plan.attribution
        fields: dict[str, Any] = {
            "user_id": record.user_id,
            "org_id": record.org_id,
            "account_name": attribution.account_name,
            "use_case_name": attribution.use_case_name,
            "limit_ids": list(attribution.limit_ids),
            "model": record.model,
            "provider": record.provider,
            "endpoint": plan.call.endpoint,
            "input_tokens": usage.input_tokens if usage else 0,
            "output_tokens": usage.output_tokens if usage else 0,
            "cache_read_tokens": usage.cache_read_tokens if usage else 0,
            "cache_write_tokens": usage.cache_write_tokens if usage else 0,
            "cost_usd": _usd(record.cost_nano),
            "reserved_usd": _usd(record.reserved_nano),
            "latency_ms": record.latency_ms,
            "stream": record.stream,
            "outcome": record.outcome,
            "request_id": attribution.request_id,
        }
        if attribution.use_case_id is not None:
            fields["use_case_id"] = attribution.use_case_id
        if not record.priced:
            fields["priced"] = False
        if not ledger_ok:
            fields["ledger"] = "failed"
        if record.cost_nano > record.reserved_nano and record.outcome != "recorded":
            fields["under_estimated_usd"] = _usd(record.cost_nano - record.reserved_nano)
        self._log.info(events.GENAI_CALL, **fields)

    # -- manual events ----------------------------------------------------------------------

    def _record_plan(
        self,
        user_id: object,
        model: str,
        provider: str,
        limit_ids: Sequence[str],
        use_case_name: str | None,
        request_id: str | None,
    ) -> _Plan:
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
        subject = self._subject_by_id(uid)
        runtime = self._runtime
        bound = list(runtime.limits_for(subject))
        bound.extend(runtime.limit_id_bindings(attribution.limit_ids))
        rates: Rates | None
        try:
            rates = runtime.prices.rates(model, provider)
        except UnknownModel:
            rates = None
        now = self.clock.now()
        counters = self._counters(bound, now)
        charges = [
            Charge(c.key, 0, None, float(c.window.end + _COUNTER_GRACE_SECONDS)) for c in counters
        ]
        return _Plan(
            reservation_id="record-" + new_id(),
            subject=subject,
            attribution=attribution,
            call=CallRequest(model=model, provider=provider, endpoint="record"),
            runtime=runtime,
            counters=counters,
            charges=charges,
            estimate_nano=0,
            rates=rates,
            now=now,
        )

    def _record_amounts(
        self, plan: _Plan, usage: TokenUsage, cost_usd: object
    ) -> tuple[list[int], int, bool]:
        if cost_usd is None:
            amounts, cost, priced = self._actual_amounts(plan, usage)
            if not priced:
                self._log.warning(
                    "unknown_model",
                    model=plan.call.model,
                    provider=plan.call.provider,
                    user_id=plan.subject.user_id,
                    detail="recorded without a USD cost: no price is known for this model",
                )
            return amounts, cost, priced
        cost = _parse_usd(cost_usd)
        by_unit = {"usd": cost, "tokens": usage.total_tokens, "requests": 1}
        return [by_unit[c.unit] for c in plan.counters], cost, True

    def _recorded(
        self,
        plan: _Plan,
        usage: TokenUsage,
        cost: int,
        priced: bool,
        states: tuple[CounterState, ...] | None,
        amounts: list[int],
    ) -> CallRecord:
        """Log a committed manual event (thresholds, ``genai_call``) and return its record."""
        reservation = Reservation(self, plan, held=False)
        reservation._claim()
        return reservation._finish(usage, cost, priced, "recorded", states, amounts)

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
        amounts, cost, priced = self._record_amounts(plan, usage, cost_usd)
        states = self._commit_sync(plan, amounts)
        return self._recorded(plan, usage, cost, priced, states, amounts)

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
        amounts, cost, priced = self._record_amounts(plan, usage, cost_usd)
        states = await self._commit_async(plan, amounts)
        return self._recorded(plan, usage, cost, priced, states, amounts)

    # -- reading usage ---------------------------------------------------------------------------

    def _usage_plan(
        self, user_id: object, limit_ids: Sequence[str]
    ) -> tuple[Subject, list[BoundLimit], list[_Counter]]:
        subject = self._subject_by_id(
            ANONYMOUS_USER if user_id is None else normalize_user_id(user_id)
        )
        runtime = self._runtime
        bound = list(runtime.limits_for(subject))
        bound.extend(runtime.limit_id_bindings(limit_ids))
        return subject, bound, self._counters(bound, self.clock.now())

    def _usages(
        self, bound: list[BoundLimit], counters: list[_Counter], states: Sequence[CounterState]
    ) -> list[LimitUsage]:
        state_of = {c.key: s for c, s in zip(counters, states, strict=True)}
        counter_of = {id(b): c for c in counters for b in c.limits}
        out = []
        for b in bound:
            counter = counter_of[id(b)]
            out.append(self._limit_usage(b, counter.window, state_of[counter.key]))
        return out

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
        _, bound, counters = self._usage_plan(user_id, limit_ids)
        if not counters:
            return []
        states = self.ledger.read([c.key for c in counters], now=self.clock.now())
        return self._usages(bound, counters, states)

    async def ausage(self, user_id: object, *, limit_ids: Sequence[str] = ()) -> list[LimitUsage]:
        """Async :meth:`usage`."""
        _, bound, counters = self._usage_plan(user_id, limit_ids)
        if not counters:
            return []
        states = await self.async_ledger.read([c.key for c in counters], now=self.clock.now())
        return self._usages(bound, counters, states)

    def _blocking(self, usages: Iterable[LimitUsage]) -> LimitUsage | None:
        exhausted = [u for u in usages if u.type == "block" and u.state == "exceeded"]
        if not exhausted:
            return None
        return max(exhausted, key=lambda u: u.resets_at)

    def _gate_plan(
        self, attribution: Attribution | None
    ) -> tuple[list[BoundLimit], list[_Counter]]:
        attribution = attribution if attribution is not None else get_context()
        subject = self.subject_for(attribution)
        runtime = self._runtime
        bound = list(runtime.limits_for(subject))
        bound.extend(runtime.limit_id_bindings(attribution.limit_ids))
        return bound, self._counters(bound, self.clock.now())

    def _owner_tags(self, attribution: Attribution) -> list[str]:
        subject = self.subject_for(attribution)
        tags = [f"{'a' if subject.anonymous else 'u'}:{subject.user_id}", "g:*"]
        if subject.org_id is not None:
            tags.append(f"o:{subject.org_id}")
        tags.extend(f"l:{limit_id}" for limit_id in attribution.limit_ids)
        return tags

    def _cached_exhausted(self, attribution: Attribution | None) -> LimitUsage | None:
        attribution = attribution if attribution is not None else get_context()
        # subject_for runs first: an anonymous caller under `reject` is refused here.
        tags = self._owner_tags(attribution)
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
            usages.extend(self._limit_usage(b, counter.window, state) for b in counter.limits)
        return self._blocking(usages)

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
        return self._blocking(self._usages(bound, counters, states))

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
        return self._blocking(self._usages(bound, counters, states))

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
        if new.storage != self.config.storage and new.storage != self._storage_uri:
            self._log.warning(
                events.CONFIG_RELOADED,
                detail="the storage URI changed; it takes effect after a restart",
            )
        self._runtime = _Runtime(new, self._policy_cache_size, self.clock)
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
            self._watcher = _Watcher(self, self.config.source, interval)
            self._watcher.start()

    def stop_watching(self) -> None:
        """Stop the file watcher started by :meth:`watch`."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # -- SDK integration -----------------------------------------------------------------------

    def wrap(self, client: Any, **options: Any) -> Any:
        """Guard one OpenAI / Anthropic / httpx / httpx2 client and return it.

        See :func:`payi_guard.meter.wrap` for the options.
        """
        from payi_guard.meter import wrap

        return wrap(self, client, **options)

    def instrument(self, default_user_id: object = None, **options: Any) -> Guard:
        """Guard every OpenAI and Anthropic client, existing and future (idempotent).

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
        self._instrumented = True
        return self

    def uninstrument(self) -> None:
        """Undo :meth:`instrument` (idempotent)."""
        from payi_guard.meter import uninstrument

        uninstrument(self)
        self._instrumented = False

    def __repr__(self) -> str:
        return f"Guard(storage={_redact_uri(self._storage_uri)!r}, source={self.config.source!r})"


def _parse_usd(value: object) -> int:
    """Dollars (Decimal, str, int or float) to nano-USD, rounded up; never negative."""
    if isinstance(value, bool):
        raise ValueError("cost_usd must be a number")
    try:
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)  # type: ignore[arg-type]
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise ValueError(f"cost_usd must be a number, not {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError("cost_usd must be a finite number >= 0")
    nano = amount * NANO_USD
    return int(nano.to_integral_value(rounding="ROUND_CEILING"))


def _redact_uri(uri: str) -> str:
    """Hide a password in a storage URI before it reaches a log line."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest:
        return uri
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if user else '***'}@{host}"


class _Watcher:
    """Polls a config file's mtime and reloads the guard when it changes."""

    def __init__(self, guard: Guard, path: str, interval: float) -> None:
        self._guard = guard
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="payi-guard-watch", daemon=True)
        self._mtime = self._stat()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def poll(self) -> bool:
        """Reload if the file changed; return True when a reload was attempted."""
        current = self._stat()
        if current is None or current == self._mtime:
            return False
        self._mtime = current
        self._guard.reload(self._path)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()
