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
import contextvars
import sys
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

__all__ = ["Detached"]

T = TypeVar("T")


class Detached:
    """Tasks that finish whatever happens to their callers; :meth:`drain` waits for them."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    async def run(self, work: Coroutine[Any, Any, T], *, inline: bool = False) -> T:
        """Run ``work`` in its own task and await it; cancelling the caller leaves it running.

        Args:
            work: the coroutine to run to its end.
            inline: ``work`` never needs the task it runs in (it does not look up
                :func:`asyncio.current_task`), as with the memory store. Before Python
                3.12 its first step then runs at once, in a copy of the caller's
                context, as 3.12's eager tasks do: work that finishes without waiting
                (the memory store) costs no trip through the event loop; work that
                waits goes on in a task of its own from where it stopped. No ``await``
                happens before that, so the caller cannot be cancelled mid-step.

        Raises:
            asyncio.CancelledError: the caller was cancelled (``work`` goes on).
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not asyncio: nothing to detach into, run it here
            return await work
        if inline and sys.version_info < (3, 12):
            context = contextvars.copy_context()
            try:
                waiting_on = context.run(work.send, None)
            except StopIteration as done:
                value: T = done.value
                return value
            # Created in that context, the task goes on in a copy of it: what the first
            # step set is seen by the rest, never by the caller.
            task: asyncio.Task[T] = context.run(loop.create_task, _Resumed(work, waiting_on))
        elif sys.version_info >= (3, 12):
            # Run at once up to the first wait: a settle that needs none (the memory
            # store) costs no trip through the event loop.
            task = asyncio.Task(work, loop=loop, eager_start=True)
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


class _Resumed(Coroutine[Any, Any, T]):
    """A coroutine already started, as a task's coroutine: it goes on from its first wait.

    The task's first ``send`` gets what the work yielded at its first wait (the future it
    waits on); everything after that, and anything thrown in (a cancellation, even
    before that first ``send``), goes straight to the work.
    """

    def __init__(self, work: Coroutine[Any, Any, T], waiting_on: object) -> None:
        self._work = work
        self._waiting_on = waiting_on
        self._started = False

    def send(self, value: Any) -> Any:
        if not self._started:
            self._started = True
            return self._waiting_on
        return self._work.send(value)

    def throw(self, *args: Any) -> Any:
        self._started = True
        return self._work.throw(*args)

    def close(self) -> None:
        self._work.close()

    def __await__(self) -> Generator[Any, Any, T]:
        return self._drive()

    def _drive(self) -> Generator[Any, Any, T]:
        try:
            value = self.send(None)
            while True:
                try:
                    sent = yield value
                except GeneratorExit:
                    self.close()
                    raise
                except BaseException as exc:  # thrown in by the awaiting task: passed on
                    value = self.throw(exc)
                else:
                    value = self.send(sent)
        except StopIteration as done:
            result: T = done.value
            return result
