"""A user's history: the JSON API, the user page (in headless Chromium), and the list's
filters, sort and CSV export. The figures are checked against the ledger and the logs."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from structlog.testing import capture_logs

from admin._support import MODEL, TOKEN, Browser, admin_config, bearer, chromium, read_png, serve
from payi_guard import BudgetExceeded, track_context
from payi_guard.admin import users_app
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.pricing import TokenUsage
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE

MODEL_B = "test-model-b"
"""Priced at $3 per million input tokens and $6 per million output tokens."""

USER = "acme:alice"
DAY = 86_400
LAST_DAY = 1_795_780_800.0  # 2026-11-27T12:00:00Z, the day the page is read
ACCENT_BLUE = (37, 99, 235)  # #2563eb, the chart's bars


def config() -> dict[str, Any]:
    prices = {
        MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0},
        MODEL_B: {"input_per_mtok": 3.0, "output_per_mtok": 6.0},
    }
    return admin_config(prices=prices, tiers={"pro": ["daily", "soft"]}, users={"bob": "pro"})


def call(guard: Guard, model: str, tokens_in: int, tokens_out: int, use_case: str | None) -> None:
    """One metered call through the engine: reserve, then settle the actual usage."""
    request = CallRequest(
        model=model, provider="openai", input_tokens=tokens_in, max_output_tokens=tokens_out
    )
    with track_context(user_id=USER, use_case_name=use_case):
        guard.begin(request).settle(TokenUsage(tokens_in, tokens_out))


def refused(guard: Guard) -> None:
    """A call the daily $1.00 limit refuses (its upper bound is $2)."""
    request = CallRequest(model=MODEL, provider="openai", max_output_tokens=1_000_000)
    with track_context(user_id=USER), pytest.raises(BudgetExceeded):
        guard.begin(request)


def seed(guard: Guard, clock: FakeClock) -> list[dict[str, Any]]:
    """Calls on three of the last five days, two models, two use cases and none; the
    clock ends on :data:`LAST_DAY`. Returns the ``genai_call`` events logged."""
    assert clock.now() == LAST_DAY - 4 * DAY
    with capture_logs() as logs:
        call(guard, MODEL, 10_000, 2_000, "chat")
        call(guard, MODEL, 20_000, 1_000, "chat")
        clock.advance(2 * DAY)
        call(guard, MODEL_B, 5_000, 5_000, "search")
        clock.advance(2 * DAY)
        call(guard, MODEL, 30_000, 3_000, "chat")
        call(guard, MODEL_B, 1_000, 500, None)
        refused(guard)
    return [dict(event) for event in logs if event["event"] == "genai_call"]


def want_week(want: dict[str, Any]) -> Decimal:
    """What the logs say was spent in the week of 2026-11-23 (every seeded day)."""
    return sum((v[0] for v in want["days"].values()), Decimal(0))


def expected(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the logs say, per day, per model and per use case (dollars as Decimal)."""
    days: dict[str, list[Any]] = defaultdict(lambda: [Decimal(0), 0, 0, 0])
    models: dict[str, list[Any]] = defaultdict(lambda: [Decimal(0), 0])
    cases: dict[str, list[Any]] = defaultdict(lambda: [Decimal(0), 0])
    for event, day in zip(
        events, ["2026-11-23"] * 2 + ["2026-11-25"] + ["2026-11-27"] * 2, strict=True
    ):
        cost = Decimal(str(event["cost_usd"]))
        totals = days[day]
        totals[0] += cost
        totals[1] += 1
        totals[2] += event["input_tokens"]
        totals[3] += event["output_tokens"]
        for table, name in ((models, event["model"]), (cases, event["use_case_name"] or "")):
            table[name][0] += cost
            table[name][1] += 1
    return {"days": days, "models": models, "cases": cases}


@asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture
def early_clock() -> FakeClock:
    return FakeClock(LAST_DAY - 4 * DAY)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def guard(
    request: pytest.FixtureRequest, early_clock: FakeClock, tmp_path: Path, key_prefix: str
) -> Iterator[Guard]:
    storage = {
        "memory": "memory://",
        "sqlite": f"sqlite:///{tmp_path / 'ledger.db'}",
        "redis": request.getfixturevalue("redis_url") if request.param == "redis" else "",
    }[request.param]
    guard = Guard(config(), storage=storage, clock=early_clock, key_prefix=key_prefix)
    yield guard
    guard.close()


