"""Async work that must run to its end even when the task awaiting it is cancelled.

A settle starts once its call ended and must then complete and log exactly once: SDK
clean-up deadlines (openai drains a finished stream under ``anyio.move_on_after(0.1)``)
and client disconnects cancel the caller's task at any ``await``. :class:`Detached` runs
such work in a task of its own, awaited through :func:`asyncio.shield`: the caller's
cancellation stops the caller's wait, never the work; a strong reference keeps the
task alive until it is done (the event loop holds only weak ones).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Detached"]

T = TypeVar("T")


class Detached:
    """Tasks that finish whatever happens to their callers; :meth:`drain` waits for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` in its own task and await it; cancelling the caller leaves it running.

        Raises:
            asyncio.CancelledError: the caller was cancelled (``work`` goes on).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: nothing to detach into, run it here
            return await work
        if sys.version_info >= (3, 12):
            # Run at once up to the first wait: a settle that needs none (the memory
            # store) costs no trip through the event loop.
            task: asyncio.Task[T] = asyncio.Task(work, loop=loop, eager_start=True)
        else:
            task = loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(task)

    async def drain(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the running loop's tasks; True when none is left."""
        loop = asyncio.get_running_loop()
        mine = [task for task in list(self._tasks) if task.get_loop() is loop]
        if not mine:
            return True
        _, pending = await asyncio.wait(mine, timeout=timeout)
        return not pending
