"""What the Redis ledgers send and how they read the replies (shared by sync and async).

Each operation is a sans-IO *plan*: a generator that yields script runs (name, KEYS,
ARGV), receives their replies and returns the result, so :class:`RedisLedger` and
:class:`AsyncRedisLedger` (:mod:`payi_guard.ledger.redis`) differ only in how they run
a call. Slot grouping for cluster mode lives here too.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from payi_guard.exceptions import MissingDependency, StorageError
from payi_guard.ledger._adjust import (
    decode_entry,
    out_of_range,
)
from payi_guard.ledger._redisconn import StoreWatch, was_sent
from payi_guard.ledger.base import (
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    StorageEvent,
    StorageOutcomeUnknown,
    Tally,
    make_counter_state,
    make_reserve_result,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import redis as redis_
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.cluster as cluster_

    SyncClient: TypeAlias = redis_.Redis | cluster_.RedisCluster
    AsyncClient: TypeAlias = aioredis.Redis | aiocluster.RedisCluster


INDEX_SUFFIX = ":x"
"""Appended to a counter key to name its reservation index (keeps the hash tag)."""

CLOSED_SUFFIX = ":d"
"""Appended to a counter key to name its set of closed ids (keeps the hash tag)."""

EventCallback = Callable[[StorageEvent], object]

_SCRIPT_NAMES = ("reserve", "commit", "read", "renew", "adjust", "tallies")
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


def _tally_part(tallies: Sequence[Tally], now: float) -> tuple[list[str], list[str]]:
    """The KEYS and ARGV that carry ``tallies`` (see ``add_tallies`` in lib.lua)."""
    keys: list[str] = []
    args: list[str] = []
    for tally in tallies:
        ttl = _ttl_millis(tally.expires_at, now)
        if int(ttl) <= 0 or not tally.fields:
            continue  # already past its life: nothing to keep
        keys.append(tally.key)
        args += (ttl, str(len(tally.fields)))
        for name, value in tally.fields:
            args += (name, str(value))
    return keys, args


def _reserve_call(
    rid: str, charges: Sequence[Charge], now: float, ttl: float, tallies: Sequence[Tally] = ()
) -> _Call:
    args = [rid, _seconds(ttl), str(len(charges))]
    for charge in charges:
        args.append(str(charge.amount))
        args.append("" if charge.max is None else str(charge.max))
        args.append(_ttl_millis(charge.expires_at, now))
    tally_keys, tally_args = _tally_part(tallies, now)
    keys = _script_keys([charge.key for charge in charges]) + tally_keys
    return ("reserve", keys, args + tally_args)


def _commit_call(
    rid: str, charges: Sequence[Charge], now: float, keep: float, tallies: Sequence[Tally] = ()
) -> _Call:
    args = [rid, _seconds(keep), str(len(charges))]
    for charge in charges:
        args.append(str(charge.amount))
        args.append(_ttl_millis(charge.expires_at, now))
    tally_keys, tally_args = _tally_part(tallies, now)
    keys = _script_keys([charge.key for charge in charges]) + tally_keys
    return ("commit", keys, args + tally_args)


def _release_call(rid: str, keys: Sequence[str], keep: float) -> _Call:
    args = [rid, _seconds(keep), str(len(keys))]
    for _ in keys:
        args += ("0", "")
    return ("commit", _script_keys(keys), args)


def _tallies_call(keys: Sequence[str]) -> _Call:
    return ("tallies", list(keys), [])


def _decode_tallies(reply: Any, count: int) -> tuple[dict[str, int], ...]:
    if not isinstance(reply, list) or len(reply) != count:
        raise _bad_reply(reply)
    try:
        return tuple(
            {_key_text(flat[j]): int(flat[j + 1]) for j in range(0, len(flat), 2)} for flat in reply
        )
    except (TypeError, ValueError, IndexError) as exc:
        raise _bad_reply(reply) from exc


def _in_slot(tallies: Sequence[Tally], key: str) -> list[Tally]:
    """The tallies that share ``key``'s cluster hash slot."""
    from redis.crc import key_slot

    slot = key_slot(key.encode("utf-8"))
    return [t for t in tallies if key_slot(t.key.encode("utf-8")) == slot]


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
        # Every reserve and commit decodes here: one pass of int() over the numbers,
        # then one plain constructor call per state (no generator per state).
        values = [int(value) for value in reply[offset:]]
    except (TypeError, ValueError) as exc:
        raise _bad_reply(reply) from exc
    make = make_counter_state
    return tuple([make(values[i], values[i + 1], values[i + 2]) for i in range(0, len(values), 3)])


