"""Commits and releases that must reach the ledger, retried with the same id until applied.

A commit or release that failed plainly (:class:`~payi_guard.StorageError`) was not
applied; one whose reply was lost (:class:`~payi_guard.ledger.StorageOutcomeUnknown`)
may have been. Both are retried with the same reservation id and the same amounts,
which the ledger applies at most once (it remembers closed ids for ``closed_ttl``).

The caller tries a few times while failures come back fast (a refused connection, a
connection the server dropped), so it never waits on the store much more than twice
the socket timeout in all; then one daemon thread per guard (:class:`Retrier`) keeps
trying in the background, in order, pausing longer after each failure, for half of
``closed_ttl`` (a retry must reach the store while it still remembers an attempt that
was applied). Whoever gets the operation through reports it (the ``genai_call`` line is
written then); an operation given up is reported as such, saying whether an attempt may
have been applied. The same path undoes a reserve whose outcome is unknown: its id is
released, so a reserve that reaches the store late holds nothing.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from payi_guard import log as events
from payi_guard.exceptions import StorageError
from payi_guard.ledger.base import Charge, CounterState, StorageOutcomeUnknown, Tally

if TYPE_CHECKING:
    from payi_guard.clock import Clock
    from payi_guard.engine.storage import Storage
    from payi_guard.ledger.base import AsyncLedger, Ledger

__all__ = ["Closer", "Closing", "Retrier"]

CounterStates = tuple[CounterState, ...]

FOREGROUND_ATTEMPTS = 3
"""Attempts a caller makes before the retrier takes over."""

FOREGROUND_PAUSES = (0.01, 0.04)
"""Seconds a caller pauses before its second and third attempts."""

BACKOFF_FIRST = 0.05
BACKOFF_MAX = 1.0
"""The retrier's pause after a failure doubles from the first value up to the second."""

RETRY_SHARE = 0.5
"""The share of ``closed_ttl`` (from the first attempt) during which an operation is retried."""


@dataclass(eq=False)
class Closing:
    """One commit or release that must be applied once, and who is told how it ended.

    Attributes:
        op: ``commit`` or ``release``.
        reservation_id: the id the ledger knows it by.
        keys: the counters it touches.
        charges: the amounts a commit adds (``None`` for a release).
        user_id: the user charged (for the logs).
        applied: called with the counters' states once the store applied it.
        abandoned: called when it is given up, with whether an attempt may have been
            applied.
        undoes_reserve: a release undoing a reserve whose outcome is unknown.
        tallies: the usage analytics a commit adds in its own atomic step.
        started: when the first attempt started (monotonic seconds).
        attempts: the attempts made so far.
        unknown: whether a failed attempt may have been applied.
        error: the last failure.
        context: the caller's context variables, in which the callbacks run once the
            retrier took over.
    """

    op: str
    reservation_id: str
    keys: tuple[str, ...]
    charges: tuple[Charge, ...] | None
    user_id: str
    applied: Callable[[CounterStates], object]
    abandoned: Callable[[bool], object]
    undoes_reserve: bool = False
    tallies: tuple[Tally, ...] = ()
    started: float = field(default_factory=time.monotonic)
    attempts: int = 0
    unknown: bool = False
    error: str = ""
    context: contextvars.Context | None = None

    def failed(self, exc: BaseException) -> None:
        """Note a failed attempt (one whose request may have been sent counts as unknown)."""
        if isinstance(exc, StorageOutcomeUnknown):
            self.unknown = True
        self.error = f"{type(exc).__name__}: {exc}"

    def pause_before_retry(self, timeout: float, *, store_down: bool) -> float | None:
        """How long the caller pauses before trying again, or ``None``: leave it to the retrier.

        Only failures that came back fast are retried by the caller (the store refused
        or dropped a connection: it may be back at once); one that took half the
        socket timeout or more means a slow or frozen store, which another attempt
        would only wait on again. Nor does the caller retry while the retrier has
        work (``store_down``): the store is known to be failing.
        """
        if store_down or self.attempts >= FOREGROUND_ATTEMPTS:
            return None
        pause = FOREGROUND_PAUSES[min(self.attempts, len(FOREGROUND_PAUSES)) - 1]
        if time.monotonic() - self.started + pause >= timeout / 2:
            return None
        return pause


