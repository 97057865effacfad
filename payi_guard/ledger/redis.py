"""Redis (and Valkey) ledgers: one Lua script per reserve and per commit.

:class:`RedisLedger` drives a redis-py client, :class:`AsyncRedisLedger` a
``redis.asyncio`` one; both run the same scripts (``payi_guard/ledger/lua/``, each
prefixed with ``lib.lua``) through ``register_script`` (EVALSHA, loading the script
on NOSCRIPT), and both build their calls and read the replies with the same code, so
on a single server every reserve, commit, release, renew and read is exactly one round
trip (``renew_many`` too, for any number of reservations). ``scan`` (discovering whose
counters exist; never on a call's path) is a plain ``SCAN ... MATCH ... TYPE hash``, one
round trip per 1000 keys the server visits.

Layout, per counter key ``K`` (chosen by the caller, with a ``{...}`` hash tag):

* hash ``K``: field ``s`` = settled, field ``p`` = pending (the sum of the open
  reservations), field ``f`` = what the last reserve this counter refused needed (gone
  once a reserve on it fits), and one field ``r:<id>`` per open reservation holding its
  amount;
* sorted set ``K:x``: ``r:<id>`` -> the reservation's deadline, so expired reservations
  are found without a scan;
* sorted set ``K:d``: ``<id>`` -> until when the id is remembered as closed (committed
  or released). All three keys share the hash tag, hence the cluster slot.

Clocks: every script reads the server's clock (``TIME``) for reservation deadlines and
closed ids, so hosts whose clocks disagree agree on them. The caller's ``now`` only sets
the counters' lifetime: ``K`` and ``K:x`` get a ``PEXPIRE`` of ``expires_at - now``
whenever a reserve or commit writes them (relative, since Redis expires keys by its own
clock); ``K:d`` lives ``closed_ttl`` from its last write. No counter key may be another
counter key plus ``:x`` or ``:d``. Reserving an id that is already open on a key
replaces its amount and deadline there, so a retried reserve is not counted twice.
Amounts are compared in Lua doubles, hence the ``2**53 - 1`` cap enforced on every
amount and max (:class:`~payi_guard.ledger.CapacityExceeded`).

Failures: any Redis or socket error is raised as :class:`~payi_guard.StorageError`
with the cause chained, or as :class:`~payi_guard.ledger.StorageOutcomeUnknown` when the
request was sent and its reply lost (then the operation may have been applied; commits
and releases are idempotent per id, so retrying them is safe). The ledger never retries
on its own. Clients built by :mod:`payi_guard.ledger.factory` bound each operation's
total wait (free connection, connect, handshake, reply) to twice the socket timeout
(0.25 s by default), detect a server restart when connections are made again (a marker
key; see :class:`~payi_guard.ledger.StorageEvent`), and are shared per process (and per
event loop). For a client built elsewhere, errors whose timing cannot be known are
reported as unknown outcomes. A connection that the server closed is detected when it
is taken from the pool, and scripts are loaded again on NOSCRIPT, so the same ledger
works again once the server is back.

Cluster mode (``group_by_slot``, automatic for a ``RedisCluster`` client): one script
can only touch keys of one slot, so the charges are grouped by hash slot (keys of one
user share a tag, hence a slot) and reserved group by group, one round trip each. If a
group refuses, the groups already reserved are rolled back, and the groups not yet tried
are read so that every state is reported and ``refused`` is the first charge that does
not fit. If a group fails with a storage error, the groups already reserved are rolled
back on a best-effort basis (what a failed rollback leaves is freed by the
reservation's ttl) and the error is raised. Each counter's check-and-add stays atomic,
so a ``max`` is never exceeded; what is lost is atomicity across slots: two concurrent
multi-slot reserves may both be refused where one alone would have fitted, and the
counter that records a refusal's ``refused`` amount is the first that refused in its
own slot, which may come after the charge reported as ``refused`` (and the groups
reserved, then rolled back, have cleared their counters' ``refused``). Commits,
releases, renewals and reads run group by group too; if a commit fails part-way, the
groups before the failure stay committed and a retry completes the others (each key
applies an id once). Every key must carry a non-empty ``{...}`` hash tag in this mode.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import threading
import weakref
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from payi_guard.exceptions import MissingDependency, StorageError
from payi_guard.ledger._adjust import (
    check_adjust,
    check_journal_read,
    decode_entry,
    out_of_range,
)
from payi_guard.ledger._checks import (
    check_charges,
    check_closed_ttl,
    check_id,
    check_keys,
    check_now,
    check_renewals,
    check_scan,
    check_ttl,
)
from payi_guard.ledger._redisconn import StoreWatch, budget, was_sent
from payi_guard.ledger.base import (
    DEFAULT_CLOSED_TTL,
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    StorageEvent,
    StorageOutcomeUnknown,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import redis as redis_
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.cluster as cluster_

    SyncClient: TypeAlias = redis_.Redis | cluster_.RedisCluster
    AsyncClient: TypeAlias = aioredis.Redis | aiocluster.RedisCluster

__all__ = ["CLOSED_SUFFIX", "INDEX_SUFFIX", "AsyncRedisLedger", "RedisLedger", "import_redis"]

INDEX_SUFFIX = ":x"
"""Appended to a counter key to name its reservation index (keeps the hash tag)."""

CLOSED_SUFFIX = ":d"
"""Appended to a counter key to name its set of closed ids (keeps the hash tag)."""

EventCallback = Callable[[StorageEvent], object]

_SCRIPT_NAMES = ("reserve", "commit", "read", "renew", "adjust")
_ZERO = CounterState(0, 0)
_SCAN_COUNT = 1000
"""The ``COUNT`` hint of each ``SCAN`` call: keys the server visits per round trip."""

T = TypeVar("T")
_Call = tuple[str, list[str], list[str]]
"""One script run: script name, KEYS, ARGV."""
_Plan = Generator[_Call, Any, T]
"""A sans-IO operation: yields script runs, receives their replies, returns a result."""


def import_redis() -> ModuleType:
    """Import redis-py, which is an optional dependency.

    Returns:
        The ``redis`` module.

    Raises:
        MissingDependency: naming the ``redis`` extra when redis-py is not installed.
    """
    try:
        import redis
        import redis.cluster
    except ImportError as exc:
        raise MissingDependency("redis", "redis") from exc
    return redis


@functools.cache
def _script_source(name: str) -> str:
    lua = resources.files("payi_guard.ledger").joinpath("lua")
    prelude = lua.joinpath("lib.lua").read_text(encoding="utf-8")
    return prelude + "\n" + lua.joinpath(f"{name}.lua").read_text(encoding="utf-8")


# -- encoding calls and decoding replies (shared by sync and async) ---------------------


def _seconds(value: float) -> str:
    return repr(float(value))


def _ttl_millis(expires_at: float, now: float) -> str:
    # Relative: Redis expires keys by its own clock, so an absolute time computed on this
    # host (or a test's fake clock) would be wrong by the difference between the clocks.
    return str(math.ceil((expires_at - now) * 1000))  # <= 0 deletes the key at once


def _script_keys(keys: Sequence[str]) -> list[str]:
    out: list[str] = []
    for key in keys:
        out += (key, key + INDEX_SUFFIX, key + CLOSED_SUFFIX)
    return out


def _reserve_call(rid: str, charges: Sequence[Charge], now: float, ttl: float) -> _Call:
    args = [rid, _seconds(ttl)]
    for charge in charges:
        args.append(str(charge.amount))
        args.append("" if charge.max is None else str(charge.max))
        args.append(_ttl_millis(charge.expires_at, now))
    return ("reserve", _script_keys([charge.key for charge in charges]), args)


def _commit_call(rid: str, charges: Sequence[Charge], now: float, keep: float) -> _Call:
    args = [rid, _seconds(keep)]
    for charge in charges:
        args.append(str(charge.amount))
        args.append(_ttl_millis(charge.expires_at, now))
    return ("commit", _script_keys([charge.key for charge in charges]), args)


def _release_call(rid: str, keys: Sequence[str], keep: float) -> _Call:
    args = [rid, _seconds(keep)]
    for _ in keys:
        args += ("0", "")
    return ("commit", _script_keys(keys), args)


def _read_call(keys: Sequence[str]) -> _Call:
    return ("read", _script_keys(keys), [])


def _renew_call(reservations: Sequence[tuple[str, Sequence[str]]], ttl: float) -> _Call:
    keys: list[str] = []
    args = [_seconds(ttl)]
    for rid, rkeys in reservations:
        keys += _script_keys(rkeys)
        args += (rid, str(len(rkeys)))
    return ("renew", keys, args)


def _bad_reply(reply: Any) -> StorageError:
    return StorageError(f"unexpected reply from a ledger script: {reply!r:.200}")


def _decode_states(reply: Any, count: int, offset: int = 0) -> tuple[CounterState, ...]:
    """``count`` states (settled, pending, refused) from ``reply[offset:]``."""
    if not isinstance(reply, list) or len(reply) != offset + 3 * count:
        raise _bad_reply(reply)
    try:
        return tuple(
            CounterState(*(int(reply[offset + 3 * i + j]) for j in range(3))) for i in range(count)
        )
    except (TypeError, ValueError) as exc:
        raise _bad_reply(reply) from exc


def _decode_reserve(reply: Any, count: int) -> ReserveResult:
    states = _decode_states(reply, count, offset=2)
    if reply[0] == 1:
        return ReserveResult(True, None, states)
    if reply[0] == -1:
        return ReserveResult(False, None, states, closed=True)
    return ReserveResult(False, int(reply[1]), states)


def _decode_flags(reply: Any, count: int) -> tuple[bool, ...]:
    if not isinstance(reply, list) or len(reply) != count:
        raise _bad_reply(reply)
    return tuple(flag == 1 for flag in reply)


# -- slot grouping (cluster mode) --------------------------------------------------------


def _slot_groups(keys: Sequence[str]) -> list[list[int]]:
    """Indices of ``keys`` grouped by cluster hash slot, in order of first appearance."""
    from redis.crc import key_slot

    groups: dict[int, list[int]] = {}
    for index, key in enumerate(keys):
        start = key.find("{")
        end = key.find("}", start + 1) if start >= 0 else -1
        if start < 0 or end <= start + 1:
            raise ValueError(
                f"key {index} has no {{hash tag}}: in cluster mode every counter key must "
                "carry one so that its reservation index lands in the same slot"
            )
        groups.setdefault(key_slot(key.encode("utf-8")), []).append(index)
    return list(groups.values())


def _place(states: list[CounterState], group: Sequence[int], part: Sequence[CounterState]) -> None:
    for index, state in zip(group, part, strict=True):
        states[index] = state


def _groups(keys: Sequence[str], grouped: bool) -> list[list[int]] | None:
    """The slot groups to run separately, or ``None`` when one script run does it."""
    if not grouped:
        return None
    groups = _slot_groups(keys)
    return groups if len(groups) > 1 else None


# -- operations as plans (shared by sync and async) --------------------------------------


def _rollback(rid: str, keys: Sequence[str], now: float) -> _Call:
    # A rollback of this very reserve: not a close (``keep`` of 0 remembers nothing).
    return ("commit", _script_keys(keys), [rid, "0", *(["0", ""] * len(keys))])


def _undo(rid: str, keys: Sequence[str], done: Sequence[Sequence[int]], now: float) -> _Plan[None]:
    """Best-effort rollback of the groups already reserved, after a storage error."""
    for group in done:
        try:
            yield _rollback(rid, [keys[i] for i in group], now)
        except StorageError:
            return  # the reservation's ttl gives that budget back


def _reserve_plan(
    rid: str, charges: Sequence[Charge], now: float, ttl: float, grouped: bool
) -> _Plan[ReserveResult]:
    keys = [charge.key for charge in charges]
    groups = _groups(keys, grouped)
    if groups is None:
        reply = yield _reserve_call(rid, charges, now, ttl)
        return _decode_reserve(reply, len(charges))

    states = [_ZERO] * len(charges)
    done: list[list[int]] = []
    for position, group in enumerate(groups):
        part = [charges[i] for i in group]
        try:
            reply = yield _reserve_call(rid, part, now, ttl)
        except StorageError:
            yield from _undo(rid, keys, done, now)
            raise
        result = _decode_reserve(reply, len(part))
        _place(states, group, result.states)
        if result.ok:
            done.append(group)
            continue
        for reserved in done:
            reply = yield _rollback(rid, [keys[i] for i in reserved], now)
            _place(states, reserved, _decode_states(reply, len(reserved)))
        untried = [i for later in groups[position + 1 :] for i in later]
        if result.closed:
            return ReserveResult(False, None, tuple(states), closed=True)
        if result.refused is None:  # pragma: no cover - the script always names it
            raise StorageError("a refused reserve did not name the charge")
        refused = group[result.refused]
        # The groups never tried are read, so every state is reported and the refused
        # index is the first charge that does not fit, as in the single-script case.
        for later in groups[position + 1 :]:
            reply = yield _read_call([keys[i] for i in later])
            _place(states, later, _decode_states(reply, len(later)))
        for i in untried:
            limit = charges[i].max
            if i < refused and limit is not None and states[i].used + charges[i].amount > limit:
                refused = i
        return ReserveResult(False, refused, tuple(states))
    return ReserveResult(True, None, tuple(states))


def _per_group(
    calls: Callable[[list[int]], _Call], keys: Sequence[str], grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    """Run one script per slot group (or one for all) and gather the states in order."""
    groups = _groups(keys, grouped)
    if groups is None:
        reply = yield calls(list(range(len(keys))))
        return _decode_states(reply, len(keys))
    states = [_ZERO] * len(keys)
    for group in groups:
        reply = yield calls(group)
        _place(states, group, _decode_states(reply, len(group)))
    return tuple(states)


def _commit_plan(
    rid: str, charges: Sequence[Charge], now: float, keep: float, grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    def call(group: list[int]) -> _Call:
        return _commit_call(rid, [charges[i] for i in group], now, keep)

    return _per_group(call, [charge.key for charge in charges], grouped)


def _release_plan(
    rid: str, keys: Sequence[str], keep: float, grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    def call(group: list[int]) -> _Call:
        return _release_call(rid, [keys[i] for i in group], keep)

    return _per_group(call, keys, grouped)


def _read_plan(keys: Sequence[str], grouped: bool) -> _Plan[tuple[CounterState, ...]]:
    return _per_group(lambda group: _read_call([keys[i] for i in group]), keys, grouped)


def _renew_plan(
    reservations: Sequence[tuple[str, Sequence[str]]], ttl: float, grouped: bool
) -> _Plan[tuple[bool, ...]]:
    if not reservations:
        return ()
    every = [key for _, keys in reservations for key in keys]
    if not grouped or _groups(every, grouped) is None:
        reply = yield _renew_call(reservations, ttl)
        return _decode_flags(reply, len(reservations))
    from redis.crc import key_slot

    _slot_groups(every)  # refuses a key without a hash tag
    by_slot: dict[int, list[tuple[int, str, list[str]]]] = {}
    for position, (rid, keys) in enumerate(reservations):
        parts: dict[int, list[str]] = {}
        for key in keys:
            parts.setdefault(key_slot(key.encode("utf-8")), []).append(key)
        for slot, part in parts.items():
            by_slot.setdefault(slot, []).append((position, rid, part))
    alive = [True] * len(reservations)
    for entries in by_slot.values():
        reply = yield _renew_call([(rid, part) for _, rid, part in entries], ttl)
        for (position, _, _), flag in zip(entries, _decode_flags(reply, len(entries)), strict=True):
            alive[position] = alive[position] and flag
    return tuple(alive)


def _adjust_call(
    adjustments: Sequence[Adjustment],
    now: float,
    journal: str,
    keep: int,
    journal_expires_at: float,
) -> _Call:
    args = [_seconds(now), str(keep), _ttl_millis(journal_expires_at, now)]
    for item in adjustments:
        args.append("" if item.amount is None else str(item.amount))
        args.append(_ttl_millis(item.expires_at, now))
        args.append(item.note)
    return ("adjust", [item.key for item in adjustments] + [journal], args)


def _adjust_plan(
    adjustments: Sequence[Adjustment],
    now: float,
    journal: str,
    keep: int,
    journal_expires_at: float,
) -> _Plan[tuple[JournalEntry, ...]]:
    # Every key shares the journal's hash tag (checked): one slot, one script run.
    reply = yield _adjust_call(adjustments, now, journal, keep, journal_expires_at)
    if not isinstance(reply, list) or not reply:
        raise StorageError(f"unexpected reply from the adjust script: {reply!r:.200}")
    try:
        if reply[0] == 0 and len(reply) == 3:
            raise out_of_range(int(reply[1]), int(reply[2]))
        if reply[0] != 1 or len(reply) != 1 + 3 * len(adjustments):
            raise StorageError(f"unexpected reply from the adjust script: {reply!r:.200}")
        return tuple(
            JournalEntry(
                float(_seconds(now)),
                item.key,
                int(reply[3 * i + 1]),
                int(reply[3 * i + 2]),
                int(reply[3 * i + 3]),
                item.note,
            )
            for i, item in enumerate(adjustments)
        )
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(exc).startswith("adjustment "):
            raise
        raise StorageError(f"unexpected reply from the adjust script: {reply!r:.200}") from exc


def _journal_entries(raw: Any) -> tuple[JournalEntry, ...]:
    """The entries of an ``LRANGE`` reply (malformed ones are skipped)."""
    if not isinstance(raw, list):
        raise StorageError(f"unexpected reply to LRANGE: {raw!r:.200}")
    entries = (decode_entry(_key_text(item)) for item in raw)
    return tuple(entry for entry in entries if entry is not None)


def _key_text(raw: bytes | str) -> str:
    """A key as returned by redis-py (bytes, or str with ``decode_responses``) as text."""
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


def _collect(found: dict[str, None], raw: bytes | str, limit: int | None) -> bool:
    """Add a scanned key (SCAN may return a key twice); True once ``limit`` is reached."""
    found.setdefault(_key_text(raw))
    return limit is not None and len(found) >= limit


def _error_types(redis: ModuleType) -> tuple[type[BaseException], ...]:
    # RedisClusterException (a cross-slot call, no reachable node) is not a RedisError.
    return (redis.RedisError, redis.exceptions.RedisClusterException, OSError)


@dataclass
class _Wiring:
    """How a ledger's client was made (by the factory) and what it adds."""

    watch: StoreWatch | None = None
    budget: float | None = None
    tagged: bool = False
    """The client's connections tag errors raised after a request was sent."""
    on_event: EventCallback | None = None
    ambiguous: tuple[type[BaseException], ...] = field(default_factory=tuple)


