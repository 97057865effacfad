"""Input validation shared by every ledger backend.

Both backends refuse the same inputs with the same messages, so the contract suite can
hold them to one behaviour. Amounts and maxima are capped at ``2**53 - 1``: Redis runs
the check-and-add in Lua, whose numbers are doubles, and an integer above that bound
would be compared inexactly (in nano-USD the cap is about 9 million dollars per counter).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from payi_guard.ledger._numbers import finite_number
from payi_guard.ledger._tally import check_tallies
from payi_guard.ledger.base import MAX_UNITS, CapacityExceeded, Charge, Tally

__all__ = [
    "MAX_UNITS",
    "check_charges",
    "check_closed_ttl",
    "check_id",
    "check_keys",
    "check_now",
    "check_operation",
    "check_renewals",
    "check_scan",
    "check_ttl",
]


def check_id(reservation_id: str) -> None:
    """Refuse an empty or non-string reservation id."""
    if not isinstance(reservation_id, str) or not reservation_id:
        raise ValueError("reservation_id must be a non-empty string")


def check_now(now: float) -> None:
    """Refuse a time that is not a finite number of epoch seconds."""
    if not finite_number(now):
        raise ValueError(f"now must be a finite number of epoch seconds, got {now!r}")


def check_ttl(ttl: float) -> None:
    """Refuse a reservation ttl that is not a positive finite number of seconds."""
    if not finite_number(ttl) or ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")


def check_operation(
    reservation_id: str,
    charges: Sequence[Charge],
    tallies: Sequence[Tally],
    now: float,
    ttl: float | None,
) -> None:
    """The checks of a reserve (or, with ``ttl=None``, a commit) in one call.

    :func:`check_id`, :func:`check_charges`, ``check_tallies``, :func:`check_now` and
    :func:`check_ttl`, in that order (so the first fault is the one reported), each
    skipped when a plain-type test shows it would pass.
    """
    if type(reservation_id) is not str or not reservation_id:
        check_id(reservation_id)
    check_charges(charges)
    if tallies:
        check_tallies(tallies)
    if type(now) is not float or not math.isfinite(now):
        check_now(now)
    if ttl is not None and not (type(ttl) is float and 0.0 < ttl < math.inf):
        check_ttl(ttl)


def _check_units(value: object, what: str, index: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"charge {index}: {what} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"charge {index}: {what} must not be negative, got {value}")
    if value > MAX_UNITS:
        raise CapacityExceeded(index, what, value)


def check_charges(charges: Sequence[Charge]) -> None:
    """Refuse malformed charges and a key that appears twice.

    Raises:
        ValueError: naming the index of the offending charge and what is wrong with it.
    """
    # Every reserve and commit passes through here: a plain-type fast path first, the
    # detailed checks (and their messages) only when something looks off.
    keys = set()
    for charge in charges:
        if type(charge) is not Charge:
            return _check_charges_slowly(charges)
        key, amount, cap, expires_at = charge.key, charge.amount, charge.max, charge.expires_at
        if not (
            type(key) is str
            and key
            and type(amount) is int
            and 0 <= amount <= MAX_UNITS
            and (cap is None or (type(cap) is int and 0 <= cap <= MAX_UNITS))
            and type(expires_at) is float  # an int one is checked in detail
            and math.isfinite(expires_at)
        ):
            return _check_charges_slowly(charges)
        keys.add(key)
    if len(keys) != len(charges):
        raise ValueError("a key may appear only once per call")
    return None


def _check_charges_slowly(charges: Sequence[Charge]) -> None:
    for index, charge in enumerate(charges):
        if not isinstance(charge, Charge):
            raise ValueError(f"charge {index}: expected a Charge, got {type(charge).__name__}")
        if not isinstance(charge.key, str) or not charge.key:
            raise ValueError(f"charge {index}: key must be a non-empty string")
        _check_units(charge.amount, "amount", index)
        if charge.max is not None:
            _check_units(charge.max, "max", index)
        if not finite_number(charge.expires_at):
            raise ValueError(f"charge {index}: expires_at must be finite epoch seconds")
    if len(charges) > 1 and len({charge.key for charge in charges}) != len(charges):
        raise ValueError("a key may appear only once per call")


def check_closed_ttl(closed_ttl: float) -> None:
    """Refuse a ``closed_ttl`` that is not a positive finite number of seconds."""
    if not finite_number(closed_ttl) or closed_ttl <= 0:
        raise ValueError(f"closed_ttl must be a positive number of seconds, got {closed_ttl!r}")


def check_renewals(reservations: Sequence[tuple[str, Sequence[str]]]) -> None:
    """Refuse malformed ``(reservation_id, keys)`` pairs (an id may appear only once)."""
    if not isinstance(reservations, (list, tuple)):
        raise ValueError("reservations must be a list of (reservation_id, keys) pairs")
    seen: set[str] = set()
    for index, pair in enumerate(reservations):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise ValueError(f"reservation {index}: expected a (reservation_id, keys) pair")
        rid, keys = pair
        check_id(rid)
        check_keys(keys)
        if rid in seen:
            raise ValueError(f"reservation {index}: id {rid!r} appears twice")
        seen.add(rid)


def check_keys(keys: Sequence[str]) -> None:
    """Refuse empty or non-string keys and a key that appears twice."""
    if isinstance(keys, str):
        raise ValueError("keys must be a sequence of keys, not a single string")
    for index, key in enumerate(keys):
        if not isinstance(key, str) or not key:
            raise ValueError(f"key {index} must be a non-empty string")
    if len(keys) > 1 and len(set(keys)) != len(keys):
        raise ValueError("a key may appear only once per call")


def check_scan(match: str, limit: int | None) -> None:
    """Refuse an empty or non-string pattern and a ``limit`` that is not a positive int."""
    if not isinstance(match, str) or not match:
        raise ValueError("match must be a non-empty glob pattern")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
