"""The price book: a model (and provider) to its integer rates, cached; usage to cost.

Resolution order: the ``prices:`` overrides of the config, the genai-prices catalogue
(:mod:`payi_guard.pricing.catalogue`), then the ``unknown_model`` policy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from cachetools import LRUCache

from payi_guard.clock import Clock, SystemClock
from payi_guard.config import PriceOverride, UnknownModelPolicy
from payi_guard.exceptions import ConfigError, UnknownModel
from payi_guard.pricing.catalogue import Resolved, candidate_names, find_rates
from payi_guard.pricing.rates import RateBand, Rates, TokenUsage, override_band

__all__ = ["PriceBook"]

_FOREVER = float("inf")


class PriceBook:
    """Resolves models to integer rates and prices usage; thread-safe.

    Resolution order for ``rates(model, provider)``: an override whose key is the model
    name (or one of its :func:`candidate_names`: an override for ``gpt-4o`` also prices
    ``gpt-4o-2024-08-06`` and ``openai/gpt-4o``); then genai-prices' data for the
    provider (``azure`` uses OpenAI's prices; ``openai-compatible`` or an unknown
    provider match by model name only) under each candidate name; then the
    ``unknown_model`` policy: a fallback price (action ``price``, or ``allow`` with a
    price) gives rates with ``source="unknown_model"``; otherwise :class:`UnknownModel`
    is raised and the caller decides.

    Resolved rates (and unknown models) are kept in a bounded LRU cache per
    ``(model, provider, price context)``. A price that changes on a future date
    (genai-prices carries announced price changes) is resolved again once that date is
    reached, by the injected clock.

    :mod:`payi_guard.pricing.catalogue` says which genai-prices facts this relies on.

    Args:
        overrides: model name -> :class:`~payi_guard.config.PriceOverride`.
        unknown_model: the unknown-model policy.
        clock: the time source (for dated price changes); defaults to the system clock.
        maxsize: the most cache entries kept.

    Raises:
        ConfigError: an override has an invalid price, or the policy's ``price`` action
            has no price.
        ValueError: ``maxsize`` is not positive.
    """

    def __init__(
        self,
        overrides: Mapping[str, PriceOverride] | None = None,
        unknown_model: UnknownModelPolicy | None = None,
        *,
        clock: Clock | None = None,
        maxsize: int = 1024,
    ) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise ValueError(f"maxsize must be a positive int, got {maxsize!r}")
        self._policy = unknown_model if unknown_model is not None else UnknownModelPolicy()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._overrides: dict[str, RateBand] = {}
        for name, price in (overrides or {}).items():
            try:
                self._overrides[name] = override_band(price)
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"prices.{name}") from None
        self._fallback: RateBand | None = None
        if self._policy.price is not None and self._policy.action in ("price", "allow"):
            try:
                self._fallback = override_band(self._policy.price)
            except ValueError as exc:
                raise ConfigError(str(exc), key="unknown_model") from None
        if self._policy.action == "price" and self._fallback is None:
            raise ConfigError("action 'price' needs a price", key="unknown_model")
        self._cache: LRUCache[tuple[str, str | None, tuple[tuple[str, str], ...]], Resolved]
        self._cache = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()
        # The entries read lately, in a plain dict read without the lock (at most maxsize:
        # emptied when full): a hit there skips the lock and the LRU's bookkeeping. It
        # holds the LRU's own entries (resolved again the same way once out of date).
        self._recent: dict[tuple[str, str | None, tuple[tuple[str, str], ...]], Resolved] = {}
        self._maxsize = maxsize

    @property
    def unknown_model(self) -> UnknownModelPolicy:
        """The unknown-model policy."""
        return self._policy

    @property
    def maxsize(self) -> int:
        """The most cache entries kept."""
        return int(self._cache.maxsize)

    def cache_len(self) -> int:
        """How many entries the cache holds now."""
        with self._lock:
            return len(self._cache)

    def clear_cache(self) -> None:
        """Forget every resolved rate (they are resolved again on next use)."""
        with self._lock:
            self._cache.clear()
            self._recent = {}

    def rates(
        self,
        model: str,
        provider: str | None = None,
        *,
        price_context: Mapping[str, str] | None = None,
    ) -> Rates:
        """The rates of ``model`` (cached).

        Args:
            model: the model name as sent to the provider.
            provider: the provider (``openai``, ``anthropic``, ``azure``,
                ``openai-compatible`` or a genai-prices provider id), if known.
            price_context: request facts that select a price variant in genai-prices'
                data, e.g. ``{"service_tier": "priority"}`` or ``{"speed": "fast"}``.

        Returns:
            The :class:`Rates`.

        Raises:
            UnknownModel: no price is known and the policy gives none.
            TypeError: ``model`` is not a non-empty string.
        """
        if not isinstance(model, str) or not model:
            raise TypeError("model must be a non-empty string")
        context = tuple(sorted(price_context.items())) if price_context else ()
        key = (model, provider, context)
        entry = self._recent.get(key)
        if entry is None or (
            entry.valid_until != _FOREVER and self._clock.now() >= entry.valid_until
        ):
            entry = self._lookup(key, model, provider, context)
        if entry.rates is None:
            raise UnknownModel(model, provider, self._policy.action, entry.reason)
        return entry.rates

    def _lookup(
        self,
        key: tuple[str, str | None, tuple[tuple[str, str], ...]],
        model: str,
        provider: str | None,
        context: tuple[tuple[str, str], ...],
    ) -> Resolved:
        """The LRU's entry of ``key``, resolved again when missing or out of date."""
        now = self._clock.now()
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or now >= entry.valid_until:
            entry = self._resolve(model, provider, dict(context), now)
            with self._lock:
                self._cache[key] = entry
        with self._lock:
            recent = self._recent
            if len(recent) >= self._maxsize:
                recent = self._recent = {}
            recent[key] = entry
        return entry

    def cost(
        self,
        model: str,
        provider: str | None,
        usage: TokenUsage,
        *,
        price_context: Mapping[str, str] | None = None,
    ) -> int:
        """The cost of ``usage`` on ``model`` in nano-USD (see :meth:`Rates.cost`).

        Raises:
            UnknownModel: as :meth:`rates`.
        """
        return self.rates(model, provider, price_context=price_context).cost(usage)

    def cost_with(self, rates: Rates, usage: TokenUsage) -> int:
        """The cost of ``usage`` at already resolved ``rates``, in nano-USD."""
        return rates.cost(usage)

    def _resolve(
        self, model: str, provider: str | None, context: Mapping[str, str], now: float
    ) -> Resolved:
        names = candidate_names(model)
        for name in names:
            band = self._overrides.get(name)
            if band is not None:
                return Resolved(Rates(model, provider, "override", band, (), name), float("inf"))
        resolved = find_rates(model, provider, names, context, now)
        if resolved.rates is not None:
            return resolved
        if self._fallback is not None:
            return Resolved(Rates(model, provider, "unknown_model", self._fallback), float("inf"))
        return Resolved(None, float("inf"), resolved.reason)
