"""What each recorded call was billed, read from the recording and priced by genai-prices.

Nothing here uses payi_guard: the usage is read straight from the provider's field
names, and the price comes from :func:`genai_prices.calc_price` for the provider that
the request's host belongs to, at the fake clock's date.

Token counts are given twice: as genai-prices wants them (``input_tokens`` counts every
input token, cache reads and writes included) for the price, and in the convention of
payi_guard's ``genai_call`` log line (``input_tokens`` excludes cache reads and cache
writes; ``output_tokens`` includes reasoning) for the log check.

Billing rules taken from the providers' pricing pages:

* OpenAI bills ``prompt_tokens_details.cache_write_tokens`` (Responses:
  ``input_tokens_details.cache_write_tokens``) at the model's cache-write rate; those
  tokens are part of ``prompt_tokens`` / ``input_tokens``.
* A Responses call is billed ``tool_usage.web_search.num_requests`` web searches where
  the response reports it, else one per ``web_search_call`` output item.
* Anthropic bills ``usage.server_tool_use.web_search_requests`` per request.
* Gemini's OpenAI-compatible API (``generativelanguage.googleapis.com/v1beta/openai``)
  counts the model's thoughts, which Google bills as output, in ``total_tokens`` only:
  the output billed is ``total_tokens - prompt_tokens`` when that is more than
  ``completion_tokens``.
* When Anthropic reports ``usage.iterations`` (compaction, advisor), the bill is the sum
  of the iterations, each at the price of its own model (the call's model when the
  iteration names none); the top-level counts cover only part of them.
* A call is billed at the tier the response says served it: OpenAI's ``service_tier``
  (``priority`` even when the request named none: a project can make it the default;
  the standard tier when a requested one was not granted), Anthropic's ``usage.speed``.
  genai-prices takes it as the price context (``service_tier``, ``speed``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import genai_prices

from conformance.corpus import Interaction

CLOCK_START = 1_795_780_800.0
"""The fake clock of every replay: 2026-11-27T12:00:00Z (prices are those of that day)."""

PRICED_AT = datetime.fromtimestamp(CLOCK_START, tz=timezone.utc)

NANO = Decimal(1_000_000_000)


@dataclass(frozen=True)
class Tokens:
    """Token counts in the convention of the ``genai_call`` log line."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    def __add__(self, other: Tokens) -> Tokens:
        return Tokens(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
        )

    @property
    def total_input(self) -> int:
        """Every input token, cache reads and writes included."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens


@dataclass(frozen=True)
class Part:
    """One separately priced part of a bill: a model and its usage."""

    model: str
    tokens: Tokens
    cache_write_1h_tokens: int = 0
    web_searches: int = 0
    media: Mapping[str, int] = field(default_factory=dict)
    """Audio and image tokens, in genai-prices' usage keys (``input_audio_tokens``...)."""

    def usage(self) -> genai_prices.Usage:
        """The usage in genai-prices' terms."""
        values: dict[str, int] = {
            "input_tokens": self.tokens.total_input,
            "output_tokens": self.tokens.output_tokens,
        }
        if self.tokens.cache_read_tokens:
            values["cache_read_tokens"] = self.tokens.cache_read_tokens
        if self.tokens.cache_write_tokens:
            values["cache_write_tokens"] = self.tokens.cache_write_tokens
        if self.cache_write_1h_tokens:
            values["cache_write_1h_tokens"] = self.cache_write_1h_tokens
        if self.web_searches:
            values["web_searches"] = self.web_searches
        values.update(self.media)
        return genai_prices.Usage(**values)