async def test_history_equals_the_logs_and_the_ledger(guard: Guard, early_clock: FakeClock) -> None:
    app = users_app(guard, token=TOKEN)
    events = seed(guard, early_clock)
    want = expected(events)
    async with client_for(app) as client:
        answer = await client.get(f"/api/users/{quote(USER, safe='')}/history", headers=bearer())
        week = await client.get(
            f"/api/users/{USER}/history", params={"days": "5"}, headers=bearer()
        )
        org = await client.get("/api/orgs/acme/history", params={"days": "5"}, headers=bearer())
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert len(doc["days"]) == 30
    assert doc["days"][-1]["date"] == "2026-11-27"
    shown = {d["date"]: d for d in week.json()["days"]}
    assert list(shown) == ["2026-11-23", "2026-11-24", "2026-11-25", "2026-11-26", "2026-11-27"]
    for date, day in shown.items():
        cost, calls, tokens_in, tokens_out = want["days"].get(date, [Decimal(0), 0, 0, 0])
        assert Decimal(day["cost_usd"]) == cost
        assert (day["calls"], day["input_tokens"], day["output_tokens"]) == (
            calls,
            tokens_in,
            tokens_out,
        )
        assert day["refused"] == (1 if date == "2026-11-27" else 0)
        assert "e" not in day["cost_usd"].lower()  # a decimal string, never exponent form
    by_model = {m["name"]: (Decimal(m["cost_usd"]), m["calls"]) for m in week.json()["by_model"]}
    assert by_model == {name: tuple(v) for name, v in want["models"].items()}
    by_case = {m["name"]: (Decimal(m["cost_usd"]), m["calls"]) for m in week.json()["by_use_case"]}
    assert by_case == {name: tuple(v) for name, v in want["cases"].items()}
    # The org sees the same figures (alice is its only user).
    assert [d["cost_usd"] for d in org.json()["days"]] == [d["cost_usd"] for d in shown.values()]
    # Today's spend is what the ledger's daily counter holds.
    daily = next(limit for limit in guard.usage(USER) if limit.name == "daily")
    assert daily.used == Decimal(shown["2026-11-27"]["cost_usd"])
    # Each limit's window day by day: whole UTC-day windows of the user and the org add
    # up to what their counters hold; an hour window and the global counter have none.
    windows = {(w["scope"], w["name"]): w for w in doc["limits"]}
    usage: dict[tuple[str, str], Any] = {(u.scope, u.name): u for u in guard.usage(USER)}
    assert set(windows) == set(usage)
    for whose, first, count in (
        (("user", "daily"), "2026-11-27", 1),
        (("user", "soft"), "2026-11-23", 5),  # the week began on Monday the 23rd
        (("org", "org:0"), "2026-11-01", 27),
    ):
        window = windows[whose]
        assert window["window_start"] == f"{first}T00:00:00+00:00", whose
        assert [d["date"] for d in window["days"]][:1] == [first], whose
        assert len(window["days"]) == count, whose
        assert sum(Decimal(d["used"]) for d in window["days"]) == usage[whose].used, whose
    assert windows["user", "soft"]["days"][1] == {"date": "2026-11-24", "used": "0"}  # no calls
    assert windows["user", "tph"]["days"] is None  # an hour window: no day-by-day history
    assert windows["user", "tph"]["window_start"] == "2026-11-27T12:00:00+00:00"
    assert windows["global", "global:0"]["days"] is None  # no analytics for the global counter
    # The calls this process saw, newest first: the refusal, then the settled calls.
    recent = doc["recent"]
    assert [r["outcome"] for r in recent][:1] == ["refused"]
    assert recent[0]["latency_ms"] is None  # a refusal made no call: no latency to show
    assert [r["latency_ms"] for r in recent[1:]] == [e["latency_ms"] for e in reversed(events)]
    assert [r["model"] for r in recent[1:]] == [MODEL_B, MODEL, MODEL_B, MODEL, MODEL]
    assert [Decimal(r["cost_usd"]) for r in recent[1:]] == [
        Decimal(str(e["cost_usd"])) for e in reversed(events)
    ]


async def test_a_bad_days_value_is_a_clear_400(guard: Guard) -> None:
    app = users_app(guard, token=TOKEN)
    async with client_for(app) as client:
        for bad in ("", "0", "367", "-1", "1.5", "abc", "٣"):
            response = await client.get(
                f"/api/users/{USER}/history", params={"days": bad}, headers=bearer()
            )
            assert response.status_code == 400, bad
            assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
            doc = response.json()
            assert doc["parameter"] == "days"
            assert "days must be a whole number from 1 to 366" in doc["detail"]
        twice = await client.get(f"/api/users/{USER}/history?days=30&days=5", headers=bearer())
        assert (twice.status_code, twice.json()["parameter"]) == (400, "days")
        assert "days must be given once" in twice.json()["detail"]
        bad_id = await client.get("/api/users/a%20b/history", headers=bearer())
        unauthorized = await client.get(f"/api/users/{USER}/history")
    assert bad_id.status_code == 400
    assert unauthorized.status_code == 401


