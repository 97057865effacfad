"""Reading logs: files (gzip or not, stdin), bounded lines, timestamps and field values.

Nothing here aggregates: :func:`read_logs` feeds lines to a sink (a
:class:`~payi_guard.report.aggregate.ReportBuilder`), and the field helpers turn a line's
values into keys, token counts, costs and instants.
"""

from __future__ import annotations

import gzip
import io
import json
import re
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import IO, BinaryIO, Protocol, cast

from payi_guard.money import DECIMAL_TEXT

__all__ = [
    "MAX_LINE_BYTES",
    "MAX_TOKENS",
    "LineSink",
    "UnreadableLog",
    "as_change",
    "as_cost",
    "as_key",
    "as_tokens",
    "decode_json",
    "line_time",
    "log_lines",
    "open_log",
    "parse_time_bound",
    "read_logs",
]

MAX_LINE_BYTES = 1 << 20
"""Longer lines are skipped without being held in memory whole."""

MAX_TOKENS = 10**15
"""The largest token count a line may carry; a line with more is skipped."""

_ZERO = Decimal(0)
_MAX_COST = Decimal(1_000_000_000)
_NANO_STEP = Decimal("1e-9")
"""The money unit: payi_guard writes costs in whole nano-dollars."""

decode_json = json.JSONDecoder(parse_float=Decimal).decode
"""Decode a JSON document with every non-integer number as an exact :class:`~decimal.Decimal`."""


class LineSink(Protocol):
    """Where :func:`read_logs` puts the lines it reads."""

    def feed(self, lines: Iterable[bytes]) -> None:
        """Read log lines."""

    def skip_line(self) -> None:
        """Count a line that could not be read at all (too long)."""


_RELATIVE = re.compile(r"([0-9]+)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?)?",
    re.IGNORECASE | re.ASCII,
)


def _parse_iso(text: str) -> datetime | None:
    """Parse an ISO 8601 date or datetime; a value without an offset is UTC."""
    value = text.strip()
    if not value.isascii():
        return None
    if value[-1:] in ("Z", "z"):
        value = value[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        # Python 3.10's fromisoformat knows only 3 or 6 fraction digits and "+HH:MM".
        parsed_or_none = _parse_iso_slow(text.strip())
        if parsed_or_none is None:
            return None
        parsed = parsed_or_none
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=timezone.utc)
    return parsed


def _parse_iso_slow(text: str) -> datetime | None:
    match = _ISO.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    tz = timezone.utc
    if offset and offset.upper() != "Z":
        sign = -1 if offset[0] == "-" else 1
        digits = offset[1:].replace(":", "")
        minutes = int(digits[:2]) * 60 + (int(digits[2:4]) if len(digits) > 2 else 0)
        tz = timezone(sign * timedelta(minutes=minutes))
    try:
        return datetime(
            int(year),
            int(month),
            int(day),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            int((fraction or "0")[:6].ljust(6, "0")),
            tzinfo=tz,
        )
    except ValueError:
        return None


def parse_time_bound(text: str) -> datetime | timedelta:
    """Parse a ``--since`` / ``--until`` value.

    Args:
        text: an ISO 8601 date (``2026-11-27``, midnight UTC), datetime
            (``2026-11-27T12:00:00Z``; UTC when it has no offset), or an age: a count and
            one of ``s``, ``m``, ``h``, ``d``, ``w`` (``24h``, ``7d``).

    Returns:
        An aware ``datetime``, or the ``timedelta`` to subtract from now for an age.

    Raises:
        ValueError: if the value is neither.
    """
    stripped = text.strip()
    relative = _RELATIVE.fullmatch(stripped)
    if relative is not None:
        try:
            return timedelta(seconds=int(relative.group(1)) * _UNIT_SECONDS[relative.group(2)])
        except OverflowError:  # past 999,999,999 days
            raise ValueError(f"{text!r} is too long an age for a date") from None
    parsed = _parse_iso(stripped) if stripped else None
    if parsed is None:
        raise ValueError(
            f"{text!r} is not a time: use an ISO 8601 date or datetime "
            "(2026-11-27, 2026-11-27T12:00:00Z) or an age such as 30m, 24h, 7d, 2w"
        )
    return parsed


