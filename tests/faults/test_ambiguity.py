"""Lost replies and late requests: commits and releases are idempotent per reservation
id, a reserve that arrives after its release holds nothing, and the ledger tells an
outcome it cannot know from a request that was never sent."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from ledger._support import LedgerAdapter, RedisServer

from faults._support import Proxy, scripts_run, wait_until
from payi_guard.exceptions import StorageError
from payi_guard.ledger import Charge, CounterState, open_async_ledger, open_ledger

EXPIRES = time.time() + 3 * 86_400
KEY = "a:{u:alice}:usd"


async def warm(ledger: LedgerAdapter) -> None:
    """Connect and load every script, so a held request is the script itself."""
    scratch = "a:{u:warm}:usd"
    now = time.time()
    await ledger.reserve("warm", [Charge(scratch, 1, 10, EXPIRES)], now=now, ttl=60)
    await ledger.commit("warm", [Charge(scratch, 1, None, EXPIRES)], now=now)
    await ledger.release("warm-2", [scratch], now=now)
    await ledger.read([scratch], now=now)


def adapter(kind: str, url: str) -> LedgerAdapter:
    if kind == "sync":
        return LedgerAdapter(kind, open_ledger(url))
    return LedgerAdapter(kind, open_async_ledger(url))


def outcome_unknown() -> type[BaseException]:
    from payi_guard.ledger import StorageOutcomeUnknown

    return StorageOutcomeUnknown


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_commit_whose_reply_was_lost_is_applied_once(
    kind: str, server: RedisServer, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(server.port)
    ledger = adapter(kind, proxy.url)
    raw = server.client()
    now = time.time()
    try:
        await warm(ledger)
        assert (await ledger.reserve("r1", [Charge(KEY, 500, 1000, EXPIRES)], now=now, ttl=60)).ok
        proxy.hold()  # the commit reaches the server only after the client gave up
        with pytest.raises(StorageError) as lost:
            await ledger.commit("r1", [Charge(KEY, 300, None, EXPIRES)], now=now)
        proxy.open()
        wait_until(lambda: raw.hget(KEY, "s") == b"300", timeout=10, what="the late commit")
        # The caller retries the commit whose outcome it could not know: applied once.
        assert await ledger.commit("r1", [Charge(KEY, 300, None, EXPIRES)], now=now) == (
            CounterState(300, 0),
        )
        assert await ledger.read([KEY], now=now) == (CounterState(300, 0),)
        assert isinstance(lost.value, outcome_unknown())
    finally:
        await ledger.close()
        raw.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_reserve_that_arrives_after_its_release_holds_nothing(
    kind: str, server: RedisServer, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(server.port)
    late = adapter(kind, proxy.url)
    direct = open_ledger(server.url)
    raw = server.client()
    now = time.time()
    try:
        await warm(late)
        proxy.hold()
        with pytest.raises(StorageError) as timed_out:
            await late.reserve("r1", [Charge(KEY, 800, 1000, EXPIRES)], now=now, ttl=300)
        # The caller gave up and released the id; the release got through at once.
        before = scripts_run(raw)
        assert direct.release("r1", [KEY], now=now) == (CounterState(0, 0),)
        proxy.open()
        wait_until(lambda: scripts_run(raw) >= before + 2, what="the late reserve")
        assert direct.read([KEY], now=now) == (CounterState(0, 0),)
        assert direct.reserve("r2", [Charge(KEY, 1000, 1000, EXPIRES)], now=now, ttl=60).ok
        assert isinstance(timed_out.value, outcome_unknown())
    finally:
        await late.close()
        direct.close()
        raw.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_store_that_refuses_connections_is_not_an_unknown_outcome(
    kind: str, server: RedisServer
) -> None:
    ledger = adapter(kind, server.url)
    now = time.time()
    try:
        await ledger.read([KEY], now=now)
        server.kill()
        # The pooled connection may only learn that the server died by sending on it:
        # that first request's fate is unknown to the client. From then on connections
        # are refused, and nothing can have been applied.
        with pytest.raises(StorageError):
            await ledger.read([KEY], now=now)
        with pytest.raises(StorageError) as refused:
            await ledger.commit("r1", [Charge(KEY, 300, None, EXPIRES)], now=now)
        assert not isinstance(refused.value, outcome_unknown())
    finally:
        await ledger.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_frozen_store_gives_an_unknown_outcome_not_a_false_failure(
    kind: str, server: RedisServer
) -> None:
    ledger = adapter(kind, server.url)
    raw = server.client()
    now = time.time()
    try:
        await warm(ledger)
        server.pause()
        try:
            with pytest.raises(StorageError) as frozen:
                await ledger.commit("r1", [Charge(KEY, 300, None, EXPIRES)], now=now)
        finally:
            server.resume()
        # It was applied once the store thawed; a retry does not add it again.
        wait_until(lambda: raw.hget(KEY, "s") == b"300", timeout=10, what="the thawed commit")
        assert await ledger.commit("r1", [Charge(KEY, 300, None, EXPIRES)], now=now) == (
            CounterState(300, 0),
        )
        assert isinstance(frozen.value, outcome_unknown())
    finally:
        await ledger.close()
        raw.close()
