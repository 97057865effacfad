"""Make the README's screenshots of the users page and a user's page.

The data is the demo's (:mod:`payi_guard.demo`: its budgets and its users), two weeks
of calls through the real engine on a fake clock (fixed dates, so the pictures do not
depend on today), served by uvicorn and photographed by headless Chromium::

    python scripts/screenshots.py            # writes docs/users-list.png, docs/user-page.png
    python scripts/screenshots.py --out DIR --chromium /usr/bin/chromium

The app is served behind a small wrapper that adds the access token to each request
(Chromium's ``--screenshot`` cannot sign in); nothing else differs from a real mount.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import structlog

from payi_guard import BudgetExceeded, request_scope, track_context
from payi_guard.admin import users_app
from payi_guard.clock import FakeClock
from payi_guard.demo import DEMO_BUDGETS, USERS_PAGE
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage

TOKEN = "screenshot-token-0123456789"  # noqa: S105 - a local, throwaway server
START = 1_794_556_800.0  # 2026-11-13T08:00:00Z: fifteen days of calls, to 2026-11-27
USERS = {"acme:alice": 1.0, "acme:bob": 0.6, "globex:carol": 0.5, "dave": 0.3, "erin": 0.15}
MODELS = ("gpt-4o", "gpt-4o-mini")
USE_CASES = ("chat", "summarize", "search", None)


def seed(guard: Guard, clock: FakeClock) -> None:
    """Fourteen days of calls by the demo's users (a fixed seed: the same every run)."""
    rng = random.Random(7)  # noqa: S311 - made-up traffic, not security
    for day in range(15):
        if day:
            clock.advance(86_400 - 40 * 60)
        for _ in range(40):
            clock.advance(60)
            user = rng.choice(list(USERS))
            if rng.random() > USERS[user]:
                continue
            model = rng.choice(MODELS)
            tokens_in, tokens_out = rng.randint(200, 1500), rng.randint(50, 300)
            request = CallRequest(
                model=model, provider="openai", input_tokens=tokens_in, max_output_tokens=300
            )
            latency = rng.uniform(0.4, 2.5)  # seconds the provider takes to answer
            try:
                request_id = f"req-{day:02d}{rng.randrange(16**6):06x}"
                use_case = rng.choice(USE_CASES)
                with (
                    request_scope(request_id=request_id),
                    track_context(user_id=user, use_case_name=use_case),
                ):
                    reservation = guard.begin(request)
                    clock.advance(latency)
                    reservation.settle(TokenUsage(tokens_in, tokens_out))
            except BudgetExceeded:
                pass
    clock.advance(4 * 3600)  # the pictures are taken at 2026-11-27T12:40Z
    guard.adjust("acme:bob", "pro_daily", "-0.01", reason="support credit")


def with_token(app: Any) -> Any:
    """``app`` with the access token added to every request (for ``--screenshot``)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = [h for h in scope["headers"] if h[0] != b"authorization"]
            headers.append((b"authorization", f"Bearer {TOKEN}".encode()))
            scope = {**scope, "headers": headers}
        await app(scope, receive, send)

    return wrapped


@contextlib.contextmanager
def serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


def shoot(chromium: str, url: str, path: Path, height: int) -> None:
    """Photograph ``url`` into ``path`` (1280 pixels wide) with headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(  # noqa: S603 - our own arguments
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size=1280,{height}",
                "--virtual-time-budget=8000",
                f"--screenshot={path}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


def main(argv: list[str] | None = None) -> int:
    """Seed the data, serve the app, take both pictures; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "docs")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
    clock = FakeClock(START)
    guard = Guard(DEMO_BUDGETS, clock=clock)
    app = users_app(guard, token=TOKEN, title="payi_guard demo users")
    seed(guard, clock)
    args.out.mkdir(parents=True, exist_ok=True)
    from starlette.applications import Starlette
    from starlette.routing import Mount

    site = Starlette(routes=[Mount(USERS_PAGE, with_token(app))])
    with serve(site) as base:
        page = f"{base}{USERS_PAGE}"
        shoot(args.chromium, f"{page}/?sort=spend&order=desc", args.out / "users-list.png", 900)
        shoot(args.chromium, f"{page}/users/acme%3Aalice", args.out / "user-page.png", 1500)
    guard.close()
    print(f"wrote {args.out / 'users-list.png'} and {args.out / 'user-page.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
