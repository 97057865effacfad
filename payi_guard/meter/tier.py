"""The tier that served a call, as its response names it: what it is priced at.

OpenAI bills a call at the ``service_tier`` its response names (``priority``, ``flex``,
``default``), Anthropic at the ``usage.speed`` (``fast``, ``standard``); genai-prices
takes either as a price context that selects the model's price variant. The request's
own tier (:func:`~payi_guard.meter.estimate.request_bounds`) sizes the reservation; the
response's, read here, prices the charge.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final

__all__ = ["STANDARD_TIER", "response_tier", "tier_context"]

STANDARD_TIER: Final[Mapping[str, str]] = MappingProxyType({})
"""The price context of a call the provider served at its standard tier (no variant)."""

_STANDARD_TIERS: Final = frozenset({"default", "standard", "on_demand", "unspecified"})
"""The names providers give their standard tier: OpenAI's, Anthropic's speed and
Gemini's (``standard``, ``unspecified``), Groq's."""


def tier_context(key: str, value: object) -> Mapping[str, str] | None:
    """The price context a response's report of its tier gives.

    OpenAI reports the tier that served a call in ``service_tier`` (``default``,
    ``flex``, ``priority``, ``scale``), Anthropic its speed in ``usage.speed``
    (``standard`` or ``fast``); each is billed at that tier's prices, whatever the
    request asked for (an OpenAI project can make ``priority`` its default).

    Args:
        key: the price-context key the value is given under (``service_tier``,
            ``speed``).
        value: the reported value.

    Returns:
        :data:`STANDARD_TIER` (empty) for the standard tier, ``{key: value}`` for another,
        or ``None`` when the value reports no tier (missing, not text, or ``auto``, which
        a Responses stream's first events carry before the tier is known).
    """
    if type(value) is not str or not value or value == "auto":
        return None
    if value in _STANDARD_TIERS:
        return STANDARD_TIER
    return {key: value}


def response_tier(kind: str, obj: Mapping[str, Any]) -> Mapping[str, str] | None:
    """:func:`tier_context` of a response object of endpoint ``kind``.

    ``usage.speed`` of an Anthropic message, the top-level ``service_tier`` of any
    other (a chat completion or chunk, a Responses object).
    """
    if kind == "anthropic_messages":
        usage = obj.get("usage")
        return tier_context("speed", usage.get("speed")) if isinstance(usage, Mapping) else None
    return tier_context("service_tier", obj.get("service_tier"))
