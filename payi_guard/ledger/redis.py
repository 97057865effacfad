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
from the script that makes them (relative, since Redis expires keys by its own clock;
every charge of a counter's window carries the same ``expires_at``, so later writes
leave it alone); ``K:d`` lives ``closed_ttl`` from its last write. No counter key may be another
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

from collections.abc import Callable, Sequence
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
from payi_guard.ledger._redis_async import AsyncRedisLedger
from payi_guard.ledger._redis_plans import (
    _SCAN_COUNT,
    _SCRIPT_NAMES,
    CLOSED_SUFFIX,
    INDEX_SUFFIX,
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
from payi_guard.ledger._redis_scripts import ScriptSender, script_sender
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


__all__ = ["CLOSED_SUFFIX", "INDEX_SUFFIX", "AsyncRedisLedger", "RedisLedger", "import_redis"]

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
        self._no_script: type[BaseException] = redis.exceptions.NoScriptError
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
        self._send: ScriptSender = script_sender(client, direct=False)

    def _attach(self, wiring: _Wiring, release: Callable[[], None]) -> None:
        """Adopt a factory-made, shared client: its wiring, and how to give it back."""
        wiring.on_event = self._on_event
        wiring.budget = _budget_of(self._client)
        self._wiring = wiring
        self._shared = True
        self._send = script_sender(self._client, direct=True)
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
        script = self._scripts[name]
        client: Any = self._client  # redis-py's script_load is untyped
        try:
            with budget(self._wiring.budget):
                # What the registered script's __call__ does, without its per-call
                # check for a pipeline (never one here) and copies of keys and args.
                send = self._send
                try:
                    return send(script.sha, keys, args)
                except self._no_script:
                    # Not in the server's cache (restarted, SCRIPT FLUSH): load it again.
                    script.sha = client.script_load(script.script)
                    return send(script.sha, keys, args)
        except self._errors as exc:
            raise _storage_error(name, exc, self._wiring) from exc
        except StorageError:
            raise
        except Exception as exc:
            raise _client_fault(name, exc) from exc

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
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        ttl: float,
        tallies: Sequence[Tally] = (),
    ) -> ReserveResult:
        """Reserve every charge or none, in one script run (one per slot in cluster mode).

        Args:
            reservation_id: a fresh id naming this reservation.
            charges: one per counter (each key at most once).
            now: the current time, epoch seconds (sets the counters' lifetime).
            ttl: seconds, on the server's clock, the reservation holds budget unless it
                is renewed, committed or released.
            tallies: added in the same script run when the reserve refuses.

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
        check_tallies(tallies)
        return self._run(_reserve_plan(reservation_id, charges, now, ttl, self._grouped, tallies))

    def commit(
        self,
        reservation_id: str,
        charges: Sequence[Charge],
        *,
        now: float,
        tallies: Sequence[Tally] = (),
    ) -> tuple[CounterState, ...]:
        """Close the reservation (if open) and add the actual amounts, in one script run.

        Idempotent per id and key: a commit (or release) already applied there changes
        nothing, so a commit whose outcome was unknown can be retried.

        Args:
            reservation_id: the id given to :meth:`reserve` (or any id for a record).
            charges: the actual amounts, on the keys that were reserved (``max`` ignored).
            now: the current time, epoch seconds.
            tallies: added in the same script run when it closes the id somewhere.

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
        check_tallies(tallies)
        plan = _commit_plan(reservation_id, charges, now, self._closed_ttl, self._grouped, tallies)
        return self._run(plan)

    def read_tallies(self, keys: Sequence[str], *, now: float) -> tuple[dict[str, int], ...]:
        """Return the fields of each tally, in one script run (one per slot in cluster mode).

        Raises:
            ValueError: on invalid input.
            StorageError: when Redis fails or cannot be reached in time.
        """
        check_keys(keys)
        check_now(now)
        return self._run(_tallies_plan(keys, self._grouped))

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