async def test_the_page_escapes_what_users_typed(early_clock: FakeClock) -> None:
    guard = Guard(config(), clock=early_clock)
    app = users_app(guard, token=TOKEN)
    evil = '<img src=x onerror="alert(1)">'
    call(guard, MODEL, 100, 10, evil)
    async with client_for(app) as client:
        page = await client.get(f"/users/{quote(USER, safe='')}", headers=bearer())
        signed_out = await client.get(f"/users/{USER}")
    assert page.status_code == 200
    assert evil not in page.text
    assert html_escaped(evil) in page.text
    assert '<h1 id="user-id">acme:alice</h1>' in page.text
    assert signed_out.status_code == 303  # back to the sign-in form
    assert signed_out.headers["location"] == "../"


def html_escaped(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    )


async def test_list_filters_sort_and_csv(early_clock: FakeClock) -> None:
    guard = Guard(config(), clock=early_clock)
    for user, dollars in (("acme:alice", "0.90"), ("acme:bob", "0.10"), ("bob", "0.50")):
        guard.record(user_id=user, model=MODEL, input_tokens=10, cost_usd=dollars)
    guard.record(user_id="carol", model=MODEL, input_tokens=10, cost_usd="0.30")
    app = users_app(guard, token=TOKEN)
    async with client_for(app) as client:

        async def ids(**params: str) -> list[str]:
            response = await client.get("/api/users", params=params, headers=bearer())
            assert response.status_code == 200, response.text
            return [u["user_id"] for u in response.json()["users"]]

        assert await ids(org="acme") == ["acme:alice", "acme:bob"]
        assert await ids(tier="pro") == ["bob"]
        assert await ids(min_spend="0.3", max_spend="0.9", sort="spend", order="desc") == [
            "acme:alice",
            "bob",
            "carol",
        ]
        assert await ids(sort="tier", order="desc") == ["bob", "acme:alice", "acme:bob", "carol"]
        # Ties of a state (or of what remains) go as the page puts them: the bigger
        # spender first, then by id, in either order (Export CSV downloads what is shown).
        ties = ["bob", "carol", "acme:bob"]  # ok, at $0.50, $0.30, $0.10
        assert await ids(sort="state", order="desc") == ["acme:alice", *ties]  # warning first
        assert await ids(sort="state", order="asc") == [*ties, "acme:alice"]
        # The Limits column: the fullest limit first (alice's daily $0.90 of $1).
        assert (await ids(sort="limits", order="desc"))[0] == "acme:alice"
        assert await ids(sort="limits", order="desc") == (await ids(sort="limits"))[::-1]
        for params, parameter in (
            ({"min_spend": "-1"}, "min_spend"),
            ({"max_spend": "lots"}, "max_spend"),
            ({"min_spend": "2", "max_spend": "1"}, "min_spend"),
            ({"sort": "cost"}, "sort"),
            ({"state": "broken"}, "state"),
        ):
            bad = await client.get("/api/users", params=params, headers=bearer())
            assert bad.status_code == 400
            assert bad.json()["parameter"] == parameter
            bad_csv = await client.get("/api/users.csv", params=params, headers=bearer())
            assert bad_csv.status_code == 400
        by_limits = await client.get("/api/users.csv", params={"sort": "limits"}, headers=bearer())
        assert by_limits.status_code == 200  # the page's Limits column can be exported
        exported = await client.get(
            "/api/users.csv", params={"org": "acme", "sort": "spend"}, headers=bearer()
        )
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [(r["user_id"], r["spend_usd"], r["tier"]) for r in rows] == [
        ("acme:bob", "0.1", "default"),
        ("acme:alice", "0.9", "default"),
    ]


