"""The async Redis ledger: :class:`AsyncRedisLedger`, one client per event loop.

It runs the plans of :mod:`payi_guard.ledger._redis_plans` like its sync twin
(:mod:`payi_guard.ledger.redis`, whose module docstring describes the layout).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from payi_guard.exceptions import StorageError
from payi_guard.ledger._adjust import (
    check_adjust,
    check_journal_read,
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
from payi_guard.ledger._redis_plans import (
    _SCAN_COUNT,
    _SCRIPT_NAMES,
    EventCallback,
    T,
    _adjust_plan,
    _budget_of,
    _Call,
    _client_fault,
    _collect,
    _commit_plan,
    _deliver,
    _error_types,
    _journal_entries,
    _Plan,
    _read_plan,
    _release_plan,
    _renew_plan,
    _reserve_plan,
    _script_source,
    _storage_error,
    _tallies_plan,
    _Wiring,
    _wiring,
    import_redis,
)
from payi_guard.ledger._redis_scripts import AsyncScriptSender, async_script_sender
from payi_guard.ledger._redisconn import budget
from payi_guard.ledger._tally import check_tallies
from payi_guard.ledger.base import (
    DEFAULT_CLOSED_TTL,
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
)

if TYPE_CHECKING:
    from typing import TypeAlias

    import redis as redis_
    import redis.asyncio as aioredis
    import redis.asyncio.cluster as aiocluster
    import redis.cluster as cluster_

    SyncClient: TypeAlias = redis_.Redis | cluster_.RedisCluster
    AsyncClient: TypeAlias = aioredis.Redis | aiocluster.RedisCluster


# -- async --------------------------------------------------------------------------------


@dataclass
class _Binding:
    """The client of one event loop, with its scripts and how to give it back."""

    client: AsyncClient
    scripts: dict[str, Any]
    grouped: bool
    release: Callable[[], Awaitable[None]]
    send: AsyncScriptSender
    """How the scripts are sent (see :func:`~payi_guard.ledger._redisconn.async_script_sender`)."""
    ready: bool = True
    """False for a Redis Cluster client until it has learnt the cluster's layout."""
    starting: asyncio.Future[Any] | None = None
    """The layout being learnt, awaited by every operation until it is."""


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
        self._no_script: type[BaseException] = redis.exceptions.NoScriptError
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
                send = async_script_sender(client, direct=self._wiring.tagged)
                ready = not isinstance(client, self._async_cluster)
                binding = _Binding(client, scripts, grouped, release, send, ready)
                self._bindings[loop] = binding
        return binding

    async def _start(self, binding: _Binding) -> None:
        """Let a Redis Cluster client learn the cluster's layout once, before any command.

        redis-py's async cluster client learns it on its first command; when many tasks
        send their first commands at once, that recycles connections other tasks are
        writing on, and their commands fail on a healthy cluster. Every operation of the
        loop waits for the one start instead (a failed start is tried again by the next).
        """
        starting = binding.starting
        if starting is None or (
            starting.done() and (starting.cancelled() or starting.exception() is not None)
        ):
            client: Any = binding.client  # redis-py's initialize is untyped
            starting = binding.starting = asyncio.ensure_future(client.initialize())
        try:
            await asyncio.shield(starting)  # a cancelled caller leaves the start running
        except self._errors as exc:
            raise _storage_error("initialize", exc, self._wiring) from exc
        except Exception as exc:
            raise _client_fault("initialize", exc) from exc
        binding.ready = True

    async def _execute(self, binding: _Binding, call: _Call) -> Any:
        name, keys, args = call
        script = binding.scripts[name]
        client: Any = binding.client  # redis-py's script_load is untyped
        try:
            with budget(self._wiring.budget):
                # What the registered script's __call__ does, without its per-call
                # check for a pipeline (never one here) and copies of keys and args.
                send = binding.send
                try:
                    return await send(script.sha, keys, args)
                except self._no_script:
                    # Not in the server's cache (restarted, SCRIPT FLUSH): load it again.
                    script.sha = await client.script_load(script.script)
                    return await send(script.sha, keys, args)
        except self._errors as exc:
            raise _storage_error(name, exc, self._wiring) from exc
        except StorageError:
            raise
        except Exception as exc:
            raise _client_fault(name, exc) from exc

    async def _run(self, binding: _Binding, plan: _Plan[T]) -> T:
        if not binding.ready:
            await self._start(binding)
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
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Async :meth:`RedisLedger.reserve` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_ttl(ttl)
        check_tallies(tallies)
        binding = self._binding()
        plan = _reserve_plan(reservation_id, charges, now, ttl, binding.grouped, tallies)
        return await self._run(binding, plan)

    async def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Async :meth:`RedisLedger.commit` (same arguments, result and errors)."""
        check_id(reservation_id)
        check_charges(charges)
        check_now(now)
        check_tallies(tallies)
        binding = self._binding()
        plan = _commit_plan(
            reservation_id, charges, now, self._closed_ttl, binding.grouped, tallies
        )
        return await self._run(binding, plan)

    async def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Async :meth:`RedisLedger.read_tallies` (same arguments, result and errors)."""
        check_keys(keys)
        check_now(now)
        binding = self._binding()
        return await self._run(binding, _tallies_plan(keys, binding.grouped))

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
