"""Audio, image and video tokens priced at their own rates, as genai-prices prices them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.clock import FakeClock
from payi_guard.meter.modality import gemini_media, openai_media
from payi_guard.meter.parse import openai_usage
from payi_guard.meter.plain import openai_token_usage
from payi_guard.meter.providers.chat import chat_usage
from payi_guard.meter.providers.gemini import gemini_usage
from payi_guard.pricing import MediaTokens, PriceBook, TokenUsage
from payi_guard.pricing.media import MEDIA_KINDS

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)
BOOK = PriceBook(clock=FakeClock(NOW))
MEDIA_PRICE_KEYS = {f"{kind}_mtok" for kind in MEDIA_KINDS}


def _media_priced_models() -> list[tuple[str, str]]:
    """Every Google and OpenAI model genai-prices gives a token price per medium."""
    found: list[tuple[str, str]] = []
    for provider in data_snapshot.get_snapshot().providers:
        if provider.id not in ("google", "openai"):
            continue
        for model in provider.models:
            prices = model.prices if isinstance(model.prices, list) else [model.prices]
            keys: set[str] = set()
            for price in prices:
                held = getattr(price, "prices", price)
                keys |= {k for k, v in vars(held).items() if v is not None}
            if "input_mtok" in keys and keys & MEDIA_PRICE_KEYS:
                found.append((model.id, provider.id))
    return sorted(set(found))


MEDIA_MODELS = _media_priced_models()


def test_the_cross_check_covers_the_media_models() -> None:
    names = {model for model, _ in MEDIA_MODELS}
    assert {"gemini-2.5-flash", "gemini-2.5-flash-image", "gpt-audio", "gpt-realtime"} <= names
    assert len(MEDIA_MODELS) >= 15


def _genai_usage(usage: TokenUsage) -> Usage:
    """``usage`` in genai-prices' keys: a parent count includes its parts."""
    media = usage.media or MediaTokens()
    values: dict[str, int] = {
        "input_tokens": usage.total_input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
    }
    for medium in ("audio", "image", "video"):
        read = getattr(media, f"cache_{medium}_read")
        values[f"input_{medium}_tokens"] = getattr(media, f"input_{medium}") + read
        values[f"cache_{medium}_read_tokens"] = read
        values[f"output_{medium}_tokens"] = getattr(media, f"output_{medium}")
    return Usage(**values)


@st.composite
def media_usages(draw: Any) -> TokenUsage:
    """A usage with text, cache reads and media parts of each."""
    counts = st.integers(0, 300_000)
    text_in, text_read, text_out = draw(counts), draw(counts), draw(counts)
    parts = {kind: draw(st.integers(0, 100_000)) for kind in MEDIA_KINDS}
    media = MediaTokens(**parts)
    return TokenUsage(
        input_tokens=text_in + media.inputs,
        output_tokens=text_out + media.outputs,
        cache_read_tokens=text_read + media.cache_reads,
        media=media,
    )


@settings(max_examples=400, deadline=None)
@given(model=st.sampled_from(MEDIA_MODELS), usage=media_usages())
def test_media_cost_matches_calc_price_exactly(model: tuple[str, str], usage: TokenUsage) -> None:
    theirs = calc_price(
        _genai_usage(usage), model[0], provider_id=model[1], genai_request_timestamp=NOW
    ).total_price
    ours = BOOK.cost(model[0], model[1], usage)
    assert ours == math.ceil(theirs * 10**9)


