"""Serve the example Django site for real: gunicorn (WSGI) and uvicorn (ASGI) processes.

Each server gets a listening socket the test process opened (so no port race and no
start-up sleep: the first request waits in the socket's backlog until the server is
ready), the example's settings as :mod:`chatsite_testing` adjusts them, and its own copy
of a migrated SQLite database. Its JSON log lines (``configure_json`` on stdout) are
collected so tests read what a user of the site would read.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "examples" / "django_app"
HERE = Path(__file__).resolve().parent

READY_TIMEOUT = 120.0
"""Seconds a server may take to answer its first request on a loaded machine."""

EVENT_TIMEOUT = 60.0
"""Seconds to wait for a log line the server is about to write."""


def site_env(settings: str = "chatsite_testing", **extra: str) -> dict[str, str]:
    """The environment of a served site: its settings and import path."""
    env = {k: v for k, v in os.environ.items() if k != "EXAMPLE_OPENAI_BASE_URL"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(SITE), str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["DJANGO_SETTINGS_MODULE"] = settings
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def migrate(database: Path) -> None:
    """Create the site's tables (auth, sessions) in a new SQLite file."""
    subprocess.run(
        [sys.executable, str(SITE / "manage.py"), "migrate", "--verbosity", "0"],
        env=site_env(CHATSITE_DB=str(database)),
        check=True,
        timeout=READY_TIMEOUT,
    )


class Logs:
    """The JSON lines a server writes on stdout, collected by a thread."""

    def __init__(self) -> None:
        self._lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self.other: list[str] = []

    def feed(self, stream: Any) -> None:
        for raw in stream:
            line = raw.decode("utf-8", "replace").strip()
            try:
                event = json.loads(line)
            except ValueError:
                self.other.append(line)
                continue
            with self._changed:
                self._lines.append(event)
                self._changed.notify_all()

    def events(self, name: str, **fields: object) -> list[dict[str, Any]]:
        """The events called ``name`` whose fields have the given values, so far."""
        with self._changed:
            return [
                e
                for e in self._lines
                if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
            ]

    def wait(self, name: str, count: int = 1, **fields: object) -> list[dict[str, Any]]:
        """Wait until ``count`` such events were logged; return them."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        with self._changed:
            while True:
                found = [
                    e
                    for e in self._lines
                    if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
                ]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {count} {name} event(s) with {fields}: {found}")
                self._changed.wait(left)


class Server:
    """A running server process of the site."""

    def __init__(self, kind: str, url: str, process: subprocess.Popen[bytes], logs: Logs) -> None:
        self.kind = kind
        self.url = url
        self.process = process
        self.logs = logs

    def client(self) -> httpx.Client:
        """A client with its own cookie jar (its own session)."""
        return httpx.Client(base_url=self.url, timeout=READY_TIMEOUT)


COMMANDS: Mapping[str, Callable[[int], list[str]]] = {
    "wsgi": lambda fd: [
        sys.executable,
        "-m",
        "gunicorn",
        "chatsite.wsgi:application",
        "--bind",
        f"fd://{fd}",
        "--workers",
        "1",
        "--no-control-socket",
    ],
    "asgi": lambda fd: [
        sys.executable,
        "-m",
        "uvicorn",
        "chatsite.asgi:application",
        "--fd",
        str(fd),
        "--lifespan",
        "off",
        "--no-access-log",
    ],
}


@contextmanager
def serve(
    kind: str, database: Path, settings: str = "chatsite_testing", **env: str
) -> Iterator[Server]:
    """Run the site under ``kind`` (``wsgi``: gunicorn, ``asgi``: uvicorn) until exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.set_inheritable(True)
    fd = sock.fileno()
    own_db = database.with_name(f"{kind}-{uuid.uuid4().hex[:8]}-{database.name}")
    shutil.copyfile(database, own_db)
    process = subprocess.Popen(
        COMMANDS[kind](fd),
        env=site_env(settings, CHATSITE_DB=str(own_db), **env),
        cwd=SITE,
        pass_fds=(fd,),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    logs = Logs()
    assert process.stdout is not None
    reader = threading.Thread(target=logs.feed, args=(process.stdout,), daemon=True)
    reader.start()
    server = Server(kind, f"http://127.0.0.1:{sock.getsockname()[1]}", process, logs)
    try:
        with server.client() as http:
            ready = http.get("/whoami")
        if ready.status_code != 200:
            raise RuntimeError(f"{kind} server answered {ready.status_code}: {logs.other}")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)
        reader.join(timeout=30)
        sock.close()


class HeldProvider:
    """An OpenAI-compatible endpoint whose streams send one chunk, then wait.

    The stream goes on when :attr:`release` is set (the tests set it on exit), so what
    happens while it waits (a client going away) does not depend on timing.
    """

    def __init__(self) -> None:
        self.release = threading.Event()
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.end_headers()
                try:
                    self.wfile.write(_chunk({"role": "assistant", "content": "Once"}))
                    self.wfile.flush()
                    provider.release.wait(READY_TIMEOUT)
                    self.wfile.write(_chunk({"content": " upon"}, finish="stop"))
                    self.wfile.write(b"data: [DONE]\n\n")
                except OSError:
                    pass  # the caller went away: that is what the tests look at

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> HeldProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=30)


def _chunk(delta: Mapping[str, str], finish: str | None = None) -> bytes:
    payload = {
        "id": "chatcmpl-held",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
    }
    return f"data: {json.dumps(payload)}\n\n".encode()