def _wiring(
    redis: ModuleType, watch: StoreWatch | None, budget_: float | None, tagged: bool
) -> _Wiring:
    return _Wiring(
        watch, budget_, tagged, None, (redis.ConnectionError, redis.TimeoutError, OSError)
    )


def _storage_error(name: str, exc: BaseException, wiring: _Wiring) -> StorageError:
    message = f"Redis ledger {name} failed: {type(exc).__name__}: {exc}"
    if was_sent(exc) or (not wiring.tagged and isinstance(exc, wiring.ambiguous)):
        return StorageOutcomeUnknown(message)
    return StorageError(message)


def _budget_of(client: Any) -> float | None:
    """What each phase of an operation may take: its client's socket timeout.

    The phases are getting a connection, then the requests (None: no timeout).
    """
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    timeout = kwargs.get("socket_timeout")
    return None if timeout is None else float(timeout)


def _deliver(wiring: _Wiring, seen: int) -> int:
    watch = wiring.watch
    if watch is None or wiring.on_event is None or watch.seq == seen:
        return seen
    watch.deliver(wiring.on_event)
    return watch.seq


# -- sync ---------------------------------------------------------------------------------


class RedisLedger:
    """A :class:`~payi_guard.ledger.Ledger` on Redis or Valkey (redis-py, sync).

    Safe to share between threads (redis-py's connection pool is). Build one from a URI
    with :func:`payi_guard.ledger.factory.open_ledger`, which also sets short timeouts,
    bounds every wait, shares the client and watches the store's marker.

    Args:
        client: a ``redis.Redis`` (single server, Sentinel master) or
            ``redis.cluster.RedisCluster``; :meth:`close` closes it.
        group_by_slot: split multi-key operations by cluster hash slot; ``None`` (the
            default) does so exactly when ``client`` is a ``RedisCluster``.
        closed_ttl: seconds each counter remembers a committed or released id.
        on_event: called with each :class:`~payi_guard.ledger.StorageEvent` (a store
            that is new or lost its data) at the end of the first operation after it
            was seen (factory-built ledgers only). It must not block; what it raises is
            logged and ignored.

    Raises:
        MissingDependency: when redis-py is not installed.
        ValueError: when ``closed_ttl`` is not a positive number.
    """

    def __init__(
        self,
        client: SyncClient,
        *,
        group_by_slot: bool | None = None,
        closed_ttl: float = DEFAULT_CLOSED_TTL,
        on_event: EventCallback | None = None,
    ) -> None:
        redis = import_redis()
        check_closed_ttl(closed_ttl)
        self._client = client
        self._errors: tuple[type[BaseException], ...] = _error_types(redis)
        if group_by_slot is None:
            group_by_slot = isinstance(client, redis.cluster.RedisCluster)
        self._grouped = group_by_slot
        self._closed_ttl = float(closed_ttl)
        self._scripts = {
            name: client.register_script(_script_source(name)) for name in _SCRIPT_NAMES
        }
        self._wiring = _wiring(redis, None, _budget_of(client), False)
        self._on_event = on_event
        self._seen = 0
        self._shared = False
        self._release: Callable[[], None] | None = None

    def _attach(self, wiring: _Wiring, release: Callable[[], None]) -> None:
        """Adopt a factory-made, shared client: its wiring, and how to give it back."""
        wiring.on_event = self._on_event
        wiring.budget = _budget_of(self._client)
        self._wiring = wiring
        self._shared = True
        self._release = release
        if wiring.watch is not None and self._on_event is not None:
            wiring.watch.subscribe(self._on_event)
            self._seen = wiring.watch.seq

    @property
    def client(self) -> SyncClient:
        """The redis-py client the ledger runs on."""
        return self._client

    def __repr__(self) -> str:
        return f"RedisLedger({self._client!r}, group_by_slot={self._grouped})"

    def _execute(self, call: _Call) -> Any:
        name, keys, args = call
        try:
            with budget(self._wiring.budget):
                return self._scripts[name](keys=keys, args=args)
        except self._errors as exc:
            raise _storage_error(name, exc, self._wiring) from exc

    def _run(self, plan: _Plan[T]) -> T:
        try:
            call = next(plan)
            while True:
                try:
                    reply = self._execute(call)
                except StorageError as exc:
                    call = plan.throw(exc)
                else:
                    call = plan.send(reply)
        except StopIteration as stop:
            return cast("T", stop.value)
        finally:
            self._seen = _deliver(self._wiring, self._seen)

    def reserve(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float, ttl: float
    ) -> ReserveResult:
        """Reserve every charge or none, in one script run (one per slot in cluster mode).

        Args:
            reservation_id: a fresh id naming this reservation.
            charges: one per counter (each key at most once).
            now: the current time, epoch seconds (sets the counters' lifetime).
            ttl: seconds, on the server's clock, the reservation holds budget unless it
                is renewed, committed or released.

        Returns:
            The outcome; when refused (or ``closed``), no counter was changed.

        Raises:
            ValueError: on invalid input (see :class:`~payi_guard.ledger.MemoryLedger`);
                :class:`~payi_guard.ledger.CapacityExceeded` for an amount or max above
                what a counter holds.
            StorageOutcomeUnknown: the request was sent and its reply lost.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_ttl(ttl)
        return self._run(_reserve_plan(reservation_id, charges, now, ttl, self._grouped))

    def commit(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float
    ) -> tuple[CounterState, ...]:
        """Close the reservation (if open) and add the actual amounts, in one script run.

        Idempotent per id and key: a commit (or release) already applied there changes
        nothing, so a commit whose outcome was unknown can be retried.

        Args:
            reservation_id: the id given to :meth:`reserve` (or any id for a record).
            charges: the actual amounts, on the keys that were reserved (``max`` ignored).
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the commit.

        Raises:
            ValueError: on invalid input.
            StorageOutcomeUnknown: the request was sent and its reply lost.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        plan = _commit_plan(reservation_id, charges, now, self._closed_ttl, self._grouped)
        return self._run(plan)

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything (a commit of zero).

        Idempotent like :meth:`commit`; the id is closed even where it was never
        reserved, so a reserve of it that arrives later holds nothing.

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the release.

        Raises:
            ValueError: on invalid input.
            StorageOutcomeUnknown: the request was sent and its reply lost.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        return self._run(_release_plan(reservation_id, keys, self._closed_ttl, self._grouped))

    def renew(self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float) -> bool:
        """Push an open reservation's deadline to ``ttl`` s from the server's now.

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds (checked only).
            ttl: seconds, on the server's clock, the reservation holds budget from now.

        Returns:
            True when it was still open on every key (a deadline is never shortened).

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        return self.renew_many([(reservation_id, keys)], now=now, ttl=ttl)[0]

    def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """:meth:`renew` many ``(reservation_id, keys)`` pairs in one script run.

        Returns:
            One flag per pair: True when that reservation was still open.

        Raises:
            ValueError: on a malformed pair or an id given twice.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_renewals(reservations)
        check_now(now)
        check_ttl(ttl)
        return self._run(_renew_plan(reservations, ttl, self._grouped))

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing counters are zero).

        Args:
            keys: the counters to read.
            now: the current time, epoch seconds (checked only: reservations due on
                the server's clock are purged).

        Returns:
            One state per key, in order.

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_keys(keys)
        check_now(now)
        return self._run(_read_plan(keys, self._grouped))

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Return the keys of the counters matching a Redis glob pattern.

        Runs ``SCAN ... MATCH match COUNT 1000 TYPE hash`` (never ``KEYS``, which blocks
        the server), one round trip per 1000 keys visited; the ``TYPE`` filter leaves
        out the reservation indexes and closed-id sets (sorted sets). On a cluster every
        primary is scanned. ``TYPE`` needs Redis 6.0 or later (any Valkey).

        Args:
            match: a Redis glob (``pg:{u:*``).
            now: the current time, epoch seconds (checked only: Redis drops expired
                counters by its own clock).
            limit: the most keys returned (the scan stops there), or ``None``.

        Returns:
            The matching keys, each once, in no particular order.

        Raises:
            ValueError: on an empty pattern or a ``limit`` that is not a positive int.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_scan(match, limit)
        check_now(now)
        found: dict[str, None] = {}
        keys = self._client.scan_iter(match=match, count=_SCAN_COUNT, _type="hash")
        try:
            for raw in keys:
                if _collect(found, raw, limit):
                    break
        except self._errors as exc:
            raise _storage_error("scan", exc, self._wiring) from exc
        finally:
            # Stop a scan left early now, not whenever the generator is collected.
            close = getattr(keys, "close", None)
            if close is not None:
                close()
            self._seen = _deliver(self._wiring, self._seen)
        return list(found)

    def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Apply every adjustment or none and journal them, in one script run.

        See :meth:`payi_guard.ledger.Ledger.adjust`. The ``pending`` the entries report
        is the counter's as stored: reservations past their deadline still count there
        until the next reserve, commit or read of the counter drops them.

        Raises:
            ValueError: on invalid input or a counter that would go out of range.
            StorageOutcomeUnknown: the request was sent and its reply lost: the
                adjustment may have been applied (it is not idempotent: read the
                journal before trying again).
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_adjust(adjustments, now, journal, keep, journal_expires_at)
        return self._run(_adjust_plan(adjustments, now, journal, keep, journal_expires_at))

    def read_journal(self, journal: str, *, now: float, limit: int) -> tuple[JournalEntry, ...]:
        """Return the ``limit`` newest entries of ``journal``, newest first (one ``LRANGE``).

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_journal_read(journal, now, limit)
        try:
            with budget(self._wiring.budget):
                raw = self._client.lrange(journal, 0, limit - 1)
        except self._errors as exc:
            raise _storage_error("read_journal", exc, self._wiring) from exc
        finally:
            self._seen = _deliver(self._wiring, self._seen)
        return _journal_entries(raw)

    def close(self) -> None:
        """Close the client (a shared one once its last ledger closes it).

        Raises:
            StorageError: when closing the client fails.
        """
        release, self._release = self._release, None
        try:
            if not self._shared:
                self._client.close()
                return
            if release is None:
                return  # closed already: never give a shared client back twice
            watch = self._wiring.watch
            if watch is not None and self._on_event is not None:
                watch.unsubscribe(self._on_event)
            release()
        except self._errors as exc:
            raise _storage_error("close", exc, self._wiring) from exc


# -- async --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    """The client of one event loop, with its scripts and how to give it back."""

    client: AsyncClient
    scripts: dict[str, Any]
    grouped: bool
    release: Callable[[], Awaitable[None]]


ClientFactory = Callable[[], "AsyncClient"]


class AsyncRedisLedger:
    """An :class:`~payi_guard.ledger.AsyncLedger` on Redis or Valkey (``redis.asyncio``).

    An asyncio client belongs to the event loop it first ran on, so the ledger keeps one
    client per running loop, made by ``client_factory`` on first use in that loop and
    held in a weak mapping: a Guard used from several loops (``asyncio.run`` called
    again, test suites) keeps working. Clients of loops that have been closed are
    dropped when another client is made or on :meth:`aclose`; their sockets cannot be
    closed any more through a closed loop, so they are closed when garbage collected
    (with a ``ResourceWarning``). Call :meth:`aclose` in each loop before it ends to
    close them cleanly. Ledgers from :func:`payi_guard.ledger.factory.open_async_ledger`
    share one client per loop and storage URI.

    Args:
        client_factory: makes a new ``redis.asyncio.Redis`` or
            ``redis.asyncio.cluster.RedisCluster`` (no I/O happens until first use);
            :func:`payi_guard.ledger.factory.open_async_ledger` supplies one from a URI.
        group_by_slot: split multi-key operations by cluster hash slot; ``None`` (the
            default) does so exactly when the client is a ``RedisCluster``.
        closed_ttl: seconds each counter remembers a committed or released id.
        on_event: as for :class:`RedisLedger`.

    Raises:
        MissingDependency: when redis-py is not installed.
        ValueError: when ``closed_ttl`` is not a positive number.
    """

    def __init__(
        self,
        client_factory: ClientFactory,
        *,
        group_by_slot: bool | None = None,
        closed_ttl: float = DEFAULT_CLOSED_TTL,
        on_event: EventCallback | None = None,
    ) -> None:
        redis = import_redis()
        check_closed_ttl(closed_ttl)
        self._async_cluster: type[Any] = importlib.import_module(
            "redis.asyncio.cluster"
        ).RedisCluster
        self._errors: tuple[type[BaseException], ...] = _error_types(redis)
        self._lease: Callable[[], tuple[AsyncClient, Callable[[], Awaitable[None]]]] = (
            self._own_client
        )
        self._factory = client_factory
        self._group_by_slot = group_by_slot
        self._closed_ttl = float(closed_ttl)
        self._wiring = _wiring(redis, None, None, False)
        self._on_event = on_event
        self._seen = 0
        self._subscribed = False
        self._lock = threading.Lock()
        self._bindings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Binding] = (
            weakref.WeakKeyDictionary()
        )

    def _own_client(self) -> tuple[AsyncClient, Callable[[], Awaitable[None]]]:
        client = self._factory()
        return client, client.aclose

    def _attach(
        self,
        wiring: _Wiring,
        lease: Callable[[], tuple[AsyncClient, Callable[[], Awaitable[None]]]],
    ) -> None:
        """Adopt factory-made clients: their wiring, and how to lease one per loop."""
        wiring.on_event = self._on_event
        self._wiring = wiring
        self._lease = lease

    def _subscribe(self) -> None:
        """Start taking store events (call with the lock held, when a client is made)."""
        watch = self._wiring.watch
        if not self._subscribed and watch is not None and self._on_event is not None:
            watch.subscribe(self._on_event)
            self._seen = watch.seq
            self._subscribed = True

    def __repr__(self) -> str:
        return f"AsyncRedisLedger(loops={len(self._bindings)})"

    def _prune(self) -> None:
        """Forget the clients of closed loops (call with the lock held)."""
        for loop in [loop for loop in self._bindings if loop.is_closed()]:
            del self._bindings[loop]

    def _binding(self) -> _Binding:
        loop = asyncio.get_running_loop()
        binding = self._bindings.get(loop)
        if binding is not None:
            return binding
        with self._lock:
            binding = self._bindings.get(loop)
            if binding is None:
                self._prune()
                self._subscribe()
                client, release = self._lease()
                if self._wiring.tagged:
                    self._wiring.budget = _budget_of(client)
                grouped = self._group_by_slot
                if grouped is None:
                    grouped = isinstance(client, self._async_cluster)
                scripts = {
                    name: client.register_script(_script_source(name)) for name in _SCRIPT_NAMES
                }
                binding = _Binding(client, scripts, grouped, release)
                self._bindings[loop] = binding
        return binding

    async def _execute(self, binding: _Binding, call: _Call) -> Any:
        name, keys, args = call
        try:
            with budget(self._wiring.budget):
                return await binding.scripts[name](keys=keys, args=args)
        except self._errors as exc:
            raise _storage_error(name, exc, self._wiring) from exc

    async def _run(self, binding: _Binding, plan: _Plan[T]) -> T:
        try:
            call = next(plan)
            while True:
                try:
                    reply = await self._execute(binding, call)
                except StorageError as exc:
                    call = plan.throw(exc)
                else:
                    call = plan.send(reply)
        except StopIteration as stop:
            return cast("T", stop.value)
        finally:
            self._seen = _deliver(self._wiring, self._seen)

    async def reserve(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float, ttl: float
    ) -> ReserveResult:
        """Async :meth:`RedisLedger.reserve` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_ttl(ttl)
        binding = self._binding()
        plan = _reserve_plan(reservation_id, charges, now, ttl, binding.grouped)
        return await self._run(binding, plan)

    async def commit(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.commit` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        binding = self._binding()
        plan = _commit_plan(reservation_id, charges, now, self._closed_ttl, binding.grouped)
        return await self._run(binding, plan)

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.release` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        binding = self._binding()
        plan = _release_plan(reservation_id, keys, self._closed_ttl, binding.grouped)
        return await self._run(binding, plan)

    async def renew(
        self, reservation_id: str, keys: Sequence[str], *, now: float, ttl: float
    ) -> bool:
        """Async :meth:`RedisLedger.renew` (same arguments, result and errors)."""
        return (await self.renew_many([(reservation_id, keys)], now=now, ttl=ttl))[0]

    async def renew_many(
        self, reservations: Sequence[tuple[str, Sequence[str]]], *, now: float, ttl: float
    ) -> tuple[bool, ...]:
        """Async :meth:`RedisLedger.renew_many` (same arguments, result and errors)."""
        check_renewals(reservations)
        check_now(now)
        check_ttl(ttl)
        binding = self._binding()
        return await self._run(binding, _renew_plan(reservations, ttl, binding.grouped))

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.read` (same arguments, result and errors)."""
        check_keys(keys)
        check_now(now)
        binding = self._binding()
        return await self._run(binding, _read_plan(keys, binding.grouped))

    async def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Async :meth:`RedisLedger.scan` (same arguments, result and errors)."""
        check_scan(match, limit)
        check_now(now)
        binding = self._binding()
        found: dict[str, None] = {}
        keys = binding.client.scan_iter(match=match, count=_SCAN_COUNT, _type="hash")
        try:
            async for raw in keys:
                if _collect(found, raw, limit):
                    break
        except self._errors as exc:
            raise _storage_error("scan", exc, self._wiring) from exc
        finally:
            # An async generator left early is otherwise finalized by the loop later.
            aclose = getattr(keys, "aclose", None)
            if aclose is not None:
                await aclose()
            self._seen = _deliver(self._wiring, self._seen)
        return list(found)

    async def adjust(
        self,
        adjustments: Sequence[Adjustment],
        *,
        now: float,
        journal: str,
        keep: int,
        journal_expires_at: float,
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`RedisLedger.adjust` (same arguments, result and errors)."""
        check_adjust(adjustments, now, journal, keep, journal_expires_at)
        binding = self._binding()
        plan = _adjust_plan(adjustments, now, journal, keep, journal_expires_at)
        return await self._run(binding, plan)

    async def read_journal(
        self, journal: str, *, now: float, limit: int
    ) -> tuple[JournalEntry, ...]:
        """Async :meth:`RedisLedger.read_journal` (same arguments, result and errors)."""
        check_journal_read(journal, now, limit)
        binding = self._binding()
        try:
            with budget(self._wiring.budget):
                raw = await binding.client.lrange(journal, 0, limit - 1)
        except self._errors as exc:
            raise _storage_error("read_journal", exc, self._wiring) from exc
        finally:
            self._seen = _deliver(self._wiring, self._seen)
        return _journal_entries(raw)

    async def aclose(self) -> None:
        """Close the running loop's client and forget those of closed loops.

        A client shared with other ledgers is closed when the last of them closes.

        Raises:
            StorageError: when closing the client fails.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            binding = self._bindings.pop(loop, None)
            self._prune()
            watch = self._wiring.watch
            if not self._bindings and self._subscribed and watch is not None:
                if self._on_event is not None:
                    watch.unsubscribe(self._on_event)
                self._subscribed = False
        if binding is None:
            return
        try:
            await binding.release()
        except self._errors as exc:
            raise _storage_error("close", exc, self._wiring) from exc
