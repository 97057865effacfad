"""`payi-guard demo` runs end to end in a subprocess, offline, and exits 0.

It is run as users see it: written to a pipe (plain lines) and on a pseudo-terminal
(the live table redrawn in place), at 80 columns and wider; every line must fit.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import unicodedata
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
REDRAW = re.compile(r"\x1b\[(\d+)F\x1b\[J")
COLOUR = re.compile(r"\x1b\[[0-9;]*m")


def visible_width(line: str) -> int:
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in line
    )


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env.update(extra)
    return env


def test_demo_runs_end_to_end_in_plain_lines_at_80_columns(tmp_path: Path) -> None:
    logs = tmp_path / "demo.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "payi_guard", "demo", "--json-logs", str(logs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=demo_env(COLUMNS="80"),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    # Not a terminal: no cursor movement, no colour, only plain lines.
    assert "\x1b" not in out
    for line in out.splitlines():
        assert visible_width(line) <= 80, line
    # The live table, a warning, a 429 block, the users page, then the report.
    assert "daily budget" in out
    assert "WARN " in out
    assert "429 " in out
    assert " blocked" in out
    assert "Report from the JSON logs" in out
    assert "user_id" in out
    assert "TOTAL" in out
    page = re.search(r"users page: (http://127\.0\.0\.1:\d+/guard/)", out)
    assert page is not None, out
    assert "token=" not in out  # the sign-in token never travels in a URL
    # The line wraps where the port numbers put it: any white space between the words.
    assert re.search(r"sign\s+in\s+with\s+the\s+token\s+\S{20,}", out)

    events = [json.loads(line, parse_float=Decimal) for line in logs.read_text().splitlines()]
    calls = [e for e in events if e["event"] == "genai_call"]
    assert calls
    assert {e["user_id"] for e in calls} >= {"acme:alice", "globex:carol"}
    assert any(e["stream"] for e in calls)
    assert any(e["event"] == "budget_exceeded" for e in events)
    assert any(e["event"] == "budget_warning" for e in events)
    total = sum((e["cost_usd"] for e in calls), Decimal(0))
    # The report's total equals the exact sum of the logged costs.
    assert f"${total}" in out or f"${total:.6f}" in out


def run_on_a_terminal(columns: int, rows: int = 40) -> tuple[int, str]:
    """Run the demo with its stdout on a pseudo-terminal of ``columns`` x ``rows``."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-m", "payi_guard", "demo"],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=demo_env(TERM="xterm"),
    )
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        reader.join(timeout=30)
        os.close(master)
    assert process.returncode == 0, err.decode(errors="replace")
    # The terminal turns "\n" into "\r\n".
    return process.returncode, b"".join(chunks).decode("utf-8").replace("\r\n", "\n")


def check_frames(output: str, columns: int) -> list[list[str]]:
    """Split the live part into frames and check each is redrawn exactly over the last.

    Each redraw moves the cursor up by the number of lines the previous frame took; it
    only lands on the frame's first line if no line wrapped, so every frame line must be
    narrower than the terminal.
    """
    parts = REDRAW.split(output)
    # parts: before, n1, frame1, n2, frame2, ... ; the first frame follows "before".
    before, rest = parts[0], parts[1:]
    counts = [int(n) for n in rest[0::2]]
    frames_text = rest[1::2]
    assert len(counts) >= 3, "the live table was not redrawn"
    # The first frame is the end of what came before the first redraw (after the intro);
    # every later frame is checked against the count of the redraw that replaces it.
    first = "\n".join(before.split("\n")[-counts[0] - 1 :])
    assert first.lstrip("\n").startswith("user"), before
    frames = [first.lstrip("\n"), *frames_text]
    seen: list[list[str]] = []
    for index, count in enumerate(counts):
        frame = frames[index]
        lines = frame.split("\n")
        assert lines[-1] == "", "a frame ends with a newline"
        lines = lines[:-1]
        assert len(lines) == count, (index, count, lines)
        seen.append(lines)
    for lines in seen:
        for line in lines:
            plain = COLOUR.sub("", line)
            assert "\x1b" not in plain, repr(line)  # only colours inside a frame
            assert visible_width(plain) < columns, (columns, plain)
    return seen


