"""``payi-guard demo``: a real FastAPI app, a fake provider and simulated users.

Everything runs on this machine, offline, on the default in-memory store:

1. an embedded :class:`~payi_guard.testing.FakeProvider` plays OpenAI;
2. a FastAPI app behind Starlette's ``AuthenticationMiddleware`` and
   :class:`~payi_guard.web.GuardMiddleware` answers ``POST /chat`` with a guarded
   ``openai.AsyncOpenAI`` client (plain and streamed);
3. simulated users of different tiers call it over real HTTP, a live table shows each
   one's spend against their limits, a warning and a ``429`` happen; the app also
   serves the users page (its address and sign-in token are printed);
4. the JSON logs are turned into the per-user report.

Everything printed fits the terminal (80 columns unless it is wider). On a terminal the
live table is redrawn in place (ANSI cursor movement and colours); written to a file or
a pipe, the demo prints plain lines, one per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import socket
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

from payi_guard.exceptions import MissingDependency
from payi_guard.money import decimal_text
from payi_guard.report.table import printable, shorten, terminal_width
from payi_guard.usage import LimitUsage

__all__ = ["DEMO_BUDGETS", "USERS_PAGE", "run_demo"]

DEMO_BUDGETS = """\
version: 1
storage: memory://
limits:
  daily:      {max: 0.010, per: day, warn_at: 0.5}
  pro_daily:  {max: 0.050, per: day, warn_at: 0.8}
  anon_daily: {max: 0.004, per: day}
  org_month:  {max: 0.500, per: month}
  all_month:  {max: 5.00, per: month}
  rpm:        {requests: 40, per: minute}
default: [daily, rpm]
tiers:
  pro: [pro_daily, rpm]
users:
  "acme:alice": pro
  "acme:bob": pro
orgs:
  acme: [org_month]
global: [all_month]
anonymous: {strategy: shared, limits: [anon_daily]}
"""

USERS_PAGE = "/guard"
"""Where the demo app mounts the users page."""

MODEL = "gpt-4o"
REPLY = (
    "Budgets are enforced before each call is sent: the guard reserves an upper bound of "
    "the cost, the provider answers, and the real cost from the usage it reports is "
    "settled against every counter that applies to the user, the org and everyone. "
) * 3


@dataclass
class _SimUser:
    token: str | None
    user_id: str
    tier: str
    pause: float
    stream: bool = False
    heavy: bool = False
    calls: int = 0
    blocked: int = 0
    last_status: int = 0
    retry_after: str = ""


@dataclass
class _Feed:
    """Notable events, appended by the structlog tap and read by the display."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    lines: list[str] = field(default_factory=list)
    warnings: int = 0
    exceeded: int = 0
    seen: set[tuple[str, str]] = field(default_factory=set)

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def tail(self, n: int) -> list[str]:
        with self.lock:
            return self.lines[-n:]


