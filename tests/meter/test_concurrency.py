"""Concurrency: exact attribution across asyncio tasks, hard limits across threads.

Both run on the memory store and on real Redis.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from decimal import Decimal
from typing import Any

import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import calls, expected_cost, logged_usd, make_guard, used, user_message
from payi_guard import BudgetExceeded, is_refusal, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.testing import FakeProvider


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def storage(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "memory":
        return {}
    # These tests are about attribution and exact spend, not latency: a loaded CI machine
    # may take longer than the default 0.25 s to open a connection, so give the store room.
    url = request.getfixturevalue("redis_url") + "?socket_timeout=5&socket_connect_timeout=5"
    return {
        "storage_uri": url,
        "key_prefix": request.getfixturevalue("key_prefix"),
    }


async def test_64_concurrent_users_are_attributed_exactly(
    clock: FakeClock, fake: FakeProvider, storage: dict[str, Any]
) -> None:
    guard = make_guard(clock, **storage)
    # One socket per call: the 64 calls are in flight at once.
    http_client = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=64))
    client = guard.wrap(
        openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="k", max_retries=0, http_client=http_client
        )
    )
    fake.chunk_delay = 0.001  # keep many streams open at once

    async def one(i: int) -> None:
        user = f"user-{i}"
        # Each user's prompt has its own length, so each user's cost is its own.
        prompt = user_message(f"{user} " + "word " * i)
        async with track_context(user_id=user, use_case_name=f"case-{i % 4}"):
            await asyncio.sleep(0)  # interleave with the other tasks before sending
            if i % 2:
                await client.chat.completions.create(model="gpt-test", messages=prompt)
            else:
                stream = await client.chat.completions.create(
                    model="gpt-test", messages=prompt, stream=True
                )
                async for _ in stream:
                    await asyncio.sleep(0)

    with capture_logs() as logs:
        await asyncio.gather(*(one(i) for i in range(64)))
    await client.close()
    records = {r.json["messages"][0]["content"].split()[0]: r for r in fake.requests}
    assert len(records) == 64
    events = calls(logs)
    assert Counter(e["user_id"] for e in events) == {f"user-{i}": 1 for i in range(64)}
    for event in events:
        user = event["user_id"]
        i = int(user.split("-")[1])
        cost = expected_cost(records[user], "gpt-test")
        assert logged_usd(event) == cost
        assert event["use_case_name"] == f"case-{i % 4}"
        assert event["stream"] is (i % 2 == 0)
        assert used(guard, user) == cost
    guard.close()
    await guard.aclose()


def test_threads_never_overspend_one_tight_budget(
    clock: FakeClock, fake: FakeProvider, storage: dict[str, Any]
) -> None:
    limit = Decimal("0.003")
    guard: Guard = make_guard(clock, default=[{"max": float(limit), "per": "day"}], **storage)
    # A socket per thread: the 16 threads reserve and call at once.
    http_client = openai.DefaultHttpxClient(limits=httpx2.Limits(max_connections=16))
    client = guard.wrap(
        openai.OpenAI(
            base_url=fake.openai_base_url, api_key="k", max_retries=0, http_client=http_client
        )
    )
    prompt = user_message("Give me a short status update")
    refusals: list[BaseException] = []
    completed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(16)

    def worker(n: int) -> None:
        start.wait()
        with track_context(user_id="team"):
            for k in range(15):
                try:
                    if (n + k) % 2:
                        client.chat.completions.create(
                            model="gpt-test", messages=prompt, max_tokens=20
                        )
                    else:
                        stream = client.chat.completions.create(
                            model="gpt-test", messages=prompt, max_tokens=20, stream=True
                        )
                        for _ in stream:
                            pass
                except BudgetExceeded as exc:
                    with lock:
                        refusals.append(exc)
                else:
                    with lock:
                        completed.append(1)

    with capture_logs() as logs:
        threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(completed) + len(refusals) == 16 * 15
    assert completed
    assert refusals
    assert all(is_refusal(e) and isinstance(e, openai.RateLimitError) for e in refusals)
    assert len(fake.requests) == len(completed)  # refused calls never left the process
    events = calls(logs)
    assert len(events) == len(completed)
    spent = used(guard, "team")
    assert spent <= limit
    assert spent == sum((logged_usd(e) for e in events), Decimal(0))
    assert all(logged_usd(e) == expected_cost(fake.requests[0], "gpt-test") for e in events)
    guard.close()
