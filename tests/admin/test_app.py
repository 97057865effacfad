"""The users page: token and cookie auth, listing over memory, SQLite and real Redis,
manual usage events, and the page itself rendered by headless Chromium."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from structlog.testing import capture_logs

from admin._support import (
    MODEL,
    TOKEN,
    Browser,
    admin_config,
    bearer,
    chromium,
    read_png,
    serve,
)
from payi_guard import BudgetExceeded, track_context
from payi_guard.admin import MAX_BATCH, SESSION_COOKIE, users_app
from payi_guard.admin.directory import user_of_key, users_of_keys
from payi_guard.clock import FakeClock
from payi_guard.engine import CallRequest, Guard
from payi_guard.identity import Pseudonymizer
from payi_guard.pricing import TokenUsage
from payi_guard.usage import LimitUsage
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE

EXCEEDED_RED = (220, 38, 38)  # #dc2626, the bar of an exceeded limit
WARNING_AMBER = (217, 119, 6)  # #d97706
OK_GREEN = (22, 163, 74)  # #16a34a


class CountingGuard(Guard):
    """A Guard that notes whose usage is read (the reads themselves are the real ones)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reads: list[str] = []

    async def ausage(
        self, user_id: object, *, limit_ids: Sequence[str] = (), tier: str | None = None
    ) -> list[LimitUsage]:
        self.reads.append(str(user_id))
        return await super().ausage(user_id, limit_ids=limit_ids, tier=tier)


def _delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["memory", "redis"])
async def any_guard(
    request: pytest.FixtureRequest, clock: FakeClock, key_prefix: str
) -> AsyncIterator[CountingGuard]:
    """A guard on memory storage, then on the shared Redis under a fresh key prefix."""
    if request.param == "memory":
        yield CountingGuard(admin_config(), clock=clock)
        return
    url: str = request.getfixturevalue("redis_url")
    guard = CountingGuard(admin_config(), storage=url, key_prefix=key_prefix, clock=clock)
    try:
        yield guard
    finally:
        await guard.aclose()
        _delete_prefix(url, key_prefix)


@pytest.fixture
def memory_guard(clock: FakeClock) -> CountingGuard:
    return CountingGuard(admin_config(), clock=clock)


@asynccontextmanager
async def client_for(
    app: Any, base_url: str = "http://testserver"
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url) as client:
        yield client


def spend(guard: Guard, user_id: str, cost: str, tokens: int = 100, **kwargs: Any) -> None:
    guard.record(user_id=user_id, model=MODEL, input_tokens=tokens, cost_usd=cost, **kwargs)


def seed_users(guard: Guard, count: int = 25) -> list[str]:
    """user00..user{count-1}; user i spends $0.05 * i (20+ exceeded, 16-19 warning)."""
    users = [f"user{i:02d}" for i in range(count)]
    for i, uid in enumerate(users):
        spend(guard, uid, str(Decimal("0.05") * i))
    return users


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_CONTENT_TYPE
    document: dict[str, Any] = response.json()
    assert document["status"] == status
    assert document["type"].startswith("urn:payi-guard:problem:")
    return document


