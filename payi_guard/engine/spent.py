"""The spent cache: counters known to be full, refused locally for a while.

A counter whose settled total reached its limit stays full for the rest of its window
as far as calls go (calls only add to it), so a call charged to it is refused without a
storage round trip, and a gate can tell in one dict lookup per owner that a user has
nothing left. Only an operator's ``adjust`` or ``reset`` lowers a counter: this process
forgets the counters it adjusts at once, and an entry is trusted for ``ttl`` seconds at
most, so an adjustment made by another process (the CLI, another worker) is seen within
that time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, replace

from payi_guard.clock import Clock
from payi_guard.engine.plan import Counter, blocking, limit_usage
from payi_guard.ledger.base import CounterState
from payi_guard.ledger.keys import hash_tag
from payi_guard.usage import LimitUsage

__all__ = ["Spent", "SpentCache"]


@dataclass(frozen=True, slots=True)
class Spent:
    """A counter known to be spent for the rest of its window."""

    until: float
    settled: int
    counter: Counter


class SpentCache:
    """Counters whose settled total reached their max: refused locally for a while.

    An entry lasts until its window ends or ``ttl`` seconds after it was added, whichever
    comes first (a reload clears the cache, since limits may have changed; an adjustment
    made here drops its counters with :meth:`forget`). Entries are indexed by owner tag too, so a
    gate can tell in one dict lookup per owner that a user has nothing spent. Bounded: the
    oldest entries go first.

    Args:
        maxsize: the most counters remembered.
        clock: the time source (when an entry was added); none: entries last until
            their window ends.
        ttl: the most seconds an entry is trusted.
    """

    def __init__(self, maxsize: int, clock: Clock | None = None, ttl: float = 5.0) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._ttl = ttl
        self._maxsize = maxsize
        self._items: dict[str, Spent] = {}
        self.tags: dict[str, int] = {}
        """Owner hash tag -> how many of its counters are here (read it; never write it)."""

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: str, spent: Spent) -> None:
        """Remember that the counter ``key`` is spent."""
        if self._clock is not None:
            trusted = self._clock.now() + self._ttl
            if trusted < spent.until:
                spent = replace(spent, until=trusted)
        with self._lock:
            if key not in self._items:
                tag = hash_tag(key)
                self.tags[tag] = self.tags.get(tag, 0) + 1
                while len(self._items) >= self._maxsize:
                    self._drop(next(iter(self._items)))
            self._items[key] = spent

    def _drop(self, key: str) -> None:
        if self._items.pop(key, None) is not None:
            tag = hash_tag(key)
            left = self.tags[tag] - 1
            if left:
                self.tags[tag] = left
            else:
                del self.tags[tag]

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

    def exhausted(self, counters: Iterable[Counter], now: float) -> LimitUsage | None:
        """The exhausted block limit among ``counters`` this cache knows of, or ``None``."""
        usages: list[LimitUsage] = []
        for counter in counters:
            spent = self.get(counter.key, now)
            if spent is not None:
                state = CounterState(settled=spent.settled, pending=0)
                usages.extend(limit_usage(b, counter.window, state) for b in counter.limits)
        return blocking(usages)

    def any_tag(self, tags: Iterable[str]) -> bool:
        """Whether any counter of these owners (hash tags) may be spent."""
        known = self.tags
        return any(tag in known for tag in tags)

    def forget(self, keys: Iterable[str]) -> None:
        """Forget these counters (an operator just lowered them)."""
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        """Forget everything (the limits may have changed)."""
        with self._lock:
            self._items.clear()
            self.tags.clear()
