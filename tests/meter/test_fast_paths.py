"""The per-call fast paths of the guarding transport give what the general code gives.

Each fast path is checked against a reference: the general function it stands for, or
the code it replaced (kept here), over the recorded cassettes of ``tests/conformance``
and generated cases that reach every branch (invalid counts, odd types, every endpoint).
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import pytest
from conformance.corpus import Interaction, corpus, synthetic

from payi_guard.meter.estimate import estimate_request, request_bounds
from payi_guard.meter.parse import (
    Endpoint,
    RequestInfo,
    classify,
    loads_json,
    openai_usage,
    usage_from_response,
)
from payi_guard.meter.plain import is_event_stream, openai_token_usage
from payi_guard.meter.server_tools import file_search_bound, tool_input_tokens, web_search_bound
from payi_guard.meter.streams import DECODABLE_ENCODINGS, Settlement
from payi_guard.meter.text_bound import text_token_bound
from payi_guard.meter.tier import response_tier
from payi_guard.meter.tokens import (
    OUTPUT_CAP_FIELDS,
    EndpointKind,
    estimate_input_tokens,
    image_token_bound,
    max_output_tokens,
    request_output_cap,
)
from payi_guard.meter.transport import PlannedCall, TransportMeter
from payi_guard.money import ceil_div

# ---------------------------------------------------------------------------------------
# References: the code the fast paths replaced
# ---------------------------------------------------------------------------------------

_SPACE_BYTES = b" \t\n\r\x0b\x0c"
_DIGITS = b"0123456789"
_LOWER = bytes(range(ord("a"), ord("z") + 1))
_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_LEAD4 = bytes(range(0xF0, 0xF8))


def _table(members: dict[bytes, bytes], default: bytes) -> bytes:
    table = bytearray(default * 256)
    for chars, letter in members.items():
        for byte in chars:
            table[byte] = letter[0]
    return bytes(table)


_WORD = _table({_LOWER + _UPPER + bytes(range(0x80, 0x100)): b"w"}, b".")
_CASE = _table({_LOWER: b"l", _UPPER: b"u"}, b".")
_DIGIT = _table({_DIGITS: b"d"}, b".")
_SPACE = _table({_SPACE_BYTES: b"s"}, b".")
_MERGE = _table({b" ": b"s", _SPACE_BYTES[1:]: b"t", _DIGITS: b"d"}, b"n")


def _runs(classes: bytes, letter: bytes) -> int:
    return classes.count(b"." + letter) + (classes[:1] == letter)


def reference_text_bound(text: str) -> int:
    """``text_token_bound(text, "ratio")`` as it was written with helper calls."""
    data = text.encode("utf-8", "surrogatepass")
    size = len(data)
    if not size:
        return 0
    words = data.translate(_WORD)
    word_bytes = words.count(b"w")
    word_runs = _runs(words, b"w") if word_bytes else 0
    upper = size - len(data.translate(None, _UPPER))
    switches = data.translate(_CASE).count(b"lu") if upper else 0
    four_byte = 0 if text.isascii() else size - len(data.translate(None, _LEAD4))
    digit_bytes = size - len(data.translate(None, _DIGITS))
    digit_runs = _runs(data.translate(_DIGIT), b"d") if digit_bytes else 0
    space_bytes = size - len(data.translate(None, _SPACE_BYTES))
    space_runs = _runs(data.translate(_SPACE), b"s") if space_bytes else 0
    spaces = data.count(b" ")
    merged = 0
    if spaces:
        classes = data.translate(_MERGE)
        merged = (
            classes.count(b"sn")
            - classes.count(b"ssn")
            - classes.count(b"tsn")
            - (classes[:2] == b"sn")
        )
    other = size - word_bytes - digit_bytes - space_bytes
    tokens = (
        ceil_div(2 * word_bytes + upper + switches + 4 * four_byte + word_runs, 3)
        + ceil_div(digit_bytes + digit_runs, 2)
        + ceil_div(spaces + 2 * space_runs, 2)
        + (space_bytes - spaces)
        - merged
        + other
    )
    return max(tokens, ceil_div(2 * size, 5))


def _count_param(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def reference_output_cap(endpoint: EndpointKind, body: Mapping[str, Any]) -> int | None:
    """``request_output_cap`` as it was: the first field holding a count."""
    for name in OUTPUT_CAP_FIELDS.get(endpoint, ()):
        cap = _count_param(body, name)
        if cap is not None:
            return cap
    return None


def _mentions_key(obj: object, key: str) -> bool:
    if isinstance(obj, Mapping):
        return key in obj or any(_mentions_key(v, key) for v in obj.values())
    if isinstance(obj, list):
        return any(_mentions_key(v, key) for v in obj)
    return False


def reference_bounds(
    body: Mapping[str, Any], endpoint: EndpointKind, model: str, mode: Any
) -> tuple[object, ...]:
    """What the transport reserved for, from the public functions one by one."""
    context: dict[str, str] = {}
    tier = body.get("service_tier")
    standard = ("default", "standard", "on_demand")
    asked = tier if isinstance(tier, str) and tier not in ("", "auto", *standard) else None
    if endpoint != "anthropic_messages" and asked is not None:
        context["service_tier"] = asked
    speed = body.get("speed")
    if endpoint == "anthropic_messages" and isinstance(speed, str) and speed not in standard:
        context["speed"] = speed
    web, files = web_search_bound(body, endpoint), file_search_bound(body, endpoint)
    return (
        estimate_input_tokens(
            body, mode=mode, endpoint=endpoint, image_tokens=image_token_bound(model)
        )
        + tool_input_tokens(body, endpoint, web, files),
        max_output_tokens(body, endpoint=endpoint, model=model),
        endpoint != "anthropic_messages" or _mentions_key(body, "cache_control"),
        context or None,
        web,
        files,
    )


def reference_plain_result(endpoint: Endpoint, content: bytes) -> Settlement:
    """``TransportMeter.plain_result`` through ``usage_from_response`` only."""
    try:
        obj: Any = loads_json(content)
    except (ValueError, UnicodeDecodeError):
        obj = None
    parsed = usage_from_response(endpoint, obj)
    problems = parsed.problems if parsed.complete else ("usage: missing",)
    outcome = "ok"
    model: Any = None
    tier = None
    if isinstance(obj, dict):
        model = obj.get("model")
        tier = response_tier(endpoint.kind, obj)
        if endpoint.kind == "responses":
            status = obj.get("status")
            if status == "incomplete":
                outcome = "incomplete"
            elif status == "failed":
                outcome = "error"
    return Settlement(
        parsed.to_token_usage(),
        outcome,
        response_model=model if isinstance(model, str) and model else None,
        other_models=parsed.other_models,
        problems=problems,
        price_context=tier,
    )


# ---------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------


def _interactions() -> tuple[Interaction, ...]:
    return corpus() + synthetic()


def _endpoint(interaction: Interaction) -> Endpoint:
    endpoint = classify("POST", urlsplit(interaction.url).path, interaction.host)
    assert endpoint is not None
    return endpoint


def _strings(obj: object) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield key
            yield from _strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _strings(value)


_ALPHABET = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "      \t\n\r\x0b\x0c.,;:!?-_/\\\"'{}[]()#@$%^&*+=<>|~`"
    "éüßçñ日本語中文한국어русскийΑλφαשלוםمرحباनमस्ते😀🚀🧪"
)


def _random_texts(count: int) -> list[str]:
    rng = random.Random(20261127)
    texts = ["", " ", "  ", "a", "A", "1", "\t", " a", "a ", " 1", "aB", "a b", "\n a"]
    for _ in range(count):
        size = rng.choice((1, 2, 3, 5, 8, 20, 80, 400))
        texts.append("".join(rng.choice(_ALPHABET) for _ in range(size)))
    return texts


# Counts that can and cannot be trusted, as providers (and broken proxies) send them.
_COUNTS: tuple[object, ...] = (0, 1, 7, 120, 10**9, -1, 2.0, 2.5, "3", True, False, None, [1])


def _usage_variants() -> list[dict[str, Any]]:
    rng = random.Random(7)

    def count() -> object:
        # Mostly counts that can be trusted, as providers send them.
        return rng.choice(_COUNTS[:5] if rng.random() < 0.8 else _COUNTS)

    keys = ("prompt_tokens", "completion_tokens", "total_tokens")
    detail_keys = ("cached_tokens", "cache_write_tokens", "audio_tokens", "image_tokens")
    variants: list[dict[str, Any]] = [{}, {"prompt_tokens": 5}, {"completion_tokens": 5}]
    for _ in range(600):
        usage: dict[str, Any] = {}
        for key in keys:
            if rng.random() < 0.85:
                usage[key] = count()
        roll = rng.random()
        if roll < 0.5:
            usage["prompt_tokens_details"] = {
                key: count() for key in detail_keys if rng.random() < 0.7
            }
        elif roll < 0.6:
            usage["prompt_tokens_details"] = rng.choice((None, [], "x", 3))
        elif roll < 0.65:
            usage["prompt_tokens_details"] = MappingProxyType({"cached_tokens": count()})
        if rng.random() < 0.5:
            answer = ("reasoning_tokens", "audio_tokens", "image_tokens")
            usage["completion_tokens_details"] = {k: count() for k in answer if rng.random() < 0.6}
        variants.append(usage)
    return variants


# ---------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------


def test_text_bound_is_the_same_over_random_and_recorded_text() -> None:
    texts = _random_texts(3000)
    for interaction in _interactions():
        texts.extend(_strings(interaction.request))
        texts.append("\n".join(_strings(interaction.request)))
    for text in texts:
        assert text_token_bound(text) == reference_text_bound(text), repr(text)
        assert text_token_bound(text, "bytes") == len(text.encode("utf-8", "surrogatepass"))


def test_reference_text_bound_agrees_on_known_values() -> None:
    # The reference is itself checked, so the comparison above cannot pass vacuously.
    assert reference_text_bound("") == 0
    assert reference_text_bound("hello world") == text_token_bound("hello world") > 0
    assert reference_text_bound("x" * 100) == 67


@pytest.mark.parametrize("mode", ["ratio", "bytes"])
def test_request_bounds_are_the_estimate_over_the_recorded_requests(mode: Any) -> None:
    checked = 0
    for interaction in _interactions():
        endpoint = _endpoint(interaction)
        body = interaction.request
        named = body.get("model")
        model = named if isinstance(named, str) and named else "unknown"
        cap = request_output_cap(endpoint.kind, body)
        found = request_bounds(body, endpoint.kind, model, mode, cap)
        assert found == reference_bounds(body, endpoint.kind, model, mode), interaction.id
        estimate = estimate_request(body, endpoint.kind, model, mode=mode)
        assert found == (
            estimate.input_tokens,
            estimate.output_tokens,
            estimate.cache_writes,
            dict(estimate.price_context) or None,
            estimate.web_searches,
            estimate.file_searches,
        )
        checked += 1
    assert checked >= 50


_EXTRA_BODIES: tuple[dict[str, Any], ...] = (
    {"service_tier": "priority", "messages": [{"role": "user", "content": "hi"}]},
    {"service_tier": "auto", "speed": "fast", "max_tokens": 3, "n": 4},
    {"speed": "fast", "system": "s", "messages": [], "max_tokens": 9},
    {"max_completion_tokens": True, "max_tokens": 5},
    {"max_completion_tokens": -1, "max_tokens": 5.0, "max_output_tokens": 7},
    {"max_completion_tokens": 4, "max_tokens": 5, "best_of": 3, "n": 2, "prompt": "p"},
    {"tools": [{"type": "web_search_20250305", "max_uses": 3}, {"type": "file_search"}]},
    {"tools": [{"type": "web_search"}, {"type": "custom", "cache_control": {"t": 1}}]},
    {"input": "text", "instructions": "be brief", "max_output_tokens": 0},
)


@pytest.mark.parametrize("body", _EXTRA_BODIES)
@pytest.mark.parametrize(
    "kind", ["chat", "responses", "embeddings", "anthropic_messages", "completions"]
)
def test_request_bounds_every_endpoint(body: dict[str, Any], kind: EndpointKind) -> None:
    cap = request_output_cap(kind, body)
    assert cap == reference_output_cap(kind, body)
    for model in ("gpt-4o-mini", "claude-sonnet-4-5", "unknown"):
        for mode in ("ratio", "bytes"):
            found = request_bounds(body, kind, model, mode, cap)
            assert found == reference_bounds(body, kind, model, mode)


def test_request_info_over_the_recorded_requests() -> None:
    for interaction in _interactions():
        endpoint = _endpoint(interaction)
        body = interaction.request
        raw = json.dumps(body).encode()
        info = RequestInfo.parse(endpoint, raw, "application/json")
        assert info is not None
        model = body.get("model")
        assert info.model == (model if isinstance(model, str) and model else endpoint.deployment)
        assert info.stream is (body.get("stream") is True)
        assert info.max_output_tokens == reference_output_cap(endpoint.kind, body)
        assert info.body == body


def test_openai_token_usage_is_the_full_parse_when_trusted() -> None:
    trusted = untrusted = media = hidden = 0
    for usage in _usage_variants():
        for output in (True, False):
            parsed = openai_usage(usage, output=output)
            fast = openai_token_usage(usage, output=output)
            if parsed.problems:
                assert fast is None, usage
                untrusted += 1
            elif output and _total_above_counts(usage):
                assert fast is None, usage  # the full parse adds the output the total hides
                hidden += 1
            elif isinstance(usage.get("prompt_tokens_details"), MappingProxyType):
                assert fast is None or fast == parsed.to_token_usage()
            else:
                assert fast == parsed.to_token_usage(), usage
                trusted += 1
                media += fast is not None and fast.media is not None
    # Both sides are reached many times, audio and image tokens too.
    assert trusted > 100
    assert untrusted > 100
    assert media > 50
    assert hidden > 10


def _total_above_counts(usage: dict[str, Any]) -> bool:
    total, prompt, completion = (
        usage.get(k) for k in ("total_tokens", "prompt_tokens", "completion_tokens")
    )
    if type(total) is not int or type(prompt) is not int or type(completion) is not int:
        return False
    return total > prompt + completion


def _plain_bodies() -> Iterator[tuple[Endpoint, bytes]]:
    for interaction in _interactions():
        if interaction.ok and not interaction.is_stream:
            yield _endpoint(interaction), interaction.body
    chat = Endpoint("chat")
    for usage in _usage_variants():
        yield chat, json.dumps({"model": "gpt-x", "usage": usage}, default=dict).encode()
        yield Endpoint("embeddings"), json.dumps({"usage": usage}, default=dict).encode()
    for odd in (b"", b"null", b"[]", b"{", b'{"usage": null}', b'{"usage": [1]}', b"\xff"):
        yield chat, odd
    yield chat, b'{"model": 3, "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    yield chat, b'{"model": "", "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'


def _planned(endpoint: Endpoint) -> PlannedCall:
    info = RequestInfo(endpoint, "m", False, 1, False, None, {})
    return PlannedCall(endpoint, info, None, None, None, False, None)  # type: ignore[arg-type]


def test_plain_result_is_the_full_parse_over_recorded_and_generated_bodies() -> None:
    fast_ok = 0
    for endpoint, content in _plain_bodies():
        found = TransportMeter.plain_result(_planned(endpoint), content)
        assert found == reference_plain_result(endpoint, content), content[:200]
        fast_ok += found.outcome == "ok" and not found.problems
    assert fast_ok > 100


_CONTENT_TYPES: tuple[list[tuple[str, str]], ...] = (
    [],
    [("content-type", "application/json")],
    [("Content-Type", "Text/Event-Stream; charset=utf-8")],
    [("content-type", " text/event-stream ")],
    [("content-type", "text/event-stream"), ("content-type", "application/json")],
    [("content-type", "application/json"), ("content-type", "text/event-stream")],
    [("content-type", "text/event-streams")],
    [("content-type", "text/event-stream"), ("content-type", "; charset=utf-8")],
)


@pytest.mark.parametrize("module_name", ["httpx", "httpx2"])
def test_response_kind_reads_the_content_type_as_get_does(module_name: str) -> None:
    module = pytest.importorskip(module_name)
    planned = _planned(Endpoint("chat"))
    for _ in range(2):  # the second time from the memo
        for headers in _CONTENT_TYPES:
            response = module.Response(200, headers=headers, content=b"{}")
            ctype = response.headers.get("content-type", "")
            expected = ctype.split(";", 1)[0].strip().lower() == "text/event-stream"
            kind = TransportMeter.response_kind(planned, response)
            assert kind == ("stream" if expected else "plain"), headers
    assert TransportMeter.response_kind(planned, module.Response(500, content=b"")) == "error"


@pytest.mark.parametrize("module_name", ["httpx", "httpx2"])
@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("content-encoding", "gzip")],
        [("Content-Encoding", " GZIP ")],
        [("content-encoding", "identity")],
        [("content-encoding", "gzip"), ("content-encoding", "gzip")],
    ],
)
def test_after_read_drops_a_decoded_encoding_as_before(
    module_name: str, headers: list[tuple[str, str]]
) -> None:
    module = pytest.importorskip(module_name)
    body = b"{}"
    for _, value in headers:
        if value.strip().lower() == "gzip":
            body = gzip.compress(body)
    response = module.Response(200, headers=[*headers, ("content-length", "99")], content=body)
    response.read()
    encoding = response.headers.get("content-encoding", "").strip().lower()
    TransportMeter.after_read(response)
    if encoding in DECODABLE_ENCODINGS:
        assert "content-encoding" not in response.headers
        assert response.headers["content-length"] == "2"
    else:
        assert response.headers.get("content-encoding", "").strip().lower() == encoding
        assert response.headers["content-length"] == "99"


def test_is_event_stream_memo_gives_the_computed_answer_past_its_size() -> None:
    types = [f"text/event-stream; n={i}" for i in range(300)] + [
        f"application/json; n={i}" for i in range(300)
    ]
    types += [" TEXT/Event-Stream ", "text/event-streams", ""]
    for _ in range(2):
        for ctype in types:
            expected = ctype.split(";", 1)[0].strip().lower() == "text/event-stream"
            assert is_event_stream(ctype) is expected, ctype
