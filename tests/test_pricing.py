"""Pricing: integer rates, exact costs, tiers, the unknown-model policy, the rate cache."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import Usage, calc_price, data_snapshot
from genai_prices import types as gp
from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.clock import FakeClock
from payi_guard.config import PriceOverride, UnknownModelPolicy
from payi_guard.exceptions import ConfigError, PayiGuardError
from payi_guard.money import PICO_PER_NANO, cost_usd, nano_to_decimal, per_mtok_to_pico
from payi_guard.pricing import (
    PriceBook,
    RateBand,
    Rates,
    TokenUsage,
    UnknownModel,
    candidate_names,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=timezone.utc)


def usd(value: str) -> Decimal:
    return Decimal(value)


def book(**kwargs: Any) -> PriceBook:
    return PriceBook(clock=FakeClock(NOW), **kwargs)


# -- TokenUsage ---------------------------------------------------------------------------


def test_token_usage_totals() -> None:
    usage = TokenUsage(100, 20, cache_read_tokens=30, cache_write_tokens=5, cache_write_1h_tokens=2)
    assert usage.total_input_tokens == 137
    assert usage.total_tokens == 157


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"input_tokens": -1, "output_tokens": 0}, ValueError),
        ({"input_tokens": 0, "output_tokens": -5}, ValueError),
        ({"input_tokens": 0, "output_tokens": 0, "cache_read_tokens": -1}, ValueError),
        ({"input_tokens": 0, "output_tokens": 0, "cache_write_1h_tokens": -1}, ValueError),
        ({"input_tokens": 1.0, "output_tokens": 0}, TypeError),
        ({"input_tokens": True, "output_tokens": 0}, TypeError),
        ({"input_tokens": 0, "output_tokens": "3"}, TypeError),
    ],
)
def test_token_usage_validates(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="tokens"):
        TokenUsage(**kwargs)


# -- price conversion ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("price", "pico"),
    [
        ("1", 1_000_000),
        ("2.5", 2_500_000),
        ("0.000001", 1),
        ("0.075", 75_000),
        ("123.456789", 123_456_789),
        ("0", 0),
        (3, 3_000_000),
        # finer than 6 decimals rounds up: never under-charge
        ("0.0000001", 1),
        ("1.0000001", 1_000_001),
    ],
)
def test_per_mtok_to_pico(price: str | int, pico: int) -> None:
    assert per_mtok_to_pico(price) == pico


@pytest.mark.parametrize("price", ["-1", "NaN", "Infinity", "abc", 1.5, True])
def test_per_mtok_to_pico_refuses(price: Any) -> None:
    with pytest.raises(ValueError, match="price"):
        per_mtok_to_pico(price)


# -- known models, hand-computed ----------------------------------------------------------


def test_gpt_4o_cost_by_hand() -> None:
    # gpt-4o: $2.50 input, $10 output, $1.25 cached input per million tokens.
    rates = book().rates("gpt-4o", "openai")
    assert (rates.input, rates.output, rates.cache_read) == (2_500_000, 10_000_000, 1_250_000)
    assert rates.source == "genai-prices"
    assert rates.matched == "gpt-4o"
    usage = TokenUsage(input_tokens=1_000, output_tokens=500, cache_read_tokens=200)
    # 1000 * 2.5e6 + 500 * 10e6 + 200 * 1.25e6 = 7.75e9 pico = 7,750,000 nano = $0.00775
    assert book().cost("gpt-4o", "openai", usage) == 7_750_000


def test_cost_rounds_up_to_the_nano() -> None:
    # text-embedding-3-small: $0.02 per million = 20,000 pico per token
    price_book = book()
    assert price_book.cost("text-embedding-3-small", "openai", TokenUsage(1, 0)) == 20
    # claude-3-5-haiku cache read is $0.08 = 80,000 pico; one token is 80 nano exactly,
    # and an override at $0.0015 (1,500 pico) charges 2 nano for one token (1.5 rounded up)
    tiny = book(overrides={"tiny": PriceOverride(usd("0.0015"), usd("0"))})
    assert tiny.cost("tiny", None, TokenUsage(1, 0)) == 2
    assert tiny.cost("tiny", None, TokenUsage(2, 0)) == 3
    assert tiny.cost("tiny", None, TokenUsage(0, 0)) == 0


def test_cache_reads_and_writes_are_priced() -> None:
    # claude-opus-4-1: $15 in, $75 out, $1.50 cache read, $18.75 5m write, $30 1h write,
    # $10 per thousand web searches
    rates = book().rates("claude-opus-4-1", "anthropic")
    assert rates.base == RateBand(
        15_000_000, 75_000_000, 1_500_000, 18_750_000, 30_000_000, web_search=10_000_000_000
    )
    usage = TokenUsage(
        input_tokens=10,
        output_tokens=20,
        cache_read_tokens=1_000,
        cache_write_tokens=300,
        cache_write_1h_tokens=100,
    )
    pico = 10 * 15_000_000 + 20 * 75_000_000 + 1_000 * 1_500_000 + 300 * 18_750_000
    pico += 100 * 30_000_000
    # 0.15e9 + 1.5e9 + 1.5e9 + 5.625e9 + 3e9 pico = $0.011775
    assert rates.cost(usage) == pico // PICO_PER_NANO == 11_775_000


def test_unpriced_cache_kinds_fall_back_to_their_parent() -> None:
    # OpenAI charges no separate cache write: a write is plain input.
    rates = book().rates("gpt-4o-mini", "openai")
    assert rates.cache_write == rates.cache_write_1h == rates.input == 150_000


def test_per_request_fee_is_charged_once() -> None:
    # Perplexity sonar: $1 in, $1 out per million tokens, $12 per thousand requests.
    rates = book().rates("sonar", "perplexity")
    assert rates.base.request == 12 * 10**12 // 1_000
    assert rates.cost(TokenUsage(1_000, 1_000)) == (2_000 * 1_000_000 + 12 * 10**9) // 1_000


def test_request_variants_from_the_price_context() -> None:
    price_book = book()
    standard = price_book.rates("gpt-4o", "openai")
    priority = price_book.rates("gpt-4o", "openai", price_context={"service_tier": "priority"})
    assert priority.input > standard.input
    usage = TokenUsage(1_000, 1_000)
    expected = calc_price(
        Usage(input_tokens=1_000, output_tokens=1_000),
        "gpt-4o",
        provider_id="openai",
        genai_request_timestamp=NOW,
        price_context={"service_tier": "priority"},
    ).total_price
    assert Decimal(priority.cost(usage)) == expected * 10**9


# -- agreement with genai-prices' calc_price ---------------------------------------------

CROSS_CHECK_MODELS = [
    ("gpt-4o", "openai"),
    ("gpt-4o-mini", "openai"),
    ("gpt-4.1", "openai"),
    ("o3", "openai"),
    ("text-embedding-3-small", "openai"),
    ("claude-sonnet-4-5", "anthropic"),
    ("claude-opus-4-1", "anthropic"),
    ("claude-3-5-haiku", "anthropic"),
    ("gemini-2.5-pro", "google"),
]


def genai_nano(model: str, provider: str, usage: TokenUsage) -> Decimal:
    gp_usage = Usage(
        input_tokens=usage.total_input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens + usage.cache_write_1h_tokens,
        cache_write_1h_tokens=usage.cache_write_1h_tokens,
    )
    total = calc_price(gp_usage, model, provider_id=provider, genai_request_timestamp=NOW)
    return total.total_price * 10**9


CROSS_BOOK = book()


@settings(max_examples=300, deadline=None)
@given(
    model=st.sampled_from(CROSS_CHECK_MODELS),
    tokens=st.tuples(*(st.integers(0, 400_000) for _ in range(5))),
)
def test_cost_matches_calc_price_exactly(
    model: tuple[str, str], tokens: tuple[int, int, int, int, int]
) -> None:
    usage = TokenUsage(*tokens)
    ours = CROSS_BOOK.cost(model[0], model[1], usage)
    theirs = genai_nano(model[0], model[1], usage)
    # calc_price is exact Decimal arithmetic; ours is the same number rounded up to the nano
    assert ours == math.ceil(theirs)


# -- tiers ---------------------------------------------------------------------------------


def test_long_context_tier_applies_to_the_whole_call() -> None:
    # claude-sonnet-4-5: $3 / $15 up to 200k input tokens, $6 / $22.50 above.
    rates = book().rates("claude-sonnet-4-5", "anthropic")
    assert rates.tiered
    assert rates.base.input == 3_000_000
    assert rates.tiers[0][0] == 200_000
    # the flat attributes are the highest band: safe for any estimate
    assert (rates.input, rates.output) == (6_000_000, 22_500_000)
    at_threshold = TokenUsage(input_tokens=199_000, output_tokens=1_000, cache_read_tokens=1_000)
    assert at_threshold.total_input_tokens == 200_000
    assert rates.cost(at_threshold) == (199_000 * 3 + 1_000 * 15) * 1_000 + 1_000 * 300
    # one more token, and it is a cache token: every token moves to the higher band
    above = TokenUsage(input_tokens=199_000, output_tokens=1_000, cache_read_tokens=1_001)
    assert rates.cost(above) == (199_000 * 6 + 1_000 * 22.5) * 1_000 + 1_001 * 600


def test_upper_bound_uses_only_reachable_tiers() -> None:
    rates = book().rates("claude-sonnet-4-5", "anthropic")
    # an input bound at the threshold cannot reach the tier
    small = rates.upper_bound_nano(200_000, 1_000, cache_writes=False)
    assert small == (200_000 * 3_000_000 + 1_000 * 15_000_000) // 1_000
    big = rates.upper_bound_nano(200_001, 1_000, cache_writes=False)
    assert big == (200_001 * 6_000_000 + 1_000 * 22_500_000) // 1_000
    # with cache writes possible, every input token may be a 1-hour write ($6, $12 above)
    assert rates.upper_bound_nano(10, 0) == 10 * 6_000_000 // 1_000
    with pytest.raises(ValueError, match="negative"):
        rates.upper_bound_nano(-1, 0)


def test_web_searches_are_priced_per_search() -> None:
    # claude-sonnet-4-5 and gpt-4o: $10 per thousand searches, 10,000,000 nano-USD each.
    price_book = book()
    for model, provider in (("claude-sonnet-4-5", "anthropic"), ("gpt-4o", "openai")):
        rates = price_book.rates(model, provider)
        tokens = TokenUsage(1_000, 100)
        with_searches = TokenUsage(1_000, 100, web_searches=3)
        assert rates.cost(with_searches) - rates.cost(tokens) == 3 * 10_000_000
        assert with_searches.total_tokens == tokens.total_tokens
        bound = rates.upper_bound_nano(1_000, 100, web_searches=2)
        assert bound - rates.upper_bound_nano(1_000, 100) == 2 * 10_000_000
    with pytest.raises(ValueError, match="negative"):
        price_book.rates("gpt-4o", "openai").upper_bound_nano(1, 1, web_searches=-1)
    with pytest.raises(ValueError, match="web_searches"):
        TokenUsage(1, 1, web_searches=-1)


def test_file_searches_are_priced_per_call() -> None:
    # gpt-4o: $2.50 per thousand file search calls, 2,500,000 nano-USD each.
    rates = book().rates("gpt-4o", "openai")
    with_calls = TokenUsage(1_000, 100, file_searches=4)
    assert rates.cost(with_calls) - rates.cost(TokenUsage(1_000, 100)) == 4 * 2_500_000
    bound = rates.upper_bound_nano(1_000, 100, file_searches=2)
    assert bound - rates.upper_bound_nano(1_000, 100) == 2 * 2_500_000
    # Anthropic has no such tool: no price.
    assert book().rates("claude-sonnet-4-5", "anthropic").base.file_search == 0


def test_token_usages_add_up() -> None:
    a = TokenUsage(1, 2, 3, 4, 5, 6, 7)
    assert a + TokenUsage(10, 20, 30, 40, 50, 60, 70) == TokenUsage(11, 22, 33, 44, 55, 66, 77)


def test_rates_refuse_unsorted_tiers() -> None:
    band = RateBand(1, 1, 1, 1, 1)
    with pytest.raises(ValueError, match="ascending"):
        Rates("m", None, "override", band, ((10, band), (10, band)))


# -- custom genai-prices data: dated changes, time of day, per-key tiers --------------------


def _model(model_id: str, prices: Any, **kwargs: Any) -> Any:
    return gp.ModelInfo(
        id=model_id, match=gp.ClauseEquals(equals=model_id), prices=prices, **kwargs
    )


@pytest.fixture
def custom_data() -> Iterator[None]:
    """Install a small genai-prices snapshot (restored afterwards)."""
    models = [
        _model(
            "dated-model",
            [
                gp.ConditionalPrice(
                    prices=gp.ModelPrice(input_mtok=Decimal("1"), output_mtok=Decimal("2"))
                ),
                gp.ConditionalPrice(
                    constraint=gp.StartDateConstraint(start_date=date(2026, 12, 1)),
                    prices=gp.ModelPrice(input_mtok=Decimal("4"), output_mtok=Decimal("8")),
                ),
            ],
        ),
        _model(
            "offpeak-model",
            [
                gp.ConditionalPrice(
                    prices=gp.ModelPrice(input_mtok=Decimal("0.5"), output_mtok=Decimal("3"))
                ),
                gp.ConditionalPrice(
                    constraint=gp.TimeOfDateConstraint(
                        start_time=time(0, 30, tzinfo=timezone.utc),
                        end_time=time(8, 30, tzinfo=timezone.utc),
                    ),
                    prices=gp.ModelPrice(input_mtok=Decimal("0.25"), output_mtok=Decimal("4")),
                ),
            ],
        ),
        _model(
            "split-tiers",
            gp.ModelPrice(
                input_mtok=gp.TieredPrices(
                    base=Decimal("1"), tiers=[gp.Tier(start=1_000, price=Decimal("2"))]
                ),
                output_mtok=gp.TieredPrices(
                    base=Decimal("10"), tiers=[gp.Tier(start=5_000, price=Decimal("30"))]
                ),
            ),
        ),
        _model("audio-only", gp.ModelPrice(input_audio_mtok=Decimal("5"))),
    ]
    provider = gp.Provider(
        id="testprov",
        name="Test",
        api_pattern=r"https://test\.invalid",
        model_match=gp.ClauseContains(contains="-model"),
        models=models,
    )
    data_snapshot.set_custom_snapshot(
        data_snapshot.DataSnapshot(providers=[provider], from_auto_update=False)
    )
    try:
        yield
    finally:
        data_snapshot.set_custom_snapshot(None)


@pytest.mark.usefixtures("custom_data")
def test_announced_price_change_is_picked_up_on_its_date() -> None:
    clock = FakeClock(datetime(2026, 11, 30, 23, 59, tzinfo=timezone.utc))
    price_book = PriceBook(clock=clock)
    assert price_book.rates("dated-model", "testprov").input == 1_000_000
    clock.advance(59)
    assert price_book.rates("dated-model", "testprov").input == 1_000_000
    clock.advance(1)  # 2026-12-01T00:00Z: the cached rate expires
    assert price_book.rates("dated-model", "testprov").input == 4_000_000
    assert price_book.rates("dated-model", "testprov").output == 8_000_000


@pytest.mark.usefixtures("custom_data")
def test_time_of_day_prices_charge_the_price_of_the_hour() -> None:
    # As genai-prices prices a request at its timestamp: inside the 00:30-08:30 window
    # its prices (lower input, higher output here), outside it the all-day ones.
    for hour, expected in ((3, (250_000, 4_000_000)), (12, (500_000, 3_000_000))):
        clock = FakeClock(datetime(2026, 11, 27, hour, tzinfo=timezone.utc))
        rates = PriceBook(clock=clock).rates("offpeak-model", "testprov")
        assert (rates.input, rates.output) == expected
        usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
        price = calc_price(
            usage, "offpeak-model", provider_id="testprov", genai_request_timestamp=clock.datetime()
        )
        assert rates.cost(TokenUsage(1_000_000, 1_000_000)) == int(price.total_price * 10**9)
    # A cached rate turns over at each bound of the window, not only at midnight.
    clock = FakeClock(datetime(2026, 11, 27, 0, 29, 59, tzinfo=timezone.utc))
    price_book = PriceBook(clock=clock)
    assert price_book.rates("offpeak-model", "testprov").input == 500_000
    clock.advance(1)  # 00:30
    assert price_book.rates("offpeak-model", "testprov").input == 250_000
    clock.advance(8 * 3600 - 1)  # 08:29:59
    assert price_book.rates("offpeak-model", "testprov").input == 250_000
    clock.advance(1)  # 08:30
    assert price_book.rates("offpeak-model", "testprov").input == 500_000


@pytest.mark.usefixtures("custom_data")
def test_each_price_key_keeps_its_own_tier_threshold() -> None:
    rates = book().rates("split-tiers", "testprov")
    assert [start for start, _ in rates.tiers] == [1_000, 5_000]
    assert rates.cost(TokenUsage(1_000, 1)) == (1_000 * 1_000_000 + 10_000_000) // 1_000
    assert rates.cost(TokenUsage(1_001, 1)) == (1_001 * 2_000_000 + 10_000_000) // 1_000
    assert rates.cost(TokenUsage(5_001, 1)) == (5_001 * 2_000_000 + 30_000_000) // 1_000


@pytest.mark.usefixtures("custom_data")
def test_a_model_without_token_prices_is_unknown_not_free() -> None:
    with pytest.raises(UnknownModel, match="no token price"):
        book().rates("audio-only", "testprov")


# -- resolution order ------------------------------------------------------------------------


def test_override_wins_over_genai_prices_and_covers_variants_of_the_name() -> None:
    price_book = book(overrides={"gpt-4o": PriceOverride(usd("1"), usd("2"), usd("0.5"))})
    for name in ("gpt-4o", "openai/gpt-4o", "gpt-4o-2024-08-06", "openai/gpt-4o-2024-08-06"):
        rates = price_book.rates(name, "openai")
        assert rates.source == "override"
        assert rates.matched == "gpt-4o"
        assert rates.base == RateBand(1_000_000, 2_000_000, 500_000, 1_000_000, 1_000_000)
    # another model still comes from genai-prices
    assert price_book.rates("gpt-4o-mini", "openai").source == "genai-prices"


def test_override_for_a_custom_model() -> None:
    price_book = book(overrides={"my-finetune": PriceOverride(usd("1.0"), usd("2.0"))})
    assert (
        price_book.cost("my-finetune", "openai-compatible", TokenUsage(1_000, 1_000)) == 3_000_000
    )


def test_bad_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"prices\.bad"):
        PriceBook({"bad": PriceOverride(usd("-1"), usd("1"))})


def test_azure_uses_openai_prices() -> None:
    price_book = book()
    azure = price_book.rates("gpt-4o", "azure")
    openai = price_book.rates("gpt-4o", "openai")
    assert azure.base == openai.base
    assert azure.provider == "azure"
    assert azure.matched == "gpt-4o"


def test_a_model_only_azure_serves_has_azure_prices() -> None:
    # Phi is not in OpenAI's table: Azure's own prices, not an unknown model.
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    for model in ("phi-4", "phi-4-mini-instruct"):
        rates = book().rates(model, "azure")
        price = calc_price(usage, model, provider_id="azure", genai_request_timestamp=NOW)
        assert rates.cost(TokenUsage(1_000_000, 1_000_000)) == int(price.total_price * 10**9)
    with pytest.raises(UnknownModel):
        book().rates("phi-4", "openai")  # OpenAI itself does not serve it


@pytest.mark.parametrize(
    ("name", "provider", "plain", "plain_provider"),
    [
        ("gpt-4o-2024-08-06", "openai", "gpt-4o", "openai"),
        ("openai/gpt-4o", None, "gpt-4o", "openai"),
        ("openai/gpt-4o", "openai-compatible", "gpt-4o", "openai"),
        ("anthropic/claude-3-5-haiku", None, "claude-3-5-haiku", "anthropic"),
        ("claude-3-5-sonnet@20240620", "anthropic", "claude-3-5-sonnet", "anthropic"),
        ("claude-sonnet-4-5-20250929", "anthropic", "claude-sonnet-4-5", "anthropic"),
        ("gpt-4o", "some-unknown-provider", "gpt-4o", "openai"),
    ],
)
def test_prefixed_and_dated_names_resolve(
    name: str, provider: str | None, plain: str, plain_provider: str
) -> None:
    price_book = book()
    rates = price_book.rates(name, provider)
    expected = price_book.rates(plain, plain_provider)
    assert (rates.matched, rates.base, rates.tiers) == (
        expected.matched,
        expected.base,
        expected.tiers,
    )
    assert rates.model == name
    assert rates.source == "genai-prices"


def test_candidate_names() -> None:
    assert candidate_names("openai/gpt-4o-2024-08-06") == [
        "openai/gpt-4o-2024-08-06",
        "gpt-4o-2024-08-06",
        "openai/gpt-4o",
        "gpt-4o",
    ]
    assert candidate_names("claude-3-5-sonnet@20240620") == [
        "claude-3-5-sonnet@20240620",
        "claude-3-5-sonnet",
    ]
    assert candidate_names("gpt-4o") == ["gpt-4o"]


# -- unknown models ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["block", "allow"])
def test_unknown_model_without_price_raises(action: Any) -> None:
    price_book = book(unknown_model=UnknownModelPolicy(action=action))
    with pytest.raises(UnknownModel) as info:
        price_book.rates("no-such-model-xyz", "openai")
    assert isinstance(info.value, PayiGuardError)
    assert (info.value.model, info.value.provider, info.value.action) == (
        "no-such-model-xyz",
        "openai",
        action,
    )
    # the refusal is cached too, and raised again
    with pytest.raises(UnknownModel):
        price_book.cost("no-such-model-xyz", "openai", TokenUsage(1, 1))


@pytest.mark.parametrize("action", ["price", "allow"])
def test_unknown_model_fallback_price(action: Any) -> None:
    policy = UnknownModelPolicy(action=action, price=PriceOverride(usd("10"), usd("30")))
    price_book = book(unknown_model=policy)
    rates = price_book.rates("no-such-model-xyz", "openai")
    assert rates.source == "unknown_model"
    assert rates.matched is None
    # $10 + $30 per million: 1,000 of each is $0.04
    assert rates.cost(TokenUsage(1_000, 1_000)) == 40_000_000
    # known models keep their own price
    assert price_book.rates("gpt-4o", "openai").source == "genai-prices"


def test_price_policy_needs_a_price() -> None:
    with pytest.raises(ConfigError, match="needs a price"):
        PriceBook(unknown_model=UnknownModelPolicy(action="price"))


def test_rates_needs_a_model_name() -> None:
    with pytest.raises(TypeError, match="model"):
        book().rates("", "openai")


# -- no network -------------------------------------------------------------------------------


def test_lookups_make_no_network_call_and_start_no_thread() -> None:
    script = textwrap.dedent(
        """
        import socket, threading

        def refuse(*args, **kwargs):
            raise RuntimeError("network access attempted")

        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse

        from payi_guard.pricing import PriceBook, TokenUsage, UnknownModel
        import genai_prices

        book = PriceBook()
        for model, provider in [("gpt-4o", "openai"), ("claude-sonnet-4-5", "anthropic"),
                                ("openai/gpt-4o-mini", None), ("gpt-4.1", "azure")]:
            book.cost(model, provider, TokenUsage(100, 100))
        try:
            book.rates("no-such-model", "openai")
        except UnknownModel:
            pass
        genai_prices.calc_price(genai_prices.Usage(input_tokens=1), "gpt-4o")
        assert threading.active_count() == 1, threading.enumerate()
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_importing_pricing_does_not_load_genai_prices_data() -> None:
    script = "import sys, payi_guard.pricing; print('genai_prices.data' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "False"


