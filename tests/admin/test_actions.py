"""The users page's operator actions: adjust and reset behind the token, CSRF-safe, with the
user's history; over the API (memory and Redis) and in headless Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from admin._support import TOKEN, Browser, admin_config, bearer, chromium, serve
from payi_guard.admin import users_app
from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.testing import capture_events
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE

MODEL = "test-model"


def spend(guard: Guard, user_id: str, cost: str) -> None:
    guard.record(user_id=user_id, model=MODEL, input_tokens=100, cost_usd=cost)


def daily(guard: Guard, user_id: str) -> Decimal | int:
    return {u.name: u.used for u in guard.usage(user_id)}["daily"]


@asynccontextmanager
async def client_for(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


@pytest.fixture(params=["memory", "redis"])
async def guard(
    request: pytest.FixtureRequest, clock: FakeClock, key_prefix: str
) -> AsyncIterator[Guard]:
    """A guard on memory storage, then on the shared Redis under a fresh key prefix."""
    if request.param == "memory":
        yield Guard(admin_config(), clock=clock)
        return
    url: str = request.getfixturevalue("redis_url")
    guard = Guard(admin_config(), storage=url, key_prefix=key_prefix, clock=clock)
    try:
        yield guard
    finally:
        await guard.aclose()
        client = redis.Redis.from_url(url)
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


async def signed_in(client: httpx.AsyncClient) -> str:
    """Sign the client in; return the page's CSRF token."""
    signed = await client.post("/", data={"token": TOKEN}, headers={"origin": "http://testserver"})
    assert signed.status_code == 303
    page = await client.get("/")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None
    return found.group(1)


def problem_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    document: dict[str, Any] = response.json()
    return document


async def test_a_bearer_client_adjusts_resets_and_reads_the_history(guard: Guard) -> None:
    spend(guard, "acme:alice", "0.80")
    async with client_for(users_app(guard, token=TOKEN)) as client:
        with capture_events() as events:
            adjusted = await client.post(
                "/api/users/acme:alice/adjust",
                json={"limit": "daily", "amount": "-0.30", "reason": "goodwill", "by": "ops:kim"},
                headers=bearer(),
            )
            reset = await client.post(
                "/api/users/acme:alice/reset", json={"reason": "incident 9"}, headers=bearer()
            )
        history = await client.get("/api/users/acme:alice/adjustments", headers=bearer())
    assert adjusted.status_code == 200, adjusted.text
    body = adjusted.json()
    assert (body["op"], body["by"]) == ("adjust", "ops:kim")
    assert [(c["name"], c["used"]) for c in body["changed"]] == [("daily", "0.5")]
    assert body["user"]["user_id"] == "acme:alice"
    assert body["user"]["spend_usd"] == "0.5"
    assert body["adjustments"][0]["reason"] == "goodwill"
    assert reset.status_code == 200, reset.text
    assert [c["name"] for c in reset.json()["changed"]] == ["daily", "soft", "tph"]
    assert reset.json()["by"] == "api"
    assert daily(guard, "acme:alice") == 0
    items = history.json()["adjustments"]
    assert [(i["op"], i["limits"], i["amount"]) for i in items] == [
        ("reset", ["tph"], "-100"),  # the 100 tokens of the recorded call
        ("reset", ["soft"], "-0.8"),  # a weekly counter: the adjustment was daily
        ("reset", ["daily"], "-0.5"),
        ("adjust", ["daily"], "-0.3"),
    ]
    logged = events.named("budget_adjusted")
    assert [(e["limit"], e["by"]) for e in logged] == [
        ("daily", "ops:kim"),
        ("daily", "api"),
        ("soft", "api"),
        ("tph", "api"),
    ]


async def test_the_page_session_needs_its_csrf_token_and_its_own_site(guard: Guard) -> None:
    spend(guard, "bob", "0.40")
    async with client_for(users_app(guard, token=TOKEN)) as client:
        csrf = await signed_in(client)
        action = {"limit": "daily", "amount": "1"}
        url = "/api/users/bob/adjust"
        for headers in (
            {},  # no CSRF token: a form on another site cannot know it
            {"x-csrf-token": "forged"},
            {"x-csrf-token": csrf, "origin": "https://evil.example"},
            {"x-csrf-token": csrf, "sec-fetch-site": "cross-site"},
        ):
            refused = await client.post(url, json=action, headers=headers)
            assert problem_of(refused, 403)["title"] == "Forbidden", headers
        assert daily(guard, "bob") == Decimal("0.40")  # none of them changed anything
        # A form post (what a cross-site form can send) is not JSON: refused before all.
        form = await client.post(url, data=action, headers={"x-csrf-token": csrf})
        problem_of(form, 415)
        done = await client.post(
            url, json=action, headers={"x-csrf-token": csrf, "sec-fetch-site": "same-origin"}
        )
        assert done.status_code == 200, done.text
        assert done.json()["by"] == "users page"
        assert daily(guard, "bob") == Decimal("1.40")
    async with client_for(users_app(guard, token=TOKEN)) as stranger:
        problem_of(await stranger.post(url, json=action), 401)
        problem_of(await stranger.get("/api/users/bob/adjustments"), 401)


