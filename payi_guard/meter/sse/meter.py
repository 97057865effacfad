"""The bytes of a metered stream: forwarded as they come, their usage read alike.

A :class:`StreamMeter` puts an :class:`~payi_guard.meter.sse.decoder.SSEDecoder` and a
:class:`~payi_guard.meter.sse.usage.StreamUsageTracker` together, and takes back out of a
chat stream what the guard's ``stream_options.include_usage`` caused
(:func:`without_usage_member`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Final

from payi_guard.meter.parse import Endpoint
from payi_guard.meter.sse.decoder import SSEDecoder, SSEEvent
from payi_guard.meter.sse.usage import CHAT_KINDS, StreamUsageTracker

__all__ = ["StreamMeter", "without_usage_member"]

_HELD_LIMIT: Final = 256 * 1024
"""Bytes :class:`StreamMeter` forwards before reading them."""


class StreamMeter:
    """An :class:`SSEDecoder` and a :class:`StreamUsageTracker` used together.

    :meth:`feed` takes raw response bytes and returns the bytes to hand to the client:
    every event unchanged, minus what the guard's ``include_usage`` caused in a chat
    stream (the usage-only chunk, the ``"usage":null`` members). Reading the events is
    put off while nothing depends on it:

    - A stream whose bytes the guard never changes (``added_include_usage`` false, and
      every stream that is not chat) goes on as it comes; its bytes are read in bulk
      when the usage is asked for (:attr:`tracker`, :meth:`finish`) or past
      :data:`_HELD_LIMIT` bytes.
    - In a chat stream the guard asked usage of, the usual chunk (one whole ``data:``
      event, its only ``usage`` member a top-level ``null``) costs a few byte scans and
      the cut of that member; it is read with the rest. Anything else, and the bytes of
      an unfinished event, are read at once, after what was put off.

    Args:
        endpoint: the endpoint the stream came from.
        added_include_usage: whether the guard added ``stream_options.include_usage``.
    """

    def __init__(self, endpoint: Endpoint, *, added_include_usage: bool = False) -> None:
        self.decoder = SSEDecoder()
        self._tracker = StreamUsageTracker(endpoint, added_include_usage=added_include_usage)
        self._rewrites = added_include_usage and endpoint.kind in CHAT_KINDS
        self._quick = False
        """Whether the next chunk may take the byte-scan path of :meth:`feed` (a stream
        the guard rewrites, its decoder at a block boundary, model and id known)."""
        self._held: list[bytes] = []
        self._held_size = 0
        self._held_mixed = False
        """Whether a chunk in :attr:`_held` may be something other than a ``data: {`` event
        (``feed`` notes it as it holds a chunk, so :meth:`_read_held` need not look)."""

    @property
    def tracker(self) -> StreamUsageTracker:
        """What the stream reported so far (every byte fed so far read first)."""
        if self._held:
            self._read_held()
        return self._tracker

    def feed(self, chunk: bytes) -> bytes:
        """Take ``chunk``; return the bytes to forward.

        When the guard rewrites the stream, what is returned ends where an event ends
        (the bytes of an unfinished event wait for the rest of it).
        """
        if not self._rewrites:
            self._hold(chunk)
            return chunk
        if self._quick:
            # One whole one-line event, its only newlines the two that end it, is the
            # usual chunk. Inside a JSON string every quote is escaped, so a quoted name
            # found here is a key (or a whole string value). When the last
            # ',"usage":null' of a data event is followed only by scalar members (no
            # brackets, braces, escapes or further "usage") and the closing brace, that
            # member is the object's own: it is cut out of the bytes. An event without
            # a "usage" is kept as it is, unless a unicode escape could spell one.
            # Byte operations only (a regular expression costs more, once per chunk), and
            # find() rather than `in`, whose failed int conversion formats an error.
            head, cut, tail = chunk.rpartition(b',"usage":null')
            usual: bytes | None = None
            if cut:
                if (
                    tail[-3:] == b"}\n\n"
                    and head[:7] == b"data: {"  # a JSON object event (noted for _read_held)
                    and head.find(b"\n") < 0
                    and head.find(b"\r") < 0
                    and (
                        len(tail) == 3
                        or (
                            tail[0] == 44  # ","
                            # only the "}" and the two newlines are deleted
                            and len(tail.translate(None, _NOT_SCALAR)) == len(tail) - 3
                            and tail.find(b'"usage"') < 0
                        )
                    )
                ):
                    usual = head + tail
            elif (
                chunk[-2:] == b"\n\n"
                and chunk.find(b"\n") == len(chunk) - 2
                and chunk.find(b"\r") < 0
                and chunk.find(b'"usage"') < 0
                and chunk.find(b"\\u") < 0
            ):
                usual = chunk
                if chunk[:7] != b"data: {":
                    self._held_mixed = True
            if usual is not None:
                self._held.append(chunk)  # _hold() inlined: one frame less per chunk
                self._held_size += len(chunk)
                if self._held_size > _HELD_LIMIT:
                    self._read_held()
                return usual
        if self._held:
            self._read_held()
        forward = self._feed(chunk)
        tracker = self._tracker
        self._quick = (
            self.decoder.at_boundary
            and tracker.model is not None
            and tracker.response_id is not None
        )
        return forward

    def finish(self) -> bytes:
        """End the stream; return the remaining bytes to forward."""
        if self._held:
            self._read_held()
        if not self._rewrites:
            self._forward(self.decoder.finish())
            return b""  # already forwarded as they came
        return self._forward(self.decoder.finish())

    def _hold(self, chunk: bytes) -> None:
        self._held.append(chunk)
        self._held_size += len(chunk)
        if self._held_size > _HELD_LIMIT:
            self._read_held()

    def _read_held(self) -> None:
        """Read the bytes :meth:`feed` forwarded without reading them, in order."""
        held, self._held, self._held_size = self._held, [], 0
        mixed, self._held_mixed = self._held_mixed, False
        if not self._rewrites:
            self._feed(b"".join(held))  # forwarded already
            return
        # Whole one-line events, as they came: each "usage" member in them is the
        # top-level null the guard caused (what observe_data would do with it: nothing).
        # Those that can change nothing but the output counts (the checks of
        # StreamUsageTracker._only_counts) are read when the counts are; the others
        # (an end of a choice, an error, [DONE]) now, in order.
        tracker = self._tracker
        joined = b"".join(held)
        if (
            not mixed  # every one a "data: {" event
            and joined.find(b'"error"') < 0
            # A lone byte is found at memchr speed; "\u" is searched for slowly, "u"
            # being everywhere in JSON text, so only where there is a backslash.
            and (joined.find(b"\\") < 0 or joined.find(b"\\u") < 0)
        ):
            # All are JSON objects: find the few that end a choice, from the end.
            ends = joined.count(b'"finish_reason"') - joined.count(b'"finish_reason":null')
            ending: list[bytes] = []
            index = len(held)
            while ends > 0 and index > 0:
                index -= 1
                event = held[index]
                extra = event.count(b'"finish_reason"') - event.count(b'"finish_reason":null')
                if extra:
                    ends -= extra
                    ending.append(event)
                    del held[index]
            tracker.defer_events(held, len(joined))
            for event in reversed(ending):
                tracker.observe_data(event[6:-2].decode("utf-8", errors="replace"))
            return
        counts_only: list[bytes] = []
        for event in held:
            if (
                event.startswith(b"data: {")
                and event.find(b'"error"') < 0
                and event.find(b"\\u") < 0
                and event.count(b'"finish_reason"') == event.count(b'"finish_reason":null')
            ):
                counts_only.append(event)
            elif event.startswith(b"data:"):
                value = event[6:-2] if event[5:6] == b" " else event[5:-2]
                tracker.observe_data(value.decode("utf-8", errors="replace"))
        tracker.defer_events(counts_only, len(joined))

    def _feed(self, chunk: bytes) -> bytes:
        blocks = self.decoder.data_blocks(chunk)
        if blocks is None:
            return self._forward(self.decoder.feed(chunk))
        # Whole one-line data events (what providers send): no event objects, and the
        # chunk itself goes on when no event in it is dropped or changed.
        tracker = self._tracker
        if len(blocks) == 1:
            block = blocks[0]
            value = block[6:] if block[5:6] == b" " else block[5:]
            data = value.decode("utf-8", errors="replace")
            forward = tracker.observe_data(data)
            strip = tracker.strip_usage
            if forward and not strip:
                return chunk
            if not forward:
                return b""
            event = SSEEvent(raw=chunk, data=data, has_data=True)
            return without_usage_member(event, null=strip == "null")
        changed: list[bytes | None] | None = None
        for index, block in enumerate(blocks):
            value = block[6:] if block[5:6] == b" " else block[5:]
            data = value.decode("utf-8", errors="replace")
            forward = tracker.observe_data(data)
            strip = tracker.strip_usage
            if forward and not strip:
                if changed is not None:
                    changed.append(None)
                continue
            if changed is None:
                changed = [None] * index
            if not forward:
                changed.append(b"")
            else:
                event = SSEEvent(raw=block + b"\n\n", data=data, has_data=True)
                changed.append(without_usage_member(event, null=strip == "null"))
        if changed is None:
            return chunk
        return b"".join(
            block + b"\n\n" if out is None else out
            for block, out in zip(blocks, changed, strict=True)
        )

    def _forward(self, events: Iterable[SSEEvent]) -> bytes:
        tracker = self._tracker
        out: list[bytes] = []
        for event in events:
            if not tracker.observe(event):
                continue
            strip = tracker.strip_usage
            out.append(without_usage_member(event, null=strip == "null") if strip else event.raw)
        return b"".join(out)


_NOT_SCALAR: Final = b"{}[]\\\n\r"
"""Bytes :meth:`StreamMeter.feed` finds in no scalar member after a cut ``usage``."""

# What follows a top-level ``"usage":null`` to the end of a chunk's JSON: scalar members
# (no brackets, braces or escapes, even inside their strings) and the closing brace.
_TOP_LEVEL_TAIL: Final = re.compile(rb"(?:,[^{}\[\]\\]*)?\}")

# ``"usage": null`` as a member of an object, with the comma that joins it to the next
# (first member) or to the previous one. Inside a JSON string every quote is escaped,
# so a match is always a key; the caller checks that it is the only one.
_USAGE_NULL: Final = re.compile(
    rb',[ \t\r\n]*"usage"[ \t\r\n]*:[ \t\r\n]*null(?=[ \t\r\n]*[,}])'
    rb'|"usage"[ \t\r\n]*:[ \t\r\n]*null[ \t\r\n]*,'
)


def without_usage_member(event: SSEEvent, *, null: bool) -> bytes:
    """The bytes of a chat chunk event without the top-level ``usage`` member.

    The common case, a top-level ``"usage":null`` (``null``) that only scalar members
    follow, or the chunk's only ``"usage":null``, is cut out of the bytes as they are
    (no re-encoding). Anything else (a usage object, the key appearing more than
    once elsewhere) re-encodes the chunk's JSON without the member, keeping the event's
    other lines.

    Args:
        event: the chunk's event.
        null: whether the chunk's top-level ``usage`` is ``null``.
    """
    raw = event.raw
    if null:
        # The last "usage" key, when nothing but scalar members and the closing brace
        # follow it on the line, is the top-level one (StreamMeter.feed's cut).
        at = raw.rfind(b'"usage"')
        if (
            raw[at - 1 : at + 12] == b',"usage":null'
            and raw[-2:] == b"\n\n"
            and _TOP_LEVEL_TAIL.fullmatch(raw, at + 12, len(raw) - 2) is not None
        ):
            return raw[: at - 1] + raw[at + 12 :]
        if len(_USAGE_NULL.findall(raw)) == 1:
            return _USAGE_NULL.sub(b"", raw, count=1)
    try:
        obj = json.loads(event.data)
    except ValueError:
        return raw
    if not isinstance(obj, dict) or "usage" not in obj:
        return raw
    del obj["usage"]
    data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
    out: list[bytes] = []
    for line in raw.splitlines(keepends=True):
        if line.startswith(b"data:"):
            # The first data line becomes the re-encoded chunk, the others go.
            if data:
                out.append(data + line[len(line.rstrip(b"\r\n")) :])
                data = b""
            continue
        out.append(line)
    return b"".join(out)