# -- the cache ------------------------------------------------------------------------------


def _known_models() -> list[tuple[str, str]]:
    snapshot = data_snapshot.get_snapshot()
    found: list[tuple[str, str]] = []
    for provider in snapshot.providers:
        if provider.id not in ("openai", "anthropic"):
            continue
        for info in provider.models[:40]:
            found.append((info.id, provider.id))
    return found


def test_cache_is_bounded_and_thread_safe() -> None:
    models = _known_models()
    assert len(models) >= 60
    reference: dict[tuple[str, str], int | None] = {}
    solo = book()
    usage = TokenUsage(1_234, 567, 89, 10, 1)
    for model, provider in models:
        try:
            reference[(model, provider)] = solo.cost(model, provider, usage)
        except UnknownModel:
            reference[(model, provider)] = None

    shared = book(maxsize=8)
    errors: list[BaseException] = []
    mismatches: list[tuple[str, str]] = []
    start = threading.Barrier(32)

    def worker(offset: int) -> None:
        try:
            start.wait()
            for i in range(300):
                model, provider = models[(offset * 7 + i) % len(models)]
                try:
                    got: int | None = shared.cost(model, provider, usage)
                except UnknownModel:
                    got = None
                if got != reference[(model, provider)]:
                    mismatches.append((model, provider))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert not mismatches
    assert shared.cache_len() <= 8
    assert shared.maxsize == 8


