"""Helpers for the users-page tests: a budgets config, a real uvicorn server, headless
Chromium driven through its command line, and a PNG reader built on zlib and struct."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import zlib
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from web._support import serve_asgi

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
CHROMIUM = "/usr/bin/chromium"
TOKEN = "s3cret-admin-token-0123456789"
MODEL = "test-model"
"""Priced at $1 per million input tokens and $2 per million output tokens."""


def admin_config(**overrides: Any) -> dict[str, Any]:
    """Budgets with every kind of limit the page shows.

    Users: a $1.00 daily limit (warning at 80%), a $5.00 weekly soft limit and 100k
    tokens per hour; org ``acme``: $100 a month; everyone: $1000 a month; anonymous:
    $0.10 a day; ``project`` is a $50 monthly limit for ``limit_ids``.
    """
    base: dict[str, Any] = {
        "version": 1,
        "prices": {MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
        "limits": {
            "daily": {"max": 1.00, "per": "day", "warn_at": 0.8},
            "soft": {"max": 5.00, "per": "week", "type": "allow"},
            "tph": {"tokens": 100_000, "per": "hour"},
            "project": {"max": 50.00, "per": "month"},
        },
        "default": ["daily", "soft", "tph"],
        "orgs": {"acme": [{"max": 100.00, "per": "month"}]},
        "global": [{"max": 1000.00, "per": "month"}],
        "anonymous": {"strategy": "shared", "limits": [{"max": 0.10, "per": "day"}]},
    }
    base.update(overrides)
    return base


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


serve = serve_asgi
"""Serve an ASGI app with uvicorn on a free loopback port (shared with the web tests)."""


def chromium() -> str:
    """The Chromium executable; skips without one, fails without one under CI=true."""
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        if IN_CI:
            pytest.fail(f"CI=true needs Chromium at {CHROMIUM}")
        pytest.skip(f"Chromium is not installed at {CHROMIUM}")
    return path


def run_chromium(
    url: str, profile: Path, *extra: str, size: tuple[int, int] = (1280, 900), timeout: float = 60
) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium once on ``url``; the whole process group dies afterwards."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-color-profile=srgb",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
        "--virtual-time-budget=5000",
        *extra,
        url,
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
        else:
            # Chromium leaves helper processes (zygote, crashpad) behind at times.
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@dataclass(frozen=True)
class Png:
    """A decoded 8-bit RGB(A) PNG: its size and its pixels as RGB triples, row by row."""

    width: int
    height: int
    pixels: list[tuple[int, int, int]]

    def colours(self) -> Counter[tuple[int, int, int]]:
        return Counter(self.pixels)

    def count_near(self, colour: tuple[int, int, int], tolerance: int = 6) -> int:
        """How many pixels are within ``tolerance`` of ``colour`` on every channel."""
        return sum(
            n
            for c, n in self.colours().items()
            if all(abs(a - b) <= tolerance for a, b in zip(c, colour, strict=True))
        )


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def read_png(data: bytes) -> Png:
    """Decode a non-interlaced 8-bit RGB or RGBA PNG (what Chromium writes)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG file")
    offset = 8
    idat = bytearray()
    header: tuple[int, ...] | None = None
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        chunk = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        if zlib.crc32(kind + chunk) != crc:
            raise ValueError(f"bad CRC in chunk {kind!r}")
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        elif kind == b"IEND":
            break
        offset += 12 + length
    if header is None:
        raise ValueError("no IHDR chunk")
    width, height, depth, colour_type, _, _, interlace = header
    if depth != 8 or colour_type not in (2, 6) or interlace != 0:
        raise ValueError(f"unsupported PNG format {header}")
    channels = 3 if colour_type == 2 else 4
    stride = width * channels
    raw = zlib.decompress(bytes(idat))
    if len(raw) != height * (stride + 1):
        raise ValueError("truncated image data")
    previous = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    for row in range(height):
        start = row * (stride + 1)
        filter_type = raw[start]
        line = bytearray(raw[start + 1 : start + 1 + stride])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            corner = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + (left + up) // 2) & 0xFF
            elif filter_type == 4:
                line[i] = (line[i] + _paeth(left, up, corner)) & 0xFF
            elif filter_type != 0:
                raise ValueError(f"unknown PNG filter {filter_type}")
        pixels.extend((line[i], line[i + 1], line[i + 2]) for i in range(0, stride, channels))
        previous = line
    return Png(width, height, pixels)
