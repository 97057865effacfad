"""The spent cache: counters known to be full until their window ends, refused locally.

A counter whose settled total reached its limit stays full for the rest of its window
(settled totals only grow), so a call charged to it is refused without a storage round
trip, and a gate can tell in one dict lookup per owner that a user has nothing spent.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass

from payi_guard.engine.plan import Counter
from payi_guard.ledger.keys import hash_tag

__all__ = ["Spent", "SpentCache"]


@dataclass(frozen=True, slots=True)
class Spent:
    """A counter known to be spent for the rest of its window."""

    until: float
    settled: int
    counter: Counter


class SpentCache:
    """Counters whose settled total reached their max: refused locally until the window ends.

    Settled totals only grow within a window, so an entry is never wrong until ``until``
    (a reload clears the cache, since limits may have changed). Entries are indexed by
    owner tag too, so a gate can tell in one dict lookup per owner that a user has nothing
    spent. Bounded: the oldest entries go first.

    Args:
        maxsize: the most counters remembered.
    """

    def __init__(self, maxsize: int) -> None:
        self._lock = threading.Lock()
        self._maxsize = maxsize
        self._items: dict[str, Spent] = {}
        self._tags: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: str, spent: Spent) -> None:
        """Remember that the counter ``key`` is spent."""
        with self._lock:
            if key not in self._items:
                tag = hash_tag(key)
                self._tags[tag] = self._tags.get(tag, 0) + 1
                while len(self._items) >= self._maxsize:
                    self._drop(next(iter(self._items)))
            self._items[key] = spent

    def _drop(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            tag = hash_tag(key)
            left = self._tags[tag] - 1
            if left:
                self._tags[tag] = left
            else:
                del self._tags[tag]

    def get(self, key: str, now: float) -> Spent | None:
        """Return the entry of ``key`` while its window lasts, else ``None``."""
        spent = self._items.get(key)
        if spent is None:
            return None
        if now >= spent.until:
            with self._lock:
                if self._items.get(key) is spent:
                    self._drop(key)
            return None
        return spent

    def any_tag(self, tags: Iterable[str]) -> bool:
        """Whether any counter of these owners (hash tags) may be spent."""
        known = self._tags
        return any(tag in known for tag in tags)

    def clear(self) -> None:
        """Forget everything (the limits may have changed)."""
        with self._lock:
            self._items.clear()
            self._tags.clear()
