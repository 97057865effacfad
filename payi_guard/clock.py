"""Injectable time: the library never reads the wall clock directly.

Every component that needs the time takes a :class:`Clock`; tests pass a
:class:`FakeClock` and move it forward instead of sleeping.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """A source of time."""

    def now(self) -> float:
        """Seconds since the epoch (UTC), like :func:`time.time`."""
        ...

    def monotonic(self) -> float:
        """A monotonic reading in seconds, for durations."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        """Return :func:`time.time`."""
        return time.time()

    def monotonic(self) -> float:
        """Return :func:`time.perf_counter`."""
        return time.perf_counter()

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that only moves when told to (thread-safe).

    Args:
        start: the initial time, as epoch seconds or an aware ``datetime``.
    """

    def __init__(self, start: float | datetime = 1_800_000_000.0) -> None:
        self._lock = threading.Lock()
        self._now = start.timestamp() if isinstance(start, datetime) else float(start)
        self._mono = 0.0

    def now(self) -> float:
        """Return the fake wall-clock time."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Return the fake monotonic time (moves with :meth:`advance`)."""
        with self._lock:
            return self._mono

    def advance(self, seconds: float) -> None:
        """Move time forward by ``seconds`` (must not be negative)."""
        if seconds < 0:
            raise ValueError("a clock only moves forward")
        with self._lock:
            self._now += seconds
            self._mono += seconds

    def set(self, when: float | datetime) -> None:
        """Jump to ``when`` (epoch seconds or an aware ``datetime``), forward only."""
        target = when.timestamp() if isinstance(when, datetime) else float(when)
        self.advance(max(0.0, target - self.now()))

    def datetime(self) -> datetime:
        """Return the fake time as an aware UTC ``datetime``."""
        return datetime.fromtimestamp(self.now(), tz=timezone.utc)

    def __repr__(self) -> str:
        return f"FakeClock({self.datetime().isoformat()})"