def ids_of(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [u["user_id"] for u in response.json()["users"]]


# -- construction ----------------------------------------------------------------------------


def test_a_short_or_blank_token_is_refused(memory_guard: Guard) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        users_app(memory_guard, token="x" * 15)
    with pytest.raises(ValueError, match="whitespace"):
        users_app(memory_guard, token="x" * 16 + " y")
    users_app(memory_guard, token="x" * 16)  # 16 characters are enough
    with pytest.raises(ValueError, match="page_size"):
        users_app(memory_guard, token=TOKEN, page_size=0)


def test_a_pseudonymising_guard_is_refused(clock: FakeClock) -> None:
    guard = Guard(admin_config(), clock=clock, pseudonymizer=Pseudonymizer(b"k" * 32))
    with pytest.raises(ValueError, match="pseudonym"):
        users_app(guard, token=TOKEN)


# -- authentication --------------------------------------------------------------------------


async def test_the_api_needs_the_token_and_never_says_who_exists(memory_guard: Guard) -> None:
    spend(memory_guard, "alice", "0.10")
    app = users_app(memory_guard, token=TOKEN)
    async with client_for(app) as client:
        for headers in ({}, bearer("wrong-token-0123456789"), {"authorization": f"Basic {TOKEN}"}):
            answers = [
                await client.get("/api/users", headers=headers),
                await client.get("/api/users/alice", headers=headers),
                await client.get("/api/users/nobody", headers=headers),
                await client.post("/api/events", headers=headers, json={"model": MODEL}),
            ]
            for response in answers:
                assert_problem(response, 401)
                assert response.headers["www-authenticate"] == 'Bearer realm="payi_guard"'
                assert "alice" not in response.text
            # A known and an unknown user get the very same answer.
            assert answers[1].content == answers[2].content
        assert (await client.get("/api/users", headers=bearer())).status_code == 200


async def test_healthz_needs_no_token_and_shows_no_data(memory_guard: Guard) -> None:
    spend(memory_guard, "alice", "0.10")
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def csrf_of(page: httpx.Response) -> str:
    """The sign-out form's CSRF token, from the page's HTML."""
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text[:500]
    return found.group(1)


async def test_the_page_signs_in_with_a_posted_token_then_uses_a_cookie(
    memory_guard: Guard, clock: FakeClock
) -> None:
    spend(memory_guard, "alice-secret", "0.10")
    app = users_app(memory_guard, token=TOKEN, session_ttl=600)
    async with client_for(app) as client:
        login = await client.get("/")
        assert login.status_code == 401
        assert '<form method="post"' in login.text
        assert 'name="token"' in login.text
        assert "alice-secret" not in login.text

        wrong = await client.post("/", data={"token": "not-the-token-at-all"})
        assert wrong.status_code == 401
        assert "not valid" in wrong.text
        assert "set-cookie" not in wrong.headers

        signed = await client.post("/", data={"token": TOKEN})
        assert signed.status_code == 303
        assert signed.headers["location"] == "./"
        cookie = signed.headers["set-cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=v2.")
        for flag in ("HttpOnly", "SameSite=strict", "Path=/", "Max-Age=600"):
            assert flag in cookie
        assert "Secure" not in cookie  # plain http
        assert TOKEN not in cookie

        page = await client.get("/")
        assert page.status_code == 200
        assert "<table" in page.text
        assert TOKEN not in page.text
        listing = await client.get("/api/users")
        assert ids_of(listing) == ["alice-secret"]
        # The session cookie reads, it never posts events: that takes the Bearer token.
        assert_problem(await client.post("/api/events", json={"model": MODEL}), 401)

        # A forged or tampered cookie is refused.
        value = client.cookies[SESSION_COOKIE]
        expiry, nonce, mac = value.split(".")[1:]
        client.cookies.clear()
        for forged in (
            f"v2.{expiry}.{nonce}.{mac[:-1]}{'0' if mac[-1] != '0' else '1'}",
            f"v2.{int(expiry) + 1}.{nonce}.{mac}",
            f"v2.{expiry}.{nonce[:-1]}{'0' if nonce[-1] != '0' else '1'}.{mac}",
            f"v1.{expiry}.{mac}",
            f"v3.{expiry}.{nonce}.{mac}",
            "garbage",
        ):
            cookie_header = {"cookie": f"{SESSION_COOKIE}={forged}"}
            assert_problem(await client.get("/api/users", headers=cookie_header), 401)
            assert (await client.get("/", headers=cookie_header)).status_code == 401
        client.cookies.set(SESSION_COOKIE, value)
        assert (await client.get("/api/users")).status_code == 200

        # Sessions expire by the guard's clock.
        clock.advance(601)
        assert_problem(await client.get("/api/users"), 401)


async def test_a_token_in_the_address_never_signs_in(memory_guard: Guard) -> None:
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        for params in ({"token": TOKEN}, {"token": "wrong-token-0123456789"}):
            response = await client.get("/", params=params)
            assert response.status_code == 400
            assert "set-cookie" not in response.headers
            assert 'name="token"' in response.text  # the form to use instead
            assert "not in the address" in response.text
            assert TOKEN not in response.text
        assert (await client.get("/")).status_code == 401


async def test_the_sign_in_form_and_sign_out(memory_guard: Guard) -> None:
    async with client_for(users_app(memory_guard, token=TOKEN), "https://testserver") as client:
        refused = await client.post("/", data={"token": "nope-nope-nope-nope"})
        assert refused.status_code == 401
        assert "not valid" in refused.text
        signed = await client.post("/", data={"token": TOKEN})
        assert signed.status_code == 303
        assert "Secure" in signed.headers["set-cookie"]  # https
        page = await client.get("/")
        assert page.status_code == 200
        out = await client.post("/logout", data={"csrf": csrf_of(page)})
        assert out.status_code == 303
        assert f'{SESSION_COOKIE}=""' in out.headers["set-cookie"]
        assert (await client.get("/")).status_code == 401
        huge = await client.post("/", data={"token": "x" * 10_000})
        assert huge.status_code == 413


async def test_state_changing_posts_are_refused_from_another_site(memory_guard: Guard) -> None:
    app = users_app(memory_guard, token=TOKEN)
    evil = {"origin": "https://evil.example"}
    async with client_for(app) as client:
        # Signing in from another site's form.
        refused = await client.post("/", data={"token": TOKEN}, headers=evil)
        assert refused.status_code == 403
        assert "set-cookie" not in refused.headers
        cross = {"sec-fetch-site": "cross-site"}
        assert (await client.post("/", data={"token": TOKEN}, headers=cross)).status_code == 403

        signed = await client.post(
            "/", data={"token": TOKEN}, headers={"origin": "http://testserver"}
        )
        assert signed.status_code == 303
        page = await client.get("/")
        csrf = csrf_of(page)
        # Signing out takes the page's CSRF token, from the page's own origin.
        for data, headers in (
            ({}, {}),
            ({"csrf": "forged"}, {}),
            ({"csrf": csrf}, evil),
            ({"csrf": csrf}, cross),
        ):
            response = await client.post("/logout", data=data, headers=headers)
            assert response.status_code == 403, (data, headers)
            assert "set-cookie" not in response.headers
            assert (await client.get("/")).status_code == 200  # still signed in
        # Another session's token does not sign this one out.
        other = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        async with other:
            await other.post("/", data={"token": TOKEN})
            other_csrf = csrf_of(await other.get("/"))
        assert other_csrf != csrf
        assert (await client.post("/logout", data={"csrf": other_csrf})).status_code == 403
        done = await client.post(
            "/logout", data={"csrf": csrf}, headers={"origin": "http://testserver"}
        )
        assert done.status_code == 303
        assert (await client.get("/")).status_code == 401


async def test_mounted_under_a_path_the_cookie_is_scoped_to_it(memory_guard: Guard) -> None:
    spend(memory_guard, "alice", "0.10")
    parent = Starlette(routes=[Mount("/guard", users_app(memory_guard, token=TOKEN))])
    async with client_for(parent) as client:
        signed = await client.post("/guard/", data={"token": TOKEN})
        assert signed.status_code == 303
        assert "Path=/guard/" in signed.headers["set-cookie"]
        assert (await client.get("/guard/")).status_code == 200
        assert ids_of(await client.get("/guard/api/users")) == ["alice"]
        assert (await client.get("/guard/healthz")).status_code == 200


async def test_the_page_is_escaped_and_locked_down(memory_guard: Guard) -> None:
    app = users_app(memory_guard, token=TOKEN, title='<script>alert("x")</script> & co')
    async with client_for(app) as client:
        page = await client.get("/", headers=bearer())
        login = await client.get("/")
    assert page.status_code == 200
    nonces = []
    for response in (page, login):
        assert "<script>alert" not in response.text
        assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in response.text
        policy = response.headers["content-security-policy"]
        found = re.search(r"'nonce-([^']+)'", policy)
        assert found is not None
        nonces.append(found.group(1))
        assert f'<style nonce="{found.group(1)}">' in response.text
        assert "default-src 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-frame-options"] == "DENY"
    assert f'<script nonce="{nonces[0]}">' in page.text
    assert nonces[0] != nonces[1]  # a fresh nonce per response
    # Data reaches the page through textContent only; nothing external is loaded.
    assert "innerHTML" not in page.text
    assert "http://" not in page.text
    assert "https://" not in page.text


# -- listing users ---------------------------------------------------------------------------


async def test_lists_every_user_with_exactly_what_the_guard_reports(
    any_guard: CountingGuard,
) -> None:
    guard = any_guard
    spend(guard, "acme:alice", "0.85", tokens=2000)  # warning on daily
    spend(guard, "bob", "1.25", limit_ids=["project"])  # daily exceeded
    spend(guard, "carol", "0.10")
    reservation = guard.begin(CallRequest(model=MODEL, input_tokens=10, max_output_tokens=10))
    reservation.settle(TokenUsage(1000, 500))  # no user: the shared anonymous bucket

    async with client_for(users_app(guard, token=TOKEN, directory_ttl=0)) as client:
        response = await client.get("/api/users", headers=bearer())
    body = response.json()
    # Org, global and limit_ids counters are not users.
    assert ids_of(response) == ["acme:alice", "anonymous", "bob", "carol"]
    assert (body["total"], body["pages"], body["page"], body["scope"]) == (4, 1, 1, "all")
    assert body["truncated"] is False
    assert body["now"] == "2026-11-27T12:00:00+00:00"
    users = {u["user_id"]: u for u in body["users"]}
    for uid, user in users.items():
        assert user["limits"] == [limit.as_dict() for limit in guard.usage(uid)]
    alice, anonymous, bob = users["acme:alice"], users["anonymous"], users["bob"]
    assert (alice["state"], alice["blocked"], alice["kind"]) == ("warning", False, "user")
    assert (alice["spend_usd"], alice["remaining_usd"], alice["max_usd"]) == ("0.85", "0.15", "1")
    assert alice["spend_limit"] == "daily"
    assert [limit["scope"] for limit in alice["limits"]] == [
        "user",
        "user",
        "user",
        "org",
        "global",
    ]
    assert (bob["state"], bob["blocked"], bob["spend_usd"]) == ("exceeded", True, "1.25")
    assert (anonymous["kind"], anonymous["spend_usd"], anonymous["spend_limit"]) == (
        "anonymous",
        "0.002",
        "anonymous:0",
    )
    assert users["carol"]["state"] == "ok"


