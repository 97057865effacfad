"""Redis (and Valkey) ledgers: one Lua script per reserve and per commit.

:class:`RedisLedger` drives a redis-py client, :class:`AsyncRedisLedger` a
``redis.asyncio`` one; both run the same scripts (``payi_guard/ledger/lua/``, each
prefixed with ``lib.lua``) through ``register_script`` (EVALSHA, loading the script
on NOSCRIPT), and both build their calls and read the replies with the same code, so
on a single server every reserve, commit, release and read is exactly one round trip.
``scan`` (discovering whose counters exist; never on a call's path) is a plain
``SCAN ... MATCH ... TYPE hash``, one round trip per 1000 keys the server visits.

Layout, per counter key ``K`` (chosen by the caller, with a ``{...}`` hash tag):

* hash ``K``: field ``s`` = settled, field ``p`` = pending (the sum of the open
  reservations), and one field ``r:<id>`` per open reservation holding its amount;
* sorted set ``K:x`` (same hash tag, so the same cluster slot): reservation id ->
  deadline in epoch seconds, so expired reservations are found without a scan.

Every script first purges the reservations of its keys whose deadline is ``<= now``
(subtracting them from ``p``), then works on the totals. Both keys get a ``PEXPIRE`` of
``expires_at - now`` whenever a reserve or commit writes them: relative, because Redis
expires keys by its own clock, whereas reservation deadlines use the ``now`` passed in.
No counter key may be another counter key plus ``:x``. A reservation id is meant to be
used once; reserving an id that is already open on a key replaces its amount and
deadline there, so a retried reserve is not counted twice. Amounts are compared in Lua
doubles, hence the ``2**53 - 1`` cap enforced on every amount and max.

Failures: any Redis or socket error is raised as :class:`~payi_guard.StorageError`
with the cause chained. The ledger never retries a script on its own (a commit is not
idempotent), and the clients built by :mod:`payi_guard.ledger.factory` have 0.25 s
connect and read timeouts, so a dead server fails a call fast instead of hanging it. A
connection that the server closed (a restart) is detected when it is taken from the
pool, and scripts are loaded again on NOSCRIPT, so the same ledger works again once
the server is back.

Cluster mode (``group_by_slot``, automatic for a ``RedisCluster`` client): one script
can only touch keys of one slot, so the charges are grouped by hash slot (keys of one
user share a tag, hence a slot) and reserved group by group, one round trip each. If a
group refuses, the groups already reserved are released, and the groups not yet tried
are read so that every state is reported and ``refused`` is the first charge that does
not fit. If a group fails with a storage error, the groups already reserved are
released on a best-effort basis (what a failed release leaves is freed by the
reservation's ttl) and the error is raised. Each counter's check-and-add stays atomic,
so a ``max`` is never exceeded; what is lost is atomicity across slots: two concurrent
multi-slot reserves may both be refused where one alone would have fitted. Commits,
releases and reads run group by group too; if a commit fails part-way, the groups
before the failure stay committed. Every key must carry a non-empty ``{...}`` hash tag
in this mode, so that ``K`` and ``K:x`` share a slot.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import math
import threading
import weakref
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from importlib import resources
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar, cast

from payi_guard.exceptions import MissingDependency, StorageError
from payi_guard.ledger._checks import (
    check_charges,
    check_id,
    check_keys,
    check_now,
    check_scan,
    check_ttl,
)
from payi_guard.ledger.base import Charge, CounterState, ReserveResult

if TYPE_CHECKING:
    from typing import TypeAlias

    import redis as redis_
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.cluster as cluster_

    SyncClient: TypeAlias = redis_.Redis | cluster_.RedisCluster
    AsyncClient: TypeAlias = aioredis.Redis | aiocluster.RedisCluster

__all__ = ["INDEX_SUFFIX", "AsyncRedisLedger", "RedisLedger", "import_redis"]

INDEX_SUFFIX = ":x"
"""Appended to a counter key to name its reservation index (keeps the hash tag)."""

_SCRIPT_NAMES = ("reserve", "commit", "read")
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
        out.append(key)
        out.append(key + INDEX_SUFFIX)
    return out


def _reserve_call(rid: str, charges: Sequence[Charge], now: float, deadline: float) -> _Call:
    args = [rid, _seconds(now), _seconds(deadline)]
    for charge in charges:
        args.append(str(charge.amount))
        args.append("" if charge.max is None else str(charge.max))
        args.append(_ttl_millis(charge.expires_at, now))
    return ("reserve", _script_keys([charge.key for charge in charges]), args)


def _commit_call(rid: str, charges: Sequence[Charge], now: float) -> _Call:
    args = [rid, _seconds(now)]
    for charge in charges:
        args.append(str(charge.amount))
        args.append(_ttl_millis(charge.expires_at, now))
    return ("commit", _script_keys([charge.key for charge in charges]), args)


def _release_call(rid: str, keys: Sequence[str], now: float) -> _Call:
    args = [rid, _seconds(now)]
    for _ in keys:
        args.append("0")
        args.append("")
    return ("commit", _script_keys(keys), args)


def _read_call(keys: Sequence[str], now: float) -> _Call:
    return ("read", _script_keys(keys), [_seconds(now)])


def _decode_states(reply: Any, count: int, offset: int = 0) -> tuple[CounterState, ...]:
    if not isinstance(reply, list) or len(reply) != offset + 2 * count:
        raise StorageError(f"unexpected reply from a ledger script: {reply!r:.200}")
    try:
        return tuple(
            CounterState(int(reply[offset + 2 * i]), int(reply[offset + 2 * i + 1]))
            for i in range(count)
        )
    except (TypeError, ValueError) as exc:
        raise StorageError(f"unexpected reply from a ledger script: {reply!r:.200}") from exc


def _decode_reserve(reply: Any, count: int) -> ReserveResult:
    states = _decode_states(reply, count, offset=2)
    if reply[0] == 1:
        return ReserveResult(True, None, states)
    return ReserveResult(False, int(reply[1]), states)


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


def _undo(rid: str, keys: Sequence[str], done: Sequence[Sequence[int]], now: float) -> _Plan[None]:
    """Best-effort release of the groups already reserved, after a storage error."""
    for group in done:
        try:
            yield _release_call(rid, [keys[i] for i in group], now)
        except StorageError:
            return  # the reservation's ttl gives that budget back


def _reserve_plan(
    rid: str, charges: Sequence[Charge], now: float, ttl: float, grouped: bool
) -> _Plan[ReserveResult]:
    deadline = now + ttl
    keys = [charge.key for charge in charges]
    groups = _groups(keys, grouped)
    if groups is None:
        reply = yield _reserve_call(rid, charges, now, deadline)
        return _decode_reserve(reply, len(charges))

    states = [_ZERO] * len(charges)
    done: list[list[int]] = []
    for position, group in enumerate(groups):
        part = [charges[i] for i in group]
        try:
            reply = yield _reserve_call(rid, part, now, deadline)
        except StorageError:
            yield from _undo(rid, keys, done, now)
            raise
        result = _decode_reserve(reply, len(part))
        _place(states, group, result.states)
        if result.ok:
            done.append(group)
            continue
        if result.refused is None:  # pragma: no cover - the script always names it
            raise StorageError("a refused reserve did not name the charge")
        refused = group[result.refused]
        for reserved in done:
            reply = yield _release_call(rid, [keys[i] for i in reserved], now)
            _place(states, reserved, _decode_states(reply, len(reserved)))
        # The groups never tried are read, so every state is reported and the refused
        # index is the first charge that does not fit, as in the single-script case.
        for untried in groups[position + 1 :]:
            reply = yield _read_call([keys[i] for i in untried], now)
            _place(states, untried, _decode_states(reply, len(untried)))
            for i in untried:
                limit = charges[i].max
                if i < refused and limit is not None and states[i].used + charges[i].amount > limit:
                    refused = i
        return ReserveResult(False, refused, tuple(states))
    return ReserveResult(True, None, tuple(states))


def _commit_plan(
    rid: str, charges: Sequence[Charge], now: float, grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    groups = _groups([charge.key for charge in charges], grouped)
    if groups is None:
        reply = yield _commit_call(rid, charges, now)
        return _decode_states(reply, len(charges))
    states = [_ZERO] * len(charges)
    for group in groups:
        reply = yield _commit_call(rid, [charges[i] for i in group], now)
        _place(states, group, _decode_states(reply, len(group)))
    return tuple(states)


def _release_plan(
    rid: str, keys: Sequence[str], now: float, grouped: bool
) -> _Plan[tuple[CounterState, ...]]:
    groups = _groups(keys, grouped)
    if groups is None:
        reply = yield _release_call(rid, keys, now)
        return _decode_states(reply, len(keys))
    states = [_ZERO] * len(keys)
    for group in groups:
        reply = yield _release_call(rid, [keys[i] for i in group], now)
        _place(states, group, _decode_states(reply, len(group)))
    return tuple(states)


def _read_plan(keys: Sequence[str], now: float, grouped: bool) -> _Plan[tuple[CounterState, ...]]:
    groups = _groups(keys, grouped)
    if groups is None:
        reply = yield _read_call(keys, now)
        return _decode_states(reply, len(keys))
    states = [_ZERO] * len(keys)
    for group in groups:
        reply = yield _read_call([keys[i] for i in group], now)
        _place(states, group, _decode_states(reply, len(group)))
    return tuple(states)


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


def _storage_error(name: str, exc: BaseException) -> StorageError:
    return StorageError(f"Redis ledger {name} failed: {type(exc).__name__}: {exc}")


# -- sync ---------------------------------------------------------------------------------


class RedisLedger:
    """A :class:`~payi_guard.ledger.Ledger` on Redis or Valkey (redis-py, sync).

    Safe to share between threads (redis-py's connection pool is). Build one from a URI
    with :func:`payi_guard.ledger.factory.open_ledger`, which also sets short timeouts.

    Args:
        client: a ``redis.Redis`` (single server, Sentinel master) or
            ``redis.cluster.RedisCluster``; :meth:`close` closes it.
        group_by_slot: split multi-key operations by cluster hash slot; ``None`` (the
            default) does so exactly when ``client`` is a ``RedisCluster``.

    Raises:
        MissingDependency: when redis-py is not installed.
    """

    def __init__(self, client: SyncClient, *, group_by_slot: bool | None = None) -> None:
        redis = import_redis()
        self._client = client
        self._errors: tuple[type[BaseException], ...] = _error_types(redis)
        if group_by_slot is None:
            group_by_slot = isinstance(client, redis.cluster.RedisCluster)
        self._grouped = group_by_slot
        self._scripts = {
            name: client.register_script(_script_source(name)) for name in _SCRIPT_NAMES
        }

    @property
    def client(self) -> SyncClient:
        """The redis-py client the ledger runs on."""
        return self._client

    def __repr__(self) -> str:
        return f"RedisLedger({self._client!r}, group_by_slot={self._grouped})"

    def _execute(self, call: _Call) -> Any:
        name, keys, args = call
        try:
            return self._scripts[name](keys=keys, args=args)
        except self._errors as exc:
            raise _storage_error(name, exc) from exc

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

    def reserve(
        self, reservation_id: str, charges: Sequence[Charge], *, now: float, ttl: float
    ) -> ReserveResult:
        """Reserve every charge or none, in one script run (one per slot in cluster mode).

        Args:
            reservation_id: a fresh id naming this reservation.
            charges: one per counter (each key at most once).
            now: the current time, epoch seconds.
            ttl: seconds the reservation holds budget if it is never committed.

        Returns:
            The outcome; when refused, no counter was changed.

        Raises:
            ValueError: on invalid input (see :class:`~payi_guard.ledger.MemoryLedger`).
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

        Args:
            reservation_id: the id given to :meth:`reserve` (or any id for a record).
            charges: the actual amounts, on the keys that were reserved (``max`` ignored).
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the commit.

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        return self._run(_commit_plan(reservation_id, charges, now, self._grouped))

    def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Drop the reservation without charging anything (a commit of zero).

        Args:
            reservation_id: the id given to :meth:`reserve`.
            keys: the keys that were reserved.
            now: the current time, epoch seconds.

        Returns:
            The state of each counter after the release.

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        return self._run(_release_plan(reservation_id, keys, now, self._grouped))

    def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Return the state of each counter (missing counters are zero).

        Args:
            keys: the counters to read.
            now: the current time, epoch seconds (reservations due by then are purged).

        Returns:
            One state per key, in order.

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_keys(keys)
        check_now(now)
        return self._run(_read_plan(keys, now, self._grouped))

    def scan(self, match: str, *, now: float, limit: int | None = None) -> list[str]:
        """Return the keys of the counters matching a Redis glob pattern.

        Runs ``SCAN ... MATCH match COUNT 1000 TYPE hash`` (never ``KEYS``, which blocks
        the server), one round trip per 1000 keys visited; the ``TYPE`` filter leaves
        out the reservation indexes (sorted sets). On a cluster every primary is
        scanned. ``TYPE`` needs Redis 6.0 or later (any Valkey).

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
            raise _storage_error("scan", exc) from exc
        finally:
            # Stop a scan left early now, not whenever the generator is collected.
            close = getattr(keys, "close", None)
            if close is not None:
                close()
        return list(found)

    def close(self) -> None:
        """Close the client and its connections."""
        try:
            self._client.close()
        except self._errors as exc:
            raise _storage_error("close", exc) from exc


# -- async --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Binding:
    """The client of one event loop, with its scripts."""

    client: AsyncClient
    scripts: dict[str, Any]
    grouped: bool


class AsyncRedisLedger:
    """An :class:`~payi_guard.ledger.AsyncLedger` on Redis or Valkey (``redis.asyncio``).

    An asyncio client belongs to the event loop it first ran on, so the ledger keeps one
    client per running loop, made by ``client_factory`` on first use in that loop and
    held in a weak mapping: a Guard used from several loops (``asyncio.run`` called
    again, test suites) keeps working. Clients of loops that have been closed are
    dropped when another client is made or on :meth:`aclose`; their sockets cannot be
    closed any more through a closed loop, so they are closed when garbage collected
    (with a ``ResourceWarning``). Call :meth:`aclose` in each loop before it ends to
    close them cleanly.

    Args:
        client_factory: makes a new ``redis.asyncio.Redis`` or
            ``redis.asyncio.cluster.RedisCluster`` (no I/O happens until first use);
            :func:`payi_guard.ledger.factory.open_async_ledger` supplies one from a URI.
        group_by_slot: split multi-key operations by cluster hash slot; ``None`` (the
            default) does so exactly when the client is a ``RedisCluster``.

    Raises:
        MissingDependency: when redis-py is not installed.
    """

    def __init__(
        self,
        client_factory: Callable[[], AsyncClient],
        *,
        group_by_slot: bool | None = None,
    ) -> None:
        redis = import_redis()
        self._async_cluster: type[Any] = importlib.import_module(
            "redis.asyncio.cluster"
        ).RedisCluster
        self._errors: tuple[type[BaseException], ...] = _error_types(redis)
        self._factory = client_factory
        self._group_by_slot = group_by_slot
        self._lock = threading.Lock()
        self._bindings: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Binding] = (
            weakref.WeakKeyDictionary()
        )

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
                client = self._factory()
                grouped = self._group_by_slot
                if grouped is None:
                    grouped = isinstance(client, self._async_cluster)
                scripts = {
                    name: client.register_script(_script_source(name)) for name in _SCRIPT_NAMES
                }
                binding = _Binding(client, scripts, grouped)
                self._bindings[loop] = binding
        return binding

    async def _execute(self, binding: _Binding, call: _Call) -> Any:
        name, keys, args = call
        try:
            return await binding.scripts[name](keys=keys, args=args)
        except self._errors as exc:
            raise _storage_error(name, exc) from exc

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
        return await self._run(binding, _commit_plan(reservation_id, charges, now, binding.grouped))

    async def release(
        self, reservation_id: str, keys: Sequence[str], *, now: float
    ) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.release` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_keys(keys)
        check_now(now)
        binding = self._binding()
        return await self._run(binding, _release_plan(reservation_id, keys, now, binding.grouped))

    async def read(self, keys: Sequence[str], *, now: float) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.read` (same arguments, result and errors)."""
        check_keys(keys)
        check_now(now)
        binding = self._binding()
        return await self._run(binding, _read_plan(keys, now, binding.grouped))

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
            raise _storage_error("scan", exc) from exc
        finally:
            # An async generator left early is otherwise finalized by the loop later.
            aclose = getattr(keys, "aclose", None)
            if aclose is not None:
                await aclose()
        return list(found)

    async def aclose(self) -> None:
        """Close the running loop's client and forget those of closed loops.

        Raises:
            StorageError: when closing the client fails.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            binding = self._bindings.pop(loop, None)
            self._prune()
        if binding is None:
            return
        try:
            await binding.client.aclose()
        except self._errors as exc:
            raise _storage_error("close", exc) from exc