async def test_bad_actions_are_refused_with_what_is_wrong(guard: Guard) -> None:
    spend(guard, "acme:carol", "0.10")
    async with client_for(users_app(guard, token=TOKEN)) as client:
        cases: list[tuple[str, Any, int, str]] = [
            ("acme:carol/adjust", {"limit": "weekly", "amount": "1"}, 400, "has no limit 'weekly'"),
            ("acme:carol/adjust", {"limit": "org:0", "amount": "1"}, 400, "own limits"),
            ("acme:carol/adjust", {"limit": "daily", "amount": "lots"}, 400, "must be a number"),
            ("acme:carol/adjust", {"limit": "daily"}, 400, "amount"),
            ("acme:carol/adjust", {"amount": "1"}, 400, "limit"),
            ("acme:carol/adjust", {"limit": "tph", "amount": "1.5"}, 400, "whole number"),
            # JSON numbers, shown as they were written, never a Python repr or an exponent.
            ("acme:carol/adjust", {"limit": "tph", "amount": 1.5}, 400, "whole number, not 1.5."),
            ("acme:carol/adjust", {"limit": "daily", "amount": 1e-12}, 400, "0.000000000001 is"),
            ("acme:carol/adjust", ["daily"], 400, "JSON object"),
            ("acme:carol/reset", {"limit": 5}, 400, "string"),
            ("acme:carol/reset", {"reason": "two\nlines"}, 400, "printable line"),
            ("carol smith/reset", {}, 400, "whitespace"),
        ]
        for path, body, status, message in cases:
            response = await client.post(f"/api/users/{path}", json=body, headers=bearer())
            detail = problem_of(response, status)["detail"]
            assert message in detail, (path, body)
            assert "Decimal" not in detail, detail
            assert "E-" not in detail, detail
        huge = await client.post(
            "/api/users/acme:carol/reset",
            content=json.dumps({"reason": "x" * 5000}),
            headers={**bearer(), "content-type": "application/json"},
        )
        problem_of(huge, 413)
    assert daily(guard, "acme:carol") == Decimal("0.10")


async def test_a_store_that_fails_is_a_503_and_changes_nothing(clock: FakeClock) -> None:
    guard = Guard(admin_config(), storage="redis://127.0.0.1:1/0", clock=clock)
    async with client_for(users_app(guard, token=TOKEN)) as client:
        response = await client.post(
            "/api/users/dave/adjust", json={"limit": "daily", "amount": "1"}, headers=bearer()
        )
        history = await client.get("/api/users/dave/adjustments", headers=bearer())
    problem_of(response, 503)
    problem_of(history, 503)


# -- in a real browser --------------------------------------------------------------------


