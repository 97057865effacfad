"""The test every ledger check makes of a time or a duration."""

from __future__ import annotations

import math

__all__ = ["finite_number"]


def finite_number(value: object) -> bool:
    """Whether ``value`` is an ``int`` or ``float`` (not a ``bool``) with a finite value.

    An ``int`` too large for a float is not finite here (``math.isfinite`` raises
    ``OverflowError`` on it).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