async def test_filters_sorts_and_pages_many_users(any_guard: CountingGuard) -> None:
    guard = any_guard
    users = seed_users(guard)
    app = users_app(guard, token=TOKEN, page_size=10, directory_ttl=0)

    async def get(**params: str) -> httpx.Response:
        guard.reads.clear()
        response = await client.get("/api/users", params=params, headers=bearer())
        assert response.status_code == 200, response.text
        assert len(guard.reads) <= 10  # never more than page_size users' usage
        return response

    async with client_for(app) as client:
        first = await get()
        assert ids_of(first) == users[:10]
        assert guard.reads == users[:10]
        assert (first.json()["total"], first.json()["pages"]) == (25, 3)
        assert ids_of(await get(page="3")) == users[20:]
        assert ids_of(await get(page="4")) == []
        assert ids_of(await get(order="desc")) == users[::-1][:10]
        assert ids_of(await get(order="desc", page="3")) == users[::-1][20:]

        # Filters: substring or glob, case-insensitive.
        ones = await get(q="1")  # user01, user10-19, user21: 12 users on 2 pages
        assert ids_of(ones) == ["user01", *users[10:19]]
        assert (ones.json()["total"], ones.json()["pages"]) == (12, 2)
        assert ids_of(await get(q="1", page="2")) == ["user19", "user21"]
        assert ids_of(await get(q="er1")) == users[10:20]
        assert ids_of(await get(q="USER2*")) == users[20:]
        assert ids_of(await get(q="user?5")) == ["user05", "user15"]
        assert ids_of(await get(q="nobody")) == []

        # One page holds every match: sort and state apply across all of them.
        teens = await get(q="user1?", sort="spend", order="desc")
        assert ids_of(teens) == users[10:20][::-1]
        assert teens.json()["scope"] == "all"
        assert ids_of(await get(q="user1?", sort="remaining")) == users[10:20][::-1]
        assert ids_of(await get(q="user1?", state="warning")) == users[16:20]
        assert ids_of(await get(q="user?9", sort="state", order="desc")) == [
            "user19",  # warning first, then ok users by id
            "user09",
        ]
        assert ids_of(await get(state="exceeded", q="user2*", sort="name")) == users[20:]

        # Several pages: pages are cut by id, the sort orders the page's users.
        paged = await get(sort="spend", order="desc")
        assert ids_of(paged) == users[:10][::-1]
        assert paged.json()["scope"] == "page"
        assert ids_of(await get(sort="spend", order="desc", page="3")) == users[20:][::-1]
        assert ids_of(await get(state="exceeded", page="2")) == []
        assert ids_of(await get(state="exceeded", page="3")) == users[20:]


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store_guard(
    request: pytest.FixtureRequest, clock: FakeClock, key_prefix: str, tmp_path: Path
) -> AsyncIterator[Guard]:
    """A guard on each store: memory, an SQLite file, the shared Redis (a fresh prefix)."""
    if request.param == "memory":
        yield Guard(admin_config(), clock=clock)
        return
    url = f"sqlite:///{tmp_path / 'budgets.db'}"
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
    guard = Guard(admin_config(), storage=url, key_prefix=key_prefix, clock=clock)
    try:
        yield guard
    finally:
        await guard.aclose()
        if request.param == "redis":
            _delete_prefix(url, key_prefix)


async def test_a_user_whose_calls_are_refused_is_listed_as_exceeded(store_guard: Guard) -> None:
    guard = store_guard
    spend(guard, "dave", "0.999966")  # $0.000034 of the daily $1 left
    spend(guard, "carol", "0.10")
    small = CallRequest(model=MODEL, input_tokens=10, max_output_tokens=10)  # $0.00003
    big = CallRequest(model=MODEL, input_tokens=30, max_output_tokens=20)  # $0.00007
    app = users_app(guard, token=TOKEN, directory_ttl=0)

    async def shown() -> tuple[dict[str, Any], list[str]]:
        async with client_for(app) as client:
            everyone = await client.get("/api/users", headers=bearer())
            exceeded = await client.get(
                "/api/users", params={"state": "exceeded"}, headers=bearer()
            )
        users = {u["user_id"]: u for u in everyone.json()["users"]}
        return users["dave"], ids_of(exceeded)

    dave, exceeded = await shown()
    assert (dave["state"], dave["blocked"], exceeded) == ("warning", False, [])
    with capture_logs(), track_context(user_id="dave"), pytest.raises(BudgetExceeded) as info:
        guard.begin(big)  # "0.000034 USD left, not enough for this call"
    dave, exceeded = await shown()
    assert (dave["state"], dave["blocked"], exceeded) == ("exceeded", True, ["dave"])
    daily = next(limit for limit in dave["limits"] if limit["name"] == "daily")
    assert (daily["remaining"], daily["state"]) == ("0.000034", "exceeded")
    assert daily == info.value.limit.as_dict()  # the page and the 429 agree
    # A smaller call still fits: the user is no longer blocked.
    with capture_logs(), track_context(user_id="dave"):
        guard.begin(small).settle(TokenUsage(10, 10))
    dave, exceeded = await shown()
    assert (dave["state"], dave["blocked"], exceeded) == ("warning", False, [])


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"state": "broken"}, "state"),
        ({"sort": "cost"}, "sort"),
        ({"order": "up"}, "order"),
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "two"}, "page"),
        ({"q": "x" * 201}, "q"),
    ],
)
async def test_bad_parameters_are_refused(
    memory_guard: Guard, params: dict[str, str], parameter: str
) -> None:
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        response = await client.get("/api/users", params=params, headers=bearer())
    document = assert_problem(response, 400)
    assert document["parameter"] == parameter
    if parameter in ("state", "sort", "order"):  # the refused value is not repeated
        assert params[parameter] not in document["detail"]


async def test_one_user_and_invalid_ids(any_guard: CountingGuard) -> None:
    spend(any_guard, "acme:bob", "0.30", tokens=5000)
    async with client_for(users_app(any_guard, token=TOKEN)) as client:
        bob = await client.get("/api/users/acme:bob", headers=bearer())
        assert bob.status_code == 200
        assert bob.json()["limits"] == [u.as_dict() for u in any_guard.usage("acme:bob")]
        assert (bob.json()["user_id"], bob.json()["spend_usd"]) == ("acme:bob", "0.3")
        # A valid id without counters shows its limits at zero.
        nobody = await client.get("/api/users/nobody", headers=bearer())
        assert nobody.json()["spend_usd"] == "0"
        for raw in ("a%20b", "x%3Cscript%3E", "%C3%A9t%C3%A9", "a::b", "x" * 129):
            response = await client.get(f"/api/users/{raw}", headers=bearer())
            document = assert_problem(response, 400)
            assert document["title"] == "Invalid user id"
            for shown in ("a b", "<script>", "été", "a::b", "x" * 129):
                assert shown not in response.text


