"""Carrying the attribution into threads: :func:`bind_context`, :class:`ContextThreadPoolExecutor`.

A new thread starts with an empty :mod:`contextvars` context, so GenAI calls made there
would be anonymous. These helpers capture the context where the work is created; the
request scope object travels with it, so :func:`~payi_guard.set_user` inside the thread
is seen by the request. They are re-exported by :mod:`payi_guard.context`.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

__all__ = ["ContextThreadPoolExecutor", "bind_context"]

P = ParamSpec("P")
R = TypeVar("R")


def bind_context(fn: Callable[P, R]) -> Callable[P, R]:
    """Capture the current attribution and request scope for ``fn`` to run elsewhere.

    ``ThreadPoolExecutor.submit`` and ``threading.Thread`` start with an empty context,
    so GenAI calls made there would be anonymous. Capture the context where the work is
    created::

        pool.submit(bind_context(summarize), doc)
        threading.Thread(target=bind_context(worker)).start()

    Each call runs in its own copy of the captured context, so one bound function can run
    in many threads at once. The request scope object is shared, so :func:`set_user`
    inside the thread is seen by the request.
    """
    captured = contextvars.copy_context()

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return captured.copy().run(fn, *args, **kwargs)

    return run


class ContextThreadPoolExecutor(ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` whose ``submit`` carries the caller's context.

    A drop-in replacement: ``executor.submit(fn, ...)`` and ``executor.map(fn, ...)`` run
    ``fn`` with the attribution and request scope in effect where they were called.
    """

    def submit(self, fn: Callable[..., R], /, *args: Any, **kwargs: Any) -> Future[R]:
        """Schedule ``fn(*args, **kwargs)`` in the caller's context."""
        return super().submit(contextvars.copy_context().run, fn, *args, **kwargs)
