"""What only the Redis ledgers have: round trips, timeouts and recovery, event loops,
slot grouping (forced on one server, and automatic on a real one-node cluster),
Sentinel, Unix sockets and the URI forms."""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.crc import key_slot

from ledger._support import (
    LedgerAdapter,
    RedisServer,
    counting_classes,
    free_port,
    own_marker,
)
from payi_guard.clock import FakeClock
from payi_guard.exceptions import ConfigError, MissingDependency, StorageError
from payi_guard.ledger import (
    AsyncRedisLedger,
    Charge,
    CounterState,
    RedisLedger,
    ReserveResult,
    StorageEvent,
    StorageOutcomeUnknown,
    open_async_ledger,
    open_ledger,
)
from payi_guard.ledger._redis_plans import _SCRIPT_NAMES, _script_source
from payi_guard.ledger.factory import DEFAULT_TIMEOUT
from payi_guard.ledger.redis import CLOSED_SUFFIX, INDEX_SUFFIX

EXPIRES = 1_795_780_800.0 + 3 * 86_400


# -- round trips ---------------------------------------------------------------------------


async def _round_trips(
    adapter: LedgerAdapter, sent: Callable[[], int], rid: str, keys: list[str], now: float
) -> list[int]:
    """How many requests each of reserve, commit, reserve, renew, release, read sent."""
    charges = [Charge(k, 10, 1000, EXPIRES) for k in keys]
    counts = []
    for step in ("reserve", "commit", "reserve-again", "renew", "release", "read"):
        before = sent()
        if step == "reserve":
            assert (await adapter.reserve(rid, charges, now=now, ttl=60)).ok
        elif step == "commit":
            await adapter.commit(rid, charges, now=now)
        elif step == "reserve-again":
            assert (await adapter.reserve(rid + "x", charges, now=now, ttl=60)).ok
        elif step == "renew":
            batch = [(rid + "x", keys), (rid + "y", keys), (rid, keys)]
            assert await adapter.renew_many(batch, now=now, ttl=60) == (True, False, False)
        elif step == "release":
            await adapter.release(rid + "x", keys, now=now)
        else:
            await adapter.read(keys, now=now)
        counts.append(sent() - before)
    return counts