@pytest.mark.browser
def test_the_user_page_in_headless_chromium(tmp_path: Path, early_clock: FakeClock) -> None:
    chromium()
    guard = Guard(config(), clock=early_clock)
    app = users_app(guard, token=TOKEN)
    events = seed(guard, early_clock)
    guard.adjust(USER, "daily", Decimal("-0.01"), reason="<b>goodwill</b>")
    want = expected(events)
    shot = tmp_path / "user.png"
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        sign_in(browser, url)
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 1")
        href = browser.evaluate("document.querySelector('a.uid').getAttribute('href')")
        assert href == "users/acme%3Aalice"
        browser.submit("document.querySelector('a.uid').click()")
        assert browser.evaluate("location.pathname") == "/users/acme%3Aalice"
        browser.wait_for("document.getElementById('spend-chart') !== null")
        bars = browser.evaluate(
            "JSON.stringify(Array.from(document.querySelectorAll('#spend-chart rect.bar'))"
            ".map(r => [r.dataset.date, r.dataset.cost, r.getBoundingClientRect().height]))"
        )
        tables = browser.evaluate(
            "JSON.stringify(Object.fromEntries(['by-model', 'by-use-case', 'limits', 'recent',"
            " 'adjustments'].map(id => [id, Array.from(document.querySelectorAll("
            "'#' + id + ' tbody tr')).map(tr => Array.from(tr.cells).map(c => c.textContent))])))"
        )
        window_bars = browser.evaluate(
            "JSON.stringify(Object.fromEntries(Array.from(document.querySelectorAll("
            "'#limits tbody tr')).map(tr => [tr.cells[0].textContent, Array.from("
            "tr.querySelectorAll('svg.window rect.bar')).map(r => [r.dataset.date, "
            "r.dataset.used, r.getBoundingClientRect().height])])))"
        )
        total = browser.evaluate("document.getElementById('total-spend').textContent")
        browser.screenshot(shot)
        # The list keeps its filters in the address; a bad one is named, not a crash.
        browser.open(f"{url}/?org=acme&state=broken&sort=spend&order=desc")
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 1")
        browser.wait_for("!document.getElementById('note').hidden")
        note = browser.evaluate("document.getElementById('note').textContent")
        address = browser.evaluate("location.search")
        export = browser.evaluate("document.getElementById('export').getAttribute('href')")
    bars_by_day = {date: (Decimal(cost), height) for date, cost, height in json.loads(bars)}
    assert len(bars_by_day) == 30
    for date, (cost, *_) in want["days"].items():
        assert bars_by_day[date][0] == cost
    assert bars_by_day["2026-11-24"] == (Decimal(0), 0)
    heights = {date: h for date, (_, h) in bars_by_day.items() if date in want["days"]}
    tallest = max(want["days"], key=lambda d: want["days"][d][0])
    assert max(heights, key=lambda d: heights[d]) == tallest
    assert Decimal(total.lstrip("$")) == sum(v[0] for v in want["days"].values())
    shown = json.loads(tables)
    assert {row[0]: Decimal(row[1].lstrip("$")) for row in shown["by-model"]} == {
        name: v[0] for name, v in want["models"].items()
    }
    assert {row[0] for row in shown["by-use-case"]} == {"chat", "search", "(none)"}
    assert [row[0] for row in shown["limits"]][:1] == ["daily"]
    since, resets = shown["limits"][0][6:8]  # both instants say their zone
    assert since.endswith(" UTC"), since
    assert resets.endswith(" UTC"), resets
    assert len(shown["recent"]) == 6  # five calls and the refusal
    assert shown["recent"][0][5] == "refused"
    assert shown["recent"][0][6] == "\u2014"  # no latency for a refusal, not "0 ms"
    # The weekly limit's window, day by day: the days with calls are drawn, the others flat.
    week = json.loads(window_bars)
    assert [date for date, _, _ in week["soft"]] == [
        "2026-11-23",
        "2026-11-24",
        "2026-11-25",
        "2026-11-26",
        "2026-11-27",
    ]
    assert [height > 0 for _, _, height in week["soft"]] == [True, False, True, False, True]
    assert sum(Decimal(used) for _, used, _ in week["soft"]) == want_week(want)
    assert week["tph"] == []  # an hour window: a dash, no bars
    assert shown["adjustments"][0][5] == "<b>goodwill</b>"  # text, not markup
    assert "state" in note
    assert "broken" in note
    assert "state=" not in address
    assert "org=acme" in address
    assert export.startswith("api/users.csv?")
    assert "org=acme" in export
    image = read_png(shot.read_bytes())
    assert image.count_near(ACCENT_BLUE) >= 200  # the bars are drawn


def sign_in(browser: Browser, url: str) -> None:
    browser.open(f"{url}/")
    browser.submit(
        f"document.getElementById('token').value = {json.dumps(TOKEN)};"
        "document.querySelector('form button[type=submit]').click()"
    )
    assert re.fullmatch(rf"{re.escape(url)}/(\?.*)?", browser.evaluate("location.href"))


async def test_the_anonymous_bucket_has_its_history_too(
    guard: Guard, early_clock: FakeClock
) -> None:
    # Anonymous callers' calls are tallied under the anonymous scope: the bucket's page
    # shows them, as its limit does.
    for _ in range(2):
        with track_context(user_id=None):
            request = CallRequest(model=MODEL, provider="openai", max_output_tokens=100)
            guard.begin(request).settle(TokenUsage(1_000, 100))
    app = users_app(guard, token=TOKEN)
    async with client_for(app) as client:
        answer = await client.get("/api/users/anonymous/history", headers=bearer())
        page = await client.get("/users/anonymous", headers=bearer())
    assert answer.status_code == 200, answer.text
    today = answer.json()["days"][-1]
    assert (today["calls"], Decimal(today["cost_usd"])) == (2, Decimal("0.0024"))
    (bucket,) = [u for u in guard.usage("anonymous") if u.name == "anonymous:0"]
    assert bucket.used == Decimal("0.0024")
    assert page.status_code == 200