def _decode_reserve(reply: Any, count: int) -> ReserveResult:
    states = _decode_states(reply, count, offset=2)
    if reply[0] == 1:
        return make_reserve_result(True, None, states, False)
    if reply[0] == -1:
        return make_reserve_result(False, None, states, True)
    return make_reserve_result(False, int(reply[1]), states, False)


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
    return ("commit", _script_keys(keys), [rid, "0", str(len(keys)), *(["0", ""] * len(keys))])


def _undo(rid: str, keys: Sequence[str], done: Sequence[Sequence[int]], now: float) -> _Plan[None]:
    """Best-effort rollback of the groups already reserved, after a storage error."""
    for group in done:
        try:
            yield _rollback(rid, [keys[i] for i in group], now)
        except StorageError:
            return  # the reservation's ttl gives that budget back


def _reserve_plan(
    rid: str,
    charges: Sequence[Charge],
    now: float,
    ttl: float,
    grouped: bool,
    tallies: Sequence[Tally] = (),
) -> _Plan[ReserveResult]:
    keys = [charge.key for charge in charges]
    groups = _groups(keys, grouped)
    if groups is None:
        if grouped and tallies and keys:
            tallies = _in_slot(tallies, keys[0])
        reply = yield _reserve_call(rid, charges, now, ttl, tallies)
        return _decode_reserve(reply, len(charges))

    states = [_ZERO] * len(charges)
    done: list[list[int]] = []
    for position, group in enumerate(groups):
        part = [charges[i] for i in group]
        try:
            reply = yield _reserve_call(rid, part, now, ttl, _in_slot(tallies, part[0].key))
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
    rid: str,
    charges: Sequence[Charge],
    now: float,
    keep: float,
    grouped: bool,
    tallies: Sequence[Tally] = (),
) -> _Plan[tuple[CounterState, ...]]:
    def call(group: list[int]) -> _Call:
        part = [charges[i] for i in group]
        mine = _in_slot(tallies, part[0].key) if grouped and tallies and part else tallies
        return _commit_call(rid, part, now, keep, mine)

    return _per_group(call, [charge.key for charge in charges], grouped)


def _release_plan(
    rid: str, keys: Sequence[str], keep: float, grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    def call(group: list[int]) -> _Call:
        return _release_call(rid, [keys[i] for i in group], keep)

    return _per_group(call, keys, grouped)


def _tallies_plan(keys: Sequence[str], grouped: bool) -> _Plan[tuple[dict[str, int], ...]]:
    if not keys:
        return ()
    if not grouped:
        reply = yield _tallies_call(keys)
        return _decode_tallies(reply, len(keys))
    out: list[dict[str, int]] = [{} for _ in keys]
    for group in _slot_groups(keys):
        reply = yield _tallies_call([keys[i] for i in group])
        for index, fields in zip(group, _decode_tallies(reply, len(group)), strict=True):
            out[index] = fields
    return tuple(out)


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


def _client_fault(name: str, exc: Exception) -> StorageError:
    """What an exception the Redis client raised outside its own error classes means.

    A race inside redis-py (an async cluster client tearing down a connection another
    task is writing on raises ``AttributeError``) is a failure of the store's client,
    not of the call's input: the command may have been sent, so its outcome is unknown
    and the engine undoes or retries it as after a lost reply.
    """
    return StorageOutcomeUnknown(
        f"Redis ledger {name} failed inside the Redis client: {type(exc).__name__}: {exc}"
    )


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
