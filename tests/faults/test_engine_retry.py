"""Commits, releases and reserves through the Guard while a private store fails.

A commit or release the store did not take is retried with the same id, by the caller
a little, then in the background, and ``genai_call`` is logged once, when it is applied
(or when it is given up, saying whether it may have been applied). A reserve whose
outcome is unknown, or whose caller was cancelled, is released so it holds nothing. A
settle whose caller is cancelled still commits and logs. A store restart without
persistence is logged once and forgets the guard's spent cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, MutableMapping, Sequence
from decimal import Decimal
from typing import Any

import pytest
from ledger._support import RedisServer, own_marker
from structlog.testing import capture_logs

from faults._stall import unstalled
from faults._support import MiddayClock, Proxy, async_wait_until, wait_until
from payi_guard import BudgetExceeded, Guard, track_context
from payi_guard.engine import CallRequest, Reservation
from payi_guard.ledger.factory import DEFAULT_TIMEOUT
from payi_guard.pricing import TokenUsage

PRICES = {"m": {"input_per_mtok": 1000, "output_per_mtok": 2000}}
"""$0.001 per input token and $0.002 per output token: a call of 100 + 50 tokens bounds
at $0.2 and costs $0.12 when it uses 60 + 30."""
CALL = CallRequest(model="m", input_tokens=100, max_output_tokens=50)
USED = TokenUsage(60, 30)
COST = Decimal("0.12")
NOTHING = Decimal(0)
BOUND = 2 * DEFAULT_TIMEOUT + 1.0
"""The longest a caller may wait on a failing store: twice the socket timeout, plus a
generous allowance for a loaded machine."""


def make_guard(url: str, *, limit: float = 10.0, **options: Any) -> Guard:
    config = {"prices": PRICES, "default": [{"max": limit, "per": "day"}]}
    policy = options.pop("on_storage_error", None)
    if policy is not None:
        config["on_storage_error"] = policy
    return Guard(config, storage=url, storage_options=options or None, clock=MiddayClock())


def named(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in list(logs) if e["event"] == name]


def state(guard: Guard, user: str = "alice") -> tuple[Decimal, Decimal]:
    """(settled, pending) of the user's counter, in dollars, read from the store."""
    ledger = guard.ledger
    (usage,) = guard.usage(user)
    key = next(iter(ledger.scan(f"pg:{{u:{user}}}:usd:*", now=time.time())))
    (counter,) = ledger.read([key], now=time.time())
    assert usage.used == Decimal(counter.used) / 10**9
    return Decimal(counter.settled) / 10**9, Decimal(counter.pending) / 10**9


def begin(guard: Guard) -> Reservation:
    with track_context(user_id="alice"):
        return guard.begin(CALL)


def timed(action: Callable[[], Any]) -> float:
    """Seconds ``action`` took, less the time this process was kept from running."""
    started = time.monotonic()
    action()
    return unstalled(started, time.monotonic())


def test_a_commit_while_the_store_is_down_is_applied_and_logged_once_it_is_back(
    aof_server: RedisServer,
) -> None:
    guard = make_guard(aof_server.url)
    try:
        reservation = begin(guard)
        aof_server.kill()
        with capture_logs() as logs:
            assert timed(lambda: reservation.settle(USED)) <= BOUND
            assert reservation.release() is reservation.record  # settled: a no-op
            assert not named(logs, "genai_call")
            (error,) = named(logs, "storage_error")
            assert error["op"] == "commit"
            assert error["retried"] is True
            aof_server.start()  # the AOF brings the reservation back
            (line,) = wait_until(lambda: named(logs, "genai_call"), what="the genai_call line")
            wait_until(lambda: named(logs, "storage_recovered"), what="storage_recovered")
        assert "ledger" not in line
        assert Decimal(str(line["cost_usd"])) == COST
        assert state(guard) == (COST, NOTHING)
    finally:
        guard.close()


async def test_an_async_release_while_the_store_is_down_frees_the_budget_once_it_is_back(
    aof_server: RedisServer,
) -> None:
    guard = make_guard(aof_server.url)
    try:
        async with track_context(user_id="alice"):
            reservation = await guard.abegin(CALL)
        aof_server.kill()
        with capture_logs() as logs:
            await reservation.arelease(outcome="error")
            assert not named(logs, "genai_call")
            await asyncio.to_thread(aof_server.start)
            (line,) = await async_wait_until(lambda: named(logs, "genai_call"), what="the line")
        assert line["outcome"] == "error"
        assert "ledger" not in line
        assert state(guard) == (NOTHING, NOTHING)
    finally:
        await guard.aclose()


def test_a_commit_given_up_says_it_was_not_applied(server: RedisServer) -> None:
    # closed_ttl bounds the retries (half of it): a store that stays down is given up.
    guard = make_guard(server.url, closed_ttl=1)
    try:
        reservation = begin(guard)
        server.kill()
        with capture_logs() as logs:
            reservation.settle(USED)
            (line,) = wait_until(lambda: named(logs, "genai_call"), what="the given-up line")
        assert line["ledger"] == "failed"  # every attempt was refused: none was applied
        (gave_up,) = named(logs, "storage_gave_up")
        assert gave_up["applied"] == "no"
        assert gave_up["attempts"] >= 2
    finally:
        guard.close()


