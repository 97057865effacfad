"""Streamed Django responses, served inside their request's context.

Django sends a ``StreamingHttpResponse`` after every middleware has returned, so the
body's steps would run outside the request: GenAI calls made while streaming would be
anonymous, log lines would lose the request id. As
:class:`~payi_guard.web.WSGIGuardMiddleware` does for a WSGI body, each request gets its
own :class:`contextvars.Context`; every step of the body (``next`` or ``__anext__``) and
the response's ``close`` run inside it, and nothing is set in the server's context.

Async code cannot be handed to ``Context.run``: :func:`run_in_context` runs each step of
a coroutine inside the context instead (what ``asyncio.create_task(..., context=)``
does, without a task per chunk and on Python 3.10 too).
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterator
from typing import Any, TypeVar, cast

from payi_guard.exceptions import BudgetExceeded

__all__ = ["AsyncBody", "SyncBody", "close_in_context", "run_in_context"]

_T = TypeVar("_T")

OnRefusal = Callable[[BudgetExceeded], None]
"""Called (in the request's context) when a refusal ends a body that already started."""


class _Suspend:
    """Hands what the inner coroutine yielded to the event loop, and the loop's answer back."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __await__(self) -> Generator[Any, Any, Any]:
        return (yield self.value)


async def run_in_context(context: contextvars.Context, coro: Coroutine[Any, Any, _T]) -> _T:
    """Await ``coro`` with every step of it run inside ``context``.

    The coroutine sees ``context`` (and what it sets stays there); the task that awaits
    this sees nothing of it. Futures the coroutine waits on are passed to the event loop
    unchanged, and whatever the loop throws in (a cancellation) is thrown into the
    coroutine, so it behaves exactly as if awaited directly. ``context`` must not be
    entered elsewhere while a step runs.

    Args:
        context: the context to run in.
        coro: the coroutine.

    Returns:
        What the coroutine returned.
    """
    steps = coro.__await__()
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            if error is None:
                yielded = context.run(steps.send, value)
            else:
                yielded = context.run(steps.throw, error)
        except StopIteration as stop:
            return cast(_T, stop.value)
        try:
            value, error = await _Suspend(yielded), None
        except BaseException as exc:  # a cancellation too: the coroutine decides
            value, error = None, exc


_NOTHING: Any = object()


class SyncBody:
    """A sync streamed body whose every step runs in the request's context.

    Args:
        context: the request's context.
        first: the chunk the middleware read ahead (see :class:`GuardMiddleware
            <payi_guard.django.GuardMiddleware>`).
        rest: the rest of the body.
        end: ends the request (idempotent); called in the context when the body ends,
            fails or is closed.
        on_refusal: logs a refusal that ends the body after it started.
    """

    __slots__ = ("_context", "_done", "_end", "_first", "_on_refusal", "_rest")

    def __init__(
        self,
        context: contextvars.Context,
        first: bytes,
        rest: Iterator[bytes],
        end: Callable[[], None],
        on_refusal: OnRefusal,
    ) -> None:
        self._context = context
        self._first = first
        self._rest = rest
        self._end = end
        self._on_refusal = on_refusal
        self._done = False

    def __iter__(self) -> SyncBody:
        return self

    def __next__(self) -> bytes:
        return self._context.run(self._next)

    def _next(self) -> bytes:
        if self._first is not _NOTHING:
            chunk, self._first = self._first, _NOTHING
            return chunk
        if self._done:
            raise StopIteration
        try:
            return next(self._rest)
        except StopIteration:
            self._end()
            raise
        except BudgetExceeded as exc:
            self._done = True
            self._on_refusal(exc)
            self._end()
            raise StopIteration from None
        except BaseException:
            self._end()
            raise


class AsyncBody:
    """An async streamed body whose every step runs in the request's context.

    Args:
        context: the request's context.
        first: the chunk the middleware read ahead.
        rest: the rest of the body.
        end: ends the request (idempotent); called in the context when the body ends,
            fails, is cancelled (a client that went away) or is closed.
        on_refusal: logs a refusal that ends the body after it started.
    """

    __slots__ = ("_context", "_done", "_end", "_first", "_on_refusal", "_rest")

    def __init__(
        self,
        context: contextvars.Context,
        first: bytes,
        rest: AsyncIterator[bytes],
        end: Callable[[], None],
        on_refusal: OnRefusal,
    ) -> None:
        self._context = context
        self._first = first
        self._rest = rest
        self._end = end
        self._on_refusal = on_refusal
        self._done = False

    def __aiter__(self) -> AsyncBody:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not _NOTHING:
            chunk, self._first = self._first, _NOTHING
            return chunk
        if self._done:
            raise StopAsyncIteration
        return await run_in_context(self._context, self._anext())

    async def _anext(self) -> bytes:
        try:
            return await self._rest.__anext__()
        except StopAsyncIteration:
            self._end()
            raise
        except BudgetExceeded as exc:
            self._done = True
            self._on_refusal(exc)
            self._end()
            raise StopAsyncIteration from None
        except BaseException:
            self._end()
            raise


def close_in_context(response: Any, context: contextvars.Context, end: Callable[[], None]) -> None:
    """Make ``response.close()`` run in ``context``, then end the request.

    Django's own closers (the view's generator, files, the ``request_finished`` signal)
    then see the request's context, so a GenAI stream a closed generator settles is
    attributed like the rest of the request.

    Args:
        response: the ``StreamingHttpResponse``.
        context: the request's context.
        end: ends the request (idempotent).
    """
    original: Callable[[], None] = response.close
    closing = False

    def close() -> None:
        nonlocal closing
        # Once: a closer Django runs may call response.close() again (the test client's
        # wrapper does), and the context cannot be entered twice.
        if not closing:
            closing = True
            context.run(_close, original, end)

    response.close = close


def _close(original: Callable[[], None], end: Callable[[], None]) -> None:
    try:
        original()
    finally:
        end()
