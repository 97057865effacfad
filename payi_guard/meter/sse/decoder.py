"""Server-sent event streams decoded event by event, each event's raw bytes kept."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["SSEDecoder", "SSEEvent"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    r"""One block of a server-sent event stream, with the exact bytes it came from.

    A block ends at a blank line. Blocks that dispatch nothing (a ``: ping`` comment, a
    stray blank line) are events too, with ``has_data`` false, so that writing every
    kept event's ``raw`` reproduces the stream byte for byte.

    Attributes:
        raw: the block's bytes, line terminators and the ending blank line included.
        event: the ``event:`` field, or ``None``.
        data: the ``data:`` lines joined with ``\n``.
        id: the last event id seen so far in the stream (it persists, per the spec).
        retry: the ``retry:`` field, if any.
        has_data: whether the block had at least one ``data:`` line (only those are
            dispatched to a client).
        complete: false only for the trailing bytes of a stream that ended without a
            blank line (returned by :meth:`SSEDecoder.finish`).
    """

    raw: bytes
    event: str | None = None
    data: str = ""
    id: str | None = None
    retry: int | None = None
    has_data: bool = False
    complete: bool = True

    def json(self) -> Any:
        """Parse ``data`` as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.data)


_LINE_END = re.compile(rb"[\r\n]")
_BOM: Final = "\ufeff"


class SSEDecoder:
    r"""An incremental server-sent events parser that keeps each event's raw bytes.

    Feed it bytes split anywhere (inside a UTF-8 sequence, between ``\r`` and ``\n``):
    the events are the same whatever the split. Lines end at ``\r\n``, ``\n`` or
    ``\r`` (WHATWG SSE). A chunk that ends in ``\r`` keeps that line open until the
    next byte shows whether a ``\n`` follows; this only delays streams that use bare
    ``\r`` line ends. Bytes are held only until their block ends.

    Example::

        decoder = SSEDecoder()
        for chunk in response.iter_raw():
            for event in decoder.feed(chunk):
                out.write(event.raw)
        for event in decoder.finish():
            out.write(event.raw)
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # bytes of _buf before this offset are parsed lines of the block
        self._first_line = True
        self._last_id: str | None = None
        self._event: str | None = None
        self._data: list[str] = []
        self._retry: int | None = None

    def _reset_stream(self) -> None:
        self._buf = bytearray()
        self._scan = 0
        self._first_line = True
        self._last_id = None
        self._reset_block()

    def _reset_block(self) -> None:
        self._event = None
        self._data = []
        self._retry = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned in an event."""
        return len(self._buf)

    @property
    def at_boundary(self) -> bool:
        """Whether the next byte starts a new block of a stream already under way.

        Nothing is held and the first line (which may start with a byte order mark)
        has been read.
        """
        return not self._buf and not self._first_line

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Add bytes and return the events they complete, in order."""
        if not chunk:
            return []
        self._buf += chunk
        return self._drain(final=False)

    def data_blocks(self, chunk: bytes) -> list[bytes] | None:
        r"""Split ``chunk`` when it is whole one-line ``data:`` events; else ``None``.

        The fast path for the shape providers send: the decoder holds nothing and
        ``chunk`` is one or more ``data: ...\n\n`` blocks with ``\n`` line ends. Each
        block comes back without its ending blank line; its event is what :meth:`feed`
        would give (no ``event``, ``id`` or ``retry`` field, ``data`` the line's value).
        ``None`` leaves the decoder as it was: :meth:`feed` the chunk instead.
        """
        # find() rather than `in` (bytes' `in` first tries the needle as an int, and
        # formats the error it then drops): this runs on every chunk read at once.
        if self._buf or not chunk.endswith(b"\n\n") or chunk.find(b"\r") >= 0:
            return None
        if self._first_line and chunk.startswith(b"\xef\xbb\xbf"):
            return None
        if chunk.find(b"\n") == len(chunk) - 2:
            # One block (the usual chunk): its only line ends right before the blank one.
            if not chunk.startswith(b"data:"):
                return None
            self._first_line = False
            return [chunk[:-2]]
        blocks = chunk.split(b"\n\n")
        if blocks.pop():
            return None
        for block in blocks:
            if not block.startswith(b"data:") or block.find(b"\n") >= 0:
                return None
        self._first_line = False
        return blocks

    def finish(self) -> list[SSEEvent]:
        """End the stream: return the last events, then reset the decoder.

        Trailing bytes that no blank line ended come back as one event with
        ``complete=False`` (a client does not dispatch it, but its bytes still belong to
        the stream).
        """
        events = self._drain(final=True)
        if self._buf:
            if self._scan < len(self._buf):
                self._parse_line(bytes(self._buf[self._scan :]))
            events.append(self._make_event(bytes(self._buf), complete=False))
        self._reset_stream()
        return events

    def _drain(self, *, final: bool) -> list[SSEEvent]:
        buf = self._buf
        events: list[SSEEvent] = []
        start = 0  # where the current block begins
        scan = self._scan
        while True:
            match = _LINE_END.search(buf, scan)
            if match is None:
                break
            end = match.start()
            width = 1
            if buf[end] == 0x0D:
                if end + 1 < len(buf):
                    width = 2 if buf[end + 1] == 0x0A else 1
                elif not final:
                    break  # a "\n" may follow in the next chunk: decide then
            line = bytes(buf[scan:end])
            scan = end + width
            if self._parse_line(line):
                events.append(self._make_event(bytes(buf[start:scan]), complete=True))
                start = scan
        if start:
            del buf[:start]
        self._scan = scan - start
        return events

    def _parse_line(self, raw_line: bytes) -> bool:
        """Apply one line to the current block; True when it is the blank line ending it."""
        line = raw_line.decode("utf-8", errors="replace")
        if self._first_line:
            self._first_line = False
            if line.startswith(_BOM):
                line = line[1:]
        if not line:
            return True
        if line.startswith(":"):
            return False
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return False

    def _make_event(self, raw: bytes, *, complete: bool) -> SSEEvent:
        event = SSEEvent(
            raw=raw,
            event=self._event or None,
            data="\n".join(self._data),
            id=self._last_id,
            retry=self._retry,
            has_data=bool(self._data),
            complete=complete,
        )
        self._reset_block()
        return event
