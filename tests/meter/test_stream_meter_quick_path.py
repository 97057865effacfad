"""StreamMeter's byte-scan path: the usual chat chunk is forwarded, and read later, alike.

:class:`~payi_guard.meter.sse.StreamMeter` forwards the usual chunk of a chat stream the
guard asked usage of after a few byte scans (its top-level ``"usage":null`` cut out), and
reads it with the rest later; a stream whose bytes the guard never changes goes on as it
comes and is read in bulk. Fed one byte at a time, no chunk takes those paths: whatever
the chunks, the bytes forwarded and what the tracker says must be the same.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from meter._support import tracker_state
from payi_guard.meter.parse import Endpoint, ParsedUsage
from payi_guard.meter.sse import StreamMeter
from payi_guard.meter.sse.meter import _TOP_LEVEL_TAIL

CHAT = Endpoint("chat")
ANTHROPIC = Endpoint("anthropic_messages", provider="anthropic")

# A chunk of recorded OpenAI traffic (pydantic-ai's cassette
# test_run_stream_sync_streams_real_model.yaml, in tests/conformance/cassettes), as
# OpenAI sends it when asked for stream_options.include_usage.
RECORDED = (
    b'data: {"id":"chatcmpl-Dx0XpqH8w09uBXwq1zFGYdETjtnEl","object":"chat.completion.chunk",'
    b'"created":1782955817,"model":"gpt-4o-mini-2024-07-18","service_tier":"default",'
    b'"system_fingerprint":"fp_d0469e1700","choices":[{"index":0,"delta":{"tool_calls":'
    b'[{"index":0,"function":{"arguments":"country"}}]},"logprobs":null,"finish_reason":null}'
    b'],"usage":null,"obfuscation":"UqdZk18gUR"}\n\n'
)


def _by_event(stream: bytes) -> list[bytes]:
    events = [e + b"\n\n" for e in stream.split(b"\n\n")[:-1]]
    tail = stream[sum(map(len, events)) :]
    return events + ([tail] if tail else [])


def _metered(
    chunks: list[bytes], endpoint: Endpoint, *, added: bool
) -> tuple[bytes, tuple[object, ...]]:
    meter = StreamMeter(endpoint, added_include_usage=added)
    out = b"".join(meter.feed(chunk) for chunk in chunks) + meter.finish()
    return out, tracker_state(meter.tracker)


def test_the_recorded_chunk_loses_only_its_usage_member() -> None:
    first = RECORDED.replace(b'"arguments":"country"', b'"arguments":""')
    meter = StreamMeter(CHAT, added_include_usage=True)
    meter.feed(first)  # read at once: it names the model and the id

    out = meter.feed(RECORDED)

    assert out == RECORDED.replace(b',"usage":null', b"")
    assert meter.tracker.output_bytes == len("country") + 0
    assert meter.tracker.model == "gpt-4o-mini-2024-07-18"


_TEXT = st.lists(
    st.sampled_from([*'ab {}[]",:\\/\n\u00e9\u4e2d', '"usage":null', "usage"]), max_size=8
).map("".join)


@st.composite
def _chat_chunk(draw: st.DrawFn, index: int) -> bytes:
    """A chat chunk whose shape varies where the byte-scan path must be careful."""
    delta: dict[str, Any] = {"content": draw(_TEXT)}
    if draw(st.booleans()):
        delta["usage"] = None  # a nested "usage":null is not the chunk's own
    finish = draw(st.sampled_from([None, None, None, "stop", "length"]))
    choices = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    members: list[tuple[str, Any]] = [
        ("id", "chatcmpl-1"),
        ("object", "chat.completion.chunk"),
        ("model", "m"),
        ("choices", draw(st.sampled_from([choices, choices, []]))),
    ]
    usage = draw(st.sampled_from(["null", "null", "null", "none", "object"]))
    if usage == "null":
        members.append(("usage", None))
    elif usage == "object":
        members.append(("usage", {"prompt_tokens": index, "completion_tokens": 2}))
    for name in draw(st.lists(st.sampled_from(["obfuscation", "extra", "error"]), unique=True)):
        if name == "error":
            members.append((name, {"message": draw(_TEXT)}))
        elif name == "extra":
            members.append((name, draw(st.sampled_from([[1], {"a": 1}, 3, None]))))
        else:
            members.append((name, draw(_TEXT)))
    members = draw(st.permutations(members)) if draw(st.booleans()) else members
    ascii_only = draw(st.booleans())
    text = json.dumps(dict(members), separators=(",", ":"), ensure_ascii=ascii_only)
    return draw(st.sampled_from([b"data: ", b"data: ", b"data:"])) + text.encode() + b"\n\n"


@st.composite
def _chat_streams(draw: st.DrawFn) -> bytes:
    first: dict[str, Any] = {"id": "chatcmpl-1", "model": "m", "choices": [], "usage": None}
    out = b"data: " + json.dumps(first).encode() + b"\n\n"
    for index in range(draw(st.integers(0, 8))):
        # Blocks that dispatch nothing, one of them spelling a chunk's usage member.
        filler = [b"", b"", b"", b": ping\n\n", b"\n\n", b': {"a":1,"usage":null}\n\n']
        out += draw(st.sampled_from(filler))
        out += draw(_chat_chunk(index))
    if draw(st.booleans()):
        out += b"data: [DONE]\n\n"
    return out


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=_chat_streams(), added=st.booleans())
def test_chat_chunks_whole_or_byte_by_byte_alike(stream: bytes, added: bool) -> None:
    whole = _metered(_by_event(stream), CHAT, added=added)
    single = _metered([stream[i : i + 1] for i in range(len(stream))], CHAT, added=added)

    assert whole == single


# What may follow a chunk's "usage":null: the bytes the tail test looks at, and others.
_TAIL = st.tuples(
    st.sampled_from([b"", b",", b" ,"]),
    st.lists(
        st.sampled_from([b",", b"}", b"{", b"[", b"]", b"\\", b'"a"', b":", b"1", b" "]),
        max_size=4,
    ).map(b"".join),
    st.sampled_from([b"}", b"}", b"", b"]}", b"} "]),
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(tail=_TAIL)
@example(tail=b',"a":1{}')
@example(tail=b',"a":1}}')
@example(tail=b',"a":1[}')
@example(tail=b',"a":1]}')
@example(tail=b',"a":1\\}')
@example(tail=b"}")
@example(tail=b',"a":1}')
@example(tail=b"")
def test_the_byte_scan_cuts_usage_where_the_tail_pattern_allows(tail: bytes) -> None:
    meter = StreamMeter(CHAT, added_include_usage=True)
    meter.feed(RECORDED)  # read at once: it names the model and the id
    chunk = b'data: {"id":"chatcmpl-1","choices":[],"usage":null' + tail + b"\n\n"

    out = meter.feed(chunk)

    # The byte-scan path holds the chunk back unread; any other path reads it at once.
    took_byte_scan = meter._held == [chunk]
    assert took_byte_scan == (_TOP_LEVEL_TAIL.fullmatch(tail) is not None)
    if took_byte_scan:
        assert out == chunk.replace(b',"usage":null', b"")


def test_held_chunks_that_are_not_json_events_are_read_alike() -> None:
    # The byte scan holds back only "data: {" events with a usage member; a comment, a
    # [DONE] or an event without the space after "data:" among the held chunks makes
    # the bulk read look at each one.
    chunks = [RECORDED, RECORDED, b": ping\n\n", RECORDED.replace(b"data: {", b"data:{")]
    chunks += [RECORDED.replace(b'"finish_reason":null', b'"finish_reason":"stop"')]
    chunks.append(b"data: [DONE]\n\n")

    whole = _metered(chunks, CHAT, added=True)
    single = _metered([c[i : i + 1] for c in chunks for i in range(len(c))], CHAT, added=True)

    assert whole == single
    assert b'"usage":null' not in whole[0]
    assert whole[0].count(b"data:") == 5
    assert whole[1][3] == "stop"


def test_held_chunks_with_escapes_are_read_alike() -> None:
    # Held back unread, then read together: a unicode escape may spell a key (here the
    # end of the choice), other escapes cannot.
    head = b'data: {"id":"chatcmpl-1","model":"m","choices":[{"index":0,"delta":'
    chunks = [RECORDED]
    chunks.append(
        head + b'{"content":"a \\"quoted\\" \\\\ word"},"finish_reason":null}],"usage":null}\n\n'
    )
    chunks.append(head + b'{},"finish\\u005freason":"stop"}],"usage":null}\n\n')

    whole = _metered(chunks, CHAT, added=True)
    single = _metered([c[i : i + 1] for c in chunks for i in range(len(c))], CHAT, added=True)

    assert whole == single
    assert whole[1][3] == "stop"


def test_a_long_stream_is_read_as_it_goes_and_counted_alike() -> None:
    chunks = [RECORDED.replace(b'"arguments":"country"', b'"arguments":""')]
    chunks += [RECORDED] * 2000  # past the bytes held back unread
    chunks.append(RECORDED.replace(b'"finish_reason":null', b'"finish_reason":"length"'))

    whole = _metered(chunks, CHAT, added=True)
    single = _metered([b for c in chunks for b in (c[:100], c[100:])], CHAT, added=True)

    assert whole == single
    assert whole[1][3] == "length"
    assert whole[1][6] == 2001 * len("country")
    assert whole[1][0] is None  # no usage reported: the output counts are the estimate


def test_an_unchanged_stream_goes_on_as_it_comes() -> None:
    events = [
        b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1",'
        b'"model":"claude-sonnet-4-5","usage":{"input_tokens":7,"output_tokens":1}}}\n\n',
        b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hi there"}}\n\n',
        b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
        b'"end_turn"},"usage":{"output_tokens":3}}\n\n',
        b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
    ]
    stream = b"".join(events)
    meter = StreamMeter(ANTHROPIC)

    # Cut mid-event: every byte goes on at once, none is held back.
    outs = [meter.feed(stream[i : i + 37]) for i in range(0, len(stream), 37)]

    assert outs == [stream[i : i + 37] for i in range(0, len(stream), 37)]
    assert meter.finish() == b""
    assert meter.tracker.usage == ParsedUsage(input_tokens=7, output_tokens=3, complete=True)
    assert (meter.tracker.status, meter.tracker.finished) == ("end_turn", True)


def _chunk_with(choices: list[Any] | None, **members: Any) -> bytes:
    obj = {"id": "chatcmpl-1", "model": "m", "choices": choices, **members, "usage": None}
    if choices is None:
        del obj["choices"]
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    return b"data: " + text.encode() + b"\n\n"


def _choice(delta: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}


def _output_of(chunk: bytes) -> tuple[int, int]:
    """What a chat chunk adds to the output counts, read with ``json`` (the oracle)."""
    size = deltas = 0
    for choice in json.loads(chunk[6:-2]).get("choices") or []:
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = choice
        keys = ("content", "refusal", "reasoning_content", "reasoning", "text")
        texts = [delta.get(key) for key in keys]
        texts += [call["function"]["arguments"] for call in delta.get("tool_calls") or []]
        texts.append((delta.get("function_call") or {}).get("arguments"))
        for text in texts:
            if isinstance(text, str) and text:
                size += len(text.encode())
                deltas += 1
    return size, deltas


def test_held_chunks_of_any_shape_count_what_json_reads() -> None:
    # Chunks held back unread are counted when the counts are read, or as the stream
    # goes once a quarter of a megabyte of them is held: whatever their shape, what the
    # tracker counts is what json reads in them.
    shapes = [
        _chunk_with([_choice({"content": " word"})]),
        _chunk_with([_choice({"content": "h\u00e9llo \u4e2d \U0001f600"})]),
        _chunk_with([_choice({"content": 'a "quoted" line\nand a \\ backslash'})]),
        _chunk_with([_choice({"content": ""})]),
        _chunk_with([_choice({"content": "a", "role": "assistant"})]),
        _chunk_with([_choice({"content": "one"}), _choice({"content": "two"}, 1)]),
        _chunk_with([_choice({"content": "said", "reasoning": "thought"})]),
        _chunk_with([], x={"delta": {"content": "not a choice's"}}),
        _chunk_with(None, x={"choices": [_choice({"content": "nor here"})]}),
        _chunk_with([{**_choice({"content": "lp"}), "logprobs": {"content": []}}]),
        _chunk_with([_choice({"content": "{[}]"})], system_fingerprint="fp_{["),
        _chunk_with([_choice({"content": "a", "refusal": "no"})]),
        _chunk_with([_choice({"content": "a", "function_call": {"arguments": "{}"}})]),
        _chunk_with([_choice({"content": "a", "tool_calls": [{"function": {"arguments": "{}"}}]})]),
        _chunk_with([_choice({"content": "a"}), {"index": 1, "text": "legacy"}]),
    ]
    chunks = [RECORDED] + shapes * 400  # past the bytes held back, and counted as it goes
    expected = [sum(n) for n in zip(*map(_output_of, chunks), strict=True)]
    assert sum(map(len, chunks)) > 2 * 256 * 1024

    meter = StreamMeter(CHAT, added_include_usage=True)
    out = b"".join(meter.feed(chunk) for chunk in chunks) + meter.finish()

    assert [meter.tracker.output_bytes, meter.tracker.output_deltas] == expected
    assert out == b"".join(chunks).replace(b',"usage":null', b"")