@pytest.mark.browser
def test_an_operator_adjusts_and_resets_from_the_page(tmp_path: Path, clock: FakeClock) -> None:
    chromium()
    guard = Guard(admin_config(), clock=clock)
    spend(guard, "acme:alice", "0.40")
    spend(guard, "carol", "1.37")  # exceeded: her calls are refused
    app = users_app(guard, token=TOKEN)
    shot = tmp_path / "manage.png"
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        browser.open(f"{url}/")
        browser.submit(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.querySelector('form button[type=submit]').click()"
        )
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 2")
        assert (
            browser.evaluate("document.querySelector('tr[data-user=carol]').dataset.state")
            == "exceeded"
        )

        # Manage carol: give $0.50 back on her daily limit, with a reason.
        browser.evaluate("document.querySelector('[data-manage=carol]').click()")
        browser.wait_for("document.querySelector('tr[data-detail=carol]') !== null")
        browser.wait_for(
            "document.querySelector('tr[data-detail=carol] .history').innerText"
            ".includes('No adjustments yet')"
        )
        browser.evaluate(
            """(() => {
              const form = document.querySelector('tr[data-detail=carol] form[data-action=adjust]');
              form.elements.limit.value = 'daily';
              form.elements.amount.value = '-0.50';
              form.elements.reason.value = 'refund <b>ticket</b> 7';
              form.querySelector('button').click();
            })()"""
        )
        browser.wait_for(
            "(document.querySelector('tr[data-detail=carol] .msg') || {}).textContent"
            " && document.querySelector('tr[data-detail=carol] .msg').textContent"
            ".startsWith('Adjusted daily')"
        )
        after_adjust = browser.evaluate(
            """(() => ({
              state: document.querySelector('tr[data-user=carol]').dataset.state,
              message: document.querySelector('tr[data-detail=carol] .msg').textContent,
              history: [...document.querySelectorAll('tr[data-detail=carol] li')]
                .map(li => li.textContent),
              bold: document.querySelectorAll('tr[data-detail=carol] li b').length,
            }))()"""
        )
        browser.screenshot(shot)

        # A bad amount is refused with the server's own words, and changes nothing.
        browser.evaluate(
            """(() => {
              const form = document.querySelector('tr[data-detail=carol] form[data-action=adjust]');
              form.elements.amount.value = 'lots';
              form.querySelector('button').click();
            })()"""
        )
        browser.wait_for("document.querySelector('tr[data-detail=carol] .msg.error') !== null")
        error = browser.evaluate("document.querySelector('tr[data-detail=carol] .msg').textContent")

        # Reset every limit of alice's from her own panel.
        browser.evaluate("document.querySelector('[data-manage=\"acme:alice\"]').click()")
        browser.wait_for("document.querySelector('tr[data-detail=\"acme:alice\"]') !== null")
        browser.evaluate(
            """(() => {
              const form = document.querySelector(
                'tr[data-detail="acme:alice"] form[data-action=reset]');
              form.elements.reason.value = 'incident 12';
              form.querySelector('button').click();
            })()"""
        )
        browser.wait_for(
            "document.querySelectorAll('tr[data-detail=\"acme:alice\"] li[data-op=reset]')"
            ".length === 3"
        )
        alice = browser.evaluate("document.querySelector('tr[data-user=\"acme:alice\"]').innerText")
        # A reload of the page shows the same history, from the store.
        browser.open(f"{url}/")
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 2")
        browser.evaluate("document.querySelector('[data-manage=carol]').click()")
        browser.wait_for("document.querySelectorAll('tr[data-detail=carol] li').length === 1")
        reloaded = browser.evaluate(
            "document.querySelector('tr[data-detail=carol] li').textContent"
        )
    print(f"screenshot: {shot}")
    assert after_adjust["state"] == "warning"  # $0.87 of $1.00: calls go through again
    assert after_adjust["message"] == "Adjusted daily: $0.87 of $1.00 used."
    (line,) = after_adjust["history"]
    assert "adjusted daily -$0.50, used then $0.87 · by users page" in line
    assert "refund <b>ticket</b> 7" in line  # shown as text, never as markup
    assert after_adjust["bold"] == 0
    assert "must be a number" in error
    assert {u.name: u.used for u in guard.usage("carol")}["daily"] == Decimal("0.87")
    assert "$0.00" in alice
    assert [u.used for u in guard.usage("acme:alice")[:3]] == [0, 0, 0]
    assert reloaded == line
    assert [a.reason for a in guard.adjustments("carol")] == ["refund <b>ticket</b> 7"]


EVIL_ACTION = """<!doctype html><html><body><script>
fetch("{target}", {{method: "POST", credentials: "include", mode: "no-cors",
  headers: {{"Content-Type": "text/plain"}}, body: '{{"limit":"daily","amount":"100"}}'}})
  .finally(() => {{ document.title = "sent"; }});
</script></body></html>"""


@pytest.mark.browser
def test_another_site_cannot_adjust_through_a_signed_in_browser(
    tmp_path: Path, clock: FakeClock
) -> None:
    chromium()
    guard = Guard(admin_config(), clock=clock)
    spend(guard, "carol", "0.10")
    app = users_app(guard, token=TOKEN)
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        browser.open(f"{url}/")
        browser.submit(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.querySelector('form button[type=submit]').click()"
        )
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 1")
        target = f"{url}/api/users/carol/adjust"
        evil_app = Starlette(
            routes=[Route("/", lambda request: HTMLResponse(EVIL_ACTION.format(target=target)))]
        )
        with serve(evil_app) as evil_url:
            browser.open(evil_url.replace("127.0.0.1", "localhost") + "/")
            browser.wait_for("document.title === 'sent'")
    assert {u.name: u.used for u in guard.usage("carol")}["daily"] == Decimal("0.10")
    assert guard.adjustments("carol") == []


