"""Money as integers: the units, the conversions, and the few places money meets floats.

The ledger counts **nano-USD** (:data:`NANO_USD` per dollar): a limit of ``max: 1.00``
is ``1_000_000_000``. Prices are **pico-USD per token** (:data:`PICO_USD` per dollar),
so any price with up to six decimals per million tokens is exact; a cost in pico-USD is
turned into nano-USD by dividing by :data:`PICO_PER_NANO`, rounding up (never
under-charge). Floats appear only on the way out, in log fields.
"""

from __future__ import annotations

import re
import sys
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # usage.py formats its amounts with decimal_text()
    from payi_guard.usage import Unit

__all__ = [
    "DECIMAL_TEXT",
    "NANO_USD",
    "PICO_PER_NANO",
    "PICO_USD",
    "ceil_div",
    "cost_usd",
    "decimal_text",
    "decimal_usd",
    "display_amount",
    "log_amount",
    "nano_to_decimal",
    "parse_usd",
    "parse_usd_change",
    "per_mtok_to_pico",
    "shown_amount",
]

NANO_USD = 1_000_000_000
"""Ledger units per US dollar: money is stored as integer nano-dollars."""

PICO_USD = 1_000_000_000_000
"""Pico-USD per US dollar: the unit of a per-token rate."""

PICO_PER_NANO = 1_000
"""Pico-USD per nano-USD: a cost in pico-USD is divided by this (rounding up)."""

_PICO_PER_TOKEN_PER_USD_PER_MTOK = 1_000_000
DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")
"""A decimal number as text in ASCII digits: ``str.isdigit()``, ``int()`` and
``Decimal()`` also read "١", "１" and "1_000" as numbers."""
_NOT_FINITE = frozenset(("nan", "inf", "infinity"))
"""Read too (signed or not, any case), to be refused as not finite."""


def _dollars(value: object) -> Decimal:
    """``value`` as a ``Decimal`` (a float through its shortest ``repr``).

    Raises:
        InvalidOperation, TypeError, ValueError: not a number (text other than ASCII
            digits with an optional sign, point and exponent).
    """
    if isinstance(value, float):
        return Decimal(str(value))
    if isinstance(value, str):
        text = value.strip()
        if not DECIMAL_TEXT.match(text) and text.lstrip("+-").lower() not in _NOT_FINITE:
            raise ValueError(value)
    return Decimal(value)  # type: ignore[arg-type]


"""``$1`` per million tokens is ``1e-6`` USD per token, i.e. ``1e6`` pico-USD per token."""