@pytest.mark.parametrize(
    ("key", "user"),
    [
        ("pg:{u:acme:alice}:usd:day:1795737600", "acme:alice"),
        ("pg:{a:anonymous}:requests:minute:1795780800", "anonymous"),
        ("pg:{a:anonymous:s-1}:usd:day:1795737600", "anonymous:s-1"),
        ("pg:{o:acme}:usd:month:1795737600", None),
        ("pg:{g:*}:usd:month:1795737600", None),
        ("pg:{l:project}:usd:month:1795737600", None),
        ("pg:{u:bad id}:usd:day:1", None),
        ("pg:{u:}:usd:day:1", None),
        ("pg:{u:alice", None),
        ("pgx:{u:alice}:usd:day:1", None),
        ("other:{u:alice}:usd:day:1", None),
    ],
)
def test_users_are_read_from_the_hash_tag_of_their_keys(key: str, user: str | None) -> None:
    assert user_of_key("pg", key) == user
    assert users_of_keys("pg", [key, key]) == ([] if user is None else [user])


async def test_the_user_list_is_reused_for_the_directory_ttl(
    memory_guard: Guard, clock: FakeClock
) -> None:
    spend(memory_guard, "alice", "0.10")
    async with client_for(users_app(memory_guard, token=TOKEN, directory_ttl=5)) as client:
        assert ids_of(await client.get("/api/users", headers=bearer())) == ["alice"]
        spend(memory_guard, "bob", "0.10")
        assert ids_of(await client.get("/api/users", headers=bearer())) == ["alice"]
        clock.advance(5)
        assert ids_of(await client.get("/api/users", headers=bearer())) == ["alice", "bob"]


async def test_a_scan_that_hits_its_key_limit_says_truncated(memory_guard: Guard) -> None:
    seed_users(memory_guard, 6)
    async with client_for(users_app(memory_guard, token=TOKEN, max_keys=4)) as client:
        body = (await client.get("/api/users", headers=bearer())).json()
    assert body["truncated"] is True
    assert 1 <= body["total"] <= 4


async def test_storage_down_is_a_503(clock: FakeClock) -> None:
    guard = Guard(admin_config(), storage="redis://127.0.0.1:1/0", clock=clock)
    async with client_for(users_app(guard, token=TOKEN)) as client:
        assert_problem(await client.get("/api/users", headers=bearer()), 503)
        assert_problem(await client.get("/api/users/alice", headers=bearer()), 503)
    await guard.aclose()


# -- manual events ---------------------------------------------------------------------------


def _limits(guard: Guard, user_id: str, *limit_ids: str) -> dict[str, Decimal | int]:
    return {u.name: u.used for u in guard.usage(user_id, limit_ids=limit_ids)}