def line_time(value: object) -> datetime | None:
    """The instant of a line's ``timestamp`` (ISO 8601 string or epoch seconds)."""
    if isinstance(value, str):
        return _parse_iso(value) if value else None
    if isinstance(value, (int, Decimal)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(float(value), tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    return None


def as_key(value: object) -> str | None:
    """A group key from a field: a string as it is, an integer as text, else ``None``."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def as_tokens(value: object) -> int | None:
    """A token count from a field: a whole number from 0 to MAX_TOKENS.

    A missing field (``None``) is 0; anything else (negative, fractional, huge, text,
    a boolean) is ``None``: the line is not to be trusted.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, Decimal):
        if not value.is_finite() or not 0 <= value <= MAX_TOKENS or value != value.to_integral():
            return None
        return int(value)
    if isinstance(value, int) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def as_cost(value: object) -> Decimal | None:
    """The cost of a line, or None when it is unusable.

    Usable: a number (or numeric text) from 0 to $1,000,000,000 in whole nano-dollars,
    the unit every amount payi_guard logs is in.
    """
    if value is None:
        return _ZERO
    if isinstance(value, Decimal):
        cost = value
    elif isinstance(value, int) and not isinstance(value, bool):
        cost = Decimal(value)
    elif isinstance(value, str):
        text = value.strip()
        if not DECIMAL_TEXT.match(text):
            return None
        try:
            cost = Decimal(text)
        except InvalidOperation:
            return None
    else:
        return None
    if not cost.is_finite() or cost < 0 or cost > _MAX_COST:
        return None
    exponent = cost.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -9 and cost.quantize(_NANO_STEP) != cost:
        # Finer than a nano-dollar: not an amount payi_guard writes (and one such
        # value, 1e-200, would make every later exact sum too long to keep).
        return None
    return cost


def as_change(value: object) -> Decimal | None:
    """An amount that may be negative (an operator's adjustment), or None when unusable.

    The rules of :func:`as_cost` apply to its magnitude.
    """
    negative = False
    if isinstance(value, str):
        text = value.strip()
        negative = text.startswith("-")
        value = text[1:] if negative else text
    elif isinstance(value, (Decimal, int)) and not isinstance(value, bool) and value < 0:
        negative, value = True, -value
    amount = as_cost(value)
    if amount is None:
        return None
    return -amount if negative else amount


def open_log(path: str, stdin: BinaryIO | None) -> IO[bytes]:
    """Open a log (``-`` is stdin), decompressing gzip whatever the file name."""
    if path == "-":
        stream: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
    else:
        stream = open(path, "rb")  # noqa: SIM115 - the caller closes it
    peek = getattr(stream, "peek", None)
    if peek is None:
        stream = io.BufferedReader(cast(io.RawIOBase, stream))
        peek = cast(io.BufferedReader, stream).peek
    if peek(2)[:2] == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=stream, mode="rb"))
    return stream


def log_lines(stream: IO[bytes], builder: LineSink) -> Iterator[bytes]:
    """The lines of a stream, never holding more than MAX_LINE_BYTES of one line."""
    readline = stream.readline
    while True:
        line = readline(MAX_LINE_BYTES)
        if not line:
            return
        if len(line) == MAX_LINE_BYTES and not line.endswith(b"\n"):
            while True:
                rest = readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
            builder.skip_line()
            continue
        yield line


class UnreadableLog(Exception):
    """A log that cannot be opened, read or decompressed; the message says which and why.

    Args:
        message: what failed.
        partial: the lines before the failure were read (a compressed log cut short or
            corrupt part way): a report of them can still be given.
    """

    def __init__(self, message: str, *, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


def read_logs(paths: Sequence[str], builder: LineSink, stdin: BinaryIO | None = None) -> None:
    """Feed every line of the logs at ``paths`` to ``builder``, in order.

    Every path is checked to be readable before any line is read, so a typo fails fast.

    Args:
        paths: log files (gzip is detected whatever the name), or ``-`` for stdin.
        builder: where the lines go.
        stdin: the binary stream ``-`` reads (default: ``sys.stdin.buffer``).

    Raises:
        UnreadableLog: a file cannot be opened, read or decompressed.
    """
    for path in paths:
        if path != "-":
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                raise UnreadableLog(f"cannot read {path!r}: {exc.strerror or exc}") from None
    for path in paths:
        try:
            stream = open_log(path, stdin)
            try:
                builder.feed(log_lines(stream, builder))
            finally:
                if path != "-":
                    stream.close()
        except (OSError, EOFError, zlib.error) as exc:
            name = "stdin" if path == "-" else repr(path)
            reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
            if isinstance(exc, (EOFError, zlib.error, gzip.BadGzipFile)):
                reason = f"its compressed data is cut short or corrupt ({reason})"
            raise UnreadableLog(f"cannot read {name}: {reason}", partial=True) from None
