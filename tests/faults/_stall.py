"""How long this process was kept from running: the allowance a latency bound needs on a
loaded machine, measured instead of guessed.

A daemon thread asks to sleep a few milliseconds at a time and notes every oversleep. When
the machine is busy (other processes on every core, or many threads of this one holding
the GIL), the probe oversleeps exactly when the code under test cannot run either. A wait
on a store is then checked against its bound once the stalls that overlapped it are taken
out: a call that hangs on a frozen store is still caught (the probe runs on meanwhile and
notes nothing), a call slowed by a descheduled process is not taken for one.

Every process that imports this module runs its own probe; all times are
``time.monotonic()``.
"""

from __future__ import annotations

import threading
import time
from multiprocessing.connection import Connection

__all__ = ["STALLS", "StallProbe", "report_stall", "unstalled"]

TICK = 0.005
"""Seconds the probe asks to sleep each turn."""
NOTICE = 0.002
"""Oversleep below this is timer slack, not a stall."""
KEEP = 200_000
"""Stalls remembered (the oldest are dropped first; a test run notes far fewer)."""


class StallProbe:
    """A thread that records when this process could not run."""

    def __init__(self) -> None:
        self._gaps: list[tuple[float, float]] = []  # (slept at, woke at), oversleeps only
        self._since = time.monotonic()
        self._lock = threading.Lock()
        thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)
        thread.start()

    def _run(self) -> None:
        since = time.monotonic()
        while True:
            time.sleep(TICK)
            woke = time.monotonic()
            # The gap and the next sleep's start change together, under the lock: a
            # reader never sees neither (a stall noted nowhere) or both (noted twice).
            with self._lock:
                if woke - since - TICK > NOTICE:
                    self._gaps.append((since, woke))
                    if len(self._gaps) > KEEP:
                        del self._gaps[: KEEP // 2]
                self._since = since = woke

    def stalled(self, start: float, end: float) -> float:
        """Seconds within ``[start, end]`` this process was kept from running."""
        with self._lock:
            gaps = list(self._gaps)
            since = self._since
        now = time.monotonic()
        if now - since > TICK + NOTICE:
            gaps.append((since, now))  # a stall under way (the probe has not woken yet)
        total = 0.0
        for slept, woke in reversed(gaps):
            if woke < start:
                break
            overlap = min(woke, end) - max(slept + TICK, start)
            if overlap > 0:
                total += overlap
        return total


STALLS = StallProbe()
"""This process's probe (started on import)."""


def unstalled(start: float, end: float) -> float:
    """``end - start`` less the time this process was kept from running meanwhile."""
    return end - start - STALLS.stalled(start, end)


def report_stall(conn: Connection) -> None:
    """A child for the probe's own test: note the time, wait to be stopped and resumed
    (``SIGSTOP``, ``SIGCONT``), then send back what its probe saw in between."""
    start = time.monotonic()
    conn.send("ready")
    conn.recv()  # the parent has resumed it
    end = time.monotonic()
    conn.send((end - start, STALLS.stalled(start, end)))