@dataclass(frozen=True)
class Bill:
    """What the provider billed for one recorded call.

    Attributes:
        model: the model the response names.
        parts: the separately priced parts (one, or one per Anthropic iteration).
        tokens: the counts the ``genai_call`` line must show.
        provider_url: the base URL the provider is recognised by.
    """

    model: str
    parts: tuple[Part, ...]
    tokens: Tokens
    provider_url: str
    requested: str = ""
    price_context: dict[str, str] | None = None

    def price(self) -> Decimal:
        """The exact price in USD, from genai-prices.

        Each part is priced as the model the response names; when genai-prices does not
        know that name (legacy completions answer ``davinci:2023-07-21-v2``), as the
        model the request named.
        """
        total = Decimal(0)
        for part in self.parts:
            names = [part.model]
            if part.model == self.model and self.requested and self.requested != part.model:
                names.append(self.requested)
            total += self._price(part, names)
        return total

    def _price(self, part: Part, names: list[str]) -> Decimal:
        for name in names[:-1]:
            try:
                return self._calc(part, name)
            except LookupError:
                continue
        return self._calc(part, names[-1])

    def _calc(self, part: Part, name: str) -> Decimal:
        calc = genai_prices.calc_price(
            part.usage(),
            name,
            provider_api_url=self.provider_url,
            genai_request_timestamp=PRICED_AT,
            price_context=self.price_context,
        )
        return Decimal(calc.total_price)

    def nano(self) -> int | None:
        """The price in nano-USD, rounded up as payi_guard charges it.

        ``None`` when genai-prices does not know a model of the bill: such a call must
        be logged as unpriced (``priced: false``), never as a $0 charge that looks real.
        """
        try:
            return math.ceil(self.price() * NANO)
        except LookupError:
            return None


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _dig(obj: object, *keys: str) -> object:
    for key in keys:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def provider_url(interaction: Interaction) -> str:
    """The base URL genai-prices recognises the provider by (scheme and host)."""
    parts = urlsplit(interaction.url)
    return f"{parts.scheme}://{parts.netloc}"


def _openai_tokens(usage: Mapping[str, Any], *, prompt: str, completion: str) -> Tokens:
    details = "prompt_tokens_details" if prompt == "prompt_tokens" else "input_tokens_details"
    total = _int(usage.get(prompt))
    cached = _int(_dig(usage, details, "cached_tokens"))
    written = _int(_dig(usage, details, "cache_write_tokens"))
    # Thoughts Gemini's OpenAI-compatible API counts only in the total: billed as output.
    output = max(_int(usage.get(completion)), _int(usage.get("total_tokens")) - total)
    return Tokens(
        input_tokens=total - cached - written,
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=written,
    )


def _anthropic_part(usage: Mapping[str, Any], model: str, *, searches: int = 0) -> Part:
    return Part(
        model=model,
        tokens=Tokens(
            input_tokens=_int(usage.get("input_tokens")),
            output_tokens=_int(usage.get("output_tokens")),
            cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
            cache_write_tokens=_int(usage.get("cache_creation_input_tokens")),
        ),
        cache_write_1h_tokens=_int(_dig(usage, "cache_creation", "ephemeral_1h_input_tokens")),
        web_searches=searches,
    )


def _anthropic_bill(usage: Mapping[str, Any], model: str, url: str) -> Bill:
    searches = _int(_dig(usage, "server_tool_use", "web_search_requests"))
    iterations = usage.get("iterations")
    if isinstance(iterations, list) and iterations:
        parts = [
            _anthropic_part(it, str(it.get("model") or model))
            for it in iterations
            if isinstance(it, Mapping)
        ]
        first = parts[0]
        parts[0] = Part(first.model, first.tokens, first.cache_write_1h_tokens, searches)
        own = Tokens()
        for part in parts:
            if part.model == model:
                own = own + part.tokens
        return Bill(model, tuple(parts), own, url)
    part = _anthropic_part(usage, model, searches=searches)
    return Bill(model, (part,), part.tokens, url)


def _anthropic_stream_usage(interaction: Interaction) -> tuple[dict[str, Any], str]:
    merged: dict[str, Any] = {}
    model = ""
    for _, data in interaction.events():
        if not isinstance(data, Mapping):
            continue
        if data.get("type") == "message_start":
            message = data.get("message") or {}
            model = str(message.get("model") or "")
            merged.update({k: v for k, v in (message.get("usage") or {}).items() if v is not None})
        elif data.get("type") == "message_delta":
            merged.update({k: v for k, v in (data.get("usage") or {}).items() if v is not None})
    return merged, model


def _responses_object(interaction: Interaction) -> Mapping[str, Any] | None:
    if not interaction.is_stream:
        body = interaction.body_json()
        return body if isinstance(body, Mapping) else None
    final: Mapping[str, Any] | None = None
    for _, data in interaction.events():
        if isinstance(data, Mapping) and data.get("type") in (
            "response.completed",
            "response.incomplete",
            "response.failed",
        ):
            response = data.get("response")
            final = response if isinstance(response, Mapping) else None
    return final


def _responses_web_searches(response: Mapping[str, Any]) -> int:
    """Web searches billed for a Responses call: ``tool_usage.web_search.num_requests``
    where the response reports it, else one per ``web_search_call`` output item."""
    reported = _dig(response, "tool_usage", "web_search", "num_requests")
    if isinstance(reported, int) and not isinstance(reported, bool):
        return reported
    output = response.get("output") or []
    return sum(
        1 for item in output if isinstance(item, Mapping) and item.get("type") == "web_search_call"
    )