def test_the_recorded_gemini_audio_call_costs_what_google_bills() -> None:
    # tests/conformance/providers/cassettes/gemini/pydantic-ai/
    # test_google_model_mobile_youtube_video_url_input.yaml: gemini-2.5-flash, 17,713
    # prompt tokens (1,917 audio, 1,881 of them cached), 17,379 cached in all, 889 out.
    usage = gemini_usage(
        {
            "promptTokenCount": 17713,
            "cachedContentTokenCount": 17379,
            "candidatesTokenCount": 68,
            "thoughtsTokenCount": 821,
            "totalTokenCount": 18602,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": 16},
                {"modality": "VIDEO", "tokenCount": 15780},
                {"modality": "AUDIO", "tokenCount": 1917},
            ],
            "cacheTokensDetails": [
                {"modality": "AUDIO", "tokenCount": 1881},
                {"modality": "TEXT", "tokenCount": 15},
                {"modality": "VIDEO", "tokenCount": 15483},
            ],
        }
    ).to_token_usage()
    assert usage.media == MediaTokens(
        input_audio=36, cache_audio_read=1881, input_video=297, cache_video_read=15483
    )
    # $0.30 / $1.00 per million for text and audio input, $0.03 / $0.10 cached, $2.50 out.
    assert BOOK.cost("gemini-2.5-flash", "google", usage) == 3_000_940
    as_text = TokenUsage(usage.input_tokens, usage.output_tokens, usage.cache_read_tokens)
    assert BOOK.cost("gemini-2.5-flash", "google", as_text) == 2_844_070


def test_gemini_image_output_is_charged_at_the_image_rate() -> None:
    # gemini-2.5-flash-image: $2.50 per million text output tokens, $30 per million image
    # output tokens (1,290 per image).
    meta = {
        "prompt_token_count": 12,
        "candidates_token_count": 1300,
        "total_token_count": 1312,
        "candidates_tokens_details": [
            {"modality": "TEXT", "token_count": 10},
            {"modality": "IMAGE", "token_count": 1290},
        ],
    }
    usage = gemini_usage(meta).to_token_usage()  # snake_case, as the Vertex SDK dumps it
    assert usage.media == MediaTokens(output_image=1290)
    rates = BOOK.rates("gemini-2.5-flash-image", "google")
    expected = -(-(12 * 300_000 + 10 * 2_500_000 + 1290 * 30_000_000) // 1000)
    assert rates.cost(usage) == expected
    # the reservation bounds every output token at the dearest output rate
    assert rates.upper_bound_nano(12, 1300) >= rates.cost(usage)
    assert rates.upper_bound_nano(0, 1) == 30_000


OPENAI_AUDIO_USAGE: Mapping[str, Any] = {
    "prompt_tokens": 48,
    "completion_tokens": 129,
    "total_tokens": 177,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 40},
    "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 120},
}


def test_every_openai_style_reader_finds_the_audio_tokens() -> None:
    want = MediaTokens(input_audio=40, output_audio=120)
    fast = openai_token_usage(dict(OPENAI_AUDIO_USAGE))
    assert fast is not None
    assert fast.media == want
    assert openai_usage(OPENAI_AUDIO_USAGE).to_token_usage() == fast
    assert chat_usage(OPENAI_AUDIO_USAGE).to_token_usage() == fast
    # gpt-audio: $2.50 / $10 per million text tokens, $32 / $64 audio.
    cost = BOOK.cost("gpt-audio", "openai", fast)
    assert cost == (8 * 2_500_000 + 40 * 32_000_000 + 9 * 10_000_000 + 120 * 64_000_000) // 1000


def test_media_the_usage_reports_as_zero_adds_nothing() -> None:
    plain = {
        "prompt_tokens": 8,
        "completion_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"audio_tokens": 0, "reasoning_tokens": 0},
    }
    fast = openai_token_usage(plain)
    assert fast == TokenUsage(8, 9)
    assert fast is not None
    assert fast.media is None


def test_cached_openai_audio_is_taken_as_plain_input_first() -> None:
    # 30 audio tokens, 100 prompt tokens of which 80 were cache reads: 20 plain input.
    usage = {"prompt_tokens_details": {"audio_tokens": 30}}
    assert openai_media(usage, 20, 80, 0) == MediaTokens(input_audio=20, cache_audio_read=10)


@pytest.mark.parametrize(
    "entry",
    [
        {"modality": "AUDIO", "tokenCount": -5},
        {"modality": "AUDIO", "tokenCount": "7"},
        {"modality": "AUDIO", "tokenCount": 2.5},
        {"modality": "AUDIO"},
        "AUDIO",
        {"modality": "TEXT", "tokenCount": 9},
    ],
)
def test_a_detail_that_is_not_a_count_is_read_as_text(entry: object) -> None:
    meta = {"promptTokenCount": 10, "promptTokensDetails": [entry]}
    assert gemini_media(meta, 10, 0, 0) is None


