"""An adjustment whose reply was lost: the operator is told it may have been applied.

An adjustment is not idempotent, so it is never retried by the guard: a Redis request
held in the network until the client gave up is reported as ``StorageOutcomeUnknown``
(on the users page, a 503 saying so), and the user's history tells once it lands.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
import redis
from faults._support import Proxy, wait_until

from payi_guard import Guard
from payi_guard.admin import users_app
from payi_guard.clock import FakeClock
from payi_guard.ledger import StorageOutcomeUnknown

TOKEN = "s3cret-admin-token-0123456789"
CONFIG = {"default": [{"max": 1, "per": "day"}]}


@pytest.fixture
def proxy(redis_url: str, key_prefix: str) -> Iterator[Proxy]:
    """A proxy in front of the shared Redis; the test's keys are deleted afterwards."""
    port = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    with Proxy(int(port)) as front:
        yield front
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def test_a_lost_reply_says_the_adjustment_may_have_applied(
    proxy: Proxy, key_prefix: str, clock: FakeClock
) -> None:
    guard = Guard(CONFIG, storage=proxy.url, key_prefix=key_prefix, clock=clock)
    guard.adjust("alice", "user:0", "0.10")  # connected, the script loaded
    proxy.hold()
    with pytest.raises(StorageOutcomeUnknown, match="may have been applied"):
        guard.adjust("alice", "user:0", "0.20", "held in the network")
    proxy.open()
    # It landed after all: the history says so, and nothing was applied twice.
    wait_until(lambda: len(guard.adjustments("alice")) == 2, timeout=10, what="the late one")
    assert guard.usage("alice")[0].used == Decimal("0.3")
    guard.close()


async def test_the_users_page_answers_503_outcome_unknown(
    proxy: Proxy, key_prefix: str, clock: FakeClock
) -> None:
    guard = Guard(CONFIG, storage=proxy.url, key_prefix=key_prefix, clock=clock)
    app = users_app(guard, token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    headers = {"authorization": f"Bearer {TOKEN}"}
    action = {"limit": "user:0", "amount": "0.05"}
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        warm = await client.post("/api/users/bob/adjust", json=action, headers=headers)
        assert warm.status_code == 200, warm.text
        proxy.hold()
        lost = await client.post("/api/users/bob/adjust", json=action, headers=headers)
        proxy.open()
    assert lost.status_code == 503
    assert lost.json()["title"] == "Outcome unknown"
    assert "may have been applied" in lost.json()["detail"]
    deadline = time.monotonic() + 10
    while len(await guard.aadjustments("bob")) < 2 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert len(await guard.aadjustments("bob")) == 2
    await guard.aclose()
