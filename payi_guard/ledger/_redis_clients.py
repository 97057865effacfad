"""The Redis clients the ledgers share, counted so that the last one to close closes it.

One client per storage URI and options per process (sync), and per event loop (async),
whichever ledger or Guard asks.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Any

__all__ = ["shared_async_client", "shared_sync_client"]


@dataclass
class _Shared:
    client: Any
    refs: int


_SYNC: dict[Hashable, _Shared] = {}
_ASYNC: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[Hashable, _Shared]] = (
    weakref.WeakKeyDictionary()
)
_SHARED_LOCK = threading.Lock()


def shared_sync_client(key: Hashable, make: Callable[[], Any]) -> tuple[Any, Callable[[], None]]:
    """The process's client for ``key`` (made on first use) and a function releasing it.

    The client is closed when its last holder releases it.
    """
    with _SHARED_LOCK:
        shared = _SYNC.get(key)
        if shared is None:
            shared = _SYNC[key] = _Shared(make(), 0)
        shared.refs += 1
        client = shared.client

    released = False

    def release() -> None:
        nonlocal released
        with _SHARED_LOCK:
            if released:
                return
            released = True
            shared.refs -= 1
            last = shared.refs <= 0 and _SYNC.get(key) is shared
            if last:
                del _SYNC[key]
        if last:
            client.close()

    return client, release


def shared_async_client(
    key: Hashable, make: Callable[[], Any]
) -> tuple[Any, Callable[[], Awaitable[None]]]:
    """The running loop's client for ``key`` and an async function releasing it."""
    loop = asyncio.get_running_loop()
    with _SHARED_LOCK:
        for gone in [other for other in _ASYNC if other.is_closed()]:
            del _ASYNC[gone]
        clients = _ASYNC.setdefault(loop, {})
        shared = clients.get(key)
        if shared is None:
            shared = clients[key] = _Shared(make(), 0)
        shared.refs += 1
        client = shared.client

    released = False

    async def release() -> None:
        nonlocal released
        with _SHARED_LOCK:
            if released:
                return
            released = True
            shared.refs -= 1
            mine = _ASYNC.get(loop, {})
            last = shared.refs <= 0 and mine.get(key) is shared
            if last:
                del mine[key]
        if last:
            await client.aclose()

    return client, release
