"""Reloading the config: what to reload from, and when its file changes.

:func:`config_from` reads what :meth:`Guard.reload` is given; :class:`ConfigWatcher`
polls the file's mtime in a daemon thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from payi_guard.config import GuardConfig, load_config, parse_config
from payi_guard.exceptions import ConfigError

__all__ = ["ConfigWatcher", "Watching", "config_from"]


def config_from(
    source: GuardConfig | Mapping[str, Any] | str | os.PathLike[str] | None,
    current: GuardConfig,
) -> GuardConfig:
    """The config a reload asks for.

    Args:
        source: a config, a dict or a path; ``None``: the file ``current`` came from.
        current: the config in effect.

    Raises:
        ConfigError: the new config is invalid, or there is no file to reload.
        OSError: the file cannot be read.
    """
    if source is None:
        if current.source is None:
            raise ConfigError("this Guard was not built from a file: pass a source")
        return load_config(current.source)
    if isinstance(source, GuardConfig):
        return source
    if isinstance(source, Mapping):
        return parse_config(source)
    return load_config(os.fspath(source))


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


class Watching:
    """At most one :class:`ConfigWatcher` of a guard: started once, stopped on demand."""

    def __init__(self) -> None:
        self._watcher: ConfigWatcher | None = None

    def start(self, reload: Callable[[str], object], path: str, interval: float) -> None:
        """Start watching ``path`` (nothing happens when a watcher already runs)."""
        if self._watcher is None:
            self._watcher = ConfigWatcher(reload, path, interval)
            self._watcher.start()

    def stop(self) -> None:
        """Stop the watcher, if one runs."""
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
