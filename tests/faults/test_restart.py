"""A store that restarts: without persistence its data is gone and the ledger reports it
(a marker key) at the first operation after the restart; with persistence nothing is
lost and nothing is reported."""

from __future__ import annotations

import time
from typing import Any

import pytest
from ledger._support import LedgerAdapter, RedisServer, own_marker

from payi_guard.ledger import Charge, CounterState, open_async_ledger, open_ledger

EXPIRES = time.time() + 3 * 86_400
KEY = "r:{u:alice}:usd"


def open_pair(url: str, events: list[Any]) -> tuple[LedgerAdapter, LedgerAdapter]:
    """A sync and an async ledger reporting to one callback, as one Guard holds them."""
    marker = own_marker()  # the store is new to this process, whatever port it got
    sync = LedgerAdapter("sync", open_ledger(url, on_event=events.append, marker_key=marker))
    aio = LedgerAdapter("async", open_async_ledger(url, on_event=events.append, marker_key=marker))
    return sync, aio


async def test_a_restart_without_persistence_is_reported_once(server: RedisServer) -> None:
    events: list[Any] = []
    sync, aio = open_pair(server.url, events)
    now = time.time()
    try:
        await sync.commit("c1", [Charge(KEY, 500, None, EXPIRES)], now=now)
        await aio.commit("c2", [Charge(KEY, 200, None, EXPIRES)], now=now)
        # A fresh server has no marker: reported honestly, once, at the first operation.
        assert [event.kind for event in events] == ["new"]
        first = events[0].marker
        assert await sync.read([KEY], now=now) == (CounterState(700, 0),)

        server.restart()  # SIGKILL, then an empty server on the same port
        assert await aio.read([KEY], now=now) == (CounterState(0, 0),)
        assert [event.kind for event in events] == ["new", "reset"]
        reset = events[1]
        assert reset.previous == first
        assert reset.marker != first
        assert str(server.port) in reset.server
        # The other ledger of the same callback sees the same store: nothing new.
        await sync.commit("c3", [Charge(KEY, 1, None, EXPIRES)], now=now)
        assert len(events) == 2
    finally:
        await sync.close()
        await aio.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_restart_with_persistence_loses_nothing_and_reports_nothing(
    kind: str, aof_server: RedisServer
) -> None:
    events: list[Any] = []
    ledger = open_pair(aof_server.url, events)[0 if kind == "sync" else 1]
    now = time.time()
    try:
        await ledger.reserve("r1", [Charge(KEY, 300, 1000, EXPIRES)], now=now, ttl=300)
        await ledger.commit("c1", [Charge(KEY, 500, None, EXPIRES)], now=now)
        assert [event.kind for event in events] == ["new"]
        aof_server.restart()  # SIGKILL: with appendfsync always every reply was on disk
        assert await ledger.read([KEY], now=now) == (CounterState(500, 300),)
        # A retried commit is still recognised after the restart.
        await ledger.commit("c1", [Charge(KEY, 500, None, EXPIRES)], now=now)
        await ledger.commit("r1", [Charge(KEY, 250, None, EXPIRES)], now=now)
        assert await ledger.read([KEY], now=now) == (CounterState(750, 0),)
        assert [event.kind for event in events] == ["new"]
    finally:
        await ledger.close()
