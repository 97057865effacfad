"""Pricing: token usage to integer cost, and upper bounds of a request's cost.

Money here is always an integer:

* a price is held as **pico-USD per token** (1e-12 USD): ``$1`` per million tokens is
  ``1_000_000`` pico-USD per token, so any price with up to six decimals per million
  tokens is exact; a finer price is rounded **up** (never under-charge);
* a cost is **nano-USD** (:data:`payi_guard.config.NANO_USD` per dollar), computed as
  ``ceil(sum(tokens * pico_rate) / 1000)`` with integers only.

Prices come from, in this order: the ``prices:`` overrides of the config, the data
bundled with ``genai-prices`` (read offline: its updater is never started here; an app
that starts it itself gets the updated data), and the ``unknown_model`` policy.

Estimates bound a request's cost before it is sent: :func:`estimate_input_tokens` reads
the JSON body, :func:`max_output_tokens` finds the output cap, and
:meth:`PriceBook.estimate_cost` prices both with the highest rates that can apply.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Literal, get_args

from cachetools import LRUCache

from payi_guard.clock import Clock, SystemClock
from payi_guard.config import PriceOverride, UnknownModelPolicy
from payi_guard.exceptions import ConfigError, PayiGuardError

__all__ = [
    "ANTHROPIC_BUILTIN_TOOL_TOKENS",
    "ANTHROPIC_TOOLS_OVERHEAD_TOKENS",
    "DEFAULT_FILE_TOKENS",
    "DEFAULT_IMAGE_TOKENS",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "ENDPOINTS",
    "MESSAGE_OVERHEAD_TOKENS",
    "OPENAI_TOOLS_OVERHEAD_TOKENS",
    "PICO_PER_NANO",
    "PICO_USD",
    "REQUEST_OVERHEAD_TOKENS",
    "Endpoint",
    "Estimate",
    "EstimateMode",
    "PriceBook",
    "PriceSource",
    "RateBand",
    "Rates",
    "TokenUsage",
    "UnknownModel",
    "candidate_names",
    "cost_usd",
    "estimate_input_tokens",
    "image_token_bound",
    "max_output_tokens",
    "model_output_cap",
    "nano_to_decimal",
    "per_mtok_to_pico",
    "text_token_bound",
]

PICO_USD = 1_000_000_000_000
"""Pico-USD per US dollar: the unit of a per-token rate."""

PICO_PER_NANO = 1_000
"""Pico-USD per nano-USD: a cost in pico-USD is divided by this (rounding up)."""

_PICO_PER_TOKEN_PER_USD_PER_MTOK = 1_000_000
"""``$1`` per million tokens is ``1e-6`` USD per token, i.e. ``1e6`` pico-USD per token."""

Endpoint = Literal["chat", "responses", "embeddings", "anthropic_messages", "completions"]
"""The request kinds estimates understand (OpenAI ``/chat/completions``, ``/responses``,
``/embeddings``, legacy ``/completions``, and Anthropic ``/v1/messages``)."""

ENDPOINTS: tuple[Endpoint, ...] = get_args(Endpoint)

EstimateMode = Literal["ratio", "bytes"]
"""How text is turned into a token bound; see :func:`estimate_input_tokens`."""

PriceSource = Literal["override", "genai-prices", "unknown_model"]
"""Where a :class:`Rates` came from."""

DEFAULT_MAX_OUTPUT_TOKENS = 16_384
"""Output bound used when a request sets no cap and the model's own cap is not known."""

DEFAULT_IMAGE_TOKENS = 1_600
"""Tokens counted per image part when the model has no entry in the image table.

It covers the largest image of tile-priced OpenAI models (gpt-4o: 85 + 170 x 8 tiles =
1,445) and of Claude (about 1.15 megapixels / 750 = 1,600).
"""

DEFAULT_FILE_TOKENS = 32_000
"""Tokens counted for a file or document passed by reference (URL or file id).

Such a file's size is not in the request, so this is a documented allowance, not a
bound; files passed inline (base64) are counted from their data instead.
"""


# ---------------------------------------------------------------------------------------
# Usage and rates
# ---------------------------------------------------------------------------------------


