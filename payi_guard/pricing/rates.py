"""Integer rates and costs: token usage at a model's prices, in integer money.

* a price is held as **pico-USD per token** (1e-12 USD): ``$1`` per million tokens is
  ``1_000_000`` pico-USD per token, so any price with up to six decimals per million
  tokens is exact; a finer price is rounded **up** (never under-charge);
* a cost is **nano-USD** (:data:`payi_guard.money.NANO_USD` per dollar), computed as
  ``ceil(sum(tokens * pico_rate) / 1000)`` with integers only.

:class:`TokenUsage` is what a call used, :class:`RateBand` one set of per-token rates,
:class:`Rates` a model's resolved prices (with long-context tiers) that prices a usage
exactly (:meth:`Rates.cost`) or bounds a call before it is sent
(:meth:`Rates.upper_bound_nano`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from payi_guard._frozen import frozen_maker
from payi_guard.config import PriceOverride
from payi_guard.money import PICO_PER_NANO, per_mtok_to_pico
from payi_guard.pricing.media import MediaRates, MediaTokens
from payi_guard.pricing.media import check_count as _check_count

__all__ = ["PriceSource", "RateBand", "Rates", "TokenUsage", "override_band"]

PriceSource = Literal["override", "genai-prices", "unknown_model"]
"""Where a :class:`Rates` came from."""


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
        web_searches: server-side web searches the provider ran for the call (billed per
            search: Anthropic's ``server_tool_use.web_search_requests``, the Responses
            API's ``web_search_call`` items); not tokens, so not in :attr:`total_tokens`.
        file_searches: server-side file (vector store) searches, billed per call (the
            Responses API's ``file_search_call`` items); not in :attr:`total_tokens`.
        media: the audio, image and video tokens within the counts above, which some
            models bill at other rates (:class:`~payi_guard.pricing.media.MediaTokens`);
            ``None`` when every token is text.

    Raises:
        TypeError: a count is not an ``int`` (``bool`` is refused too), or ``media`` is
            not :class:`~payi_guard.pricing.media.MediaTokens`.
        ValueError: a count is negative, or the media counts exceed the counts they are
            part of.
    """

    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_searches: int = 0
    file_searches: int = 0
    media: MediaTokens | None = None

    def __post_init__(self) -> None:
        # Exact non-negative ints (what every meter builds) pass in one test; anything
        # else is checked count by count, for the error that names it.
        if (
            type(self.input_tokens) is int
            and type(self.output_tokens) is int
            and type(self.cache_read_tokens) is int
            and type(self.cache_write_tokens) is int
            and type(self.cache_write_1h_tokens) is int
            and type(self.web_searches) is int
            and type(self.file_searches) is int
            and min(
                self.input_tokens,
                self.output_tokens,
                self.cache_read_tokens,
                self.cache_write_tokens,
                self.cache_write_1h_tokens,
                self.web_searches,
                self.file_searches,
            )
            >= 0
            and self.media is None
        ):
            return
        _check_count("input_tokens", self.input_tokens)
        _check_count("output_tokens", self.output_tokens)
        _check_count("cache_read_tokens", self.cache_read_tokens)
        _check_count("cache_write_tokens", self.cache_write_tokens)
        _check_count("cache_write_1h_tokens", self.cache_write_1h_tokens)
        _check_count("web_searches", self.web_searches)
        _check_count("file_searches", self.file_searches)
        media = self.media
        if media is None:
            return
        if type(media) is not MediaTokens:
            raise TypeError(f"media must be MediaTokens, not {type(media).__name__}")
        problem = media.problem(self.input_tokens, self.cache_read_tokens, self.output_tokens)
        if problem:
            raise ValueError(problem)

    def __add__(self, other: TokenUsage) -> TokenUsage:
        """The usage of two parts of one call together, count by count."""
        media = self.media
        if other.media is not None:
            media = other.media if media is None else media + other.media
        return TokenUsage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.cache_write_1h_tokens + other.cache_write_1h_tokens,
            self.web_searches + other.web_searches,
            self.file_searches + other.file_searches,
            media,
        )

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


