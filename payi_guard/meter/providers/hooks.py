"""Patching an SDK module when it is imported, so ``instrument()`` never imports an SDK.

``instrument()`` guards every installed SDK, but an application may have an SDK
installed that it never imports (importing LiteLLM alone takes seconds). So each
provider module asks :func:`when_imported` for the one module it patches: the patch runs
now when that module is already imported, otherwise right after the application
imports it (a :data:`sys.meta_path` finder wraps the module's loader; it leaves
``sys.meta_path`` once no patch is waiting).
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from payi_guard import log as events

__all__ = ["Patches", "when_imported"]

Patch = Callable[[ModuleType], None]

_log = events.get_logger()
_lock = threading.RLock()
_waiting: dict[str, list[Patch]] = {}


def when_imported(name: str, patch: Patch) -> Callable[[], None]:
    """Run ``patch(module)`` once module ``name`` is imported (now, if it already is).

    Args:
        name: the module's full name (``litellm.main``).
        patch: what to do with the module.

    Returns:
        A function that cancels ``patch`` if it has not run yet.
    """
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _waiting.setdefault(name, []).append(patch)
            if not any(isinstance(finder, _Finder) for finder in sys.meta_path):
                sys.meta_path.insert(0, _Finder())
            return lambda: _cancel(name, patch)
    patch(module)
    return _nothing


def _nothing() -> None:
    """Nothing to cancel: the patch ran at once."""


def _cancel(name: str, patch: Patch) -> None:
    with _lock:
        patches = _waiting.get(name, [])
        if patch in patches:
            patches.remove(patch)
        if not patches:
            _waiting.pop(name, None)
        _drop_finder_if_idle()


def _drop_finder_if_idle() -> None:
    if not _waiting:
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]


def _imported(module: ModuleType) -> None:
    with _lock:
        patches = _waiting.pop(module.__name__, [])
        _drop_finder_if_idle()
    for patch in patches:
        try:
            patch(module)
        except Exception as exc:  # an import of the application must never fail here
            _log.error(
                "meter_error",
                op="instrument",
                module=module.__name__,
                error=str(exc),
                error_type=type(exc).__name__,
            )


class _Loader(importlib.abc.Loader):
    """Runs the real loader, then the waiting patches."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def create_module(self, spec: Any) -> ModuleType | None:
        module: ModuleType | None = self._inner.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _imported(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds a waited-for module through the other finders and wraps its loader."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> Any:
        with _lock:
            if fullname not in _waiting:
                return None
        for finder in list(sys.meta_path):
            if isinstance(finder, _Finder):
                continue
            find = getattr(finder, "find_spec", None)
            spec = None if find is None else find(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
            return spec
        return None


class Patches:
    """The methods one provider module patches for ``instrument()``, undone together.

    :meth:`start` claims the instrumentation (once), :meth:`when_imported` waits for a
    module, :meth:`replace` swaps a method for a wrapper of it, and :meth:`undo` cancels
    what still waits and restores what was replaced (unless something wrapped it after
    us: ours then stays, inert while nothing is instrumented).
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._active = False
        self._replaced: list[tuple[Any, str, Any]] = []
        self._cancels: list[Callable[[], None]] = []

    def start(self) -> bool:
        """Claim the instrumentation; ``False`` when it is already active."""
        with self._lock:
            if self._active:
                return False
            self._active = True
            return True

    def when_imported(self, name: str, patch: Patch) -> None:
        """Run ``patch`` once module ``name`` is imported (see :func:`when_imported`)."""
        with self._lock:
            self._cancels.append(when_imported(name, patch))

    def replace(self, owner: Any, name: str, wrap: Callable[[Any], Any]) -> None:
        """Set ``owner.name`` to ``wrap(original)``; the wrapper keeps ``__wrapped__``."""
        with self._lock:
            if not self._active:
                return
            original = owner.__dict__[name]
            setattr(owner, name, wrap(original))
            self._replaced.append((owner, name, original))

    def undo(self) -> bool:
        """Cancel and restore everything; ``True`` when something was active."""
        with self._lock:
            was_active = self._active
            for cancel in self._cancels:
                cancel()
            for owner, name, original in reversed(self._replaced):
                current = owner.__dict__.get(name)
                if getattr(current, "__wrapped__", None) is original:
                    setattr(owner, name, original)
            self._cancels.clear()
            self._replaced.clear()
            self._active = False
            return was_active