def _check_count(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The tokens one call used, split by how each kind is billed.

    Every field is a separate, non-overlapping count, so :attr:`total_tokens` is their
    sum.

    Attributes:
        input_tokens: input tokens billed at the plain input rate, **excluding** cache
            reads and cache writes. Anthropic's ``usage.input_tokens`` already excludes
            them; OpenAI's ``prompt_tokens`` includes
            ``prompt_tokens_details.cached_tokens``, so an OpenAI usage gives
            ``input_tokens = prompt_tokens - cached_tokens`` and
            ``cache_read_tokens = cached_tokens``.
        output_tokens: output tokens, reasoning/thinking tokens included.
        cache_read_tokens: input tokens read from the prompt cache.
        cache_write_tokens: input tokens written to the prompt cache at the default
            (5 minute) lifetime; Anthropic's ``cache_creation_input_tokens`` minus the
            1-hour writes below.
        cache_write_1h_tokens: input tokens written to the prompt cache with a 1-hour
            lifetime (Anthropic's ``cache_creation.ephemeral_1h_input_tokens``), billed at
            a higher rate where the model has one.

    Raises:
        TypeError: a count is not an ``int`` (``bool`` is refused too).
        ValueError: a count is negative.
    """

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    def __post_init__(self) -> None:
        _check_count("input_tokens", self.input_tokens)
        _check_count("output_tokens", self.output_tokens)
        _check_count("cache_read_tokens", self.cache_read_tokens)
        _check_count("cache_write_tokens", self.cache_write_tokens)
        _check_count("cache_write_1h_tokens", self.cache_write_1h_tokens)

    @property
    def total_input_tokens(self) -> int:
        """All input tokens: plain input, cache reads and cache writes together.

        This is the count long-context price tiers are decided on.
        """
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
        )

    @property
    def total_tokens(self) -> int:
        """Every token of the call, input (all kinds) and output."""
        return self.total_input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class RateBand:
    """The per-token rates of one price band, in pico-USD per token.

    Attributes:
        input: plain input tokens.
        output: output tokens.
        cache_read: cache reads.
        cache_write: 5-minute cache writes.
        cache_write_1h: 1-hour cache writes.
        request: a fixed fee per call (pico-USD), for the few models that have one.
    """

    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    request: int = 0

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write", "cache_write_1h", "request"):
            _check_count(name, getattr(self, name))

    def cost_pico(self, usage: TokenUsage) -> int:
        """The exact cost of ``usage`` at these rates, in pico-USD (fee included)."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
            + usage.cache_write_1h_tokens * self.cache_write_1h
            + self.request
        )

    def input_ceiling(self, *, cache_writes: bool = True) -> int:
        """The highest rate any one input token can be billed at.

        Args:
            cache_writes: count cache-write rates too (a request that may write the
                cache); ``False`` bounds only plain input and cache reads.
        """
        ceiling = max(self.input, self.cache_read)
        if cache_writes:
            ceiling = max(ceiling, self.cache_write, self.cache_write_1h)
        return ceiling

    @staticmethod
    def highest(bands: Iterable[RateBand]) -> RateBand:
        """The rate-by-rate maximum of ``bands`` (at least one band)."""
        items = list(bands)
        if not items:
            raise ValueError("highest() needs at least one band")
        return RateBand(
            input=max(b.input for b in items),
            output=max(b.output for b in items),
            cache_read=max(b.cache_read for b in items),
            cache_write=max(b.cache_write for b in items),
            cache_write_1h=max(b.cache_write_1h for b in items),
            request=max(b.request for b in items),
        )


def _ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


@dataclass(frozen=True, slots=True)
class Rates:
    """The resolved prices of one model, as integer pico-USD per token.

    Long-context tiers follow genai-prices' "cliff" model: when a call's total input
    tokens (plain + cache reads + cache writes) is **greater than** a tier's ``start``,
    that tier's rates apply to **all** tokens of the call, output included. ``base``
    applies below the first tier.

    The flat attributes :attr:`input`, :attr:`output`, :attr:`cache_read`,
    :attr:`cache_write` and :attr:`cache_write_1h` are the highest rate over every band:
    an upper bound that is safe for any estimate. :meth:`cost` charges the band the
    actual usage falls in.

    Attributes:
        model: the model name that was asked for.
        provider: the provider name that was asked for (``None`` if none was given).
        source: ``"override"`` (the config's ``prices:``), ``"genai-prices"`` (bundled
            data) or ``"unknown_model"`` (the unknown-model fallback price).
        base: the rates below the first tier (the only band of an untiered price).
        tiers: ``(start, band)`` pairs, ascending by ``start``.
        matched: the price entry that matched: the override key or genai-prices' model
            id; ``None`` for the unknown-model price.
    """

    model: str
    provider: str | None
    source: PriceSource
    base: RateBand
    tiers: tuple[tuple[int, RateBand], ...] = ()
    matched: str | None = None
    ceiling: RateBand = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        previous = -1
        for start, _ in self.tiers:
            if start <= previous:
                raise ValueError("tier starts must be >= 0 and strictly ascending")
            previous = start
        object.__setattr__(
            self, "ceiling", RateBand.highest([self.base, *(band for _, band in self.tiers)])
        )

    @property
    def input(self) -> int:
        """Highest plain-input rate over all bands (pico-USD per token)."""
        return self.ceiling.input

    @property
    def output(self) -> int:
        """Highest output rate over all bands (pico-USD per token)."""
        return self.ceiling.output

    @property
    def cache_read(self) -> int:
        """Highest cache-read rate over all bands (pico-USD per token)."""
        return self.ceiling.cache_read

    @property
    def cache_write(self) -> int:
        """Highest 5-minute cache-write rate over all bands (pico-USD per token)."""
        return self.ceiling.cache_write

    @property
    def cache_write_1h(self) -> int:
        """Highest 1-hour cache-write rate over all bands (pico-USD per token)."""
        return self.ceiling.cache_write_1h

    @property
    def tiered(self) -> bool:
        """Whether the price changes with the size of the input."""
        return bool(self.tiers)

    def band_for(self, total_input_tokens: int) -> RateBand:
        """The band a call with ``total_input_tokens`` input tokens is billed in."""
        band = self.base
        for start, tier in self.tiers:
            if total_input_tokens > start:
                band = tier
            else:
                break
        return band

    def bound_for(self, max_input_tokens: int) -> RateBand:
        """The highest rates a call of at most ``max_input_tokens`` input tokens can pay.

        The rate-by-rate maximum over every band such a call can fall in: a safe price
        for an estimate.
        """
        bands = [self.base]
        bands.extend(tier for start, tier in self.tiers if max_input_tokens > start)
        return bands[0] if len(bands) == 1 else RateBand.highest(bands)

    def cost(self, usage: TokenUsage) -> int:
        """The cost of ``usage`` in nano-USD, rounded up.

        Args:
            usage: the tokens the call used.

        Returns:
            ``ceil(pico / 1000)`` where ``pico`` is the exact cost in the band the
            usage's total input falls in.
        """
        band = self.band_for(usage.total_input_tokens) if self.tiers else self.base
        return _ceil_div(band.cost_pico(usage), PICO_PER_NANO)

    def upper_bound_nano(
        self, input_tokens: int, output_tokens: int, *, cache_writes: bool = True
    ) -> int:
        """An upper bound, in nano-USD, of a call of at most these many tokens.

        Every input token is priced at the highest input-side rate of the bands the
        call can fall in (``cache_writes`` decides whether cache-write rates count).

        Args:
            input_tokens: an upper bound of all input tokens (cache included).
            output_tokens: an upper bound of the output tokens.
            cache_writes: whether the call may write the prompt cache.

        Raises:
            ValueError: a count is negative.
        """
        if input_tokens < 0 or output_tokens < 0:
            raise ValueError("token bounds must not be negative")
        band = self.bound_for(input_tokens) if self.tiers else self.base
        pico = (
            input_tokens * band.input_ceiling(cache_writes=cache_writes)
            + output_tokens * band.output
            + band.request
        )
        return _ceil_div(pico, PICO_PER_NANO)


class UnknownModel(PayiGuardError, LookupError):
    """No price is known for a model, and the unknown-model policy sets none.

    Never charged as $0: the caller decides (refuse the call under ``block``, or send
    it and log it as unpriced under ``allow``).

    Attributes:
        model: the model name.
        provider: the provider name, if one was given.
        action: the policy's action (``"block"`` or ``"allow"``).
        reason: why no price applies.
    """

    def __init__(
        self, model: str, provider: str | None, action: str, reason: str = "no price is known"
    ) -> None:
        self.model = model
        self.provider = provider
        self.action = action
        self.reason = reason
        where = f" (provider {provider!r})" if provider else ""
        super().__init__(
            f"unknown model {model!r}{where}: {reason}; unknown_model policy is {action!r}"
        )


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


def _override_band(price: PriceOverride) -> RateBand:
    input_rate = per_mtok_to_pico(price.input_per_mtok)
    cache_write = (
        input_rate
        if price.cache_write_per_mtok is None
        else per_mtok_to_pico(price.cache_write_per_mtok)
    )
    return RateBand(
        input=input_rate,
        output=per_mtok_to_pico(price.output_per_mtok),
        cache_read=(
            input_rate
            if price.cache_read_per_mtok is None
            else per_mtok_to_pico(price.cache_read_per_mtok)
        ),
        cache_write=cache_write,
        cache_write_1h=cache_write,
    )


# ---------------------------------------------------------------------------------------
# Money helpers
# ---------------------------------------------------------------------------------------


def nano_to_decimal(nano: int) -> Decimal:
    """Exact ``Decimal`` dollars of ``nano`` nano-USD (``1_500_000_000`` -> ``1.500000000``)."""
    sign, digits, exponent = Decimal(nano).as_tuple()
    return Decimal((sign, digits, int(exponent) - 9))


def cost_usd(nano: int) -> float:
    """The float dollars of ``nano`` nano-USD, for the ``cost_usd`` log field.

    For ``|nano| < 10**15`` (one million dollars) the float's shortest ``repr`` is
    exactly ``nano / 10**9`` in decimal: such a value has at most 15 significant
    digits, and a double tells apart every 15-digit decimal. Beyond that range the
    result is the nearest double.

    Args:
        nano: an amount in nano-USD.
    """
    return nano / 1_000_000_000  # int / int true division is correctly rounded


# ---------------------------------------------------------------------------------------
# genai-prices
# ---------------------------------------------------------------------------------------

_PROVIDER_IDS: Mapping[str, str | None] = {
    "openai": "openai",
    "azure": "openai",
    "azure-openai": "openai",
    "anthropic": "anthropic",
    "openai-compatible": None,
}
"""Meter provider names to genai-prices provider ids (``None``: match by model name)."""

_DATE_SUFFIX = re.compile(r"(?:[-@](?:20\d{2}-\d{2}-\d{2}|20\d{6}))$")

_PRICE_KEYS = (
    "input_mtok",
    "output_mtok",
    "cache_read_mtok",
    "cache_write_mtok",
    "cache_write_1h_mtok",
    "requests_kcount",
)


def candidate_names(model: str) -> list[str]:
    """The names a model is looked up under, most specific first.

    ``openai/gpt-4o-2024-08-06`` gives itself, ``gpt-4o-2024-08-06`` (provider prefix
    stripped), then ``openai/gpt-4o`` and ``gpt-4o`` (date suffix stripped: ``-YYYY-MM-DD``,
    ``-YYYYMMDD`` or Vertex's ``@YYYYMMDD``).
    """
    names = [model]
    if "/" in model:
        names.append(model.rsplit("/", 1)[1])
    for name in list(names):
        undated = _DATE_SUFFIX.sub("", name)
        if undated != name and undated:
            names.append(undated)
    return list(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True, slots=True)
class _Resolved:
    """A cache entry: the rates (``None`` when unknown) and until when they hold."""

    rates: Rates | None
    valid_until: float
    reason: str = ""


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _next_start(constraint: Any, today: Any, current: float) -> float:
    """The earlier of ``current`` and the future start date of ``constraint``."""
    start = getattr(constraint, "start_date", None)
    if start is None or start <= today:
        return current
    ts = datetime(start.year, start.month, start.day, tzinfo=timezone.utc).timestamp()
    return min(current, ts)


def _is_time_of_day(constraint: Any) -> bool:
    return constraint is not None and hasattr(constraint, "start_time")


def _candidate_prices(model_info: Any, now: datetime) -> tuple[list[Any], float]:
    """The price sets that can apply to a call made today, and when that may change.

    genai-prices picks the last conditional price whose constraint holds. A time-of-day
    price (an off-peak discount) holds only part of the day, so every time-of-day price
    met before the first price that holds all day counts as a candidate: the rates
    charged are their maximum, the same at any hour of the day.
    """
    prices = model_info.prices
    valid_until = float("inf")
    today = now.date()
    if not isinstance(prices, list):
        return [prices], valid_until
    candidates: list[Any] = []
    for conditional in prices:
        valid_until = _next_start(conditional.constraint, today, valid_until)
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if _is_time_of_day(constraint):
            candidates.append(conditional.prices)
            continue
        if constraint is None or constraint.active(now):
            candidates.append(conditional.prices)
            return candidates, valid_until
    # No all-day price holds: genai-prices falls back to the first one.
    candidates.append(prices[0].prices)
    return candidates, valid_until


def _apply_variants(
    model_info: Any,
    price: Any,
    context: Mapping[str, str],
    now: datetime,
    valid_until: float,
) -> tuple[dict[str, Any], float]:
    """The price keys of ``price`` with the request-context variants applied."""
    values = {key: getattr(price, key, None) for key in _PRICE_KEYS}
    today = now.date()
    overrides: dict[str, Any] = {}
    for variant in getattr(model_info, "price_variants", None) or ():
        constraint = getattr(variant, "constraint", None)
        valid_until = _next_start(constraint, today, valid_until)
        if not context:
            continue
        if constraint is not None and not constraint.active(now):
            continue
        if not all(context.get(k) == v for k, v in variant.when.items()):
            continue
        for key in _PRICE_KEYS:
            value = getattr(variant.prices, key, None)
            if value is not None:
                overrides.setdefault(key, value)
    values.update(overrides)
    return values, valid_until


def _price_at(value: Any, total_input_tokens: int) -> Decimal | None:
    """One price key's USD-per-unit price for a call with this many input tokens."""
    if value is None:
        return None
    tiers = getattr(value, "tiers", None)
    if tiers is None:
        return Decimal(value)
    applicable = value.base
    for tier in tiers:
        if total_input_tokens > tier.start:
            applicable = tier.price
    return Decimal(applicable)


def _band_from(values: Sequence[Mapping[str, Any]], total_input_tokens: int) -> RateBand | None:
    """The band for a call of ``total_input_tokens``: the max over candidate price sets."""
    bands: list[RateBand] = []
    for keys in values:
        input_price = _price_at(keys["input_mtok"], total_input_tokens)
        if input_price is None:
            continue
        output_price = _price_at(keys["output_mtok"], total_input_tokens)
        read = _price_at(keys["cache_read_mtok"], total_input_tokens)
        write = _price_at(keys["cache_write_mtok"], total_input_tokens)
        write_1h = _price_at(keys["cache_write_1h_mtok"], total_input_tokens)
        per_k = _price_at(keys["requests_kcount"], total_input_tokens)
        # Unpriced sub-kinds are billed as their parent, as genai-prices does.
        input_rate = per_mtok_to_pico(input_price)
        write_rate = input_rate if write is None else per_mtok_to_pico(write)
        bands.append(
            RateBand(
                input=input_rate,
                output=0 if output_price is None else per_mtok_to_pico(output_price),
                cache_read=input_rate if read is None else per_mtok_to_pico(read),
                cache_write=write_rate,
                cache_write_1h=write_rate if write_1h is None else per_mtok_to_pico(write_1h),
                # $X per thousand requests is X * 1e12 / 1e3 pico-USD per request.
                request=0 if per_k is None else per_mtok_to_pico(per_k) * 1_000,
            )
        )
    if not bands:
        return None
    return bands[0] if len(bands) == 1 else RateBand.highest(bands)


def _tier_starts(values: Sequence[Mapping[str, Any]]) -> list[int]:
    starts: set[int] = set()
    for keys in values:
        for value in keys.values():
            for tier in getattr(value, "tiers", None) or ():
                starts.add(int(tier.start))
    return sorted(starts)


def _genai_lookup(name: str, provider_id: str | None) -> tuple[Any, Any] | None:
    """Find ``(provider, model)`` in genai-prices' data, or ``None``."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    attempts: list[str | None] = [provider_id] if provider_id else []
    attempts.append(None)
    for pid in attempts:
        try:
            found: tuple[Any, Any] = snapshot.find_provider_model(name, None, pid, None)
        except LookupError:
            continue
        return found
    return None


def _genai_scan(name: str) -> tuple[Any, Any] | None:
    """Find ``name`` under any provider: the last resort when no provider is known.

    genai-prices guesses a provider from name patterns that miss some models (OpenAI's
    embeddings, for one). The providers that publish models under their own names are
    asked first, then every other one.
    """
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    providers = list(snapshot.providers)
    first = {pid: i for i, pid in enumerate(_FIRST_PARTY)}
    providers.sort(key=lambda provider: first.get(provider.id, len(first)))
    lowered = name.lower()
    for provider in providers:
        model = provider.find_model(lowered, all_providers=snapshot.providers)
        if model is not None:
            return provider, model
    return None


_FIRST_PARTY = ("openai", "anthropic", "google", "mistral", "deepseek", "x-ai", "cohere", "meta")


# ---------------------------------------------------------------------------------------
# The price book
# ---------------------------------------------------------------------------------------


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

    Genai-prices facts this relies on: a time-of-day price (an off-peak discount) is
    charged at the highest of the prices that can apply that day; request-context
    variants (``service_tier``, ``speed``) apply only when given in ``price_context``;
    per-unit prices other than tokens and requests (web searches, audio, images) are
    not charged.

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
                self._overrides[name] = _override_band(price)
            except ValueError as exc:
                raise ConfigError(str(exc), key=f"prices.{name}") from None
        self._fallback: RateBand | None = None
        if self._policy.price is not None and self._policy.action in ("price", "allow"):
            try:
                self._fallback = _override_band(self._policy.price)
            except ValueError as exc:
                raise ConfigError(str(exc), key="unknown_model") from None
        if self._policy.action == "price" and self._fallback is None:
            raise ConfigError("action 'price' needs a price", key="unknown_model")
        self._cache: LRUCache[tuple[str, str | None, tuple[tuple[str, str], ...]], _Resolved]
        self._cache = LRUCache(maxsize=maxsize)
        self._lock = threading.Lock()

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
        now = self._clock.now()
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or now >= entry.valid_until:
            entry = self._resolve(model, provider, dict(context), now)
            with self._lock:
                self._cache[key] = entry
        if entry.rates is None:
            raise UnknownModel(model, provider, self._policy.action, entry.reason)
        return entry.rates

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

    def estimate_cost(
        self,
        model: str,
        provider: str | None,
        body: Mapping[str, Any],
        endpoint: Endpoint,
        *,
        mode: EstimateMode = "ratio",
        default_max_output: int = DEFAULT_MAX_OUTPUT_TOKENS,
        image_tokens: int | None = None,
        file_tokens: int = DEFAULT_FILE_TOKENS,
    ) -> Estimate:
        """An upper bound of a request's cost, to reserve before sending it.

        The price variant is taken from the body (``service_tier`` other than ``auto``;
        Anthropic's ``speed``). Input tokens are priced at the highest input-side rate
        of every band the input bound can fall in: cache-write rates count unless the
        request is an Anthropic one without ``cache_control`` (Anthropic writes the
        cache only when asked; OpenAI caches by itself).

        Args:
            model: the model name.
            provider: the provider name, if known.
            body: the parsed JSON request body.
            endpoint: the request kind (one of :data:`ENDPOINTS`).
            mode: see :func:`estimate_input_tokens`.
            default_max_output: output bound for a model with no known cap when the
                request sets none.
            image_tokens: tokens per image part; defaults to :func:`image_token_bound`.
            file_tokens: tokens per file passed by reference.

        Returns:
            The :class:`Estimate`.

        Raises:
            UnknownModel: as :meth:`rates`.
            ValueError: unknown ``endpoint`` or ``mode``.
        """
        context = _price_context(body, endpoint)
        rates = self.rates(model, provider, price_context=context)
        input_tokens = estimate_input_tokens(
            body,
            mode=mode,
            endpoint=endpoint,
            image_tokens=image_token_bound(model) if image_tokens is None else image_tokens,
            file_tokens=file_tokens,
        )
        output_tokens = max_output_tokens(
            body, endpoint=endpoint, model=model, default=default_max_output
        )
        writes = endpoint != "anthropic_messages" or _mentions_key(body, "cache_control")
        nano = rates.upper_bound_nano(input_tokens, output_tokens, cache_writes=writes)
        return Estimate(input_tokens, output_tokens, nano, rates)

    # -- resolution ---------------------------------------------------------------------

    def _resolve(
        self, model: str, provider: str | None, context: Mapping[str, str], now: float
    ) -> _Resolved:
        names = candidate_names(model)
        for name in names:
            band = self._overrides.get(name)
            if band is not None:
                return _Resolved(Rates(model, provider, "override", band, (), name), float("inf"))
        if provider is None:
            provider_id: str | None = None
        else:
            provider_id = _PROVIDER_IDS.get(provider.lower(), provider.lower())
        reason = "not in the price overrides nor in genai-prices' data"
        found_any = False
        for name in names:
            found = _genai_lookup(name, provider_id)
            if found is None and provider_id is None and name == names[-1] and not found_any:
                found = _genai_scan(model)
            if found is None:
                continue
            found_any = True
            resolved = self._from_genai(model, provider, found, context, now)
            if resolved.rates is not None:
                return resolved
            reason = resolved.reason
            break
        if self._fallback is not None:
            return _Resolved(Rates(model, provider, "unknown_model", self._fallback), float("inf"))
        return _Resolved(None, float("inf"), reason)

    def _from_genai(
        self,
        model: str,
        provider: str | None,
        found: tuple[Any, Any],
        context: Mapping[str, str],
        now_ts: float,
    ) -> _Resolved:
        gp_provider, info = found
        now = _utc(now_ts)
        candidates, valid_until = _candidate_prices(info, now)
        # genai-prices applies request variants only to the provider's own models.
        owned = any(info is m for m in getattr(gp_provider, "models", ()))
        values: list[dict[str, Any]] = []
        for price in candidates:
            keys, valid_until = _apply_variants(
                info, price, context if owned else {}, now, valid_until
            )
            values.append(keys)
        base = _band_from(values, 0)
        if base is None:
            return _Resolved(None, valid_until, f"genai-prices has no token price for {info.id!r}")
        tiers: list[tuple[int, RateBand]] = []
        for start in _tier_starts(values):
            band = _band_from(values, start + 1)
            if band is not None:
                tiers.append((start, band))
        rates = Rates(model, provider, "genai-prices", base, tuple(tiers), str(info.id))
        return _Resolved(rates, valid_until)


def _price_context(body: Mapping[str, Any], endpoint: Endpoint) -> dict[str, str]:
    context: dict[str, str] = {}
    tier = body.get("service_tier")
    if endpoint != "anthropic_messages" and isinstance(tier, str) and tier != "auto":
        context["service_tier"] = tier
    speed = body.get("speed")
    if endpoint == "anthropic_messages" and isinstance(speed, str):
        context["speed"] = speed
    return context


def _mentions_key(obj: object, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj or any(_mentions_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions_key(v, key) for v in obj)
    return False


# ---------------------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """An upper bound of one request's cost.

    Attributes:
        input_tokens: upper bound of all input tokens.
        output_tokens: upper bound of the output tokens (every choice).
        nano: upper bound of the cost in nano-USD, to reserve.
        rates: the rates it was priced with.
    """

    input_tokens: int
    output_tokens: int
    nano: int
    rates: Rates


MESSAGE_OVERHEAD_TOKENS = 10
"""Tokens added per message / input item for the chat format's role and separators
(OpenAI documents 3-4 per message)."""

REQUEST_OVERHEAD_TOKENS = 16
"""Tokens added per request (reply priming and format)."""

OPENAI_TOOLS_OVERHEAD_TOKENS = 64
"""Tokens added when OpenAI tools/functions are declared: their definitions are rendered
into a system section of their own."""

ANTHROPIC_TOOLS_OVERHEAD_TOKENS = 600
"""Tokens added when Anthropic tools are declared: Anthropic documents a tool-use system
prompt of 159 to 530 tokens depending on the model and ``tool_choice``."""

ANTHROPIC_BUILTIN_TOOL_TOKENS = 1_500
"""Tokens added per Anthropic built-in tool (``{"type": "bash_20250124", ...}``): their
definitions are not in the request; Anthropic documents 245 to 1,234 tokens each."""

_IMAGE_TOKEN_BOUNDS: tuple[tuple[str, int], ...] = (
    # gpt-4o-mini bills images at 2,833 + 5,667 per 512px tile (up to 4 tiles).
    ("gpt-4o-mini", 25_501),
    # Patch-priced models: up to 1,536 patches times a per-model multiplier (<= 2.46).
    ("gpt-4.1-mini", 3_800),
    ("gpt-4.1-nano", 3_800),
    ("gpt-5-mini", 3_800),
    ("gpt-5-nano", 3_800),
    ("o4-mini", 3_800),
)


def image_token_bound(model: str) -> int:
    """Tokens counted per image part for ``model`` (longest matching name prefix).

    Models billed far above :data:`DEFAULT_IMAGE_TOKENS` per image have an entry (for
    example ``gpt-4o-mini``: 25,501); every other model uses the default.
    """
    name = model.rsplit("/", 1)[-1].lower()
    best, best_len = DEFAULT_IMAGE_TOKENS, -1
    for prefix, tokens in _IMAGE_TOKEN_BOUNDS:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = tokens, len(prefix)
    return best


# Character classes for the "ratio" text bound, over UTF-8 bytes (all C-speed passes).
_WORD_RUN = re.compile(rb"[A-Za-z\x80-\xff]+")
_DIGIT_RUN = re.compile(rb"[0-9]+")
_SPACE_RUN = re.compile(rb"[ \t\n\r\x0b\x0c]+")
_MERGED_SPACE = re.compile(rb"[^ \t\n\r\x0b\x0c] (?=[^ \t\n\r\x0b\x0c0-9])")
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LEAD4 = bytes(range(0xF0, 0xF8))


def text_token_bound(text: str, mode: EstimateMode = "ratio") -> int:
    """A bound of the tokens of ``text`` (no chat-format overhead).

    ``"bytes"``: the UTF-8 length. Every token of a byte-level BPE (OpenAI's
    tokenizers, and any tokenizer with byte fallback) covers at least one byte, so this
    can never be exceeded.

    ``"ratio"``: a per-character-class bound that follows how GPT-style tokenizers split
    text, and is at least ``ceil(bytes / 2.5)``:

    * letters (ASCII and non-ASCII bytes): 2/3 token per byte, 1/3 more per ASCII
      capital and per run, 4/3 more per 4-byte character (emoji);
    * digits: 1/2 token per digit plus 1/2 per run (they split into groups of three);
    * whitespace: 1 per tab/newline, 1/2 per space plus 1 per run, minus the single
      spaces that merge into the next word;
    * everything else (punctuation, symbols, controls): 1 per byte.

    Measured with OpenAI's cl100k_base and o200k_base tokenizers it never under-counts
    prose (English, Chinese, Japanese, Korean, Russian, Greek, Hebrew, Arabic, Hindi,
    Thai, Vietnamese), code, JSON, numbers, UUIDs, hex, base64, URLs, LaTeX or emoji;
    it does under-count text made of characters the vocabulary lacks (runic, rare CJK
    ideographs: up to 3 tokens per character). Use ``"bytes"`` for a guarantee.

    Args:
        text: the text.
        mode: ``"ratio"`` or ``"bytes"``.

    Raises:
        ValueError: unknown ``mode``.
    """
    data = text.encode("utf-8", "surrogatepass")
    size = len(data)
    if mode == "bytes":
        return size
    if mode != "ratio":
        raise ValueError(f"mode must be 'ratio' or 'bytes', not {mode!r}")
    if not size:
        return 0
    rest, word_runs = _WORD_RUN.subn(b"", data)
    word_bytes = size - len(rest)
    upper = size - len(data.translate(None, _UPPER))
    four_byte = size - len(data.translate(None, _LEAD4))
    rest, digit_runs = _DIGIT_RUN.subn(b"", data)
    digit_bytes = size - len(rest)
    rest, space_runs = _SPACE_RUN.subn(b"", data)
    space_bytes = size - len(rest)
    spaces = data.count(b" ")
    merged = len(_MERGED_SPACE.findall(data))
    other = size - word_bytes - digit_bytes - space_bytes
    tokens = (
        _ceil_div(2 * word_bytes + upper + 4 * four_byte + word_runs, 3)
        + _ceil_div(digit_bytes + digit_runs, 2)
        + _ceil_div(spaces + 2 * space_runs, 2)
        + (space_bytes - spaces)
        - merged
        + other
    )
    return max(tokens, _ceil_div(2 * size, 5))


_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "computer_screenshot"})
_FILE_TYPES = frozenset({"file", "input_file", "document"})
_INLINE_SOURCES = frozenset({"base64", "text", "content"})
_SKIPPED_KEYS = frozenset({"cache_control"})


class _Tally:
    """What a request body holds, gathered by :func:`_walk`."""

    __slots__ = ("exact", "files", "images", "items", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.items = 0
        self.images = 0
        self.files = 0
        self.exact = 0

    def add(self, obj: object) -> None:
        """Walk ``obj``: strings are text; images and files by reference are counted."""
        if isinstance(obj, str):
            self.text.append(obj)
        elif isinstance(obj, Mapping):
            kind = obj.get("type")
            if kind in _IMAGE_TYPES or (kind is None and "image_url" in obj):
                self.images += 1
                return
            if kind in _FILE_TYPES and not _inline_file(obj):
                self.files += 1
                return
            # One token per entry stands for the punctuation a rendering adds.
            self.exact += len(obj)
            for key, value in obj.items():
                if key in _SKIPPED_KEYS:
                    continue
                self.text.append(str(key))
                self.add(value)
        elif isinstance(obj, list):
            self.exact += len(obj)
            for value in obj:
                self.add(value)
        elif obj is not None:
            self.text.append(str(obj))

    def add_items(self, items: object) -> None:
        """Walk a list of messages / input items, counting the per-item overhead."""
        if isinstance(items, list):
            self.items += len(items)
            for item in items:
                self.add(item)
        elif items is not None:
            self.items += 1
            self.add(items)

    def add_prompt(self, prompt: object) -> None:
        """Walk an embeddings ``input`` / completions ``prompt``: token ids count exactly."""
        if _is_token_ids(prompt):
            self.exact += len(prompt)  # type: ignore[arg-type]
            self.items += 1
        elif isinstance(prompt, list) and prompt and all(_is_token_ids(p) for p in prompt):
            self.exact += sum(len(p) for p in prompt)
            self.items += len(prompt)
        elif isinstance(prompt, list):
            self.items += len(prompt)
            for part in prompt:
                self.add(part)
        elif prompt is not None:
            self.items += 1
            self.add(prompt)


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _inline_file(part: Mapping[str, Any]) -> bool:
    """Whether a file/document part carries its content (counted as text) in the body."""
    if "file_data" in part:
        return True
    inner = part.get("file")
    if isinstance(inner, Mapping) and "file_data" in inner:
        return True
    source = part.get("source")
    return isinstance(source, Mapping) and source.get("type") in _INLINE_SOURCES


def _walk_body(body: Mapping[str, Any], endpoint: Endpoint) -> tuple[_Tally, int]:
    """Gather the input parts of ``body``; returns the tally and fixed overhead tokens."""
    tally = _Tally()
    overhead = REQUEST_OVERHEAD_TOKENS
    if endpoint == "chat":
        tally.add_items(body.get("messages"))
        for key in ("response_format", "tool_choice", "function_call", "prediction"):
            tally.add(body.get(key))
        declared = [body.get("tools"), body.get("functions")]
        if any(declared):
            overhead += OPENAI_TOOLS_OVERHEAD_TOKENS
            for tools in declared:
                tally.add_items(tools)
    elif endpoint == "responses":
        tally.add(body.get("instructions"))
        items = body.get("input")
        tally.add_items(items)
        for key in ("text", "tool_choice"):
            tally.add(body.get(key))
        if body.get("tools"):
            overhead += OPENAI_TOOLS_OVERHEAD_TOKENS
            tally.add_items(body.get("tools"))
    elif endpoint == "anthropic_messages":
        tally.add(body.get("system"))
        tally.add_items(body.get("messages"))
        tally.add(body.get("tool_choice"))
        tools = body.get("tools")
        if tools:
            overhead += ANTHROPIC_TOOLS_OVERHEAD_TOKENS
            tally.add_items(tools)
            if isinstance(tools, list):
                overhead += ANTHROPIC_BUILTIN_TOOL_TOKENS * sum(
                    1
                    for tool in tools
                    if isinstance(tool, Mapping) and tool.get("type") not in (None, "custom")
                )
    elif endpoint == "embeddings":
        tally.add_prompt(body.get("input"))
    elif endpoint == "completions":
        tally.add_prompt(body.get("prompt"))
        tally.add(body.get("suffix"))
    else:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}")
    return tally, overhead


def _infer_endpoint(body: Mapping[str, Any]) -> Endpoint:
    if "messages" in body:
        return "anthropic_messages" if "system" in body else "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        items = body["input"]
        if isinstance(items, str) or _is_token_ids(items):
            return "embeddings" if "instructions" not in body else "responses"
        if isinstance(items, list) and all(isinstance(i, str) or _is_token_ids(i) for i in items):
            return "embeddings"
        return "responses"
    return "chat"


def estimate_input_tokens(
    body: Mapping[str, Any],
    *,
    mode: EstimateMode = "ratio",
    endpoint: Endpoint | None = None,
    image_tokens: int = DEFAULT_IMAGE_TOKENS,
    file_tokens: int = DEFAULT_FILE_TOKENS,
) -> int:
    """An upper bound of the input tokens of a request, from its JSON body.

    What counts, by endpoint:

    * ``chat``: ``messages`` (string or list-of-parts content, names, tool calls and
      their arguments, tool results), ``tools`` / ``functions`` definitions (plus
      :data:`OPENAI_TOOLS_OVERHEAD_TOKENS`), ``response_format`` (its JSON schema),
      ``tool_choice``, ``prediction``;
    * ``responses``: ``instructions``, ``input`` (a string or a list of items),
      ``tools``, ``text`` (its format schema), ``tool_choice``;
    * ``embeddings``: ``input`` (a string, a list of strings, a list of token ids or a
      list of lists of token ids: token ids are counted exactly);
    * ``anthropic_messages``: ``system`` (string or blocks), ``messages`` (every content
      block: text, tool_use, tool_result, documents), ``tools`` (plus
      :data:`ANTHROPIC_TOOLS_OVERHEAD_TOKENS`, and
      :data:`ANTHROPIC_BUILTIN_TOOL_TOKENS` per built-in tool), ``tool_choice``;
    * ``completions``: ``prompt`` (string, list of strings, token ids) and ``suffix``.

    Text (values and keys alike) is bounded by :func:`text_token_bound`; each mapping
    or list entry adds one token for punctuation; each message / input item adds
    :data:`MESSAGE_OVERHEAD_TOKENS`; each request :data:`REQUEST_OVERHEAD_TOKENS`. An
    image part counts ``image_tokens`` whatever its size or detail (its data is not
    text); a file or document passed by reference counts ``file_tokens``; inline file
    or audio data is counted as text (a large over-estimate). Server-side state the
    body only points to (``previous_response_id``, ``conversation``, stored prompts)
    is not counted.

    Args:
        body: the parsed JSON request body.
        mode: ``"ratio"`` (the default, see :func:`text_token_bound`) or ``"bytes"``
            (UTF-8 bytes plus overheads: a true bound for byte-level BPE text).
        endpoint: the request kind; inferred from the body's keys when ``None``.
        image_tokens: tokens per image part.
        file_tokens: tokens per file passed by reference.

    Returns:
        The input token bound.

    Raises:
        ValueError: unknown ``mode`` or ``endpoint``, or a negative allowance.
        TypeError: ``body`` is not a mapping.
    """
    if not isinstance(body, Mapping):
        raise TypeError(f"body must be a mapping, not {type(body).__name__}")
    if mode not in ("ratio", "bytes"):
        raise ValueError(f"mode must be 'ratio' or 'bytes', not {mode!r}")
    if image_tokens < 0 or file_tokens < 0:
        raise ValueError("image_tokens and file_tokens must be >= 0")
    kind = _infer_endpoint(body) if endpoint is None else endpoint
    tally, overhead = _walk_body(body, kind)
    per_item = 1 if kind in ("embeddings", "completions") else MESSAGE_OVERHEAD_TOKENS
    return (
        text_token_bound("\n".join(tally.text), mode)
        + tally.exact
        + tally.items * per_item
        + tally.images * image_tokens
        + tally.files * file_tokens
        + overhead
    )


_OUTPUT_CAPS: tuple[tuple[str, int], ...] = (
    ("gpt-3.5-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-4-turbo", 4_096),
    ("gpt-4o", 16_384),
    ("gpt-4o-mini", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4.1", 32_768),
    ("gpt-4.5", 16_384),
    ("gpt-5", 128_000),
    ("gpt-6", 128_000),
    ("o1", 100_000),
    ("o1-mini", 65_536),
    ("o1-preview", 32_768),
    ("o3", 100_000),
    ("o4", 100_000),
    ("claude-2", 4_096),
    ("claude-instant", 4_096),
    ("claude-3-haiku", 4_096),
    ("claude-3-opus", 4_096),
    ("claude-3-sonnet", 4_096),
    ("claude-3-5", 8_192),
    ("claude-3-7", 128_000),
    ("claude-sonnet-4", 64_000),
    ("claude-opus-4", 32_000),
    ("claude-opus-4-5", 64_000),
    ("claude-haiku-4", 64_000),
    ("claude-opus-4-6", 128_000),
    ("claude", 128_000),
)
"""Longest output (completion) each model family can produce, by name prefix (the
longest matching prefix wins). Families whose limit grew over versions use the largest
(``claude-3-7`` allows 128k output with Anthropic's output-128k beta header)."""


def model_output_cap(model: str, default: int = DEFAULT_MAX_OUTPUT_TOKENS) -> int:
    """The known output cap of ``model`` (longest name-prefix match), else ``default``.

    A provider prefix (``openai/``) is ignored and names compare case-insensitively.
    """
    name = model.rsplit("/", 1)[-1].lower()
    best, best_len = default, -1
    for prefix, cap in _OUTPUT_CAPS:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = cap, len(prefix)
    return best


def _count_param(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def max_output_tokens(
    body: Mapping[str, Any],
    *,
    endpoint: Endpoint,
    model: str,
    default: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> int:
    """An upper bound of the output tokens of a request.

    The request's cap is ``max_completion_tokens`` (then ``max_tokens``) for chat,
    ``max_output_tokens`` for Responses, ``max_tokens`` for Anthropic and legacy
    completions. Without one, the model's known cap (:func:`model_output_cap`), else
    ``default``; legacy completions too (OpenAI defaults to 16 there, compatible servers
    differ). Chat multiplies by ``n``; legacy completions by ``max(n, best_of)`` (every
    candidate is billed). Embeddings have no output. A value that is not a non-negative
    integer is ignored (the provider refuses such a request anyway).

    Args:
        body: the parsed JSON request body.
        endpoint: the request kind.
        model: the model name (for its cap).
        default: the cap of a model not in the table.

    Raises:
        ValueError: unknown ``endpoint`` or a negative ``default``.
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}")
    if default < 0:
        raise ValueError("default must be >= 0")
    if endpoint == "embeddings":
        return 0
    names: tuple[str, ...] = {
        "chat": ("max_completion_tokens", "max_tokens"),
        "responses": ("max_output_tokens",),
        "anthropic_messages": ("max_tokens",),
        "completions": ("max_tokens",),
    }[endpoint]
    cap: int | None = None
    for name in names:
        cap = _count_param(body, name)
        if cap is not None:
            break
    if cap is None:
        cap = model_output_cap(model, default)
    choices = 1
    if endpoint in ("chat", "completions"):
        choices = max(1, _count_param(body, "n") or 1)
        if endpoint == "completions":
            choices = max(choices, _count_param(body, "best_of") or 1)
    return cap * choices