def test_media_counts_are_cut_to_the_counts_they_are_part_of() -> None:
    # A detail larger than its count cannot add tokens: it moves at most all of them.
    meta = {
        "promptTokenCount": 10,
        "candidatesTokenCount": 5,
        "totalTokenCount": 15,
        "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 50}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 50}],
    }
    usage = gemini_usage(meta).to_token_usage()
    assert usage.media == MediaTokens(input_audio=10, output_image=5)
    assert usage.total_tokens == 15


def test_token_usage_refuses_media_it_cannot_hold() -> None:
    with pytest.raises(ValueError, match="media input tokens exceed"):
        TokenUsage(10, 0, media=MediaTokens(input_audio=11))
    with pytest.raises(ValueError, match="media cache reads exceed"):
        TokenUsage(10, 0, 5, media=MediaTokens(cache_image_read=6))
    with pytest.raises(ValueError, match="media output tokens exceed"):
        TokenUsage(0, 3, media=MediaTokens(output_audio=2, output_image=2))
    with pytest.raises(TypeError, match="media must be MediaTokens"):
        TokenUsage(10, 0, media={"input_audio": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_audio must be >= 0"):
        MediaTokens(input_audio=-1)
    with pytest.raises(TypeError, match="output_image must be an int"):
        MediaTokens(output_image=True)


def test_usages_add_their_media() -> None:
    a = TokenUsage(10, 10, media=MediaTokens(input_audio=4))
    b = TokenUsage(10, 10, media=MediaTokens(input_audio=1, output_image=2))
    assert (a + b).media == MediaTokens(input_audio=5, output_image=2)
    assert (a + TokenUsage(1, 1)).media == a.media
    assert (TokenUsage(1, 1) + TokenUsage(1, 1)).media is None


def test_a_model_without_media_rates_prices_media_as_text() -> None:
    usage = TokenUsage(1_000, 1_000, media=MediaTokens(input_audio=500, output_audio=500))
    text = TokenUsage(1_000, 1_000)
    assert BOOK.cost("gpt-4o-mini", "openai", usage) == BOOK.cost("gpt-4o-mini", "openai", text)
    assert BOOK.rates("gpt-4o-mini", "openai").base.media is None


def test_a_band_prices_media_cache_reads_as_genai_prices_falls_back() -> None:
    # gpt-audio prices audio input but no cache reads: a cached audio token is billed
    # at the audio input rate, as genai-prices falls back.
    media = BOOK.rates("gpt-audio", "openai").base.media
    assert media is not None
    assert media.cache_audio_read == media.input_audio == 32_000_000
    theirs = calc_price(
        Usage(
            input_tokens=100,
            cache_read_tokens=50,
            input_audio_tokens=50,
            cache_audio_read_tokens=50,
        ),
        "gpt-audio",
        provider_id="openai",
        genai_request_timestamp=NOW,
    ).total_price
    usage = TokenUsage(50, 0, 50, media=MediaTokens(cache_audio_read=50))
    assert BOOK.cost("gpt-audio", "openai", usage) == math.ceil(theirs * Decimal(10**9))


def test_gemini_document_tokens_are_billed_as_image_tokens() -> None:
    # genai-prices reads Gemini's DOCUMENT modality as image tokens; gemini-embedding-2
    # prices them at $0.45 per million against $0.20 for text. The modality is matched
    # in any case, as genai-prices matches it.
    meta = {
        "promptTokenCount": 3_010,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "document", "tokenCount": 3_000},
        ],
    }
    usage = gemini_usage(meta).to_token_usage()
    assert usage.media == MediaTokens(input_image=3_000)
    theirs = calc_price(
        Usage(input_tokens=3_010, input_image_tokens=3_000, output_tokens=0),
        "gemini-embedding-2",
        provider_id="google",
        genai_request_timestamp=NOW,
    ).total_price
    assert BOOK.cost("gemini-embedding-2", "google", usage) == math.ceil(theirs * 10**9)
    assert (
        BOOK.cost("gemini-embedding-2", "google", usage) == (10 * 200_000 + 3_000 * 450_000) // 1000
    )