@pytest.mark.browser
def test_the_manage_panel_fits_a_phone(tmp_path: Path, clock: FakeClock) -> None:
    chromium()
    guard = Guard(admin_config(), clock=clock)
    spend(guard, "acme:" + "a-very-long-user-id-without-spaces" * 3, "0.30")
    guard.adjust("acme:" + "a-very-long-user-id-without-spaces" * 3, "daily", "0.01", "x" * 200)
    app = users_app(guard, token=TOKEN)
    with (
        serve(app) as url,
        Browser(tmp_path / "profile", width=390, height=844, mobile=True) as browser,
    ):
        browser.open(f"{url}/")
        browser.submit(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.querySelector('form button[type=submit]').click()"
        )
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 1")
        browser.evaluate("document.querySelector('[data-manage]').click()")
        browser.wait_for("document.querySelectorAll('tr[data-detail] li').length === 1")
        metrics = browser.evaluate(
            """(() => {
              const button = document.querySelector(
                'tr[data-detail] form[data-action=reset] button');
              const box = button.getBoundingClientRect();
              return {inner: window.innerWidth, scroll: document.scrollingElement.scrollWidth,
                      right: box.right, width: box.width};
            })()"""
        )
    assert metrics["scroll"] <= metrics["inner"] == 390, metrics  # no sideways scroll
    assert metrics["width"] > 0
    assert metrics["right"] <= 390


async def test_the_page_names_the_tier_the_guard_charges_a_user_under(clock: FakeClock) -> None:
    # The tier comes from the user's users: entry, else from the app's tier_of: the
    # list, one user's summary and an action's answer all say the same.
    config = admin_config(
        tiers={"pro": [{"max": 10.00, "per": "day"}]},
        users={"staff": "pro", "bot": [{"max": 2.00, "per": "day"}]},
    )
    plans = {"vip1": "pro", "lost": "platinum"}  # an undefined tier gets the default
    guard = Guard(config, clock=clock, tier_of=plans.get)
    for user in ("vip1", "lost", "staff", "bot", "plain"):
        spend(guard, user, "0.10")
    expected = {
        "vip1": "pro",
        "lost": "default",
        "staff": "pro",
        "bot": "custom",
        "plain": "default",
    }
    assert {user: guard.tier(user) for user in expected} == expected
    assert {user: await guard.atier(user) for user in expected} == expected
    assert guard.tier("anonymous") == "anonymous"
    async with client_for(users_app(guard, token=TOKEN)) as client:
        listed = await client.get("/api/users", headers=bearer())
        one = await client.get("/api/users/vip1", headers=bearer())
        adjusted = await client.post(
            "/api/users/vip1/adjust", json={"limit": "user:0", "amount": "-0.05"}, headers=bearer()
        )
    assert {u["user_id"]: u["tier"] for u in listed.json()["users"]} == expected
    assert one.json()["tier"] == "pro"
    assert adjusted.status_code == 200, adjusted.text
    assert adjusted.json()["user"]["tier"] == "pro"


async def test_a_user_over_only_a_soft_limit_is_not_shown_as_refused(clock: FakeClock) -> None:
    # $0.60 spent: past the weekly soft $0.50 (it never refuses a call), within the
    # daily $1.00 that does.
    config = admin_config(
        limits={
            "daily": {"max": 1.00, "per": "day"},
            "soft": {"max": 0.50, "per": "week", "type": "allow"},
        },
        default=["daily", "soft"],
    )
    guard = Guard(config, clock=clock)
    spend(guard, "dora", "0.60")
    states = {u.name: (u.type, u.state) for u in guard.usage("dora")}
    assert states["daily"] == ("block", "ok")
    assert states["soft"] == ("allow", "exceeded")
    async with client_for(users_app(guard, token=TOKEN)) as client:
        (user,) = (await client.get("/api/users", headers=bearer())).json()["users"]
        exceeded = await client.get("/api/users", params={"state": "exceeded"}, headers=bearer())
    assert (user["state"], user["blocked"]) == ("warning", False)
    assert (user["spend_limit"], user["remaining_usd"]) == ("daily", "0.4")  # the hard one
    assert exceeded.json()["users"] == []
