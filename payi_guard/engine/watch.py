"""Reloading the config when its file changes: a daemon thread that polls the mtime."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["ConfigWatcher"]


class ConfigWatcher:
    """Polls a config file's mtime and size, and reloads when they change.

    Args:
        reload: called with the path when the file changed (``Guard.reload``).
        path: the file.
        interval: seconds between polls.
    """

    def __init__(self, reload: Callable[[str], object], path: str, interval: float) -> None:
        self._reload = reload
        self._path = path
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="payi-guard-watch", daemon=True)
        self._mtime = self._stat()

    def _stat(self) -> tuple[float, int] | None:
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_mtime, st.st_size)

    def start(self) -> None:
        """Start polling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (waits for the thread, unless called from it)."""
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def poll(self) -> bool:
        """Reload if the file changed; return True when a reload was attempted."""
        current = self._stat()
        if current is None or current == self._mtime:
            return False
        self._mtime = current
        self._reload(self._path)
        return True

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()
