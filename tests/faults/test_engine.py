"""The same faults seen through the Guard and the real openai SDK.

Bursts of plain and streamed calls on a healthy store; settles cut by the SDK's stream
clean-up deadline; calls that outlive the reservation ttl; a store restarted without
persistence; commits and reserves whose replies were lost; a call larger than a counter.
Each was first reproduced against the engine that lacked the fix.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
import redis
from ledger._support import RedisServer
from structlog.testing import capture_logs

from faults._support import (
    FakeProvider,
    MiddayClock,
    Proxy,
    async_wait_until,
    scripts_run,
    store_time,
    wait_store_time,
    wait_until,
)
from payi_guard import BudgetExceeded, Guard, StorageError, track_context

PRICES = {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2}}
PROMPT: Any = [{"role": "user", "content": "Tell me about the weather today"}]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProvider]:
    with FakeProvider() as provider:
        yield provider


def make_guard(storage: str, *, limit: float = 100.0, **config: Any) -> Guard:
    options = config.pop("storage_options", None)
    return Guard(
        {"prices": PRICES, "default": [{"max": limit, "per": "day"}], **config},
        storage=storage,
        storage_options=options,
        clock=MiddayClock(),
    )


def calls(logs: Sequence[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [event for event in logs if event["event"] == "genai_call"]


def used(guard: Guard, user: str) -> Decimal:
    value = guard.usage(user)[0].used
    assert isinstance(value, Decimal)
    return value


def async_client(guard: Guard, fake: FakeProvider, connections: int = 10) -> Any:
    http = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=connections))
    return guard.wrap(
        openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="k", max_retries=0, http_client=http
        )
    )


def sync_client(guard: Guard, fake: FakeProvider) -> Any:
    return guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0))


async def drain(stream: Any) -> None:
    async for _ in stream:
        pass


def assert_ledger_equals_logs(guard: Guard, events: Sequence[MutableMapping[str, Any]]) -> None:
    """Each user's counter holds exactly the logged costs: nothing pending, nothing lost."""
    for user in {e["user_id"] for e in events}:
        logged = sum(Decimal(str(e["cost_usd"])) for e in events if e["user_id"] == user)
        assert used(guard, user) == logged, user


@pytest.mark.slow
async def test_200_concurrent_sdk_calls_on_a_healthy_store_never_fail(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, fake: FakeProvider
) -> None:
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 100, "per": "day"}]},
        storage=redis_url,
        key_prefix=key_prefix,
        clock=MiddayClock(),
    )
    client = async_client(guard, fake, connections=200)
    failures: list[BaseException] = []

    async def one(task: int) -> None:
        async with track_context(user_id=f"user-{task % 25}"):
            try:
                await client.chat.completions.create(model="gpt-test", messages=PROMPT)
                await drain(
                    await client.chat.completions.create(
                        model="gpt-test", messages=PROMPT, stream=True
                    )
                )
            except Exception as exc:
                failures.append(exc)

    try:
        with capture_logs() as logs:
            await asyncio.gather(*(one(task) for task in range(200)))
            # A stream's settle may outlive its caller's wait (the SDK's clean-up
            # deadline): it still ends, and logs.
            events = await async_wait_until(
                lambda: len(calls(logs)) >= 400 and calls(logs), what="every settle"
            )
        assert not failures, failures[:3]
        assert not [e for e in logs if e["event"] == "storage_error"]
        assert len(events) == 400
        assert sum(e["stream"] for e in events) == 200
        assert_ledger_equals_logs(guard, events)
    finally:
        await client.close()
        await guard.aclose()


@pytest.mark.slow
async def test_100_concurrent_streaming_tasks_charge_and_log_every_stream(
    redis_url: str, key_prefix: str, raw_redis: redis.Redis, fake: FakeProvider
) -> None:
    # openai drains each finished stream under a 0.1 s deadline; with 100 tasks on one
    # event loop, many settles take longer than that and are cancelled mid-commit.
    guard = Guard(
        {"prices": PRICES, "default": [{"max": 100, "per": "day"}]},
        storage=redis_url,
        key_prefix=key_prefix,
        clock=MiddayClock(),
    )
    client = async_client(guard, fake, connections=100)
    failures: list[BaseException] = []

    async def one(task: int) -> None:
        async with track_context(user_id=f"user-{task % 20}"):
            for _ in range(10):
                try:
                    await drain(
                        await client.chat.completions.create(
                            model="gpt-test", messages=PROMPT, stream=True
                        )
                    )
                except Exception as exc:
                    failures.append(exc)

    try:
        with capture_logs() as logs:
            await asyncio.gather(*(one(task) for task in range(100)))
            events = await async_wait_until(
                lambda: len(calls(logs)) >= 1000 and calls(logs), what="every settle"
            )
        assert not failures, failures[:3]
        assert not [e for e in logs if e["event"] == "storage_error"]
        assert len(events) == 1000
        assert all(e["outcome"] == "ok" and "ledger" not in e for e in events)
        assert_ledger_equals_logs(guard, events)
    finally:
        await client.close()
        await guard.aclose()