def apply(ledger: Ledger, job: Closing, now: float) -> CounterStates:
    """One attempt of ``job`` on a sync ledger."""
    job.attempts += 1
    if job.charges is None:
        return ledger.release(job.reservation_id, job.keys, now=now)
    return ledger.commit(job.reservation_id, job.charges, now=now, tallies=job.tallies)


async def aapply(ledger: AsyncLedger, job: Closing, now: float) -> CounterStates:
    """One attempt of ``job`` on an async ledger."""
    job.attempts += 1
    if job.charges is None:
        return await ledger.release(job.reservation_id, job.keys, now=now)
    return await ledger.commit(job.reservation_id, job.charges, now=now, tallies=job.tallies)


def _job_fields(job: Closing) -> dict[str, Any]:
    """The fields ``storage_recovered`` and ``storage_gave_up`` say of a job."""
    return {
        "op": job.op,
        "user_id": job.user_id,
        "reservation_id": job.reservation_id,
        "undoes_reserve": job.undoes_reserve,
        "attempts": job.attempts,
        "seconds": round(time.monotonic() - job.started, 3),
    }


def _safely(job: Closing, callback: Callable[..., object], *args: Any) -> None:
    """Run a callback of ``job`` (in the caller's context); what it raises is logged."""
    try:
        if job.context is not None:
            job.context.run(callback, *args)
        else:
            callback(*args)
    except Exception as exc:
        events.get_logger().error(
            events.OBSERVER_ERROR,
            op=job.op,
            error=str(exc),
            error_type=type(exc).__name__,
            user_id=job.user_id,
        )


