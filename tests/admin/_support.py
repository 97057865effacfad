"""Helpers for the users-page tests: a budgets config, a real uvicorn server, headless
Chromium driven through its command line or through the DevTools protocol on a pipe,
and a PNG reader built on zlib and struct."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
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


# What the DevTools protocol answers when a navigation ends the page an evaluation ran in.
_NAVIGATED = (
    "Inspected target navigated or closed",
    "Execution context was destroyed",
    "Cannot find default execution context",
)


class Browser:
    """Headless Chromium driven over the DevTools protocol, on a pipe (no extra package).

    Chromium reads protocol commands from its fd 3 and writes replies and events to its
    fd 4, each message a JSON text ended by a NUL byte. One page (tab) is opened; every
    command waits for its reply, so the tests read as a sequence of user actions.

    Args:
        profile: a fresh profile folder.
        width: the viewport width in CSS pixels.
        height: the viewport height in CSS pixels.
        mobile: emulate a phone (``<meta name=viewport>`` applies, touch screen).
    """

    def __init__(
        self, profile: Path, *, width: int = 1280, height: int = 900, mobile: bool = False
    ) -> None:
        commands_r, self._commands = os.pipe()
        self._replies, replies_w = os.pipe()
        arguments = [
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
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "about:blank",
        ]
        # A fresh Python puts the pipe ends on fds 3 and 4, then becomes Chromium (no
        # preexec_fn: that is unsafe while the test's server threads run).
        wiring = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
            "os.execv(sys.argv[3], sys.argv[3:])"
        )
        command = [sys.executable, "-c", wiring, str(commands_r), str(replies_w)]
        self._process = subprocess.Popen(
            [*command, chromium(), *arguments],
            pass_fds=(commands_r, replies_w),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(commands_r)
        os.close(replies_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session: str | None = self._call(
            "Target.attachToTarget", {"targetId": target, "flatten": True}
        )["sessionId"]
        self.command("Page.enable")
        self.command("Runtime.enable")
        self.command(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile},
        )
        if mobile:
            self.command("Emulation.setTouchEmulationEnabled", {"enabled": True})

    def _read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._replies], [], [], deadline - time.monotonic())
            if not ready:
                raise TimeoutError("Chromium did not answer")
            chunk = os.read(self._replies, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the protocol pipe")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def _call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None
    ) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read(60)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self._events.append(reply)

    def command(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one protocol command to the page and return its result."""
        return self._call(method, params, session=self._session)

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.command(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30.0) -> Any:
        """Evaluate ``expression`` until it is truthy; return its value.

        An evaluation that a navigation cut short (the page it ran in went away) counts
        as "not yet": the expression is evaluated again in the next page.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:
                if not any(cut in str(exc) for cut in _NAVIGATED):
                    raise
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"never true: {expression}")
            time.sleep(0.05)

    def wait_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait for the next protocol event ``method`` (``Page.loadEventFired``)."""
        deadline = time.monotonic() + timeout
        while True:
            for index, event in enumerate(self._events):
                if event["method"] == method:
                    del self._events[: index + 1]
                    return event
            self._events.clear()
            message = self._read(max(0.0, deadline - time.monotonic()))
            if "method" in message:
                self._events.append(message)

    def open(self, url: str) -> None:
        """Navigate to ``url`` and wait until the new document has loaded."""
        self._events.clear()
        self.command("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def submit(self, script: str) -> None:
        """Run ``script`` (which submits a form or follows a link); wait for the next page."""
        self._events.clear()
        self.evaluate(script)
        self.wait_event("Page.loadEventFired")

    def screenshot(self, path: Path) -> None:
        """Save the viewport as a PNG."""
        data = self.command("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        """Close Chromium and every process it started."""
        try:
            self._call("Browser.close")
            self._process.wait(timeout=20)
        except Exception:  # killed below either way
            pass
        finally:
            with suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()
            os.close(self._commands)
            os.close(self._replies)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
