"""The AWS event-stream framing (``application/vnd.amazon.eventstream``), decoded incrementally.

Bedrock's ``converse-stream`` and ``invoke-with-response-stream`` bodies are a sequence
of binary messages::

    total length (4) | headers length (4) | prelude CRC32 (4) | headers | payload | CRC32 (4)

with big-endian lengths and typed headers (``:event-type``, ``:message-type``,
``:content-type``...). :class:`EventStreamDecoder` takes bytes split anywhere and
returns each whole message once it arrived. It only reads: the caller hands the same
bytes on unchanged, so a message this decoder cannot make sense of (a bad checksum, a
length no message can have) stops the decoding (:attr:`EventStreamDecoder.broken`),
never the stream.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from typing import Final

__all__ = ["EventMessage", "EventStreamDecoder", "EventStreamError"]

_PRELUDE: Final = 12
_MIN_MESSAGE: Final = _PRELUDE + 4
MAX_MESSAGE: Final = 16 * 1024 * 1024
"""The longest message accepted (AWS caps event-stream messages at 16 MiB)."""


class EventStreamError(ValueError):
    """Bytes that are not an AWS event stream."""


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One decoded message.

    Attributes:
        headers: the headers (strings, integers, booleans, bytes).
        payload: the payload bytes.
    """

    headers: dict[str, object]
    payload: bytes

    @property
    def event_type(self) -> str | None:
        """The ``:event-type`` header (``chunk``, ``metadata``, ``messageStop``...)."""
        value = self.headers.get(":event-type")
        return value if isinstance(value, str) else None

    @property
    def message_type(self) -> str | None:
        """The ``:message-type`` header: ``event``, ``exception`` or ``error``."""
        value = self.headers.get(":message-type")
        return value if isinstance(value, str) else None

    @property
    def exception_type(self) -> str | None:
        """The ``:exception-type`` (or ``:error-code``) of an exception message."""
        value = self.headers.get(":exception-type") or self.headers.get(":error-code")
        return value if isinstance(value, str) else None


_FIXED: Final = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}


def _headers(data: bytes) -> dict[str, object]:
    headers: dict[str, object] = {}
    pos = 0
    end = len(data)
    while pos < end:
        size = data[pos]
        name = data[pos + 1 : pos + 1 + size].decode("utf-8", "replace")
        pos += 1 + size
        if pos >= end:
            raise EventStreamError("a header has no type")
        kind = data[pos]
        pos += 1
        value: object
        if kind in (0, 1):
            value = kind == 0
        elif kind in _FIXED:
            fmt = _FIXED[kind]
            width = struct.calcsize(fmt)
            (value,) = struct.unpack_from(fmt, data, pos)
            pos += width
        elif kind in (6, 7):
            (length,) = struct.unpack_from(">H", data, pos)
            raw = data[pos + 2 : pos + 2 + length]
            value = raw.decode("utf-8", "replace") if kind == 7 else raw
            pos += 2 + length
        elif kind == 9:
            value = data[pos : pos + 16]
            pos += 16
        else:
            raise EventStreamError(f"unknown header type {kind}")
        if pos > end:
            raise EventStreamError("a header runs past the headers")
        headers[name] = value
    return headers


class EventStreamDecoder:
    """Splits an AWS event stream into messages, whatever the chunk boundaries."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken: str | None = None
        """Why decoding stopped, once the bytes stopped making sense."""

    def feed(self, chunk: bytes) -> list[EventMessage]:
        """Add bytes; return the messages they complete, in order."""
        if self.broken is not None or not chunk:
            return []
        self._buf += chunk
        messages: list[EventMessage] = []
        try:
            while True:
                message = self._next()
                if message is None:
                    break
                messages.append(message)
        except (EventStreamError, struct.error, IndexError) as exc:
            self.broken = str(exc) or type(exc).__name__
            self._buf = bytearray()
        return messages

    def _next(self) -> EventMessage | None:
        buf = self._buf
        if len(buf) < _PRELUDE:
            return None
        total, headers_len, prelude_crc = struct.unpack_from(">III", buf, 0)
        if zlib.crc32(bytes(buf[:8])) != prelude_crc:
            raise EventStreamError("prelude checksum mismatch")
        if not _MIN_MESSAGE <= total <= MAX_MESSAGE or headers_len > total - _MIN_MESSAGE:
            raise EventStreamError(f"impossible message length {total}")
        if len(buf) < total:
            return None
        frame = bytes(buf[:total])
        del buf[:total]
        (message_crc,) = struct.unpack_from(">I", frame, total - 4)
        if zlib.crc32(frame[:-4]) != message_crc:
            raise EventStreamError("message checksum mismatch")
        headers = _headers(frame[_PRELUDE : _PRELUDE + headers_len])
        return EventMessage(headers, frame[_PRELUDE + headers_len : total - 4])

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole message yet."""
        return len(self._buf)