make_token_usage: Final = frozen_maker(TokenUsage, post_init=False)
"""``TokenUsage(...)`` of counts the caller has checked (non-negative ints), every field
given in order, without ``__init__``'s cost or its checks."""


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
        web_search: the price of one server-side web search (pico-USD).
        file_search: the price of one server-side file search call (pico-USD).
        media: the rates of audio, image and video tokens, where the price sets any of
            them apart from text; ``None`` when it sets none.
    """

    input: int
    output: int
    cache_read: int
    cache_write: int
    cache_write_1h: int
    request: int = 0
    web_search: int = 0
    file_search: int = 0
    media: MediaRates | None = None

    def __post_init__(self) -> None:
        if self.media is not None and type(self.media) is not MediaRates:
            raise TypeError(f"media must be MediaRates, not {type(self.media).__name__}")
        for name in (
            "input",
            "output",
            "cache_read",
            "cache_write",
            "cache_write_1h",
            "request",
            "web_search",
            "file_search",
        ):
            _check_count(name, getattr(self, name))

    def cost_pico(self, usage: TokenUsage) -> int:
        """The exact cost of ``usage`` at these rates, in pico-USD (fees included)."""
        return (
            usage.input_tokens * self.input
            + usage.output_tokens * self.output
            + usage.cache_read_tokens * self.cache_read
            + usage.cache_write_tokens * self.cache_write
            + usage.cache_write_1h_tokens * self.cache_write_1h
            + usage.web_searches * self.web_search
            + usage.file_searches * self.file_search
            + self.request
            + (
                0
                if usage.media is None or self.media is None
                else usage.media.extra_pico(self.input, self.cache_read, self.output, self.media)
            )
        )

    def input_ceiling(self, *, cache_writes: bool = True) -> int:
        """The highest rate any one text input token can be billed at (media apart).

        Args:
            cache_writes: count cache-write rates too (a request that may write the
                cache); ``False`` bounds only plain input and cache reads.
        """
        ceiling = max(self.input, self.cache_read)
        if cache_writes:
            ceiling = max(ceiling, self.cache_write, self.cache_write_1h)
        return ceiling

    def output_ceiling(self) -> int:
        """The highest rate any one output token can be billed at (media included)."""
        if self.media is None:
            return self.output
        return max(self.output, self.media.output_ceiling)

    @staticmethod
    def highest(bands: Iterable[RateBand]) -> RateBand:
        """The rate-by-rate maximum of ``bands`` (at least one band)."""
        items = list(bands)
        if not items:
            raise ValueError("highest() needs at least one band")
        media = None
        if any(b.media is not None for b in items):
            media = MediaRates.highest(
                [
                    MediaRates.plain(b.input, b.cache_read, b.output)
                    if b.media is None
                    else b.media
                    for b in items
                ]
            )
        return RateBand(
            input=max(b.input for b in items),
            output=max(b.output for b in items),
            cache_read=max(b.cache_read for b in items),
            cache_write=max(b.cache_write for b in items),
            cache_write_1h=max(b.cache_write_1h for b in items),
            request=max(b.request for b in items),
            web_search=max(b.web_search for b in items),
            file_search=max(b.file_search for b in items),
            media=media,
        )


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
        return -(-band.cost_pico(usage) // PICO_PER_NANO)  # ceil_div(), inline

    def upper_bound_nano(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_writes: bool = True,
        web_searches: int = 0,
        file_searches: int = 0,
    ) -> int:
        """An upper bound, in nano-USD, of a call of at most these many tokens.

        Every input token is priced at the highest input-side rate of the bands the
        call can fall in (``cache_writes`` decides whether cache-write rates count),
        every output token at the highest output rate (audio, image and video rates
        included: a model that prices them apart is bounded at the dearest). Input is
        bounded at the text rates: the estimate counts inline audio, image and video
        data as text, far more tokens than they are billed, and a part that only
        points to a file at the file allowance.

        Args:
            input_tokens: an upper bound of all input tokens (cache included).
            output_tokens: an upper bound of the output tokens.
            cache_writes: whether the call may write the prompt cache.
            web_searches: an upper bound of the server-side web searches.
            file_searches: an upper bound of the server-side file search calls.

        Raises:
            ValueError: a count is negative.
        """
        if min(input_tokens, output_tokens, web_searches, file_searches) < 0:
            raise ValueError("token bounds must not be negative")
        band = self.bound_for(input_tokens) if self.tiers else self.base
        pico = (
            input_tokens * band.input_ceiling(cache_writes=cache_writes)
            + output_tokens * (band.output if band.media is None else band.output_ceiling())
            + web_searches * band.web_search
            + file_searches * band.file_search
            + band.request
        )
        return -(-pico // PICO_PER_NANO)  # ceil_div(), inline


def override_band(price: PriceOverride) -> RateBand:
    """The rates of a ``prices:`` entry; unset cache rates are the input rate.

    Raises:
        ValueError: a price is negative or not a number.
    """
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