def test_cache_returns_the_same_rates_object() -> None:
    price_book = book()
    first = price_book.rates("gpt-4o", "openai")
    assert price_book.rates("gpt-4o", "openai") is first
    price_book.clear_cache()
    assert price_book.cache_len() == 0
    assert price_book.rates("gpt-4o", "openai") == first


def test_maxsize_is_validated() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        PriceBook(maxsize=0)


# -- properties -----------------------------------------------------------------------------

prices = st.integers(0, 100_000_000)
bands = st.builds(RateBand, prices, prices, prices, prices, prices, st.integers(0, 10**10))


@st.composite
def any_rates(draw: st.DrawFn) -> Rates:
    starts = sorted(draw(st.sets(st.integers(0, 500_000), max_size=3)))
    tiers = tuple((start, draw(bands)) for start in starts)
    return Rates("m", None, "override", draw(bands), tiers)


counts = st.integers(0, 2_000_000)


@settings(max_examples=300, deadline=None)
@given(
    rates=any_rates(),
    usage=st.builds(TokenUsage, counts, counts, counts, counts, counts),
    field=st.sampled_from(
        [
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
            "cache_write_1h_tokens",
        ]
    ),
    extra=st.integers(1, 1_000_000),
)
def test_cost_is_never_negative_and_monotonic_within_a_band(
    rates: Rates, usage: TokenUsage, field: str, extra: int
) -> None:
    cost = rates.cost(usage)
    assert cost >= 0
    values: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
    }
    values[field] += extra
    more = TokenUsage(**values)
    if rates.band_for(more.total_input_tokens) == rates.band_for(usage.total_input_tokens):
        assert rates.cost(more) >= cost
    # the estimate bound covers any usage up to it
    bound = rates.upper_bound_nano(more.total_input_tokens, more.output_tokens)
    assert bound >= rates.cost(more)


