"""Pricing: token usage to integer cost. It never sees a request body.

* :mod:`~payi_guard.pricing.rates`: :class:`TokenUsage`, :class:`RateBand` and
  :class:`Rates`, integer pico-USD per token, costs in nano-USD rounded up;
* :mod:`~payi_guard.pricing.media`: :class:`MediaTokens` and :class:`MediaRates`, the
  audio, image and video tokens some models bill at their own rates;
* :mod:`~payi_guard.pricing.catalogue`: the genai-prices data (offline) to rates;
* :mod:`~payi_guard.pricing.book`: :class:`PriceBook`, overrides then the catalogue then
  the unknown-model policy, cached per model.

Money helpers (units, conversions) are in :mod:`payi_guard.money`; a request's cost bound
is read from its body by :mod:`payi_guard.meter.estimate`.
"""

from payi_guard.exceptions import UnknownModel
from payi_guard.pricing.book import PriceBook
from payi_guard.pricing.catalogue import candidate_names, provider_for_url
from payi_guard.pricing.media import MediaRates, MediaTokens
from payi_guard.pricing.rates import PriceSource, RateBand, Rates, TokenUsage

__all__ = [
    "MediaRates",
    "MediaTokens",
    "PriceBook",
    "PriceSource",
    "RateBand",
    "Rates",
    "TokenUsage",
    "UnknownModel",
    "candidate_names",
    "provider_for_url",
]