def _tier(key: str, value: object) -> dict[str, str] | None:
    return {key: value} if isinstance(value, str) else None


def _chat_tier(interaction: Interaction) -> dict[str, str] | None:
    """The ``service_tier`` of a chat response (of its usage chunk, for a stream)."""
    if not interaction.is_stream:
        body = interaction.body_json()
        return (
            _tier("service_tier", body.get("service_tier")) if isinstance(body, Mapping) else None
        )
    tier = None
    for _, data in interaction.events():
        if isinstance(data, Mapping) and isinstance(data.get("usage"), Mapping):
            tier = _tier("service_tier", data.get("service_tier"))
    return tier


def _chat_usage(interaction: Interaction) -> tuple[Mapping[str, Any] | None, str]:
    if not interaction.is_stream:
        body = interaction.body_json()
        if not isinstance(body, Mapping):
            return None, ""
        usage = body.get("usage")
        return (usage if isinstance(usage, Mapping) else None), str(body.get("model") or "")
    usage = None
    model = ""
    for _, data in interaction.events():
        if not isinstance(data, Mapping):
            continue
        model = model or str(data.get("model") or "")
        if isinstance(data.get("usage"), Mapping):
            usage = data["usage"]
    return usage, model


def bill(interaction: Interaction) -> Bill | None:
    """The bill of a successful recorded call, or ``None`` when it reports no usage."""
    found = _bill(interaction)
    if found is None:
        return None
    requested = interaction.request.get("model")
    return replace(found, requested=requested if isinstance(requested, str) else "")


def _with_tier(found: Bill, tier: dict[str, str] | None) -> Bill:
    return found if tier is None else replace(found, price_context=tier)


def _bill(interaction: Interaction) -> Bill | None:
    url = provider_url(interaction)
    kind = interaction.kind
    if kind == "messages":
        if interaction.is_stream:
            merged, model = _anthropic_stream_usage(interaction)
        else:
            body = interaction.body_json() or {}
            merged, model = body.get("usage") or {}, str(body.get("model") or "")
        if not merged:
            return None
        return _with_tier(_anthropic_bill(merged, model, url), _tier("speed", merged.get("speed")))
    if kind == "responses":
        response = _responses_object(interaction)
        reported = response.get("usage") if response else None
        if response is None or not isinstance(reported, Mapping):
            return None
        tokens = _openai_tokens(reported, prompt="input_tokens", completion="output_tokens")
        searches = _responses_web_searches(response)
        model = str(response.get("model") or "")
        found = Bill(model, (Part(model, tokens, web_searches=searches),), tokens, url)
        return _with_tier(found, _tier("service_tier", response.get("service_tier")))
    chat_usage, model = _chat_usage(interaction)
    if chat_usage is None:
        return None
    tokens = _openai_tokens(chat_usage, prompt="prompt_tokens", completion="completion_tokens")
    part = Part(model, tokens, media=_chat_media(chat_usage))
    return _with_tier(Bill(model, (part,), tokens, url), _chat_tier(interaction))


def _chat_media(usage: Mapping[str, Any]) -> dict[str, int]:
    """The audio and image tokens of a chat usage (``*_tokens_details``), none cached.

    OpenAI does not say which of them were cache reads; every recording with media
    tokens here has no cache reads.
    """
    media: dict[str, int] = {}
    for details, side in (
        ("prompt_tokens_details", "input"),
        ("completion_tokens_details", "output"),
    ):
        for medium in ("audio", "image"):
            found = _int(_dig(usage, details, f"{medium}_tokens"))
            if found:
                media[f"{side}_{medium}_tokens"] = found
    if media and _int(_dig(usage, "prompt_tokens_details", "cached_tokens")):
        raise ValueError("media tokens with cache reads: which were cached is not said")
    return media


def input_before_output(interaction: Interaction) -> int | None:
    """The input tokens of a streamed call before any output was generated.

    What a stream broken off early is billed for on the input side: Anthropic reports it
    in ``message_start`` (the final count can be larger, once server tools added their
    results); an OpenAI stream reports only its final count, which is the prompt's.
    """
    if interaction.kind == "messages":
        for _, data in interaction.events():
            if isinstance(data, Mapping) and data.get("type") == "message_start":
                usage = (data.get("message") or {}).get("usage") or {}
                return (
                    _int(usage.get("input_tokens"))
                    + _int(usage.get("cache_read_input_tokens"))
                    + _int(usage.get("cache_creation_input_tokens"))
                )
        return None
    found = bill(interaction)
    return found.tokens.total_input if found is not None else None