def _require(module: str, extra: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise MissingDependency(module, extra) from None


def _figure(value: object, unit: object = "usd") -> str:
    """A logged amount as people read it: ``$0.00521`` (never ``5.21e-03``), or a count."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
        return printable(str(value))
    number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    return ("$" if unit == "usd" else "") + decimal_text(number)


def _configure_logs(stream: TextIO, feed: _Feed) -> None:
    """JSON lines to ``stream``; warnings and refusals also go to the live feed."""
    import structlog

    def tap(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
        name = event.get("event")
        user = printable(str(event.get("user_id")))
        limit = printable(str(event.get("limit")))
        if name == "budget_warning":
            feed.warnings += 1
            feed.add(
                f"WARN  {user}: {limit} at {_figure(event.get('used'))} "
                f"of {_figure(event.get('max'))}"
            )
        elif name == "budget_exceeded":
            feed.exceeded += 1
            first = (user, limit)
            if first in feed.seen:  # later refusals are counted in the table
                return event
            feed.seen.add(first)
            unit = event.get("unit")
            feed.add(
                f"429   {user}: {limit} {_figure(event.get('used'), unit)} of "
                f"{_figure(event.get('max'), unit)}, needs {_figure(event.get('needed'), unit)}"
            )
        return event

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            tap,
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _build_app(guard: Any, base_url: str, tokens: dict[str, str], admin_token: str) -> Any:
    _require("fastapi", "fastapi")
    _require("openai", "openai")
    import fastapi
    import openai
    from starlette.authentication import (
        AuthCredentials,
        AuthenticationBackend,
        BaseUser,
        UnauthenticatedUser,
    )
    from starlette.middleware.authentication import AuthenticationMiddleware
    from starlette.requests import HTTPConnection
    from starlette.responses import StreamingResponse

    from payi_guard.admin import users_app
    from payi_guard.web import GuardMiddleware

    class DemoUser(BaseUser):
        def __init__(self, user_id: str) -> None:
            self.user_id = user_id

        @property
        def is_authenticated(self) -> bool:
            return True

        @property
        def display_name(self) -> str:
            return self.user_id

        @property
        def identity(self) -> str:
            return self.user_id

    class TokenAuth(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, BaseUser] | None:
            scheme, _, token = conn.headers.get("authorization", "").partition(" ")
            user = tokens.get(token) if scheme.lower() == "bearer" else None
            if user is None:
                return AuthCredentials(), UnauthenticatedUser()
            return AuthCredentials(["authenticated"]), DemoUser(user)

    client = guard.wrap(openai.AsyncOpenAI(base_url=base_url, api_key="demo", max_retries=0))
    app = fastapi.FastAPI(title="payi_guard demo")

    async def chat(body: dict[str, Any]) -> Any:
        messages = [{"role": "user", "content": str(body.get("prompt", "Hello"))}]
        if body.get("stream"):
            stream = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=300, stream=True
            )

            async def relay() -> Any:
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield f"data: {json.dumps(chunk.choices[0].delta.content)}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(relay(), media_type="text/event-stream")
        reply = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=300)
        return {"reply": reply.choices[0].message.content}

    app.add_api_route("/chat", chat, methods=["POST"])
    app.mount(USERS_PAGE, users_app(guard, token=admin_token, directory_ttl=0.5))

    # Added first, so it sits inside AuthenticationMiddleware and sees scope["user"].
    app.add_middleware(GuardMiddleware, guard=guard, guarded_paths=["/chat"])
    app.add_middleware(AuthenticationMiddleware, backend=TokenAuth())
    return app


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port; yield its base URL."""
    uvicorn = _require("uvicorn", "fastapi")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="error", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
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


def _users(extra: int) -> list[_SimUser]:
    users = [
        _SimUser("tok-alice", "acme:alice", "pro", 0.10, heavy=True),
        _SimUser("tok-bob", "acme:bob", "pro", 0.30, stream=True),
        _SimUser("tok-carol", "globex:carol", "free", 0.12, heavy=True),
        _SimUser("tok-dave", "dave", "free", 0.35, stream=True),
        _SimUser("tok-erin", "erin", "free", 0.9),
        _SimUser(None, "anonymous", "anonymous", 0.4, heavy=True),
    ]
    for i in range(max(0, extra - len(users))):
        users.append(_SimUser(f"tok-user{i}", f"user{i}", "free", 0.5 + 0.1 * (i % 5)))
    return users


def _money_limit(usages: list[LimitUsage]) -> LimitUsage | None:
    own = [u for u in usages if u.unit == "usd" and u.scope in ("user", "anonymous")]
    if not own:
        return None
    return max(own, key=lambda u: Decimal(u.used) / Decimal(u.max) if u.max else Decimal(0))


_COLOURS = {"ok": "\x1b[32m", "warning": "\x1b[33m", "exceeded": "\x1b[31m"}
_RESET = "\x1b[0m"
_BAR_MIN, _BAR_MAX = 6, 40


def _bar(ratio: Decimal, width: int) -> str:
    full = int(min(Decimal(1), max(Decimal(0), ratio)) * width)
    return "█" * full + "░" * (width - full)


def _table(guard: Any, users: list[_SimUser], colour: bool, width: int) -> list[str]:
    """The live table, at most ``width`` columns wide: the spend bar takes what is left."""
    header = ["user", "tier", "calls", "429s", "daily budget", "used", "max", "state"]
    rows: list[tuple[list[str], Decimal, str, str]] = []
    for sim in users:
        limit = _money_limit(guard.usage(sim.user_id))
        if limit is None:
            continue
        used, cap = Decimal(limit.used), Decimal(limit.max)
        blocked = sim.last_status == 429
        shown: str = "blocked" if blocked else limit.state
        cells = [
            printable(sim.user_id),
            sim.tier,
            str(sim.calls),
            str(sim.blocked),
            "",
            f"${used:.5f}",
            _figure(cap),
            shown,
        ]
        rows.append((cells, used / cap if cap else Decimal(1), limit.state, shown))
    widths = [max([len(header[i]), *(len(r[0][i]) for r in rows)]) for i in range(8)]
    widths[0] = min(widths[0], 16)
    fixed = sum(w for i, w in enumerate(widths) if i != 4) + 2 * 7
    if width - fixed < _BAR_MIN:
        widths[1] = 0  # no room for the tier: leave it out
        fixed = sum(w for i, w in enumerate(widths) if i not in (1, 4)) + 2 * 6
    widths[4] = max(_BAR_MIN, min(_BAR_MAX, width - fixed))
    right = {2, 3, 5, 6}

    last = len(header) - 1

    def line(cells: list[str], painted: dict[int, str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            if widths[i] == 0:
                continue
            text = shorten(cell, widths[i])
            if i in right:
                text = text.rjust(widths[i])
            elif i != last:  # no padding after the last cell
                text = text.ljust(widths[i])
            colour_code = painted.get(i)
            parts.append(f"{colour_code}{text}{_RESET}" if colour_code else text)
        return "  ".join(parts).rstrip()

    head = list(header)
    head[4] = shorten(header[4], widths[4])
    lines = [line(head, {})]
    for cells, ratio, state, shown in rows:
        cells[4] = _bar(ratio, widths[4])
        painted: dict[int, str] = {}
        if colour:
            painted[4] = _COLOURS.get(state, "")
            painted[7] = _COLOURS["exceeded" if shown == "blocked" else state]
        lines.append(line(cells, painted))
    return lines


async def _drive(base: str, users: list[_SimUser], stop: asyncio.Event) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=10) as http:

        async def loop(sim: _SimUser) -> None:
            headers = {"authorization": f"Bearer {sim.token}"} if sim.token else {}
            n = 0
            while not stop.is_set():
                n += 1
                body = {"prompt": f"Summarize document {n} for {sim.user_id}", "stream": sim.stream}
                if sim.stream:
                    async with http.stream("POST", "/chat", json=body, headers=headers) as r:
                        async for _ in r.aiter_bytes():
                            pass
                        status, retry = r.status_code, r.headers.get("retry-after", "")
                else:
                    r = await http.post("/chat", json=body, headers=headers)
                    status, retry = r.status_code, r.headers.get("retry-after", "")
                sim.last_status = status
                if status == 200:
                    sim.calls += 1
                elif status == 429:
                    sim.blocked += 1
                    sim.retry_after = retry
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=sim.pause)

        await asyncio.gather(*(loop(sim) for sim in users))


async def _run(
    guard: Any,
    base: str,
    users: list[_SimUser],
    feed: _Feed,
    out: TextIO,
    seconds: float,
    width: int,
    live: bool,
) -> None:
    """Drive the users until a warning and a block happened, showing the table.

    On a terminal (``live``) the table and the latest events are redrawn in place, one
    frame over the last; every frame line fits ``width - 1`` columns, so no line wraps
    and the cursor moves back exactly over the frame. Otherwise each event is printed
    once as a plain line when it happens.
    """
    stop = asyncio.Event()
    driver = asyncio.ensure_future(_drive(base, users, stop))
    drawn = 0
    printed = 0
    started = time.monotonic()
    heavy = [u for u in users if u.heavy and u.tier != "pro"]
    frame_width = width - 1

    def draw() -> None:
        nonlocal drawn
        lines = _table(guard, users, colour=True, width=frame_width)
        lines.append("")
        lines.extend("  " + shorten(line, frame_width - 2) for line in feed.tail(6))
        # Up to the frame's first line, clear to the end of the screen, redraw.
        out.write(f"\x1b[{drawn}F\x1b[J" if drawn else "")
        out.write("\n".join(lines) + "\n")
        out.flush()
        drawn = len(lines)

    while True:
        await asyncio.sleep(0.25)
        elapsed = time.monotonic() - started
        done = feed.warnings > 0 and all(u.blocked > 0 for u in heavy) and elapsed > 4
        if live:
            draw()
        else:
            news = feed.lines[printed:]
            printed += len(news)
            for line in news:
                out.write("  " + shorten(line, width - 2) + "\n")
            out.flush()
        if done or elapsed > seconds:
            break
    stop.set()
    await driver
    if live:
        # The last frame once every call has ended: the figures the report then gives
        # (a frame drawn while calls were under way counts what they held).
        draw()


def run_demo(
    *,
    json_logs: str | None = None,
    users: int = 6,
    quiet: bool = False,
    seconds: float = 20.0,
    out: TextIO | None = None,
    serve: bool = False,
    width: int | None = None,
) -> int:
    """Run the demo; return 0 when a warning, a 429 and the report were all shown.

    Args:
        json_logs: keep the JSON logs at this path (default: a temporary file).
        users: how many simulated users (at least the 6 built-in ones are used).
        quiet: print only the final table and the report.
        seconds: stop after this long even if not everything happened yet.
        out: where to print (default: stdout). The live table is redrawn in place only
            when it is a terminal; otherwise events are printed as plain lines.
        serve: keep the app and its users page running after the report, until Ctrl+C.
        width: the most columns a line may take (default: the terminal's, else 80).
    """
    out = out or sys.stdout
    columns = terminal_width(width)
    sims = _users(users)
    keep_log = json_logs is not None
    if json_logs is not None:
        try:
            log_stream = open(json_logs, "w", encoding="utf-8")  # noqa: SIM115 - closed below
        except OSError as exc:
            print(f"payi-guard demo: error: cannot write the JSON logs: {exc}", file=sys.stderr)
            return 2
        log_path = json_logs
    else:
        handle, log_path = tempfile.mkstemp(prefix="payi-guard-demo-", suffix=".jsonl")
        log_stream = open(handle, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    try:
        return _run_demo(log_stream, log_path, keep_log, sims, quiet, out, serve, columns, seconds)
    finally:
        log_stream.close()
        if not keep_log:
            os.unlink(log_path)


def _run_demo(
    log_stream: TextIO,
    log_path: str,
    keep_log: bool,
    sims: list[_SimUser],
    quiet: bool,
    out: TextIO,
    serve: bool,
    columns: int,
    seconds: float,
) -> int:
    """:func:`run_demo` once its log file is open (and removed after, unless kept)."""
    from payi_guard.engine import Guard
    from payi_guard.report import ReportBuilder, UnreadableLog, read_logs, write_table
    from payi_guard.testing import FakeProvider

    live = out.isatty() and not quiet
    tokens = {u.token: u.user_id for u in sims if u.token}
    admin_token = secrets.token_urlsafe(18)
    feed = _Feed()

    def say(text: str, *, always: bool = False) -> None:
        if always or not quiet:
            # Never at a hyphen: a token or a path must stay whole to be copied.
            lines = textwrap.wrap(
                text, columns, subsequent_indent="  ", break_on_hyphens=False
            ) or [""]
            print("\n".join(lines), file=out, flush=True)

    say("payi_guard demo: a FastAPI app, a fake OpenAI, simulated users (offline).")
    say("budgets: free users $0.010/day (warn at 50%), pro $0.050/day, anonymous $0.004/day")
    say("")
    status = 0
    _configure_logs(log_stream, feed)
    guard = Guard(DEMO_BUDGETS)
    with FakeProvider(reply=REPLY, chunk_delay=0.002) as provider:
        app = _build_app(guard, provider.openai_base_url, tokens, admin_token)
        with _serve(app) as base:
            say(f"app on {base}, provider on {provider.base_url}")
            say(f"users page: {base}{USERS_PAGE}/ (sign in with the token {admin_token})")
            say("")
            screen: TextIO = _Null() if quiet else out
            asyncio.run(_run(guard, base, sims, feed, screen, seconds, columns, live))
            log_stream.flush()
            print("", file=out)
            if not live:
                print("\n".join(_table(guard, sims, colour=False, width=columns)), file=out)
                print("", file=out)
                if quiet:
                    for line in feed.lines:
                        print("  " + shorten(line, columns - 2), file=out)
            say("Report from the JSON logs (payi-guard report):", always=True)
            print("", file=out, flush=True)
            builder = ReportBuilder()
            try:
                read_logs([log_path], builder)
            except UnreadableLog as exc:
                print(f"payi-guard report: error: {exc}", file=sys.stderr)
                status = 2
            else:
                write_table(builder.build(), out, width=columns)
                out.flush()
            if keep_log:
                say("", always=True)
                say(f"JSON logs kept in {log_path}", always=True)
            if serve and status == 0:
                # Ctrl+C stops them from the moment it is said: even before the wait.
                with contextlib.suppress(KeyboardInterrupt):
                    say("", always=True)
                    say(
                        f"The app and its users page stay up: {base}{USERS_PAGE}/ "
                        f"(token {admin_token}). Ctrl+C stops them.",
                        always=True,
                    )
                    _wait_for_interrupt()
    ok = feed.warnings > 0 and any(u.blocked for u in sims) and status == 0
    if not ok:
        print("the demo did not show a warning and a block", file=sys.stderr)
    return 0 if ok else 1


def _wait_for_interrupt() -> None:
    """Sleep until Ctrl+C (``KeyboardInterrupt``).

    In short sleeps, not one wait: the kernel may hand the SIGINT to any thread, and
    Python raises ``KeyboardInterrupt`` in the main thread when that thread next runs
    Python code, which a main thread blocked in a single wait never does.
    """
    while True:
        time.sleep(0.25)


class _Null(io.StringIO):
    """A text sink for quiet mode."""

    def write(self, text: str) -> int:
        return len(text)