def ceil_div(numerator: int, denominator: int) -> int:
    """Integer division rounded up (towards positive infinity)."""
    return -(-numerator // denominator)


def nano_to_decimal(nano: int) -> Decimal:
    """Exact ``Decimal`` dollars of ``nano`` nano-USD (``1_500_000_000`` -> ``1.500000000``)."""
    sign, digits, exponent = Decimal(nano).as_tuple()
    return Decimal((sign, digits, int(exponent) - 9))


def decimal_usd(nano: int) -> Decimal:
    """Exact ``Decimal`` dollars of ``nano`` nano-USD as a quotient (``1_500_000_000`` -> ``1.5``).

    This is the form :class:`~payi_guard.LimitUsage` and call records show; unlike
    :func:`nano_to_decimal` it keeps no trailing zeros.
    """
    return Decimal(nano) / NANO_USD


def decimal_text(value: Decimal | int) -> str:
    """Exact fixed-point text of an amount, for people: never exponent notation.

    ``Decimal("6.3E-5")`` is ``"0.000063"``, ``Decimal("1E+3")`` is ``"1000"``; trailing
    zeros after the point are dropped (``"0.0010"`` is ``"0.001"``).

    Args:
        value: a ``Decimal`` (or an ``int``) amount.
    """
    text = format(value, "f") if isinstance(value, Decimal) else str(value)
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def shown_amount(value: object) -> str:
    """An amount someone gave, as an error message shows it (at most 40 characters).

    A number in fixed-point text, never exponent notation nor a Python repr
    (``Decimal("1E-12")`` is ``0.000000000001``); anything else as its repr.
    """
    if isinstance(value, (Decimal, float)) and not isinstance(value, bool):
        number = Decimal(str(value)) if isinstance(value, float) else value
        text = decimal_text(number) if number.is_finite() else str(number)
        return text if len(text) <= 40 else text[:39] + "…"
    return f"{value!r:.40}"


def display_amount(unit: Unit, amount: int) -> Decimal | int:
    """An amount in user units: ``Decimal`` dollars for ``usd``, the count otherwise."""
    return decimal_usd(amount) if unit == "usd" else amount


def cost_usd(nano: int) -> float:
    """The float dollars of ``nano`` nano-USD, for the ``cost_usd`` log field.

    For ``|nano| < 10**15`` (one million dollars) the float's shortest ``repr`` is
    exactly ``nano / 10**9`` in decimal: such a value has at most 15 significant
    digits, and a double tells apart every 15-digit decimal. Beyond that range the
    result is the nearest double.

    Beyond a float's range (far past any counter), the largest float of its sign.

    Args:
        nano: an amount in nano-USD.
    """
    try:
        return nano / NANO_USD  # int / int true division is correctly rounded
    except OverflowError:
        return sys.float_info.max if nano > 0 else -sys.float_info.max


def log_amount(unit: Unit, amount: int) -> float | int:
    """An amount for a log field: float dollars for ``usd`` (:func:`cost_usd`), else the count."""
    return cost_usd(amount) if unit == "usd" else amount


def parse_usd(value: object) -> int:
    """Dollars (``Decimal``, ``str``, ``int`` or ``float``) to nano-USD, rounded up.

    A float is read through its shortest ``repr`` (``0.1`` is exactly 0.1 USD).

    Raises:
        ValueError: not a number (a ``bool`` neither), not finite, or negative.
    """
    if isinstance(value, bool):
        raise ValueError("cost_usd must be a number")
    try:
        amount = _dollars(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise ValueError(f"cost_usd must be a number, not {value!r}") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError("cost_usd must be a finite number >= 0")
    nano = int((amount * NANO_USD).to_integral_value(rounding=ROUND_CEILING))
    # 1e-999999999 underflows to 0 on the way (Decimal's exponent floor): still a cost.
    return 1 if nano == 0 and amount > 0 else nano


def parse_usd_change(value: object) -> int:
    """A change of dollars (may be negative) to nano-USD, exactly.

    Args:
        value: ``Decimal``, ``str`` or ``int`` dollars (``"-2.50"``); a ``float`` is
            read through its shortest ``repr``.

    Raises:
        ValueError: not a number (a ``bool`` neither), not finite, or finer than a
            nano-dollar (nine decimals).
    """
    if isinstance(value, bool):
        raise ValueError("an amount of dollars must be a number")
    try:
        amount = _dollars(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        shown = shown_amount(value)
        raise ValueError(f"an amount of dollars must be a number, not {shown}") from exc
    if not amount.is_finite():
        raise ValueError("an amount of dollars must be finite")
    nano = amount * NANO_USD
    if nano != nano.to_integral_value():
        raise ValueError(f"{shown_amount(value)} is finer than a nano-dollar (nine decimals)")
    return int(nano)


def per_mtok_to_pico(usd_per_mtok: Decimal | int | str) -> int:
    """Convert a price in USD per million tokens to pico-USD per token.

    Exact for prices with up to six decimals; a finer price is rounded up.

    Args:
        usd_per_mtok: the price (``Decimal``, ``int`` or a decimal string).

    Returns:
        The integer pico-USD per token.

    Raises:
        ValueError: the price is negative, not finite or not a number.
    """
    if isinstance(usd_per_mtok, (bool, float)):
        raise ValueError("prices must be Decimal, int or str, never float")
    try:
        price = Decimal(usd_per_mtok)
    except (InvalidOperation, TypeError, ValueError):
        raise ValueError(f"price {usd_per_mtok!r} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ValueError(f"price {usd_per_mtok!r} must be a finite number >= 0")
    return int((price * _PICO_PER_TOKEN_PER_USD_PER_MTOK).to_integral_value(ROUND_CEILING))