_RETRIERS: weakref.WeakSet[Retrier] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    # A forked child has no retry thread, and its parent's operations are not its own.
    for retrier in list(_RETRIERS):
        retrier._forked()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Retrier:
    """One daemon thread that retries, in order, the operations callers could not apply.

    It runs only while something waits: started by :meth:`submit`, it ends when its
    queue is empty. After a failure it pauses (longer each time, up to
    :data:`BACKOFF_MAX`) before trying again, so a store that is down costs one attempt
    at a time, and a store that is back drains the queue at once.

    Args:
        storage: the storage (its sync ledger is used, whichever path the caller took).
        clock: the time source (``now`` of each attempt).
    """

    def __init__(self, storage: Storage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock
        self._cond = threading.Condition()
        self._queue: deque[Closing] = deque()
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None
        self._log = events.get_logger()
        _RETRIERS.add(self)

    def _forked(self) -> None:
        self._cond = threading.Condition()
        self._queue = deque()
        self._thread = None
        self._deadline = None

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, job: Closing) -> None:
        """Take ``job`` over: retry it until it is applied or given up."""
        if job.context is None:
            job.context = contextvars.copy_context()
        with self._cond:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="payi-guard-retry", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Try what is pending for up to ``timeout`` seconds, then give the rest up.

        Returns once the thread has ended (an attempt under way may add twice the
        socket timeout).
        """
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        thread.join(timeout + 2 * self._storage.timeout + 5.0)

    def _next(self) -> tuple[Closing | None, bool]:
        """The job to work on and whether to give it up now; ``None`` ends the thread."""
        with self._cond:
            if not self._queue:
                self._thread = None
                self._deadline = None
                return None, False
            job = self._queue[0]
            now = time.monotonic()
            window = self._storage.closed_ttl * RETRY_SHARE
            late = self._deadline is not None and now >= self._deadline
            return job, late or now - job.started >= window

    def _pause(self, seconds: float) -> None:
        with self._cond:
            if self._deadline is not None:
                seconds = min(seconds, max(0.0, self._deadline - time.monotonic()))
            if seconds > 0:
                self._cond.wait(seconds)

    def _done(self) -> None:
        with self._cond:
            self._queue.popleft()

    def _run(self) -> None:
        backoff = 0.0
        while True:
            job, give_up = self._next()
            if job is None:
                return
            if give_up:
                self._done()
                self._give_up(job)
                continue
            try:
                states = apply(self._storage.ledger, job, self._clock.now())
            except StorageError as exc:
                job.failed(exc)
                backoff = min(max(backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
                self._pause(backoff)
                continue
            except Exception as exc:  # the ledger refused the input: no retry can help
                job.failed(exc)
                self._done()
                self._give_up(job)
                continue
            backoff = 0.0
            self._done()
            if job.error:  # else its first attempt went through: nothing had failed
                self._log.info(events.STORAGE_RECOVERED, **_job_fields(job))
            _safely(job, job.applied, states)

    def _give_up(self, job: Closing) -> None:
        self._log.error(
            events.STORAGE_GAVE_UP,
            **_job_fields(job),
            error=job.error,
            applied="unknown" if job.unknown else "no",
        )
        _safely(job, job.abandoned, job.unknown)


class Closer:
    """Applies commits and releases: a few quick attempts by the caller, then the retrier.

    Args:
        storage: the storage.
        clock: the time source.
        failed: called once per operation at its first failure (it logs
            ``storage_error``), with the operation and the exception.
    """

    def __init__(
        self,
        storage: Storage,
        clock: Clock,
        failed: Callable[[Closing, BaseException], object],
    ) -> None:
        self._storage = storage
        self._clock = clock
        self._failed = failed
        self.retrier = Retrier(storage, clock)

    def run(self, job: Closing, failure: BaseException | None = None) -> None:
        """Apply ``job`` (sync) and report it, or leave it to the retrier.

        ``failure`` is what an attempt the caller made itself raised (counted in
        ``job.attempts``): it is handled as if that attempt were made here.
        Never raises for a store failure.
        """
        states = self._attempts(job, failure)
        if states is not None:
            job.applied(states)

    async def arun(self, job: Closing) -> None:
        """Async :meth:`run`."""
        states = await self._aattempts(job)
        if states is not None:
            job.applied(states)

    def undo_reserve(
        self,
        reservation_id: str,
        keys: Sequence[str],
        user_id: str,
        failure: BaseException | None = None,
    ) -> None:
        """Release, in the background, a reserve that may have been applied unseen.

        ``failure``: the storage error that left it unknown; once the release is
        through, ``storage_recovered`` says so. ``None`` (the caller was cancelled):
        nothing failed, nothing is logged.
        """
        job = Closing(
            "release",
            reservation_id,
            tuple(keys),
            None,
            user_id,
            applied=_nothing,
            abandoned=_nothing,
            undoes_reserve=True,
        )
        if failure is not None:
            job.failed(failure)
            job.unknown = False  # of this release (the reserve's outcome was unknown)
        self.retrier.submit(job)

    def _failure(self, job: Closing, exc: BaseException) -> None:
        first = not job.error
        job.failed(exc)
        if first:
            self._failed(job, exc)

    def _attempts(self, job: Closing, failure: BaseException | None = None) -> CounterStates | None:
        try:
            while True:
                try:
                    if failure is None:
                        return apply(self._storage.ledger, job, self._clock.now())
                    raised, failure = failure, None
                    raise raised
                except StorageError as exc:
                    self._failure(job, exc)
                pause = job.pause_before_retry(self._storage.timeout, store_down=bool(self.retrier))
                if pause is None:
                    break
                time.sleep(pause)
        except Exception as exc:  # the ledger refused the input: no retry can help
            self._failure(job, exc)
            job.abandoned(job.unknown)
            return None
        except BaseException:  # interrupted: it may have been sent, let the retrier finish
            job.unknown = True
            self.retrier.submit(job)
            raise
        self.retrier.submit(job)
        return None

    async def _aattempts(self, job: Closing) -> CounterStates | None:
        try:
            while True:
                try:
                    return await aapply(self._storage.async_ledger, job, self._clock.now())
                except StorageError as exc:
                    self._failure(job, exc)
                pause = job.pause_before_retry(self._storage.timeout, store_down=bool(self.retrier))
                if pause is None:
                    break
                await asyncio.sleep(pause)
        except Exception as exc:
            self._failure(job, exc)
            job.abandoned(job.unknown)
            return None
        except BaseException:  # the event loop is shutting down: the retrier finishes it
            job.unknown = True
            self.retrier.submit(job)
            raise
        self.retrier.submit(job)
        return None


def _nothing(*_: object) -> None:
    """A callback with nothing to do."""
