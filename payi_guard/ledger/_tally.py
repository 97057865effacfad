"""Checks of tallies, and the in-process store of them (memory ledger)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from payi_guard.ledger._numbers import finite_number
from payi_guard.ledger.base import MAX_UNITS, Tally

__all__ = ["TallyStore", "check_tallies", "immutable_tallies"]

_MIN_UNITS = -MAX_UNITS
"""The smallest increment (negated once here: ``-MAX_UNITS`` makes a new int each time)."""


def check_tallies(tallies: Sequence[Tally]) -> None:
    """Refuse malformed tallies before anything is written.

    Raises:
        ValueError: an empty or repeated key, an empty or repeated field, an increment
            that is not an int within ``[-MAX_UNITS, MAX_UNITS]``, a non-finite expiry.
    """
    # Every reserve and commit passes through here: a plain-type fast path first, the
    # detailed checks (and their messages) only when something looks off.
    keys: set[str] = set()
    for tally in tallies:
        if type(tally) is not Tally:
            return _check_tallies_slowly(tallies)
        key, fields, expires_at = tally.key, tally.fields, tally.expires_at
        if not (
            type(key) is str
            and key
            and key not in keys
            and type(expires_at) is float
            and math.isfinite(expires_at)
        ):
            return _check_tallies_slowly(tallies)
        keys.add(key)
        names = set()
        try:
            for pair in fields:
                if type(pair) is not tuple:  # a list pair is checked in detail
                    return _check_tallies_slowly(tallies)
                name, value = pair
                if not (
                    type(name) is str
                    and name
                    and type(value) is int
                    and _MIN_UNITS <= value <= MAX_UNITS
                ):
                    return _check_tallies_slowly(tallies)
                names.add(name)
        except (TypeError, ValueError):  # a field that is not a pair
            return _check_tallies_slowly(tallies)
        if len(names) != len(fields):
            return _check_tallies_slowly(tallies)
    return None


def immutable_tallies(tallies: Sequence[Tally]) -> bool:
    """Whether ``tallies`` is a tuple of tallies whose fields are tuples of pairs.

    Such a sequence cannot change: once checked, the same object needs no new check.
    """
    return type(tallies) is tuple and all(
        type(t.fields) is tuple and all(type(pair) is tuple for pair in t.fields) for t in tallies
    )


def _check_tallies_slowly(tallies: Sequence[Tally]) -> None:
    seen: set[str] = set()
    for index, tally in enumerate(tallies):
        if not isinstance(tally, Tally):
            raise ValueError(f"tally {index} is not a Tally")
        if not tally.key or tally.key in seen:
            raise ValueError(f"tally {index}: empty or repeated key")
        seen.add(tally.key)
        if not finite_number(tally.expires_at):
            raise ValueError(f"tally {index}: expires_at must be finite")
        names: set[str] = set()
        for pair in tally.fields:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"tally {index}: a field must be a (name, value) pair: {pair!r}")
            name, value = pair
            if not isinstance(name, str) or not name or name in names:
                raise ValueError(f"tally {index}: empty, repeated or non-text field {name!r}")
            names.add(name)
            if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_UNITS:
                raise ValueError(f"tally {index}: field {name!r} must be an int, got {value!r}")


class TallyStore:
    """Tallies in a dict, dropped once expired (incrementally, oldest first).

    Not thread-safe: the memory ledger calls it under its own lock.
    """

    def __init__(self) -> None:
        self._tallies: dict[str, tuple[dict[str, int], float]] = {}
        self._times: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._tallies)

    def add(self, tallies: Sequence[Tally], now: float) -> None:
        """Add every tally's increments (a tally past its expiry starts afresh)."""
        for tally in tallies:
            held = self._tallies.get(tally.key)
            if held is None or held[1] <= now:
                fields: dict[str, int] = {}
                until = tally.expires_at
            else:
                fields, until = held[0], max(held[1], tally.expires_at)
            for name, value in tally.fields:
                fields[name] = fields.get(name, 0) + value
            self._tallies[tally.key] = (fields, until)
            if held is None or until != held[1]:
                heapq.heappush(self._times, (until, tally.key))

    def read(self, keys: Sequence[str], now: float) -> tuple[dict[str, int], ...]:
        """The fields of each tally (copies; empty when missing or expired)."""
        out: list[dict[str, int]] = []
        for key in keys:
            held = self._tallies.get(key)
            out.append({} if held is None or held[1] <= now else dict(held[0]))
        return tuple(out)

    def live_keys(self, now: float) -> list[str]:
        """The keys of the tallies that have not expired."""
        return [key for key, (_, until) in self._tallies.items() if until > now]

    def sweep(self, now: float, budget: int) -> None:
        """Drop up to ``budget`` tallies whose expiry has passed."""
        times = self._times
        while times and times[0][0] <= now and budget > 0:
            until, key = heapq.heappop(times)
            held = self._tallies.get(key)
            if held is not None and held[1] <= now and held[1] == until:
                del self._tallies[key]
                budget -= 1

    def due(self, now: float) -> bool:
        """Whether some tally may be swept."""
        return bool(self._times) and self._times[0][0] <= now
