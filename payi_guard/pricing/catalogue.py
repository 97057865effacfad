"""The genai-prices catalogue: its bundled data, read offline, turned into :class:`Rates`.

Only the data bundled with ``genai-prices`` is read (its updater is never started here;
an app that starts it itself gets the updated data). Facts this relies on: a call is
priced at the time it is made (a dated price from its UTC day on, a time-of-day price,
DeepSeek's peak and off-peak hours, inside its hours), as genai-prices prices a request
at its timestamp; request-context variants (``service_tier``, ``speed``) apply only
when given in the price context; audio, image and video tokens are charged at their
own rates where the model has them (:mod:`payi_guard.pricing.media`); of the prices per
unit other than tokens, requests and web and file searches are charged, the others
(audio seconds, characters, pages) are not.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from functools import lru_cache
from typing import Any, Final

from payi_guard.money import per_mtok_to_pico
from payi_guard.pricing.media import MEDIA_KINDS, MediaRates
from payi_guard.pricing.rates import RateBand, Rates

__all__ = ["Resolved", "candidate_names", "find_rates", "provider_for_url"]

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
    "web_searches_kcount",
    "storage_searches_kcount",
    *(f"{kind}_mtok" for kind in MEDIA_KINDS),
)


@lru_cache(maxsize=512)
def provider_for_url(url: str) -> str | None:
    """The genai-prices provider whose API address ``url`` is, or ``None``.

    Matched against each provider's URL pattern in genai-prices' data, so an
    OpenAI-compatible client aimed at ``https://api.groq.com/openai/v1`` is priced as
    Groq, ``https://api.deepseek.com`` as DeepSeek, ``https://openrouter.ai/api/v1`` as
    OpenRouter (likewise Together, Fireworks, xAI, Mistral, Cerebras and the others).

    Args:
        url: the request URL (scheme, host and path; a query is ignored by the patterns).
    """
    from genai_prices import data_snapshot

    for provider in data_snapshot.get_snapshot().providers:
        if re.match(provider.api_pattern, url):
            return str(provider.id)
    return None


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
class Resolved:
    """Rates (``None`` when no price applies), until when they hold, and why not."""

    rates: Rates | None
    valid_until: float
    reason: str = ""


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


def _next_start(constraint: Any, now: datetime, current: float) -> float:
    """The earlier of ``current`` and the next time ``constraint`` starts or stops holding.

    A start date: its UTC midnight, when still to come. A time of day: the next of its
    start and end times (UTC) after ``now``.
    """
    start = getattr(constraint, "start_date", None)
    if start is not None:
        if start <= now.date():
            return current
        ts = datetime(start.year, start.month, start.day, tzinfo=timezone.utc).timestamp()
        return min(current, ts)
    if constraint is None or not hasattr(constraint, "start_time"):
        return current
    for moment in (constraint.start_time, constraint.end_time):
        at = datetime.combine(now.date(), moment, tzinfo=moment.tzinfo or timezone.utc)
        at = at.astimezone(timezone.utc)
        while at <= now:
            at += timedelta(days=1)
        current = min(current, at.timestamp())
    return current


def _price_now(model_info: Any, now: datetime) -> tuple[Any, float]:
    """The price set of a call made at ``now``, and when that may change.

    As genai-prices picks it for a request at ``now``: the last conditional price whose
    constraint holds (a start date, or a time of day such as DeepSeek's peak hours),
    else the first. The result holds until the next start date or time-of-day bound.
    """
    prices = model_info.prices
    valid_until = float("inf")
    if not isinstance(prices, list):
        return prices, valid_until
    for conditional in prices:
        valid_until = _next_start(conditional.constraint, now, valid_until)
    for conditional in reversed(prices):
        constraint = conditional.constraint
        if constraint is None or constraint.active(now):
            return conditional.prices, valid_until
    # No price holds: genai-prices falls back to the first one.
    return prices[0].prices, valid_until


def _apply_variants(
    model_info: Any,
    price: Any,
    context: Mapping[str, str],
    now: datetime,
    valid_until: float,
) -> tuple[dict[str, Any], float]:
    """The price keys of ``price`` with the request-context variants applied."""
    values = {key: getattr(price, key, None) for key in _PRICE_KEYS}
    overrides: dict[str, Any] = {}
    for variant in getattr(model_info, "price_variants", None) or ():
        constraint = getattr(variant, "constraint", None)
        valid_until = _next_start(constraint, now, valid_until)
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


def _band_from(keys: Mapping[str, Any], total_input_tokens: int) -> RateBand | None:
    """The band of a call of ``total_input_tokens`` (``None``: no input price)."""
    input_price = _price_at(keys["input_mtok"], total_input_tokens)
    if input_price is None:
        return None
    output_price = _price_at(keys["output_mtok"], total_input_tokens)
    read = _price_at(keys["cache_read_mtok"], total_input_tokens)
    write = _price_at(keys["cache_write_mtok"], total_input_tokens)
    write_1h = _price_at(keys["cache_write_1h_mtok"], total_input_tokens)
    per_k = _price_at(keys["requests_kcount"], total_input_tokens)
    per_k_searches = _price_at(keys["web_searches_kcount"], total_input_tokens)
    per_k_files = _price_at(keys["storage_searches_kcount"], total_input_tokens)
    # Unpriced sub-kinds are billed as their parent, as genai-prices does.
    input_rate = per_mtok_to_pico(input_price)
    write_rate = input_rate if write is None else per_mtok_to_pico(write)
    output_rate = 0 if output_price is None else per_mtok_to_pico(output_price)
    read_rate = input_rate if read is None else per_mtok_to_pico(read)
    return RateBand(
        input=input_rate,
        output=output_rate,
        cache_read=read_rate,
        cache_write=write_rate,
        cache_write_1h=write_rate if write_1h is None else per_mtok_to_pico(write_1h),
        # $X per thousand requests is X * 1e12 / 1e3 pico-USD per request.
        request=0 if per_k is None else per_mtok_to_pico(per_k) * 1_000,
        web_search=0 if per_k_searches is None else per_mtok_to_pico(per_k_searches) * 1_000,
        file_search=0 if per_k_files is None else per_mtok_to_pico(per_k_files) * 1_000,
        media=_media_rates(keys, total_input_tokens, input_rate, read_rate, output_rate),
    )


def _media_rates(
    keys: Mapping[str, Any], total_input_tokens: int, input_rate: int, read: int, output: int
) -> MediaRates | None:
    """The band's audio, image and video rates, ``None`` when it prices none apart.

    As genai-prices falls back: an unpriced media input is the input rate, an unpriced
    media output the output rate, an unpriced media cache read the medium's input rate
    when cache reads have no price of their own, else the cache-read rate.
    """
    prices = {kind: _price_at(keys[f"{kind}_mtok"], total_input_tokens) for kind in MEDIA_KINDS}
    if all(price is None for price in prices.values()):
        return None
    own_read = keys["cache_read_mtok"] is not None
    rates: dict[str, int] = {}
    for modality in ("audio", "image", "video"):
        given_input = prices[f"input_{modality}"]
        given_read = prices[f"cache_{modality}_read"]
        given_output = prices[f"output_{modality}"]
        media_input = input_rate if given_input is None else per_mtok_to_pico(given_input)
        if given_read is not None:
            media_read = per_mtok_to_pico(given_read)
        elif given_input is not None and not own_read:
            media_read = media_input
        else:
            media_read = read
        rates[f"input_{modality}"] = media_input
        rates[f"cache_{modality}_read"] = media_read
        rates[f"output_{modality}"] = (
            output if given_output is None else per_mtok_to_pico(given_output)
        )
    return MediaRates(**rates)


def _tier_starts(keys: Mapping[str, Any]) -> list[int]:
    """Where any price key's tiers start, ascending."""
    starts: set[int] = set()
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


def find_rates(
    model: str, provider: str | None, names: Sequence[str], context: Mapping[str, str], now: float
) -> Resolved:
    """Find the rates of ``model`` in genai-prices' data, under each of its ``names``.

    Args:
        model: the model name asked for.
        provider: the provider (``azure`` uses OpenAI's prices, and Azure's own for a
            model OpenAI does not serve; ``openai-compatible`` or ``None`` match by model
            name only), if known.
        names: the names to try, most specific first (:func:`candidate_names`).
        context: request facts that select a price variant.
        now: the current time, epoch seconds (prices can change on announced dates).

    Returns:
        The rates and until when they hold, or ``rates=None`` with the reason.
    """
    if provider is None:
        provider_id: str | None = None
    else:
        provider_id = _PROVIDER_IDS.get(provider.lower(), provider.lower())
    provider_ids = [provider_id]
    if provider is not None and provider.lower() in _AZURE:
        provider_ids.append("azure")  # a model only Azure serves (Phi): Azure's own prices
    for looked_up in provider_ids:
        for name in names:
            found = _genai_lookup(name, looked_up)
            if found is None and looked_up is None and name == names[-1]:
                found = _genai_scan(model)
            if found is not None:
                return _from_genai(model, provider, found, context, now)
    return Resolved(None, float("inf"), "not in the price overrides nor in genai-prices' data")


_AZURE: Final = frozenset({"azure", "azure-openai"})


def _from_genai(
    model: str,
    provider: str | None,
    found: tuple[Any, Any],
    context: Mapping[str, str],
    now_ts: float,
) -> Resolved:
    gp_provider, info = found
    now = _utc(now_ts)
    price, valid_until = _price_now(info, now)
    # genai-prices applies request variants only to the provider's own models.
    owned = any(info is m for m in getattr(gp_provider, "models", ()))
    keys, valid_until = _apply_variants(info, price, context if owned else {}, now, valid_until)
    base = _band_from(keys, 0)
    if base is None:
        return Resolved(None, valid_until, f"genai-prices has no token price for {info.id!r}")
    tiers: list[tuple[int, RateBand]] = []
    for start in _tier_starts(keys):
        band = _band_from(keys, start + 1)
        if band is not None:
            tiers.append((start, band))
    rates = Rates(model, provider, "genai-prices", base, tuple(tiers), str(info.id))
    return Resolved(rates, valid_until)