def test_on_an_80_column_terminal_the_table_is_redrawn_in_place() -> None:
    _, output = run_on_a_terminal(80)
    frames = check_frames(output, 80)
    assert frames[-1][0].split()[:4] == ["user", "tier", "calls", "429s"]
    assert "\x1b[31m" in output  # red, for a refused user
    after = REDRAW.split(output)[-1]
    for line in after.split("\n"):
        assert "\x1b" not in COLOUR.sub("", line)
        assert visible_width(COLOUR.sub("", line)) <= 80, line
    assert "Report from the JSON logs" in after
    assert "users page: http://127.0.0.1:" in output
    # The last frame is drawn once every call has ended: its calls and 429s per user are
    # the report's (a frame drawn while calls were under way counted what they held).
    table, report = COLOUR.sub("", after).split("Report from the JSON logs")
    framed = {
        words[0]: (words[2], words[3])
        for words in (line.split() for line in table.split("\n")[1:])
        if len(words) > 4 and words[2].isdigit()
    }
    reported = {
        words[0]: (words[1], words[4])
        for words in (line.split() for line in report.split("\n"))
        if len(words) == 8 and words[1].isdigit() and words[0] != "TOTAL"
    }
    assert len(framed) == 6
    assert framed == reported


def test_on_a_wider_terminal_the_table_uses_the_room() -> None:
    _, output = run_on_a_terminal(140)
    frames = check_frames(output, 140)
    widest = max(visible_width(COLOUR.sub("", line)) for line in frames[-1])
    assert 80 < widest < 140
    # The report shows every column at this width.
    report = output.split("Report from the JSON logs")[-1]
    assert " p50 " in report
    assert "left out" not in report


# ``payi-guard demo --quiet --serve`` with Ctrl+C's default meaning, as from a terminal.
# A shell without job control starts a background command with SIGINT ignored (so may
# whatever runs this suite), and Python keeps an ignored SIGINT ignored.
SERVE_DEMO = [
    sys.executable,
    "-c",
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('payi_guard', run_name='__main__', alter_sys=True)",
    "demo",
    "--quiet",
    "--serve",
]


@contextlib.contextmanager
def served_demo() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Run :data:`SERVE_DEMO` until it says its pages stay up; yield it and its output.

    Killed on the way out if it still runs.
    """
    process = subprocess.Popen(
        SERVE_DEMO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A demo still running long after Ctrl+C is killed with SIGABRT: the fault
        # handler then writes every thread's stack to stderr, for the failure message.
        env=demo_env(COLUMNS="80", PYTHONFAULTHANDLER="1"),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    lines: list[str] = []
    try:
        for line in process.stdout:  # ends when the demo exits, or at the marker
            lines.append(line)
            if "Ctrl+C stops them" in line:
                break
        yield process, "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()
        process.stderr.close()


def exit_after_ctrl_c(process: subprocess.Popen[str]) -> int:
    """The demo's exit code, once the SIGINT just sent stopped it (60 s at most)."""
    try:
        return process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stderr = process.communicate(timeout=30)
        raise AssertionError(
            f"the demo still ran 60 s after Ctrl+C; its threads:\n{stderr[-8000:]}"
        ) from None


def test_serve_keeps_the_users_page_up_until_interrupted() -> None:
    with served_demo() as (process, output):
        text = " ".join(output.split())
        found = re.search(r"stay up: (http://127\.0\.0\.1:\d+/guard/) \(token (\S+)\)", text)
        assert found is not None, output
        url, token = found.groups()
        assert "token=" not in text
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.get("").status_code == 401
            signed = client.post("", data={"token": token}, headers={"origin": url[:-7]})
            assert signed.status_code == 303
            users = client.get("api/users").json()["users"]
        assert {"acme:alice", "globex:carol"} <= {u["user_id"] for u in users}
        process.send_signal(signal.SIGINT)
        assert exit_after_ctrl_c(process) == 0


# tgkill(2): a signal to one thread of a process (kill(2) lets the kernel pick the thread).
TGKILL = {"x86_64": 234, "aarch64": 131}.get(os.uname().machine)


@pytest.mark.skipif(
    sys.platform != "linux" or TGKILL is None, reason="tgkill: Linux on x86_64 or aarch64"
)
def test_serve_stops_on_a_ctrl_c_taken_by_any_thread() -> None:
    """The kernel may hand a process's SIGINT to any of its threads, not only the main one.

    Python then raises ``KeyboardInterrupt`` in the main thread only when that thread
    next runs Python code: a main thread blocked in one long wait would never see it.
    """
    with served_demo() as (process, output):
        assert "Ctrl+C stops them" in output, output
        threads = sorted(int(t) for t in os.listdir(f"/proc/{process.pid}/task"))
        others = [tid for tid in threads if tid != process.pid]
        assert others, threads  # the app's server and the fake provider run in threads
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.syscall(TGKILL, process.pid, others[0], signal.SIGINT) == 0
        assert exit_after_ctrl_c(process) == 0
