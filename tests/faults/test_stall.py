"""The stall probe the latency bounds of this suite rely on: it sees a process that is
kept from running, so a bound less the stalls is not a bound that can never fail."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

from faults._stall import STALLS, report_stall, unstalled

SPAWN = multiprocessing.get_context("spawn")
HELD = 0.5
"""Seconds the child is kept stopped (at least: the parent sleeps that long in between)."""


def test_a_stopped_process_sees_the_stall_and_only_that() -> None:
    parent, child = SPAWN.Pipe()
    process = SPAWN.Process(target=report_stall, args=(child,))
    process.start()
    try:
        assert parent.poll(60), "the child never started"
        assert parent.recv() == "ready"
        assert process.pid is not None
        os.kill(process.pid, signal.SIGSTOP)
        time.sleep(HELD)
        os.kill(process.pid, signal.SIGCONT)
        parent.send("go")
        assert parent.poll(60), "the child never answered"
        took, stalled = parent.recv()
    finally:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()
    # The child could not run for at least HELD seconds; its probe missed at most the
    # one tick it was asleep in when the stop came.
    assert stalled >= HELD - 0.01, (took, stalled)
    assert stalled <= took


def test_a_wait_on_something_else_is_not_a_stall() -> None:
    # While this thread waits (as a call waits on a frozen store), the probe runs on:
    # what it takes out is only the time it could not run itself, never the whole wait.
    start = time.monotonic()
    time.sleep(0.3)
    end = time.monotonic()
    assert 0 <= STALLS.stalled(start, end) <= end - start
    assert unstalled(start, end) >= 0