@settings(max_examples=200, deadline=None)
@given(
    model=st.sampled_from(CROSS_CHECK_MODELS),
    usage=st.builds(TokenUsage, counts, counts, counts, counts, counts),
    field=st.sampled_from(["input_tokens", "output_tokens", "cache_read_tokens"]),
    extra=st.integers(1, 500_000),
)
def test_real_prices_are_monotonic(
    model: tuple[str, str], usage: TokenUsage, field: str, extra: int
) -> None:
    # Real tiers only ever raise prices, so cost grows with every count, across tiers too.
    values: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cache_read_tokens": usage.cache_read_tokens,
        "cache_write_tokens": usage.cache_write_tokens,
        "cache_write_1h_tokens": usage.cache_write_1h_tokens,
    }
    values[field] += extra
    cost = CROSS_BOOK.cost(*model, usage)
    assert 0 <= cost <= CROSS_BOOK.cost(*model, TokenUsage(**values))


# -- money helpers --------------------------------------------------------------------------


@settings(max_examples=500)
@given(nano=st.integers(-(10**15) + 1, 10**15 - 1))
def test_cost_usd_repr_is_exact(nano: int) -> None:
    value = cost_usd(nano)
    assert Decimal(repr(value)) == nano_to_decimal(nano)


@pytest.mark.parametrize(
    ("nano", "text"),
    [(0, "0E-9"), (1, "1E-9"), (1_500_000_000, "1.500000000"), (-7, "-7E-9")],
)
def test_nano_to_decimal(nano: int, text: str) -> None:
    assert str(nano_to_decimal(nano)) == text


def test_nano_to_decimal_is_exact_for_huge_amounts() -> None:
    assert str(nano_to_decimal(10**40 + 1)) == "1" + "0" * 31 + ".000000001"


def test_cost_usd_examples() -> None:
    assert repr(cost_usd(7_750_000)) == "0.00775"
    assert repr(cost_usd(1)) == "1e-09"
    assert repr(cost_usd(999_999_999_999_999)) == "999999.999999999"


def test_models_resolve_by_name_alone_for_openai_compatible_servers() -> None:
    book = PriceBook()
    for model in ("text-embedding-3-small", "gpt-4o-mini", "claude-3-5-haiku-latest"):
        assert book.rates(model, "openai-compatible").source == "genai-prices"
        assert book.rates(model, None).source == "genai-prices"
    # Name-only matching never invents a price.
    with pytest.raises(UnknownModel):
        book.rates("no-such-model-anywhere", "openai-compatible")