async def test_an_event_is_charged_and_logged_exactly_like_record(
    any_guard: CountingGuard,
) -> None:
    guard = any_guard
    before = _limits(guard, "acme:dana", "project")
    event = {
        "user_id": "acme:dana",
        "model": "some-model-without-a-price",
        "provider": "openai-compatible",
        "input_tokens": 1200,
        "output_tokens": 300,
        "cache_read_tokens": 40,
        "cache_write_tokens": 2,
        "cost_usd": "0.0012",
        "use_case_name": "summaries",
        "limit_ids": ["project"],
        "request_id": "req-42",
    }
    async with client_for(users_app(guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            response = await client.post("/api/events", json=event, headers=bearer())
    assert response.status_code == 200, response.text
    assert response.json() == {
        "results": [
            {
                "index": 0,
                "user_id": "acme:dana",
                "cost_usd": "0.0012",
                "outcome": "recorded",
                "priced": True,
                "request_id": "req-42",
            }
        ],
        "count": 1,
        "duplicates": 0,
        "cost_usd": "0.0012",
    }
    after = _limits(guard, "acme:dana", "project")
    delta = {name: after[name] - before[name] for name in after}
    usd = Decimal("0.0012")
    assert delta == {
        "daily": usd,
        "soft": usd,
        "tph": 1542,
        "org:0": usd,
        "global:0": usd,
        "project": usd,
    }
    calls = [line for line in logs if line["event"] == "genai_call"]
    assert len(calls) == 1
    call = calls[0]
    assert {k: call[k] for k in ("user_id", "org_id", "model", "provider", "outcome")} == {
        "user_id": "acme:dana",
        "org_id": "acme",
        "model": "some-model-without-a-price",
        "provider": "openai-compatible",
        "outcome": "recorded",
    }
    assert call["cost_usd"] == 0.0012
    assert (call["input_tokens"], call["output_tokens"]) == (1200, 300)
    assert (call["use_case_name"], call["limit_ids"], call["request_id"]) == (
        "summaries",
        ["project"],
        "req-42",
    )


async def test_events_without_a_cost_are_priced_by_model(memory_guard: Guard) -> None:
    events = [
        {"user_id": "erin", "model": MODEL, "input_tokens": 1000, "output_tokens": 500},
        # A JSON number keeps its exact decimal value (never a binary float).
        {"user_id": "erin", "model": MODEL, "cost_usd": 0.1},
        {"user_id": "erin", "model": MODEL, "cost_usd": 3},
    ]
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        response = await client.post("/api/events", json=events, headers=bearer())
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    # 1000 tokens at $1/M + 500 at $2/M.
    assert [r["cost_usd"] for r in results] == ["0.002", "0.1", "3"]
    assert response.json()["cost_usd"] == "3.102"
    assert _limits(memory_guard, "erin")["soft"] == Decimal("3.102")


async def test_overruns_are_logged_and_never_refused(memory_guard: Guard) -> None:
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            response = await client.post(
                "/api/events",
                json=[{"user_id": "fay", "model": MODEL, "cost_usd": "0.90"}] * 2,
                headers=bearer(),
            )
    assert response.status_code == 200
    assert [line["limit"] for line in logs if line["event"] == "budget_overrun"] == ["daily"]
    assert [line["limit"] for line in logs if line["event"] == "budget_warning"] == ["daily"]
    assert _limits(memory_guard, "fay")["daily"] == Decimal("1.80")


async def test_the_header_names_the_user_of_events_without_one(memory_guard: Guard) -> None:
    headers = {**bearer(), "xProxy-User-ID": "acme:gus"}
    events = [{"model": MODEL, "cost_usd": "0.01"}, {"user_id": "hal", "model": MODEL}]
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        response = await client.post("/api/events", json=events, headers=headers)
        assert [r["user_id"] for r in response.json()["results"]] == ["acme:gus", "hal"]
        assert _limits(memory_guard, "acme:gus")["daily"] == Decimal("0.01")

        bad_header = {**bearer(), "xProxy-User-ID": "gus smith"}
        refused = await client.post("/api/events", json=events[0], headers=bad_header)
        document = assert_problem(refused, 400)
        assert document["errors"][0]["field"] == "user_id"
        assert "header" in document["errors"][0]["message"]
        assert "gus smith" not in refused.text

        missing = await client.post("/api/events", json=events[0], headers=bearer())
        assert assert_problem(missing, 400)["errors"][0]["message"].startswith("is required")


async def test_a_bad_event_in_a_batch_charges_nothing(any_guard: CountingGuard) -> None:
    guard = any_guard
    batch: list[object] = [
        {"user_id": "ivy", "model": MODEL, "cost_usd": "0.50"},
        {"user_id": "jon", "model": MODEL, "input_tokens": 100},
        {"user_id": "ivy", "model": MODEL, "input_tokens": -5},
        "not an event",
    ]
    async with client_for(users_app(guard, token=TOKEN, directory_ttl=0)) as client:
        with capture_logs() as logs:
            response = await client.post("/api/events", json=batch, headers=bearer())
        document = assert_problem(response, 400)
        assert [(e["index"], e["field"]) for e in document["errors"]] == [
            (2, "input_tokens"),
            (3, None),
        ]
        assert document["errors"][1]["message"] == "an event must be a JSON object"
        assert document["error_count"] == 2
        assert "nothing was charged" in document["detail"]
        assert logs == []
        assert _limits(guard, "ivy")["daily"] == 0
        assert _limits(guard, "jon")["daily"] == 0
        assert ids_of(await client.get("/api/users", headers=bearer())) == []

        good = batch[:2]
        assert (await client.post("/api/events", json=good, headers=bearer())).status_code == 200
        assert _limits(guard, "ivy")["daily"] == Decimal("0.50")
        assert ids_of(await client.get("/api/users", headers=bearer())) == ["ivy", "jon"]


BASE = {"user_id": "kim", "model": MODEL}

INVALID_EVENTS: list[tuple[str, dict[str, object], str | None, str]] = [
    ("unknown field", {**BASE, "colour": "red"}, "colour", "unknown field 'colour'"),
    ("odd field name", {**BASE, "a\nb": 1}, None, "an unknown field"),
    ("missing model", {"user_id": "kim"}, "model", "is required"),
    ("model not text", {**BASE, "model": 42}, "model", "must be a string"),
    ("model with control", {**BASE, "model": "gpt\x00"}, "model", "printable"),
    ("unpriced model", {**BASE, "model": "mystery-model"}, "model", "no price is known"),
    ("bad provider", {**BASE, "provider": "open ai"}, "provider", "letters"),
    ("negative tokens", {**BASE, "input_tokens": -1}, "input_tokens", "integer"),
    ("tokens as text", {**BASE, "output_tokens": "10"}, "output_tokens", "integer"),
    ("fractional tokens", {**BASE, "cache_read_tokens": 1.5}, "cache_read_tokens", "integer"),
    ("boolean tokens", {**BASE, "cache_write_tokens": True}, "cache_write_tokens", "integer"),
    ("too many tokens", {**BASE, "input_tokens": 10**13}, "input_tokens", "integer"),
    ("negative cost", {**BASE, "cost_usd": "-0.1"}, "cost_usd", "decimal number"),
    ("cost not a number", {**BASE, "cost_usd": "12 dollars"}, "cost_usd", "decimal number"),
    ("cost NaN text", {**BASE, "cost_usd": "NaN"}, "cost_usd", "decimal number"),
    ("cost too large", {**BASE, "cost_usd": "1e400"}, "cost_usd", "decimal number"),
    ("cost as bool", {**BASE, "cost_usd": True}, "cost_usd", "decimal number"),
    ("cost as list", {**BASE, "cost_usd": [1]}, "cost_usd", "decimal number"),
    ("cost in arabic digits", {**BASE, "cost_usd": "\u0661"}, "cost_usd", "decimal number"),
    ("cost in wide digits", {**BASE, "cost_usd": "\uff10.5"}, "cost_usd", "decimal number"),
    ("user with space", {**BASE, "user_id": "kim lee"}, "user_id", "whitespace"),
    ("user as float", {**BASE, "user_id": 1.5}, "user_id", "must be a string"),
    ("user empty", {**BASE, "user_id": ""}, "user_id", "empty"),
    ("user html", {**BASE, "user_id": "<b>kim</b>"}, "user_id", "U+003C"),
    ("limit ids not list", {**BASE, "limit_ids": "project"}, "limit_ids", "list"),
    ("unknown limit id", {**BASE, "limit_ids": ["project", "nope"]}, "limit_ids[1]", "not defined"),
    ("limit id not text", {**BASE, "limit_ids": [7]}, "limit_ids[0]", "must be a string"),
    ("empty use case", {**BASE, "use_case_name": ""}, "use_case_name", "printable"),
    # A right-to-left override would show "evil" as "live" on the users page.
    ("bidi use case", {**BASE, "use_case_name": "\u202eevil"}, "use_case_name", "printable"),
    ("line separator", {**BASE, "model": "gpt\u2028x"}, "model", "printable"),
    ("use case number", {**BASE, "use_case_name": 3}, "use_case_name", "printable"),
    ("bad request id", {**BASE, "request_id": "has spaces"}, "request_id", "letters"),
]


@pytest.mark.parametrize(
    ("event", "field", "message"),
    [case[1:] for case in INVALID_EVENTS],
    ids=[case[0] for case in INVALID_EVENTS],
)
async def test_invalid_events_are_refused_naming_the_field(
    memory_guard: Guard, event: dict[str, object], field: str | None, message: str
) -> None:
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            single = await client.post("/api/events", json=event, headers=bearer())
            batch = await client.post("/api/events", json=[BASE, event], headers=bearer())
    for response, index in ((single, 0), (batch, 1)):
        document = assert_problem(response, 400)
        assert document["title"] == "Invalid usage event"
        [error] = document["errors"]
        assert (error["index"], error["field"]) == (index, field)
        assert message in error["message"]
    if field == "user_id":
        assert str(event["user_id"]) not in single.text or event["user_id"] == ""
    assert logs == []
    assert _limits(memory_guard, "kim")["daily"] == 0


async def test_an_unpriced_model_is_recorded_when_unknown_models_are_allowed(
    clock: FakeClock,
) -> None:
    guard = Guard(admin_config(unknown_model="allow"), clock=clock)
    async with client_for(users_app(guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            response = await client.post(
                "/api/events",
                json={"user_id": "lia", "model": "mystery", "input_tokens": 10},
                headers=bearer(),
            )
    assert response.status_code == 200
    [result] = response.json()["results"]
    assert (result["cost_usd"], result["priced"]) == ("0", False)
    assert [line["event"] for line in logs] == ["unknown_model", "genai_call"]
    assert _limits(guard, "lia")["tph"] == 10


async def test_bodies_that_are_not_events(memory_guard: Guard) -> None:
    app = users_app(memory_guard, token=TOKEN, max_body_bytes=2048, max_batch=3)
    json_type = {**bearer(), "content-type": "application/json"}

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    async with client_for(app) as client:
        cases: list[tuple[httpx.Response, int, str]] = [
            (await client.post("/api/events", content=b"{", headers=json_type), 400, "JSON"),
            (await client.post("/api/events", content=b"\xff", headers=json_type), 400, "JSON"),
            (await client.post("/api/events", content=b"[]", headers=json_type), 400, "empty"),
            (await client.post("/api/events", content=b'"x"', headers=json_type), 400, "object"),
            (await client.post("/api/events", content=b"[NaN]", headers=json_type), 400, "NaN"),
            (
                await client.post(
                    "/api/events", content=b'{"model": "a", "model": "b"}', headers=json_type
                ),
                400,
                "repeats",
            ),
            (await client.post("/api/events", content=b"[" * 1500, headers=json_type), 400, "JSON"),
            (await client.post("/api/events", json=[BASE] * 4, headers=bearer()), 400, "at most 3"),
            (
                await client.post(
                    "/api/events",
                    content=b"model=x",
                    headers={**bearer(), "content-type": "text/plain"},
                ),
                415,
                "application/json",
            ),
            (await client.post("/api/events", content=b"{}", headers=bearer()), 415, "JSON"),
            (
                await client.post("/api/events", content=b" " * 2049, headers=json_type),
                413,
                "2048 bytes",
            ),
            # Without Content-Length (chunked), the size is checked while reading.
            (await client.post("/api/events", content=chunks(), headers=json_type), 413, "2048"),
        ]
        ok = await client.post(
            "/api/events",
            content=json.dumps(BASE).encode(),
            headers={**bearer(), "content-type": "application/json; charset=utf-8"},
        )
    for response, status, fragment in cases:
        document = assert_problem(response, status)
        assert fragment in document["detail"], document
    assert ok.status_code == 200


async def test_a_full_batch_is_charged_in_order(any_guard: CountingGuard) -> None:
    guard = any_guard
    events = [
        {"user_id": f"batch{i % 100:03d}", "model": MODEL, "cost_usd": "0.001", "input_tokens": 7}
        for i in range(MAX_BATCH)
    ]
    async with client_for(users_app(guard, token=TOKEN)) as client:
        started = time.perf_counter()
        response = await client.post("/api/events", json=events, headers=bearer())
        elapsed = time.perf_counter() - started
        too_many = await client.post("/api/events", json=[*events, BASE], headers=bearer())
    print(f"{MAX_BATCH} events validated and charged in {elapsed * 1000:.0f} ms")
    assert response.status_code == 200
    body = response.json()
    assert body["count"] == MAX_BATCH
    assert [r["index"] for r in body["results"]] == list(range(MAX_BATCH))
    assert body["cost_usd"] == "1"
    assert _limits(guard, "batch042")["daily"] == Decimal("0.010")
    assert _limits(guard, "batch042")["tph"] == 70
    assert assert_problem(too_many, 400)["title"] == "Batch too large"


# -- the page in a real browser --------------------------------------------------------------


def _seed_page(guard: Guard) -> None:
    spend(guard, "acme:alice", "0.42", tokens=15_000)  # ok
    spend(guard, "acme:bob", "0.85", tokens=61_000)  # warning
    spend(guard, "carol", "1.37", tokens=108_000)  # exceeded (daily and tokens)
    spend(guard, "dave", "0.20", tokens=1_000, limit_ids=["project"])


def sign_in(browser: Browser, url: str) -> None:
    """Sign in as a person does: open the page, type the token, press Sign in."""
    browser.open(f"{url}/")
    assert browser.evaluate("document.querySelector('input[name=token]') !== null")
    browser.submit(
        f"document.getElementById('token').value = {json.dumps(TOKEN)};"
        "document.querySelector('form button[type=submit]').click()"
    )
    assert browser.evaluate("location.href") == f"{url}/"  # no token in the address


@pytest.mark.browser
def test_the_page_renders_in_headless_chromium(tmp_path: Path, clock: FakeClock) -> None:
    chromium()  # skip (or fail under CI=true) before starting anything
    guard = Guard(admin_config(), clock=clock)
    _seed_page(guard)
    app = users_app(guard, token=TOKEN, title="Acme <b>budgets</b>")
    shot = tmp_path / "users.png"
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        sign_in(browser, url)
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 4")
        browser.wait_for("document.getElementById('status').textContent.includes('4 of 4')")
        html = browser.evaluate("document.documentElement.outerHTML")
        browser.screenshot(shot)
        # A search the server answers with no user: the page says the filter matched none.
        browser.open(f"{url}/?q=nobody-matches")
        browser.wait_for("document.getElementById('status').textContent.includes('0 of 0')")
        browser.wait_for("!document.getElementById('empty').hidden")
        no_match = browser.evaluate("document.getElementById('empty').textContent")
        browser.command("Network.clearBrowserCookies")  # a new visitor, with a wrong token
        browser.open(f"{url}/")
        browser.submit(
            "document.getElementById('token').value = 'wrong-token-000000';"
            "document.querySelector('form button[type=submit]').click()"
        )
        login = browser.evaluate("document.documentElement.outerHTML")
    print(f"screenshot: {shot}")
    assert shot.exists(), "Chromium wrote no screenshot"

    # The rows exist only if the page's script fetched the API (with the cookie) and
    # rendered it: the served HTML has an empty table body.
    rows = re.findall(r'<tr data-user="([^"]+)" data-state="([^"]+)"', html)
    assert sorted(rows) == [
        ("acme:alice", "ok"),
        ("acme:bob", "warning"),
        ("carol", "exceeded"),
        ("dave", "ok"),
    ]
    assert rows[0] == ("carol", "exceeded")  # worst state first
    assert len(re.findall(r'role="progressbar"', html)) == 5 + 5 + 4 + 4  # one per limit
    for state in ("ok", "warning", "exceeded"):
        assert f'class="fill {state}"' in html
    assert 'class="fill ok soft"' in html  # soft limits are drawn apart and labelled
    assert '<span class="chip soft"' in html
    assert ">Exceeded<" in html
    assert ">Warning<" in html
    assert "in 12h" in html  # the daily window resets at midnight, 12 h after the clock
    assert "$1.37" in html
    assert "108,000" in html
    assert "<h1>Acme &lt;b&gt;budgets&lt;/b&gt;</h1>" in html  # the title is text, not markup
    assert "4 of 4 users" in html
    assert no_match == "No user matches these filters."

    assert 'name="token"' in login
    assert "not valid" in login
    assert "data-user" not in login

    image = read_png(shot.read_bytes())
    assert (image.width, image.height) == (1280, 900)
    colours = image.colours()
    assert len(colours) >= 100  # text, bars, badges: not a blank page
    assert colours.most_common(1)[0][1] < 0.9 * image.width * image.height
    assert image.count_near(EXCEEDED_RED) >= 300  # the exceeded bars
    assert image.count_near(WARNING_AMBER) >= 100
    assert image.count_near(OK_GREEN) >= 100


EVIL_PAGE = """<!doctype html><html><body>
<form id="f" method="post" action="{target}"><input name="csrf" value="guess"></form>
<script>document.getElementById("f").submit();</script>
</body></html>"""


@pytest.mark.browser
def test_sign_in_and_sign_out_in_a_browser(tmp_path: Path, clock: FakeClock) -> None:
    chromium()
    guard = Guard(admin_config(), clock=clock)
    _seed_page(guard)
    app = users_app(guard, token=TOKEN)
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        evil_app = Starlette(
            routes=[
                Route("/", lambda request: HTMLResponse(EVIL_PAGE.format(target=f"{url}/logout")))
            ]
        )
        # The old address form does not sign in, and says what to do instead.
        browser.open(f"{url}/?token={TOKEN}")
        assert browser.evaluate("document.querySelector('tr[data-user]')") is None
        assert "not in the address" in browser.evaluate("document.body.innerText")

        sign_in(browser, url)
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 4")

        # Another site (localhost is not 127.0.0.1) posts a sign-out form: refused.
        with serve(evil_app) as evil_url:
            evil = evil_url.replace("127.0.0.1", "localhost")
            browser.command("Page.navigate", {"url": f"{evil}/"})
            # The page posts its form at once: wait for the answer to that post.
            browser.wait_for(
                f"location.href === {json.dumps(url + '/logout')}"
                " && document.readyState === 'complete'"
            )
            assert "refused" in browser.evaluate("document.body.innerText")
        browser.open(f"{url}/")
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 4")

        # The page's own Sign out button works.
        browser.submit(
            "[...document.querySelectorAll('button')]"
            ".find(b => b.textContent === 'Sign out').click()"
        )
        assert browser.evaluate("location.href") == f"{url}/"
        assert browser.evaluate("document.querySelector('input[name=token]') !== null")
        browser.open(f"{url}/")
        assert browser.evaluate("document.querySelector('tr[data-user]')") is None


@pytest.mark.browser
def test_the_page_fits_a_phone(tmp_path: Path, clock: FakeClock) -> None:
    chromium()
    guard = Guard(admin_config(), clock=clock)
    _seed_page(guard)
    spend(guard, "acme:" + "a-very-long-user-id-without-spaces" * 3, "0.30", limit_ids=["project"])
    spend(guard, "o" * 63 + ":" + "u" * 64, "0.01")  # a long org id too
    spend(guard, "tiny", "0.000000034")
    app = users_app(guard, token=TOKEN, title="Acme Corporation GenAI budgets")
    shot = tmp_path / "phone.png"
    with (
        serve(app) as url,
        Browser(tmp_path / "profile", width=390, height=844, mobile=True) as browser,
    ):
        browser.open(f"{url}/")
        login_fits = browser.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
        sign_in(browser, url)
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 7")
        tiny = browser.evaluate("document.querySelector('tr[data-user=tiny]').innerText")
        # Nothing runs past the screen's edge (a card would clip it): the filters sized to
        # their longest option, an org caption without spaces.
        widest = browser.evaluate(
            "Math.max(...[...document.querySelectorAll('select, .sub, .uid')]"
            ".map(e => e.getBoundingClientRect().right))"
        )
        metrics = browser.evaluate(
            """(() => {
              const button = [...document.querySelectorAll('button')]
                .find(b => b.textContent === 'Sign out');
              const box = button.getBoundingClientRect();
              const hit = document.elementFromPoint(
                box.left + box.width / 2, box.top + box.height / 2);
              return {
                innerWidth: window.innerWidth,
                scrollWidth: document.scrollingElement.scrollWidth,
                left: box.left, right: box.right, width: box.width, height: box.height,
                hit: hit === button || button.contains(hit),
                visible: getComputedStyle(button).visibility === 'visible',
              };
            })()"""
        )
        browser.screenshot(shot)
    print(f"screenshot: {shot}", metrics)
    assert login_fits
    assert "$0.000000034" in tiny  # money as people read it: never "$0." nor "3.4e-8"
    assert "e-" not in tiny.lower()
    assert metrics["innerWidth"] == 390
    assert metrics["scrollWidth"] <= metrics["innerWidth"], metrics  # no sideways scroll
    assert widest <= metrics["innerWidth"], widest
    assert 0 <= metrics["left"] < metrics["right"] <= metrics["innerWidth"], metrics
    assert metrics["width"] > 0
    assert metrics["height"] > 0
    assert metrics["hit"], metrics  # nothing covers it
    assert metrics["visible"]
    image = read_png(shot.read_bytes())
    assert image.width == 390


# -- events: idempotent per request_id, all or nothing ---------------------------------------


async def test_the_same_request_id_is_charged_once(any_guard: CountingGuard) -> None:
    guard = any_guard
    event = {"user_id": "ivy", "model": MODEL, "cost_usd": "0.25", "request_id": "svc-1:42"}
    async with client_for(users_app(guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            first = await client.post("/api/events", json=event, headers=bearer())
            again = await client.post("/api/events", json=event, headers=bearer())
            # In a batch with new events, the repeated one is skipped, the others charged.
            mixed = await client.post(
                "/api/events",
                json=[{**event, "user_id": "ivy"}, {**event, "request_id": "svc-1:43"}],
                headers=bearer(),
            )
    assert first.status_code == 200
    [result] = first.json()["results"]
    assert (result["outcome"], result["cost_usd"]) == ("recorded", "0.25")
    assert again.status_code == 200
    [repeat] = again.json()["results"]
    assert (repeat["outcome"], repeat["cost_usd"], repeat["request_id"]) == (
        "duplicate",
        "0",
        "svc-1:42",
    )
    assert again.json()["cost_usd"] == "0"
    assert again.json()["duplicates"] == 1
    assert mixed.status_code == 200
    assert [r["outcome"] for r in mixed.json()["results"]] == ["duplicate", "recorded"]
    assert _limits(guard, "ivy")["daily"] == Decimal("0.50")  # 0.25 twice, not three times
    assert [line["request_id"] for line in logs if line["event"] == "genai_call"] == [
        "svc-1:42",
        "svc-1:43",
    ]


async def test_request_ids_are_remembered_across_processes_through_the_store(
    redis_url: str, key_prefix: str, clock: FakeClock
) -> None:
    # Two guards on one Redis, as two worker processes would have.
    guards = [
        Guard(admin_config(), storage=redis_url, key_prefix=key_prefix, clock=clock)
        for _ in range(2)
    ]
    event = {"user_id": "jon", "model": MODEL, "cost_usd": "0.125", "request_id": "r-7"}
    try:
        outcomes = []
        for guard in guards:
            async with client_for(users_app(guard, token=TOKEN)) as client:
                response = await client.post("/api/events", json=event, headers=bearer())
                assert response.status_code == 200, response.text
                outcomes.append(response.json()["results"][0]["outcome"])
        assert outcomes == ["recorded", "duplicate"]
        assert _limits(guards[0], "jon")["daily"] == Decimal("0.125")
    finally:
        for guard in guards:
            await guard.aclose()
        _delete_prefix(redis_url, key_prefix)


async def test_a_request_id_is_kept_for_the_dedupe_window(
    memory_guard: Guard, clock: FakeClock
) -> None:
    event = {"user_id": "kay", "model": MODEL, "cost_usd": "0.01", "request_id": "once"}
    app = users_app(memory_guard, token=TOKEN, request_id_ttl=3600)
    async with client_for(app) as client:
        assert (await client.post("/api/events", json=event, headers=bearer())).status_code == 200
        clock.advance(3599)
        again = await client.post("/api/events", json=event, headers=bearer())
        assert again.json()["results"][0]["outcome"] == "duplicate"
        clock.advance(2)
        later = await client.post("/api/events", json=event, headers=bearer())
        assert later.json()["results"][0]["outcome"] == "recorded"
    with pytest.raises(ValueError, match="request_id_ttl"):
        users_app(memory_guard, token=TOKEN, request_id_ttl=0)


async def test_concurrent_posts_of_one_request_id_charge_it_once(
    any_guard: CountingGuard,
) -> None:
    import asyncio

    event = {"user_id": "lee", "model": MODEL, "cost_usd": "0.01", "request_id": "race"}
    async with client_for(users_app(any_guard, token=TOKEN)) as client:
        with capture_logs():
            answers = await asyncio.gather(
                *(client.post("/api/events", json=event, headers=bearer()) for _ in range(8))
            )
    outcomes = []
    for answer in answers:
        if answer.status_code == 409:
            assert "being recorded" in assert_problem(answer, 409)["detail"]
            outcomes.append("busy")
        else:
            assert answer.status_code == 200, answer.text
            outcomes.append(answer.json()["results"][0]["outcome"])
    assert outcomes.count("recorded") == 1
    assert _limits(any_guard, "lee")["daily"] == Decimal("0.01")


async def test_a_request_id_twice_in_one_batch_is_refused(memory_guard: Guard) -> None:
    batch = [
        {"user_id": "max", "model": MODEL, "cost_usd": "0.01", "request_id": "dup"},
        {"user_id": "max", "model": MODEL, "cost_usd": "0.02", "request_id": "other"},
        {"user_id": "max", "model": MODEL, "cost_usd": "0.03", "request_id": "dup"},
    ]
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            response = await client.post("/api/events", json=batch, headers=bearer())
    document = assert_problem(response, 400)
    [error] = document["errors"]
    assert (error["index"], error["field"]) == (2, "request_id")
    assert "event 0" in error["message"]
    assert logs == []
    assert _limits(memory_guard, "max")["daily"] == 0


async def test_an_event_too_costly_for_a_counter_refuses_the_whole_batch(
    any_guard: CountingGuard,
) -> None:
    guard = any_guard
    # 10^12 output tokens of gpt-4o cost $10,000,000: more than a counter holds.
    overflowing = [
        {"user_id": "ned", "model": MODEL, "cost_usd": "0.50"},
        {"user_id": "ned", "model": "gpt-4o", "output_tokens": 10**12},
        {"user_id": "ned", "model": MODEL, "cost_usd": "0.25"},
    ]
    # Each event fits, but together they are more than one counter (global) holds.
    too_much = [{"user_id": f"u{i}", "model": MODEL, "cost_usd": "1000000"} for i in range(10)]
    async with client_for(users_app(guard, token=TOKEN, directory_ttl=0)) as client:
        with capture_logs() as logs:
            single = await client.post("/api/events", json=overflowing, headers=bearer())
            total = await client.post("/api/events", json=too_much, headers=bearer())
        users = ids_of(await client.get("/api/users", headers=bearer()))
    document = assert_problem(single, 400)
    [error] = document["errors"]
    assert error["index"] == 1
    assert "$10,000,000" in error["message"]
    assert "nothing was charged" in document["detail"]
    document = assert_problem(total, 400)
    [error] = document["errors"]
    assert error["index"] == 9
    assert "split the batch" in error["message"]
    assert logs == []  # no storage_error, no genai_call: nothing was charged
    assert users == []
    assert _limits(guard, "ned")["daily"] == 0


async def test_user_money_in_the_api_is_never_in_exponent_notation(memory_guard: Guard) -> None:
    spend(memory_guard, "tiny", "0.000000034")
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        one = (await client.get("/api/users/tiny", headers=bearer())).json()
        listed = (await client.get("/api/users", headers=bearer())).json()["users"][0]
        recorded = await client.post(
            "/api/events",
            json={"user_id": "tiny", "model": MODEL, "cost_usd": "0.00000001"},
            headers=bearer(),
        )
    for summary in (one, listed):
        assert summary["spend_usd"] == "0.000000034"
        assert summary["remaining_usd"] == "0.999999966"
        assert summary["max_usd"] == "1"
    assert recorded.json()["results"][0]["cost_usd"] == "0.00000001"
    assert recorded.json()["cost_usd"] == "0.00000001"


class PausingGuard(Guard):
    """A Guard whose manual records wait for the test's go (then run for real)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import asyncio

        self.entered = asyncio.Event()
        self.go = asyncio.Event()

    async def arecord(self, **kwargs: Any) -> Any:
        self.entered.set()
        await self.go.wait()
        return await super().arecord(**kwargs)


async def test_a_request_id_being_recorded_refuses_a_second_delivery(clock: FakeClock) -> None:
    import asyncio

    guard = PausingGuard(admin_config(), clock=clock)
    event = {"user_id": "olga", "model": MODEL, "cost_usd": "0.02", "request_id": "slow-1"}
    async with client_for(users_app(guard, token=TOKEN)) as client:
        with capture_logs():
            first = asyncio.ensure_future(client.post("/api/events", json=event, headers=bearer()))
            await guard.entered.wait()  # the first delivery holds the id, mid-charge
            second = await client.post(
                "/api/events", json=[{**event, "request_id": "fresh"}, event], headers=bearer()
            )
            guard.go.set()
            assert (await first).status_code == 200
            third = await client.post("/api/events", json=event, headers=bearer())
    document = assert_problem(second, 409)
    assert document["index"] == 1
    assert "nothing was charged" in document["detail"]
    assert third.json()["results"][0]["outcome"] == "duplicate"
    assert _limits(guard, "olga")["daily"] == Decimal("0.02")  # "fresh" was not charged


async def test_a_repeated_user_header_is_refused_like_everywhere_else(memory_guard: Guard) -> None:
    event = {"model": MODEL, "cost_usd": "0.01"}
    async with client_for(users_app(memory_guard, token=TOKEN)) as client:
        with capture_logs() as logs:
            twice = await client.post(
                "/api/events",
                json=event,
                headers=[*bearer().items(), ("xProxy-User-ID", "ann"), ("xProxy-User-ID", "bo")],
            )
            joined = await client.post(
                "/api/events", json=event, headers={**bearer(), "xProxy-User-ID": "ann,bo"}
            )
    for response in (twice, joined):
        document = assert_problem(response, 400)
        assert "more than once" in document["detail"]
        assert "ann" not in response.text
    assert logs == []
    assert _limits(memory_guard, "ann")["daily"] == 0
    assert _limits(memory_guard, "bo")["daily"] == 0


@pytest.mark.browser
def test_the_page_shows_money_exactly_and_any_user_id_in_chromium(
    tmp_path: Path, clock: FakeClock
) -> None:
    # $0.9999999 of $1 is not "$1.00 of $1.00"; "__proto__" and "constructor" are user
    # ids like any other (the page keys what it keeps per user by id).
    chromium()
    guard = Guard(admin_config(), clock=clock)
    guard.record(user_id="__proto__", model="test-model", cost_usd="0.9999999")
    guard.record(user_id="constructor", model="test-model", cost_usd="19.995")
    guard.adjust("constructor", "daily", "-0.000000001", reason="one nano-dollar back")
    app = users_app(guard, token=TOKEN)
    with serve(app) as url, Browser(tmp_path / "profile") as browser:
        sign_in(browser, url)
        browser.wait_for("document.querySelectorAll('tr[data-user]').length === 2")
        proto = browser.evaluate("document.querySelector('tr[data-user=\"__proto__\"]').innerText")
        for user in ("__proto__", "constructor"):
            browser.evaluate(f"document.querySelector('[data-manage={user}]').click()")
            browser.wait_for(
                f"document.querySelector('tr[data-detail={user}]') !== null && "
                f"!document.querySelector('tr[data-detail={user}]').innerText"
                ".includes('Loading')"
            )
        history = browser.evaluate(
            "document.querySelector('tr[data-detail=constructor]').innerText"
        )
        constructor = browser.evaluate(
            "document.querySelector('tr[data-user=\"constructor\"]').innerText"
        )
    assert "$0.9999999 / $1.00" in proto
    assert "$1.00 / $1.00" not in proto
    assert "$19.995" in constructor
    assert "-$0.000000001" in history
    assert "one nano-dollar back" in history