def test_a_commit_whose_reply_was_lost_is_never_logged_as_failed(server: RedisServer) -> None:
    # closed_ttl bounds the retries (half of it), so the commit is given up while the
    # store is frozen; the store then applies what it had queued.
    guard = make_guard(server.url, closed_ttl=1)
    try:
        begin(guard).settle(USED)  # the scripts are loaded: a queued commit can run
        reservation = begin(guard)
        server.pause()
        try:
            with capture_logs() as logs:
                assert timed(lambda: reservation.settle(USED)) <= BOUND
                (line,) = wait_until(lambda: named(logs, "genai_call"), what="the given-up line")
        finally:
            server.resume()
        assert line["ledger"] == "unknown"  # it may have been applied...
        assert named(logs, "storage_gave_up")[0]["applied"] == "unknown"
        # ...and it was: the store ran the queued commit when it thawed.
        wait_until(lambda: state(guard) == (2 * COST, NOTHING), what="the queued commit")
    finally:
        guard.close()


def test_close_gives_what_waits_a_last_chance_then_gives_it_up(server: RedisServer) -> None:
    guard = make_guard(server.url)
    reservation = begin(guard)
    server.kill()
    with capture_logs() as logs:
        reservation.settle(USED)
        assert not named(logs, "genai_call")
        assert timed(guard.close) <= 4 * DEFAULT_TIMEOUT + BOUND
        (line,) = named(logs, "genai_call")
    assert line["ledger"] == "failed"


def test_a_reserve_whose_reply_was_lost_under_allow_is_charged_once(
    server: RedisServer, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(server.port)
    guard = make_guard(proxy.url, on_storage_error="allow")
    direct = make_guard(server.url)
    try:
        begin(guard).settle(USED)  # warm: a connection is open
        proxy.hold()  # the next reserve reaches the store after its caller gave up
        with capture_logs() as logs:
            reservation = begin(guard)  # let through unreserved
            proxy.open()
            reservation.settle(USED)  # under another id: the undo cannot cancel it
            wait_until(lambda: named(logs, "storage_recovered"), what="the reserve undone")
        assert named(logs, "storage_error")[0]["outcome_unknown"] is True
        assert named(logs, "storage_recovered")[0]["undoes_reserve"] is True
        wait_until(lambda: state(direct) == (2 * COST, NOTHING), what="two commits, nothing held")
    finally:
        guard.close()
        direct.close()


async def test_a_cancelled_reserve_holds_nothing(
    server: RedisServer, make_proxy: Callable[..., Proxy]
) -> None:
    proxy = make_proxy(server.port, reply_delay=0.3)
    guard = make_guard(proxy.url, socket_timeout=5)
    direct = make_guard(server.url)
    try:
        async with track_context(user_id="alice"):
            await (await guard.abegin(CALL)).asettle(USED)  # warm
            with capture_logs() as logs:
                task = asyncio.create_task(guard.abegin(CALL))
                await asyncio.sleep(0.1)  # the reserve was sent; its reply is on the way
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                # The reserve was applied, then its id released: nothing is held.
                await async_wait_until(
                    lambda: state(direct) == (COST, NOTHING), what="the reserve undone"
                )
                await guard.aclose()  # waits for the background release
        # Nothing failed: no storage_error, nor a storage_recovered without one.
        assert not named(logs, "storage_error")
        assert not named(logs, "storage_recovered")
    finally:
        await guard.aclose()
        direct.close()


@pytest.mark.parametrize("end", ["asettle", "arelease"])
async def test_a_cancelled_settle_still_commits_and_logs_once(
    server: RedisServer, make_proxy: Callable[..., Proxy], end: str
) -> None:
    # Every reply takes 0.3 s: the caller is cancelled while the commit is on its way.
    proxy = make_proxy(server.port, reply_delay=0.3)
    guard = make_guard(proxy.url, socket_timeout=5)
    direct = make_guard(server.url)
    try:
        async with track_context(user_id="alice"):
            reservation = await guard.abegin(CALL)
        with capture_logs() as logs:
            if end == "asettle":
                task = asyncio.create_task(reservation.asettle(USED))
            else:
                task = asyncio.create_task(reservation.arelease())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert reservation.record is not None
            await async_wait_until(lambda: named(logs, "genai_call"), what="the genai_call line")
            await guard.aclose()  # waits for what is under way: nothing more is logged
        assert len(named(logs, "genai_call")) == 1
        expected = COST if end == "asettle" else Decimal(0)
        assert state(direct) == (expected, NOTHING)
    finally:
        await guard.aclose()
        direct.close()


async def test_a_restart_without_persistence_is_logged_once_and_forgets_the_spent_cache(
    server: RedisServer,
) -> None:
    # A marker key of its own: this test's store is new to the process whatever port it got.
    marker = own_marker()
    guard = make_guard(server.url, limit=0.2, marker_key=marker)  # one call's bound
    try:
        with capture_logs() as logs:
            begin(guard).settle(TokenUsage(100, 50))  # spends the whole day
            with pytest.raises(BudgetExceeded):
                begin(guard)  # refused by the spent cache, no round trip
            assert len(named(logs, "storage_marker_created")) == 1
            server.restart()
            with track_context(user_id="bob"):
                # The first operation after the restart sees the marker gone.
                guard.begin(CALL).settle(USED)
                assert len(named(logs, "storage_reset")) == 1
            async with track_context(user_id="carol"):
                await (await guard.abegin(CALL)).asettle(USED)  # the async ledger: no repeat
            begin(guard).settle(USED)  # alice's spent entry went with the store's data
        (reset,) = named(logs, "storage_reset")
        assert reset["previous"] != reset["marker"]
        assert len(named(logs, "storage_marker_created")) == 1
        assert state(guard) == (COST, NOTHING)
    finally:
        await guard.aclose()