async def test_an_async_stream_settle_outlives_the_sdk_clean_up_deadline(
    server: RedisServer, make_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    # Every store reply takes 0.3 s (well within the socket timeout): longer than the
    # 0.1 s the SDK gives a finished stream's clean-up.
    proxy = make_proxy(server.port, reply_delay=0.3)
    guard = make_guard(proxy.url, storage_options={"socket_timeout": 5})
    client = async_client(guard, fake)
    try:
        with capture_logs() as logs:
            async with track_context(user_id="alice"):
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=PROMPT, stream=True
                )
                async for _ in stream:
                    pass
            events = await async_wait_until(lambda: calls(logs), what="the genai_call line")
        assert len(events) == 1
        assert used(guard, "alice") == Decimal(str(events[0]["cost_usd"]))
    finally:
        await client.close()
        guard.close()
        await guard.aclose()


@pytest.mark.slow
async def test_a_call_longer_than_the_reservation_ttl_keeps_its_reservation(
    server: RedisServer, fake: FakeProvider
) -> None:
    # The limit fits one call's upper bound, not two. Renewals come every third of the
    # ttl, from a thread: the wait below blocks this event loop, and they go on.
    guard = make_guard(server.url, limit=0.0003, reservation_ttl=2)
    client = async_client(guard, fake)
    raw = server.client()
    try:
        async with track_context(user_id="alice"):
            stream = await client.chat.completions.create(
                model="gpt-test", messages=PROMPT, stream=True, max_tokens=100
            )
            chunks = aiter(stream)
            await anext(chunks)  # the call is live
            wait_store_time(raw, store_time(raw) + 5)  # well past its ttl
            with pytest.raises(BudgetExceeded):
                await client.chat.completions.create(
                    model="gpt-test", messages=PROMPT, max_tokens=100
                )
            async for _ in chunks:
                pass
    finally:
        raw.close()
        await client.close()
        guard.close()
        await guard.aclose()


def test_a_store_restarted_without_persistence_is_logged(
    server: RedisServer, fake: FakeProvider
) -> None:
    guard = make_guard(server.url)
    client = sync_client(guard, fake)
    try:
        with track_context(user_id="alice"):
            client.chat.completions.create(model="gpt-test", messages=PROMPT)
            server.restart()
            with capture_logs() as logs:
                client.chat.completions.create(model="gpt-test", messages=PROMPT)
        assert [e for e in logs if e["event"] == "storage_reset"]
    finally:
        guard.close()


def test_a_commit_whose_reply_was_lost_is_not_logged_as_failed(
    server: RedisServer, make_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    proxy = make_proxy(server.port)
    guard = make_guard(proxy.url)
    client = sync_client(guard, fake)
    direct = make_guard(server.url)
    try:
        with track_context(user_id="alice"), capture_logs() as logs:
            client.chat.completions.create(model="gpt-test", messages=PROMPT)  # warm
            stream = client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True)
            proxy.hold()  # the settle's commit reaches the store after its timeout
            for _ in stream:
                pass
            proxy.open()
            events = wait_until(lambda: calls(logs)[1:], what="the genai_call line")
        logged = sum(Decimal(str(e["cost_usd"])) for e in calls(logs))
        wait_until(lambda: used(direct, "alice") == logged, what="the late commit")
        assert "ledger" not in events[0], events[0]
    finally:
        guard.close()
        direct.close()


def test_a_reserve_that_timed_out_holds_no_budget_once_the_store_is_back(
    server: RedisServer, make_proxy: Callable[..., Proxy], fake: FakeProvider
) -> None:
    proxy = make_proxy(server.port)
    guard = make_guard(proxy.url)
    client = sync_client(guard, fake)
    direct = make_guard(server.url)
    raw = server.client()
    try:
        with track_context(user_id="alice"):
            client.chat.completions.create(model="gpt-test", messages=PROMPT)  # warm
            spent = used(direct, "alice")
            proxy.hold()
            before = scripts_run(raw)
            with pytest.raises(StorageError):
                client.chat.completions.create(model="gpt-test", messages=PROMPT)
            proxy.open()
            wait_until(lambda: scripts_run(raw) > before, what="the late reserve")
        wait_until(lambda: used(direct, "alice") == spent, what="nothing held")
    finally:
        raw.close()
        guard.close()
        direct.close()


def test_a_call_above_what_a_counter_holds_is_a_refusal_not_a_storage_error(
    fake: FakeProvider,
) -> None:
    # $1 per output token: ten million tokens are above what a counter holds (2**53 - 1
    # nano-USD, about $9 million). Even with on_storage_error: allow, that is a refusal.
    guard = Guard(
        {
            "prices": {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 1_000_000}},
            "default": [{"max": 1, "per": "day"}],
            "on_storage_error": "allow",
        }
    )
    client = sync_client(guard, fake)
    try:
        with track_context(user_id="alice"), capture_logs() as logs:
            with pytest.raises(BudgetExceeded):
                client.chat.completions.create(
                    model="gpt-test", messages=PROMPT, max_tokens=10_000_000
                )
        assert not [e for e in logs if e["event"] == "storage_error"]
    finally:
        guard.close()