async def test_one_round_trip_per_operation(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    sync_cls, async_cls = counting_classes()
    sync = LedgerAdapter("redis-sync", open_ledger(redis_url, connection_class=sync_cls))
    aio = LedgerAdapter("redis-async", open_async_ledger(redis_url, connection_class=async_cls))
    keys = [f"{key_prefix}:{{u:{i}}}:usd" for i in range(3)]
    now = clock.now()
    # The first calls connect and load each script (NOSCRIPT -> SCRIPT LOAD -> EVALSHA).
    await _round_trips(sync, lambda: sync_cls.sent, "warm-s", keys, now)
    await _round_trips(aio, lambda: async_cls.sent, "warm-a", keys, now)
    for i in range(5):
        assert await _round_trips(sync, lambda: sync_cls.sent, f"s{i}", keys, now) == [1] * 6
        assert await _round_trips(aio, lambda: async_cls.sent, f"a{i}", keys, now) == [1] * 6
    await sync.close()
    await aio.close()


async def _reloads_forgotten_scripts(
    adapter: LedgerAdapter, sent: Callable[[], int], raw: redis.Redis, now: float
) -> None:
    charges = [Charge(f"pgtest:{{u:{adapter.kind}}}:usd", 10, 100, EXPIRES)]
    assert (await adapter.reserve("warm", charges, now=now, ttl=60)).ok
    await adapter.commit("warm", charges, now=now)
    raw.script_flush()
    before = sent()
    result = await adapter.reserve("after-flush", charges, now=now, ttl=60)
    assert sent() - before == 3  # EVALSHA (NOSCRIPT), SCRIPT LOAD, EVALSHA
    assert result.ok
    assert result.states == (CounterState(10, 10),)
    before = sent()
    assert await adapter.commit("after-flush", charges, now=now) == (CounterState(20, 0),)
    assert sent() - before == 3  # the commit script is loaded again too
    before = sent()
    assert (await adapter.reserve("loaded", charges, now=now, ttl=60)).ok
    assert sent() - before == 1


def test_closed_ids_are_trimmed_by_the_commits_that_add_them(clock: FakeClock) -> None:
    # Only a commit (or release) adds closed ids, so only it trims those whose time is
    # over (up to 64 a call): a reserve runs no ZCOUNT, and a commit past the closed
    # ttl leaves its own id alone in the set.
    server = RedisServer(free_port())
    server.start()
    raw = server.client()
    ledger = LedgerAdapter("redis", open_ledger(server.url, closed_ttl=0.3), raw=raw)
    key = "t:{u:a}:usd"
    charges = [Charge(key, 1, 1_000, EXPIRES)]

    def zcounts() -> int:
        stats: Any = raw.info("commandstats")
        return int(stats.get("cmdstat_zcount", {}).get("calls", 0))

    async def run() -> None:
        for i in range(10):
            await ledger.commit(f"c{i}", charges, now=clock.now())
        assert raw.zcard(key + CLOSED_SUFFIX) == 10
        # The set lives as long as the latest close; here others keep it alive.
        raw.persist(key + CLOSED_SUFFIX)
        await ledger.elapse(clock, 0.3)
        before = zcounts()
        for i in range(5):
            assert (await ledger.reserve(f"r{i}", charges, now=clock.now(), ttl=60)).ok
        assert zcounts() == before
        assert raw.zcard(key + CLOSED_SUFFIX) == 10  # reserves leave the set as it was
        await ledger.commit("r0", charges, now=clock.now())
        assert zcounts() == before + 1
        assert raw.zrange(key + CLOSED_SUFFIX, 0, -1) == [b"r0"]

    try:
        asyncio.run(run())
    finally:
        raw.close()
        asyncio.run(ledger.close())
        server.kill()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_counters_expiry_is_set_by_the_write_that_makes_it(
    kind: str, redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    # Every charge of a counter's window carries the same expires_at, so the script that
    # makes the hash (or its index) sets its expiry and later writes leave it alone.
    made = open_ledger(redis_url) if kind == "sync" else open_async_ledger(redis_url)
    ledger = LedgerAdapter(f"redis-{kind}", made, raw=raw_redis)
    now = clock.now()
    key, index = f"{key_prefix}:{{u:a}}:usd", f"{key_prefix}:{{u:a}}:usd" + INDEX_SUFFIX
    charge = Charge(key, 10, 1_000, now + 3_600)
    hour, far = 3_600_000, 10 * 86_400_000

    def for_the_window(name: str) -> bool:
        return hour - 600_000 < raw_redis.pttl(name) <= hour

    assert (await ledger.reserve("r1", [charge], now=now, ttl=60)).ok
    assert for_the_window(key)
    assert for_the_window(index)
    raw_redis.pexpire(key, far)
    raw_redis.pexpire(index, far)
    # A reserve beside an open one, a commit, a refusal: none sets an expiry again.
    assert (await ledger.reserve("r2", [charge], now=now, ttl=60)).ok
    await ledger.commit("r1", [charge], now=now)
    assert not (
        await ledger.reserve("r3", [Charge(key, 2_000, 1_000, now + 60)], now=now, ttl=60)
    ).ok
    assert raw_redis.pttl(key) > hour
    assert raw_redis.pttl(index) > hour
    # The index made again once no reservation is open gets the window's expiry.
    await ledger.release("r2", [key], now=now)
    assert not raw_redis.exists(index)
    assert (await ledger.reserve("r4", [charge], now=now, ttl=60)).ok
    assert for_the_window(index)
    assert raw_redis.pttl(key) > hour
    # A commit that makes the counter again, after it was gone, gives it its expiry.
    raw_redis.delete(key, index)
    assert await ledger.commit("r4", [charge], now=now) == (CounterState(10, 0),)
    assert for_the_window(key)
    assert not raw_redis.exists(index)
    await ledger.close()


async def test_scripts_the_server_forgot_are_loaded_again(clock: FakeClock) -> None:
    # A server restarted without persistence, or SCRIPT FLUSH, forgets the scripts:
    # the next operation gets NOSCRIPT, loads its script and runs it, once. (A server
    # of its own: the shared one keeps its scripts for the other tests' counts.)
    server = RedisServer(free_port())
    server.start()
    sync_cls, async_cls = counting_classes()
    sync = LedgerAdapter("redis-sync", open_ledger(server.url, connection_class=sync_cls))
    aio = LedgerAdapter("redis-async", open_async_ledger(server.url, connection_class=async_cls))
    raw = redis.Redis.from_url(server.url)
    try:
        await _reloads_forgotten_scripts(sync, lambda: sync_cls.sent, raw, clock.now())
        await _reloads_forgotten_scripts(aio, lambda: async_cls.sent, raw, clock.now())
    finally:
        raw.close()
        await sync.close()
        await aio.close()
        server.kill()


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_a_factory_ledger_gives_its_connection_back_after_every_outcome(
    flavour: str, key_prefix: str, clock: FakeClock
) -> None:
    # Factory-made ledgers run their scripts on the pool's connections directly. With one
    # connection in the pool, an operation that kept it (after a reply, a refusal, an
    # error reply, a lost reply or, asyncio, a cancelled caller) would leave the next one
    # without a connection; one that gave it back unread would hand its reply on.
    server = RedisServer(free_port())
    server.start()
    opener = open_ledger if flavour == "sync" else open_async_ledger
    ledger = LedgerAdapter(f"redis-{flavour}", opener(server.url, max_connections=1))
    raw = redis.Redis.from_url(server.url)
    key = f"{key_prefix}:{{u:a}}:usd"
    now = clock.now()

    def charge(amount: int, on: str = key) -> list[Charge]:
        return [Charge(on, amount, 1_000, EXPIRES)]

    try:
        for i in range(20):
            assert (await ledger.reserve(f"r{i}", charge(10), now=now, ttl=60)).ok
            states = await ledger.commit(f"r{i}", charge(10), now=now)
            assert states == (CounterState(10 * (i + 1), 0),)
        assert not (await ledger.reserve("big", charge(900), now=now, ttl=60)).ok
        raw.set(f"{key_prefix}:{{u:b}}:usd", "not a hash")
        with pytest.raises(StorageError) as caught:
            await ledger.reserve("wrong", charge(1, f"{key_prefix}:{{u:b}}:usd"), now=now, ttl=60)
        assert "WRONGTYPE" in str(caught.value.__cause__)
        server.pause()  # the reply never comes: the connection is dropped, not reused
        with pytest.raises(StorageError):
            await ledger.reserve("frozen", charge(1), now=now, ttl=60)
        if flavour == "async":
            task = asyncio.ensure_future(ledger.reserve("cancelled", charge(2), now=now, ttl=60))
            for _ in range(3):  # let it reach the store, which never answers while frozen
                await asyncio.sleep(0)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        server.resume()
        assert (await ledger.reserve("after", charge(5), now=now, ttl=60)).ok
        # Each reply read is its own operation's. The server may have applied what it
        # had queued when it thawed: the frozen reserve, the cancelled one.
        (state,) = await ledger.read([key], now=now)
        assert state.settled == 200
        assert state.pending in (5, 6, 7, 8)
    finally:
        raw.close()
        await ledger.close()
        server.kill()


async def test_an_async_send_on_an_open_connection_starts_no_task(
    redis_url: str, key_prefix: str, clock: FakeClock
) -> None:
    # redis.asyncio sends through asyncio.wait_for when the connection has a socket
    # timeout: on Python 3.11 a task and a pass of the event loop per command. The
    # ledger's connections bound that write themselves and start no task.
    ledger = LedgerAdapter("redis-async", open_async_ledger(redis_url))
    key = f"{key_prefix}:{{u:a}}:usd"
    charges = [Charge(key, 1, 1_000, EXPIRES)]
    loop = asyncio.get_running_loop()
    started: list[object] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    try:
        assert (await ledger.reserve("open", charges, now=clock.now(), ttl=60)).ok  # connects
        loop.set_task_factory(factory)
        for i in range(5):
            assert (await ledger.reserve(f"r{i}", charges, now=clock.now(), ttl=60)).ok
            await ledger.commit(f"r{i}", charges, now=clock.now())
        assert started == []
    finally:
        loop.set_task_factory(None)
        await ledger.close()


async def test_an_async_write_the_frozen_store_never_takes_is_bounded_and_its_outcome_unknown(
    key_prefix: str, clock: FakeClock
) -> None:
    # A command larger than the socket buffers, to a frozen store: the write itself waits
    # (the reply's timeout never starts). It ends with a storage error, not a
    # cancellation, saying that what may have reached the store may be applied;
    # after the thaw the ledger goes on, on a new connection.
    server = RedisServer(free_port())
    server.start()
    ledger = LedgerAdapter("redis-async", open_async_ledger(server.url))
    key = f"{key_prefix}:{{u:a}}:usd"
    huge = f"{key_prefix}:{{u:a}}:" + "x" * (32 << 20)
    try:
        assert (
            await ledger.reserve("open", [Charge(key, 1, 100, EXPIRES)], now=clock.now(), ttl=60)
        ).ok
        server.pause()
        huge_charge = [Charge(huge, 1, 100, EXPIRES)]
        with pytest.raises(StorageOutcomeUnknown) as caught:
            # Without a bound of its own the write would wait for ever: this test's
            # limit is far beyond the ledger's, so that it holds on a loaded machine.
            await asyncio.wait_for(ledger.reserve("huge", huge_charge, now=clock.now(), ttl=60), 60)
        assert "Timeout writing" in str(caught.value.__cause__)
        server.resume()
        assert (
            await ledger.reserve("after", [Charge(key, 2, 100, EXPIRES)], now=clock.now(), ttl=60)
        ).ok
    finally:
        await ledger.close()
        server.kill()


async def test_keys_reach_the_store_as_utf8_whichever_packs_the_command(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    # Both ledgers pack their scripts with hiredis itself: the same bytes as redis-py's
    # encoder, so a key with non-ASCII text is the same key for either, and for a plain
    # client.
    key = f"{key_prefix}:{{u:caf\u00e9 \u4e2d}}:usd"
    charge = [Charge(key, 7, 100, EXPIRES)]
    for opener in (open_ledger, open_async_ledger):
        adapter = LedgerAdapter("redis", opener(redis_url))
        assert (await adapter.reserve(f"r-{opener.__name__}", charge, now=clock.now(), ttl=60)).ok
        await adapter.close()
    assert int(raw_redis.hget(key.encode(), "p") or 0) == 14
    assert sorted(raw_redis.hkeys(key.encode())) == [
        b"p",
        b"r:r-open_async_ledger",
        b"r:r-open_ledger",
    ]


def test_only_a_plain_client_with_retries_off_runs_scripts_on_its_pool_directly() -> None:
    # The direct path does what execute_command does with retries off; a client that
    # retries, holds one connection or is a cluster keeps execute_command.
    import hiredis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    from payi_guard.ledger._redis_scripts import command_packer, direct_pool, script_sender

    plain = redis.Redis(retry=Retry(NoBackoff(), 0))
    assert direct_pool(plain) is plain.connection_pool
    assert direct_pool(redis.Redis(retry=Retry(NoBackoff(), 2))) is None
    assert (
        direct_pool(redis.Redis(single_connection_client=True, retry=Retry(NoBackoff(), 0))) is None
    )
    assert direct_pool(object()) is None  # a cluster client has no single pool
    # hiredis packs text as UTF-8 with strict errors: a pool told otherwise keeps redis-py's.
    assert command_packer(plain.connection_pool) is not None
    latin = redis.Redis(encoding="latin-1", retry=Retry(NoBackoff(), 0))
    assert command_packer(latin.connection_pool) is None
    # The sync sender packs as the async one does, with redis-py's packing as the fallback.
    for client, packer in ((plain, hiredis.pack_command), (latin, None)):
        sender = script_sender(client, direct=True)
        assert isinstance(sender, functools.partial)
        assert sender.args == (client.connection_pool, packer)


# -- slot grouping, forced on a single server ------------------------------------------------


def _grouping_keys(prefix: str) -> tuple[str, str, str, str]:
    a = f"{prefix}:{{u:acme:alice}}:usd:day:1"
    a_tokens = f"{prefix}:{{u:acme:alice}}:tokens:day:1"
    b = f"{prefix}:{{o:acme}}:usd:day:1"
    c = f"{prefix}:{{g}}:usd:day:1"
    assert len({key_slot(k.encode()) for k in (a, b, c)}) == 3
    return a, a_tokens, b, c


async def _grouping_scenario(
    adapter: LedgerAdapter, sent: Callable[[], int], prefix: str, raw: redis.Redis, now: float
) -> None:
    a, a_tokens, b, c = _grouping_keys(prefix)
    every = [a, a_tokens, b, c]
    await adapter.read(every, now=now)  # connect
    for name in _SCRIPT_NAMES:  # whatever the server's script cache holds, no load counted
        raw.script_load(_script_source(name))

    # Success: one script run per slot (a and a_tokens share one).
    charges = [Charge(a, 100, 1000, EXPIRES), Charge(b, 100, 1000, EXPIRES),
               Charge(a_tokens, 5, 50, EXPIRES), Charge(c, 100, None, EXPIRES)]  # fmt: skip
    result = await adapter.reserve("ok", charges, now=now, ttl=60)
    assert result.ok
    assert result.states == (
        CounterState(0, 100), CounterState(0, 100), CounterState(0, 5), CounterState(0, 100)
    )  # fmt: skip
    start = sent()
    states = await adapter.commit("ok", charges, now=now)
    assert sent() - start == 3
    assert states == (
        CounterState(100, 0), CounterState(100, 0), CounterState(5, 0), CounterState(100, 0)
    )  # fmt: skip

    # The last group refuses: the groups already reserved are released again.
    before = await adapter.read(every, now=now)
    refusing = [Charge(a, 100, 1000, EXPIRES), Charge(b, 100, 1000, EXPIRES),
                Charge(c, 100, 150, EXPIRES)]  # fmt: skip
    start = sent()
    result = await adapter.reserve("no", refusing, now=now, ttl=60)
    assert sent() - start == 3 + 2  # three reserves, two rollbacks
    assert not result.ok
    assert result.refused == 2
    # c refused 100: it notes so; a and b are as they were.
    noted = CounterState(before[3].settled, before[3].pending, refused=100)
    assert result.states == (before[0], before[2], noted)
    before = (*before[:3], noted)
    assert await adapter.read(every, now=now) == before
    assert not raw.hexists(a, "r:no")
    assert not raw.hexists(b, "r:no")
    # A rollback is not a release: the refused id is not closed (as on one slot).
    assert raw.zscore(a + CLOSED_SUFFIX, "no") is None
    # Nor does it forget the ids closed before it: a retried commit is applied once.
    assert raw.zscore(a + CLOSED_SUFFIX, "ok") is not None
    assert raw.pttl(a + CLOSED_SUFFIX) > 0
    assert await adapter.commit("ok", charges, now=now) == (before[0], before[2], before[1],
                                                            before[3])  # fmt: skip
    assert await adapter.read(every, now=now) == before

    # The first group refuses at index 2 but a later group has a lower failing index:
    # that one is reported, as a single script would.
    mixed = [Charge(a, 1, 1000, EXPIRES), Charge(b, 1000, 1000, EXPIRES),
             Charge(a_tokens, 100, 50, EXPIRES)]  # fmt: skip
    result = await adapter.reserve("mixed", mixed, now=now, ttl=60)
    assert not result.ok
    assert result.refused == 1
    # The counter that refused in its own slot notes what it needed (a_tokens: it does
    # refuse this call), not the one reported; nothing else changed.
    before = (before[0], CounterState(before[1].settled, before[1].pending, 100), *before[2:])
    assert await adapter.read(every, now=now) == before

    # A storage error in a later group rolls back the earlier ones, then is raised.
    raw.set(c, "not a hash")
    with pytest.raises(StorageError, match="WRONGTYPE") as caught:
        await adapter.reserve("broken", refusing, now=now, ttl=60)
    assert isinstance(caught.value.__cause__, redis.ResponseError)
    assert not raw.hexists(a, "r:broken")
    assert not raw.hexists(b, "r:broken")
    assert await adapter.read([a, a_tokens, b], now=now) == before[:3]
    raw.delete(c)

    with pytest.raises(ValueError, match="hash tag"):
        await adapter.reserve("tagless", [Charge(f"{prefix}:plain", 1, 5, EXPIRES)], now=now, ttl=1)

    # Renewals: one script run per slot for the whole batch.
    held = [Charge(a, 1, None, EXPIRES), Charge(b, 1, None, EXPIRES), Charge(c, 1, None, EXPIRES)]
    assert (await adapter.reserve("long-1", held, now=now, ttl=60)).ok
    assert (await adapter.reserve("long-2", held[:2], now=now, ttl=60)).ok
    start = sent()
    batch = [("long-1", [a, b, c]), ("long-2", [a, b]), ("gone", [c])]
    assert await adapter.renew_many(batch, now=now, ttl=3600) == (True, True, False)
    assert sent() - start == 3
    for key in (a, b):
        assert raw.zscore(key + INDEX_SUFFIX, "r:long-2") is not None
    # A retried commit that half failed completes on the other slots only.
    await adapter.commit("long-2", [Charge(a, 1, None, EXPIRES)], now=now)
    states = await adapter.commit(
        "long-2", [Charge(a, 1, None, EXPIRES), Charge(b, 1, None, EXPIRES)], now=now
    )
    assert states[0].settled == before[0].settled + 1
    assert states[1].settled == before[2].settled + 1


async def test_slot_grouping_sync(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    sync_cls, _ = counting_classes()
    ledger = open_ledger(redis_url, connection_class=sync_cls, group_by_slot=True)
    adapter = LedgerAdapter("redis-sync", ledger, raw=raw_redis)
    await _grouping_scenario(adapter, lambda: sync_cls.sent, key_prefix, raw_redis, clock.now())
    ledger.close()


async def test_slot_grouping_async(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    _, async_cls = counting_classes()
    ledger = open_async_ledger(redis_url, connection_class=async_cls, group_by_slot=True)
    adapter = LedgerAdapter("redis-async", ledger, raw=raw_redis)
    await _grouping_scenario(adapter, lambda: async_cls.sent, key_prefix, raw_redis, clock.now())
    await ledger.aclose()


# -- a dead server -------------------------------------------------------------------------------


def test_dead_server_fails_fast_and_the_same_ledger_recovers(clock: FakeClock) -> None:
    server = RedisServer(free_port())
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    sync = open_ledger(url)
    aio = open_async_ledger(url)
    loop = asyncio.new_event_loop()
    key = "pgtest:dead:{u:a}:usd"
    now = clock.now()
    counter = iter(range(1000))

    def ops() -> list[tuple[str, Callable[[], Any]]]:
        n = next(counter)
        charge = [Charge(key, 10, 1000, EXPIRES)]
        return [
            ("sync reserve", lambda: sync.reserve(f"s{n}", charge, now=now, ttl=60)),
            ("sync commit", lambda: sync.commit(f"s{n}", charge, now=now)),
            ("async reserve", lambda: loop.run_until_complete(
                aio.reserve(f"a{n}", charge, now=now, ttl=60))),
            ("async commit", lambda: loop.run_until_complete(aio.commit(f"a{n}", charge, now=now))),
        ]  # fmt: skip

    def all_fail_fast(how: str) -> list[float]:
        took = []
        for name, op in ops():
            start = time.perf_counter()
            with pytest.raises(StorageError) as caught:
                op()
            took.append(time.perf_counter() - start)
            assert isinstance(caught.value.__cause__, (redis.RedisError, OSError)), (how, name)
        return took

    try:
        for _, op in ops():
            op()
        assert sync.read([key], now=now) == (CounterState(20, 0),)

        server.pause()  # frozen: connections hang until the read timeout
        frozen = all_fail_fast("frozen")
        assert all(DEFAULT_TIMEOUT * 0.8 <= t < 0.75 for t in frozen), frozen

        server.kill()  # gone: connections are refused
        dead = all_fail_fast("dead")
        assert all(t < 0.75 for t in dead), dead

        server.start()  # back on the same port, empty (no persistence)
        for _, op in ops():
            op()
        assert sync.read([key], now=now) == (CounterState(20, 0),)
    finally:
        loop.run_until_complete(aio.aclose())
        loop.close()
        sync.close()
        server.kill()


# -- shared clients, store events, clients built elsewhere ----------------------------------------


async def test_ledgers_of_one_uri_share_one_client(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    key = f"{key_prefix}:{{u:a}}:usd"
    # An address of this test's own: a ledger another test left open on the usual one
    # would hold its shared client.
    redis_url = f"{redis_url}?client_name={key_prefix}"
    first, second = open_ledger(redis_url), open_ledger(redis_url)
    other = open_ledger(redis_url, socket_timeout=1)
    assert isinstance(first, RedisLedger)
    assert isinstance(second, RedisLedger)
    assert isinstance(other, RedisLedger)
    assert first.client is second.client
    assert other.client is not first.client
    first.close()
    first.close()  # twice: still one release
    # The other holder still works; after its close a new ledger gets a new client.
    assert second.commit("c1", [Charge(key, 5, None, EXPIRES)], now=clock.now()) == (
        CounterState(5, 0),
    )
    second.close()
    third = open_ledger(redis_url)
    assert isinstance(third, RedisLedger)
    assert third.client is not first.client
    third.close()
    other.close()

    aio_first, aio_second = open_async_ledger(redis_url), open_async_ledger(redis_url)
    assert isinstance(aio_first, AsyncRedisLedger)
    assert isinstance(aio_second, AsyncRedisLedger)
    await aio_first.read([key], now=clock.now())
    await aio_second.read([key], now=clock.now())
    assert aio_first._binding().client is aio_second._binding().client
    await aio_first.aclose()
    assert await aio_second.read([key], now=clock.now()) == (CounterState(5, 0),)
    await aio_second.aclose()


def test_a_failing_event_callback_never_fails_the_operation(clock: FakeClock) -> None:
    from structlog.testing import capture_logs

    server = RedisServer(free_port())
    server.start()

    def broken(event: StorageEvent) -> None:
        raise RuntimeError("the callback is broken")

    ledger = open_ledger(server.url, on_event=broken, marker_key=own_marker())
    try:
        with capture_logs() as logs:
            result = ledger.commit("c", [Charge("k:{u:a}", 5, None, EXPIRES)], now=clock.now())
        assert result == (CounterState(5, 0),)
        (logged,) = [e for e in logs if e["event"] == "storage_event_callback_failed"]
        assert (logged["kind"], logged["error_type"]) == ("new", "RuntimeError")
    finally:
        ledger.close()
        server.kill()


def test_a_client_built_elsewhere_reports_timeouts_as_unknown_outcomes(clock: FakeClock) -> None:
    server = RedisServer(free_port())
    server.start()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(port=server.port, socket_timeout=0.25, retry=Retry(NoBackoff(), 0))
    ledger = RedisLedger(client)
    key = "k:{u:a}"
    try:
        ledger.read([key], now=clock.now())
        server.pause()
        # Without the factory's connections the ledger cannot tell when a request was
        # sent: a timeout may have been applied.
        with pytest.raises(StorageOutcomeUnknown):
            ledger.commit("c", [Charge(key, 5, None, EXPIRES)], now=clock.now())
    finally:
        server.resume()
        ledger.close()
        server.kill()


# -- event loops ---------------------------------------------------------------------------------


# The clients of the first two loops are never closed (that is the point): their sockets
# are closed by the garbage collector, which warns.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
def test_async_ledger_keeps_working_across_event_loops(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    aio = open_async_ledger(redis_url)
    assert isinstance(aio, AsyncRedisLedger)
    key = f"{key_prefix}:{{u:a}}:usd"

    async def reserve(rid: str) -> int:
        result = await aio.reserve(rid, [Charge(key, 10, None, EXPIRES)], now=clock.now(), ttl=60)
        return result.states[0].pending

    async def reserve_and_close(rid: str) -> int:
        pending = await reserve(rid)
        await aio.aclose()
        return pending

    # Each asyncio.run makes a new loop; the first two leave their client open.
    assert asyncio.run(reserve("a")) == 10
    assert asyncio.run(reserve("b")) == 20
    assert asyncio.run(reserve_and_close("c")) == 30
    assert len(aio._bindings) == 0  # closed loops' clients are forgotten too
    gc.collect()  # collect them here, under this test's warning filter


async def test_concurrent_async_reserves_never_overshoot(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    aio = open_async_ledger(redis_url)
    key = f"{key_prefix}:{{u:a}}:usd"

    async def one(i: int) -> bool:
        charge = [Charge(key, 7, 500, EXPIRES)]
        return (await aio.reserve(f"r{i}", charge, now=clock.now(), ttl=60)).ok

    granted = await asyncio.gather(*(one(i) for i in range(200)))
    assert sum(granted) == 500 // 7
    assert await aio.read([key], now=clock.now()) == (CounterState(0, 7 * (500 // 7), 7),)
    await aio.aclose()


# -- a real (one-node) Redis Cluster --------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_port() -> Iterator[int]:
    server = RedisServer(free_port(), extra=["--cluster-enabled", "yes"])
    server.start()
    client: Any = server.client()
    try:
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 10
        while b"cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            assert time.monotonic() < deadline, "the one-node cluster never became ok"
            time.sleep(0.05)
        yield server.port
    finally:
        client.close()
        server.kill()


async def test_real_cluster_groups_by_slot(cluster_port: int, clock: FakeClock) -> None:
    uri = f"redis+cluster://127.0.0.1:{cluster_port}"
    sync = open_ledger(uri)
    assert isinstance(sync, RedisLedger)
    aio = open_async_ledger(uri)
    keys = ["c:{u:acme:alice}:usd", "c:{o:acme}:usd", "c:{g}:usd"]
    now = clock.now()
    charges = [Charge(k, 100, 1000, EXPIRES) for k in keys]
    assert sync.reserve("s1", charges, now=now, ttl=60).ok
    assert (await aio.reserve("a1", charges, now=now, ttl=60)).ok
    refused = [Charge(keys[0], 100, 1000, EXPIRES), Charge(keys[2], 900, 1000, EXPIRES)]
    assert not sync.reserve("s2", refused, now=now, ttl=60).ok
    assert sync.read(keys, now=now) == (*[CounterState(0, 200)] * 2, CounterState(0, 200, 900))
    assert await aio.commit("a1", charges, now=now) == (
        *[CounterState(100, 100)] * 2,
        CounterState(100, 100, 900),
    )
    assert sync.release("s1", keys, now=now) == (
        *[CounterState(100, 0)] * 2,
        CounterState(100, 0, 900),
    )
    # Idempotent per id on every slot; renewals reach every slot.
    assert await aio.commit("a1", charges, now=now) == sync.read(keys, now=now)
    assert sync.reserve("s3", charges, now=now, ttl=60).ok
    assert sync.renew_many([("s3", keys), ("a1", keys)], now=now, ttl=600) == (True, False)
    assert await aio.renew("s3", keys, now=now, ttl=600)
    assert sync.release("s3", keys, now=now) == (CounterState(100, 0),) * 3

    # Without grouping the server itself refuses the cross-slot script.
    client: Any = sync.client
    ungrouped = RedisLedger(client, group_by_slot=False)
    with pytest.raises(StorageError):
        ungrouped.reserve("x", charges, now=now, ttl=60)
    sync.close()
    await aio.aclose()


async def test_real_cluster_scan_lists_keys_of_every_slot(
    cluster_port: int, clock: FakeClock
) -> None:
    uri = f"redis+cluster://127.0.0.1:{cluster_port}"
    sync = open_ledger(uri)
    aio = open_async_ledger(uri)
    keys = [f"s:{{u:user{i}}}:usd" for i in range(300)]  # spread over many slots
    assert len({key_slot(k.encode()) for k in keys}) > 250
    sync.commit("seed", [Charge(k, 1, None, EXPIRES) for k in keys], now=clock.now())
    assert sorted(sync.scan("s:{u:*", now=clock.now())) == sorted(keys)
    assert sorted(await aio.scan("s:{u:*", now=clock.now())) == sorted(keys)
    assert len(await aio.scan("s:{u:*", now=clock.now(), limit=7)) == 7
    sync.close()
    await aio.aclose()


async def test_real_cluster_serves_a_burst_of_concurrent_async_calls(
    cluster_port: int, clock: FakeClock
) -> None:
    # Rounds of 300 reserve-and-commit pairs at once on one node (a user's, an org's and
    # the global counter each): more connections than redis-py's own per-node default
    # (100), past which its cluster client fails commands and drops its connections.
    aio = open_async_ledger(f"redis+cluster://127.0.0.1:{cluster_port}")
    now = clock.now()
    shared = ["burst:{o:acme}:usd", "burst:{g}:usd"]

    async def call(i: int) -> None:
        keys = [f"burst:{{u:user{i % 7}}}:usd", *shared]
        held = [Charge(key, 10, None, EXPIRES) for key in keys]
        assert (await aio.reserve(f"b{i}", held, now=now, ttl=60)).ok
        await aio.commit(f"b{i}", [Charge(key, 3, None, EXPIRES) for key in keys], now=now)

    for round_ in range(3):
        calls = (call(round_ * 300 + i) for i in range(300))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
    users = [f"burst:{{u:user{i}}}:usd" for i in range(7)]
    states = await aio.read([*users, *shared], now=now)
    assert [state.settled for state in states[7:]] == [900 * 3, 900 * 3]
    assert sum(state.settled for state in states[:7]) == 900 * 3
    assert sum(state.pending for state in states) == 0
    await aio.aclose()


@pytest.fixture(scope="module")
def three_masters() -> Iterator[str]:
    """A Redis Cluster of three masters (a third of the slots each); its URI."""
    servers = [RedisServer(free_port(), extra=["--cluster-enabled", "yes"]) for _ in range(3)]
    try:
        for server in servers:
            server.start()
        clients: list[Any] = [server.client() for server in servers]
        for index, client in enumerate(clients):
            first, last = index * 5462, min(16383, index * 5462 + 5461)
            client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        for server in servers[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", server.port)
        deadline = time.monotonic() + 20
        while not all(
            b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
            and c.execute_command("CLUSTER", "COUNTKEYSINSLOT", 0) == 0
            and len(c.execute_command("CLUSTER", "NODES").splitlines()) == 3
            for c in clients
        ):
            assert time.monotonic() < deadline, "the three-master cluster never became ok"
            time.sleep(0.05)
        for client in clients:
            client.close()
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{s.port}" for s in servers)
    finally:
        for server in servers:
            server.kill()


async def test_a_fresh_cluster_client_serves_its_first_burst(
    three_masters: str, clock: FakeClock
) -> None:
    # Every call's first command at once, on a client that has not learnt the layout:
    # redis-py would learn it under every task at the same time and fail most of them.
    aio = open_async_ledger(three_masters)
    now = clock.now()
    keys = ["first:{u:carol}:usd", "first:{o:acme}:usd", "first:{g}:usd"]
    assert len({key_slot(k.encode()) // 5462 for k in keys}) == 3  # one key per master

    async def call(i: int) -> None:
        held = [Charge(key, 10, None, EXPIRES) for key in keys]
        assert (await aio.reserve(f"f{i}", held, now=now, ttl=60)).ok
        await aio.commit(f"f{i}", [Charge(key, 3, None, EXPIRES) for key in keys], now=now)

    results = await asyncio.gather(*(call(i) for i in range(40)), return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    states = await aio.read(keys, now=now)
    assert [(state.settled, state.pending) for state in states] == [(120, 0)] * 3
    await aio.aclose()


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_an_exception_inside_the_redis_client_is_an_unknown_outcome(
    flavour: str, monkeypatch: pytest.MonkeyPatch, clock: FakeClock, key_prefix: str
) -> None:
    # A race inside redis-py (a connection torn down under a command) raises an
    # AttributeError; the ledger reports it as a storage failure of unknown outcome, and
    # a grouped reserve undoes the groups it had reserved.
    a, _, b, c = _grouping_keys(key_prefix)
    raw = redis.Redis(host="127.0.0.1", port=6379)
    for name in _SCRIPT_NAMES:  # no load among the sends counted below
        raw.script_load(_script_source(name))
    module: Any = redis.connection if flavour == "sync" else redis.asyncio.connection
    original = module.AbstractConnection.send_packed_command
    sends = 0

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal sends
        sends += 1
        if sends == 3:  # the third group's reserve
            raise AttributeError("'NoneType' object has no attribute 'writelines'")
        return original(self, *args, **kwargs)

    charges = [Charge(k, 5, 100, EXPIRES) for k in (a, b, c)]
    rid = f"torn-{flavour}"
    monkeypatch.setattr(module.AbstractConnection, "send_packed_command", broken)
    if flavour == "sync":
        ledger = RedisLedger(redis.Redis(host="127.0.0.1", port=6379), group_by_slot=True)
        with pytest.raises(StorageOutcomeUnknown, match="inside the Redis client"):
            ledger.reserve(rid, charges, now=clock.now(), ttl=60)
        monkeypatch.undo()
        ledger.close()
    else:
        aio = AsyncRedisLedger(
            lambda: redis.asyncio.Redis(host="127.0.0.1", port=6379), group_by_slot=True
        )
        with pytest.raises(StorageOutcomeUnknown, match="inside the Redis client"):
            await aio.reserve(rid, charges, now=clock.now(), ttl=60)
        monkeypatch.undo()
        await aio.aclose()
    assert sends >= 3
    for key in (a, b, c):
        assert not raw.hexists(key, f"r:{rid}")  # nothing left held
    raw.close()


# -- Sentinel, Unix socket, valkey:// --------------------------------------------------------------


def test_sentinel_uri_reaches_the_master(clock: FakeClock) -> None:
    master = RedisServer(free_port())
    master.start()
    sentinel = RedisServer(free_port())
    (sentinel.workdir / "sentinel.conf").write_text(
        f"sentinel monitor pgmaster 127.0.0.1 {master.port} 1\n"
    )
    try:
        sentinel.start(sentinel=True)
        events: list[StorageEvent] = []
        uri = f"redis+sentinel://127.0.0.1:{sentinel.port}/pgmaster/0"
        marker = own_marker()
        ledger = open_ledger(uri, on_event=events.append, marker_key=marker)
        key = "pgtest:sentinel:{u:a}:usd"
        assert ledger.reserve("r", [Charge(key, 5, 10, EXPIRES)], now=clock.now(), ttl=60).ok
        assert master.client().hget(key, "p") == b"5"
        # The master's connections check the store marker too.
        assert [event.kind for event in events] == ["new"]
        assert master.client().get(marker) == events[0].marker.encode()
        ledger.close()
    finally:
        sentinel.kill()
        master.kill()


async def test_unix_socket_uri(tmp_path: Path, clock: FakeClock) -> None:
    sock = tmp_path / "redis.sock"
    server = RedisServer(free_port(), extra=["--unixsocket", str(sock)])
    server.start()
    try:
        for scheme in ("redis+unix", "valkey+unix"):
            ledger = open_ledger(f"{scheme}://{sock}?db=0")
            key = f"pgtest:unix:{{u:{scheme}}}:usd"
            assert ledger.reserve("r", [Charge(key, 5, 10, EXPIRES)], now=clock.now(), ttl=60).ok
            ledger.close()
        aio = open_async_ledger(f"redis+unix://{sock}")
        assert await aio.read(["pgtest:unix:{u:redis+unix}:usd"], now=clock.now()) == (
            CounterState(0, 5),
        )
        await aio.aclose()
    finally:
        server.kill()


def test_valkey_scheme_speaks_redis(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, clock: FakeClock
) -> None:
    ledger = open_ledger(redis_url.replace("redis://", "valkey://", 1))
    key = f"{key_prefix}:{{u:a}}:usd"
    assert ledger.commit("r", [Charge(key, 5, None, EXPIRES)], now=clock.now()) == (
        CounterState(5, 0),
    )
    assert raw_redis.hget(key, "s") == b"5"
    ledger.close()


# -- URI handling --------------------------------------------------------------------------------


def _connection_kwargs(ledger: Any) -> dict[str, Any]:
    return dict(ledger.client.connection_pool.connection_kwargs)


def test_default_timeouts_and_overrides() -> None:
    ledger = open_ledger("redis://127.0.0.1:1/0")
    kwargs = _connection_kwargs(ledger)
    assert kwargs["socket_timeout"] == DEFAULT_TIMEOUT
    assert kwargs["socket_connect_timeout"] == DEFAULT_TIMEOUT
    assert kwargs["retry"].get_retries() == 0
    ledger.close()
    from_uri = open_ledger("redis://127.0.0.1:1/0?socket_timeout=2")
    assert _connection_kwargs(from_uri)["socket_timeout"] == 2.0
    from_options = open_ledger("redis://127.0.0.1:1/0", socket_connect_timeout=1.5)
    assert _connection_kwargs(from_options)["socket_connect_timeout"] == 1.5


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("", "URI"),
        ("127.0.0.1:6379", "URI"),
        ("mongodb://localhost", "unsupported storage scheme 'mongodb'"),
        ("memory://somewhere", "memory://"),
        ("redis+sentinel://127.0.0.1:26379", "service name"),
        ("redis+sentinel://127.0.0.1:26379/svc?bogus=1", "bogus"),
        ("redis+sentinel://:s3cret@127.0.0.1:x/svc", "invalid port"),
        ("redis+cluster://127.0.0.1:7000/3", "db"),
        ("redis+cluster:///", "at least one host"),
        ("redis+cluster://127.0.0.1:7000?socket_timeout=fast", "number"),
    ],
)
def test_bad_uris_raise_config_error(uri: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        open_ledger(uri)
    assert "s3cret" not in str(caught.value)


def test_shared_applies_to_memory_only() -> None:
    with pytest.raises(ConfigError, match="memory"):
        open_async_ledger("redis://127.0.0.1:6379/0", shared=open_ledger("memory://"))  # type: ignore[arg-type]


def test_sentinel_and_cluster_uris_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    from payi_guard.ledger import factory

    target = factory._parse(
        "redis+sentinel://u%40x:p%3Aw@[::1]:26380,10.0.0.2/mymaster/2?socket_timeout=1&ssl=true"
    )
    assert target.kind == "sentinel"
    assert target.hosts == (("::1", 26380), ("10.0.0.2", 26379))
    assert (target.service, target.db, target.username, target.password) == (
        "mymaster",
        2,
        "u@x",
        "p:w",
    )
    assert target.query == {"socket_timeout": 1.0, "ssl": True}
    target = factory._parse("valkey+cluster://secret@h1:7000,h2:7001")
    assert target.kind == "cluster"
    assert target.hosts == (("h1", 7000), ("h2", 7001))
    assert (target.username, target.password) == (None, "secret")


def test_missing_redis_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(MissingDependency, match=r"payi-guard\[redis\]"):
        open_ledger("redis://127.0.0.1:6379/0")
    with pytest.raises(MissingDependency, match=r"payi-guard\[redis\]"):
        open_async_ledger("redis://127.0.0.1:6379/0")


def test_script_replies_are_decoded_or_refused() -> None:
    from payi_guard.ledger._redis_plans import _decode_reserve, _decode_states

    assert _decode_states([1, 2, 0, b"3", 4, 5], 2) == (CounterState(1, 2), CounterState(3, 4, 5))
    assert _decode_reserve([1, -1, 7, 8, 0], 1) == ReserveResult(True, None, (CounterState(7, 8),))
    refused = _decode_reserve([0, 0, 7, 8, 9], 1)
    assert refused == ReserveResult(False, 0, (CounterState(7, 8, 9),))
    closed = _decode_reserve([-1, -1, 7, 8, 0], 1)
    assert closed == ReserveResult(False, None, (CounterState(7, 8),), closed=True)
    for reply in ([1, 2], [1, 2, 3, 4], "1 2 3", [1, None, 3], [1, b"two", 3]):
        with pytest.raises(StorageError, match="unexpected reply"):
            _decode_states(reply, 1)


def test_a_new_store_is_reported_whichever_first_connection_is_seen_first(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    # Connections opened together: the one that created the marker may be observed after
    # one that only read it. The store is new either way, and reported once.
    from payi_guard.ledger._redis_marker import StoreWatch

    for created_last in (True, False):
        watch = StoreWatch(own_marker())
        run: Any = raw_redis.execute_command  # what a new connection runs first
        created, read = run(*watch.request()), run(*watch.request())
        assert (int(created[0]), int(read[0])) == (1, 0)
        for reply in (read, created) if created_last else (created, read):
            watch.observe("redis", reply)
        (event,) = watch._events
        assert (event.kind, event.marker) == ("new", created[1].decode())
        raw_redis.delete(watch.key)
