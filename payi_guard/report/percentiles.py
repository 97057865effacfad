"""Nearest-rank percentiles of per-call costs in bounded memory: :class:`CostDistribution`."""

from __future__ import annotations

from array import array
from collections.abc import Sequence

__all__ = ["EXACT_SAMPLES", "PERCENTILES", "PERCENTILE_RELATIVE_ERROR", "CostDistribution"]

EXACT_SAMPLES = 10_000
"""A group keeps every call cost (exact percentiles) up to this many calls."""

_SUB_BITS = 8
_SUB = 1 << _SUB_BITS
PERCENTILE_RELATIVE_ERROR = 1 / (1 << (_SUB_BITS + 1))
"""Worst relative error of a percentile once a group has more than EXACT_SAMPLES calls."""

PERCENTILES = (50, 90, 99)
"""The percentiles a report shows."""


def _bucket_index(nano: int) -> int:
    """Histogram bucket of a non-negative nano-USD value.

    Values below ``2 * _SUB`` get a bucket each; above, each power of two is split into
    ``_SUB`` equal buckets, so a bucket is never wider than ``1/_SUB`` of its lower bound.
    """
    if nano < 2 * _SUB:
        return nano
    shift = nano.bit_length() - 1 - _SUB_BITS
    return ((shift + 1) << _SUB_BITS) + (nano >> shift) - _SUB


def _bucket_bounds(index: int) -> tuple[int, int]:
    """Smallest and largest nano-USD value of a histogram bucket."""
    if index < 2 * _SUB:
        return index, index
    shift = (index >> _SUB_BITS) - 1
    mantissa = (index & (_SUB - 1)) + _SUB
    return mantissa << shift, ((mantissa + 1) << shift) - 1


class CostDistribution:
    """Nearest-rank percentiles of per-call costs (integer nano-USD) in bounded memory.

    Up to ``exact_limit`` values are kept as they are, so percentiles are exact. The next
    value moves them into a histogram of at most about 14,000 counters whose percentiles
    are within :data:`PERCENTILE_RELATIVE_ERROR` of the exact ones (and never outside the
    exact minimum and maximum).

    Args:
        exact_limit: how many values are kept before switching to the histogram.

    Raises:
        ValueError: if ``exact_limit`` is negative.
    """

    __slots__ = ("_counts", "_exact", "_exact_limit", "count", "maximum", "minimum")

    def __init__(self, exact_limit: int = EXACT_SAMPLES) -> None:
        if exact_limit < 0:
            raise ValueError(f"exact_limit must be >= 0, got {exact_limit}")
        self._exact_limit = exact_limit
        self._exact: array[int] | None = array("q")
        self._counts: array[int] = array("q")
        self.count = 0
        self.minimum = 0
        self.maximum = 0

    @property
    def exact(self) -> bool:
        """True while every value is kept, so percentiles are exact."""
        return self._exact is not None

    def add(self, nano: int) -> None:
        """Record one cost.

        Args:
            nano: the cost in nano-USD, between 0 and 2**62.

        Raises:
            ValueError: if ``nano`` is out of range.
        """
        if not 0 <= nano < 1 << 62:
            raise ValueError(f"a cost must be between 0 and 2**62 nano-USD, got {nano}")
        if self.count == 0 or nano < self.minimum:
            self.minimum = nano
        if nano > self.maximum:
            self.maximum = nano
        self.count += 1
        exact = self._exact
        if exact is not None:
            exact.append(nano)
            if len(exact) <= self._exact_limit:
                return
            self._exact = None
            for value in exact:
                self._count(value)
            return
        self._count(nano)

    def _count(self, nano: int) -> None:
        index = _bucket_index(nano)
        counts = self._counts
        if index >= len(counts):
            counts.frombytes(bytes(counts.itemsize * (index + 1 - len(counts))))
        counts[index] += 1

    def percentiles(self, ps: Sequence[int] = PERCENTILES) -> list[int | None]:
        """Return the nearest-rank percentiles ``ps`` (each 1..100), in nano-USD.

        Args:
            ps: the percentiles wanted.

        Returns:
            One value per percentile, ``None`` for all when nothing was recorded.

        Raises:
            ValueError: if a percentile is outside 1..100.
        """
        for p in ps:
            if not 1 <= p <= 100:
                raise ValueError(f"a percentile must be between 1 and 100, got {p}")
        n = self.count
        if n == 0:
            return [None for _ in ps]
        ranks = [-(-p * n // 100) for p in ps]
        if self._exact is not None:
            ordered = sorted(self._exact)
            return [ordered[rank - 1] for rank in ranks]
        return [self._rank_in_histogram(rank) for rank in ranks]

    def _rank_in_histogram(self, rank: int) -> int:
        if rank == self.count:
            return self.maximum
        seen = 0
        for index, count in enumerate(self._counts):
            seen += count
            if seen >= rank:
                low, high = _bucket_bounds(index)
                middle = (low + high) // 2
                return min(max(middle, self.minimum), self.maximum)
        return self.maximum  # pragma: no cover - counts always add up to self.count
