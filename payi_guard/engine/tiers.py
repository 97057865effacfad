"""Tiers from the app: its ``tier_of`` function, called safely and cached.

An app keeps its customers' plans in its own database and gives the guard
``tier_of(user_id) -> tier name | None`` (sync or async). :class:`TierSource` calls it
from either side without ever blocking an event loop on it: the async paths await an
async function and run a sync one in a worker thread; the sync paths call a sync
function directly and run an async one to completion on a private event loop thread
(started on first need), so the coroutine always runs on the same loop.

:class:`TierCache` keeps each answer for ``tier_cache_ttl`` seconds (``cachetools``
behind a lock; its timer is the guard's clock, so tests move time instead of waiting).
A function that raises, or returns something that is not a tier name, is logged as
``tier_lookup_failed`` and counts as no tier (``default``); that failure is not cached,
so the next call asks again.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import cachetools

from payi_guard import log as events
from payi_guard.clock import Clock

__all__ = ["TierCache", "TierFunction", "TierSource", "shown_tier"]

TierFunction = Callable[[str], "str | Awaitable[str | None] | None"]
"""``tier_of``: a user id to the name of its tier, or ``None`` (sync or async)."""

_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")


def shown_tier(tier: object) -> str:
    """A tier name as a log line may show it: the name itself, else a short ``ascii()``."""
    if isinstance(tier, str) and _NAME.match(tier):
        return tier
    text = ascii(tier)
    return text if len(text) <= 66 else text[:63] + "..."


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - a callable object's own method
    return call is not None and inspect.iscoroutinefunction(call)


async def _awaited(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


class TierSource:
    """The app's ``tier_of`` function, callable from sync and async code.

    Args:
        fn: ``tier_of(user_id)``, returning a tier name or ``None``, sync or async.

    Raises:
        TypeError: ``fn`` is not callable.
    """

    def __init__(self, fn: TierFunction) -> None:
        if not callable(fn):
            raise TypeError("tier_of must be a function of the user id (sync or async)")
        self.fn = fn
        self._async = _is_async(fn)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"TierSource({getattr(self.fn, '__qualname__', self.fn)!r})"

    def call(self, user_id: str) -> object:
        """Call the function from sync code and return what it returned (may raise)."""
        if self._async:
            return self._run(self.fn(user_id))  # type: ignore[arg-type]
        result = self.fn(user_id)
        if inspect.isawaitable(result):  # a plain function that returned a coroutine
            return self._run(result)
        return result

    async def acall(self, user_id: str) -> object:
        """Call the function from async code, never blocking the loop (may raise)."""
        if self._async:
            return await self.fn(user_id)  # type: ignore[misc]
        result = await asyncio.to_thread(self.fn, user_id)
        if inspect.isawaitable(result):
            return await result
        return result

    def _run(self, awaitable: Awaitable[Any]) -> object:
        loop = self._background_loop()
        return asyncio.run_coroutine_threadsafe(_awaited(awaitable), loop).result()

    def _background_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="payi-guard-tier-of", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def close(self) -> None:
        """Stop the private loop thread, if one was started (it restarts on next need)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


class TierCache:
    """The answers of a :class:`TierSource`, kept ``ttl`` seconds per user.

    Args:
        source: the app's function.
        ttl: seconds an answer is reused (``0``: never cached).
        maxsize: the most users remembered.
        clock: whose ``monotonic`` times the entries.
    """

    def __init__(self, source: TierSource, ttl: float, maxsize: int, clock: Clock) -> None:
        self.source = source
        self._lock = threading.Lock()
        self._cache: cachetools.TTLCache[str, str | None] | None = None
        if ttl > 0:
            self._cache = cachetools.TTLCache(maxsize=maxsize, ttl=ttl, timer=clock.monotonic)
        self._log = events.get_logger()

    def peek(self, user_id: str) -> tuple[bool, str | None]:
        """``(True, tier)`` when an answer for ``user_id`` is cached, else ``(False, None)``."""
        if self._cache is None:
            return False, None
        with self._lock:
            try:
                return True, self._cache[user_id]
            except KeyError:
                return False, None

    def lookup(self, user_id: str, logged_as: str) -> str | None:
        """The tier of ``user_id`` (sync): cached, else asked of the app's function.

        Args:
            user_id: the user's real id (what the app's function is given).
            logged_as: the id a failure is logged with (the pseudonym, if any).
        """
        hit, tier = self.peek(user_id)
        if hit:
            return tier
        try:
            answer = self.source.call(user_id)
        except Exception as exc:
            self._failed(logged_as, exc)
            return None
        return self._keep(user_id, logged_as, answer)

    async def alookup(self, user_id: str, logged_as: str) -> str | None:
        """Async :meth:`lookup`: never blocks the event loop."""
        hit, tier = self.peek(user_id)
        if hit:
            return tier
        try:
            answer = await self.source.acall(user_id)
        except Exception as exc:
            self._failed(logged_as, exc)
            return None
        return self._keep(user_id, logged_as, answer)

    def _keep(self, user_id: str, logged_as: str, answer: object) -> str | None:
        if answer is not None and not (isinstance(answer, str) and answer):
            detail = f"tier_of returned {type(answer).__name__}, not a tier name or None"
            self._failed(logged_as, TypeError(detail))
            return None
        if self._cache is not None:
            with self._lock:
                self._cache[user_id] = answer
        return answer

    def _failed(self, logged_as: str, exc: Exception) -> None:
        self._log.error(
            events.TIER_LOOKUP_FAILED,
            user_id=logged_as,
            error=str(exc)[:200],
            error_type=type(exc).__name__,
            detail="tier_of failed: the user gets the `default` limits for this call",
        )
