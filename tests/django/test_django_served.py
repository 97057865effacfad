"""The example Django site served for real, under gunicorn (WSGI) and uvicorn (ASGI).

The real OpenAI SDK, wrapped by ``get_guard()``, calls the fake provider; the user is
the one Django's ``login()`` put in the session; what is checked is what the site's
users and operators see: responses, headers and the JSON log lines.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from served import HeldProvider, Server, migrate, serve

from payi_guard.testing import FakeProvider
from payi_guard.web.identify import session_digest

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


@pytest.fixture(scope="module")
def held() -> Iterator[HeldProvider]:
    with HeldProvider() as provider:
        yield provider


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chatsite") / "db.sqlite3"
    migrate(path)
    return path


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def server(
    request: pytest.FixtureRequest, database: Path, provider: FakeProvider, held: HeldProvider
) -> Iterator[Server]:
    with serve(
        request.param,
        database,
        EXAMPLE_OPENAI_BASE_URL=provider.openai_base_url,
        HELD_OPENAI_BASE_URL=held.url,
    ) as running:
        yield running


def login(http: httpx.Client) -> tuple[str, str]:
    """Sign a new user in (Django's login(): the session names them); return name and pk."""
    username = f"user-{uuid.uuid4().hex[:10]}"
    response = http.post("/login", json={"username": username})
    assert response.status_code == 200, response.text
    return username, str(response.json()["pk"])


def chat(http: httpx.Client, path: str = "/api/chat") -> httpx.Response:
    return http.post(path, json={"prompt": "Say hello"})


def test_calls_are_charged_to_the_users_primary_key(server: Server) -> None:
    with server.client() as http:
        username, pk = login(http)
        assert http.get("/whoami").json() == {"username": username, "pk": int(pk), "charged_as": pk}
        sync_view = chat(http, "/api/chat")
        async_view = chat(http, "/api/achat")
        limits = http.get("/usage").json()
    assert (sync_view.status_code, async_view.status_code) == (200, 200)
    assert sync_view.json()["charged_as"] == async_view.json()["charged_as"] == pk
    calls = [
        server.logs.wait("genai_call", request_id=response.headers["x-request-id"])[0]
        for response in (sync_view, async_view)
    ]
    assert [call["user_id"] for call in calls] == [pk, pk]
    assert all(username not in str(call) for call in calls)
    assert [(c["input_tokens"], c["output_tokens"], c["stream"]) for c in calls] == [
        (2, 10, False),
        (2, 10, False),
    ]
    # $1 and $2 per million tokens: 2 + 20 micro-USD per call, and the ledger agrees.
    assert [c["cost_usd"] for c in calls] == [0.000022, 0.000022]
    assert limits[0]["counter"] == pk
    assert limits[0]["used"] == "0.000044"


def test_over_budget_user_gets_the_problem_document(server: Server, provider: FakeProvider) -> None:
    with server.client() as http:
        _, pk = login(http)
        statuses = []
        for _ in range(20):  # each call reserves its upper bound: a few fit in $0.0002
            response = chat(http, "/open/chat")  # not gated: the view's call is refused
            statuses.append(response.status_code)
            if response.status_code != 200:
                break
        sent = len(provider.requests)
        gated = chat(http, "/api/chat")
        assert len(provider.requests) == sent  # refused before anything was sent
    assert statuses[-1] == 429
    assert set(statuses[:-1]) == {200}
    for refused in (response, gated):
        assert refused.status_code == 429
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "43200"
        assert refused.headers["ratelimit-policy"] == '"daily";q=200;w=86400'
        assert refused.headers["ratelimit"].startswith('"daily";r=')
        assert refused.headers["ratelimit"].endswith(";t=43200")
        body = refused.json()
        assert body["type"] == "urn:payi-guard:problem:budget-exceeded"
        assert (body["status"], body["limit"], body["scope"], body["unit"]) == (
            429,
            "daily",
            "user",
            "usd",
        )
        assert body["request_id"] == refused.headers["x-request-id"]
        assert body["resets_at"] == "2026-11-28T00:00:00+00:00"
    for refused in (response, gated):
        (event,) = server.logs.wait("budget_exceeded", request_id=refused.headers["x-request-id"])
        assert (event["user_id"], event["limit"]) == (pk, "daily")


@pytest.mark.parametrize("path", ["/api/stream", "/api/astream"])
def test_streamed_response_is_settled_once_after_its_last_chunk(server: Server, path: str) -> None:
    with server.client() as http:
        _, pk = login(http)
        with http.stream("GET", path, params={"prompt": "Count to three"}) as response:
            chunks = list(response.iter_text())
        marker = http.get("/whoami")  # served after the stream's request has ended
    text = "".join(chunks)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert text.startswith("data: Hello\n\n")
    # The view's own last chunk reports who was charged while the body streamed.
    assert text.endswith(f"data: [DONE] charged_as={pk}\n\n")
    request_id = response.headers["x-request-id"]
    (call,) = server.logs.wait("genai_call", request_id=request_id)
    assert (call["user_id"], call["stream"], call["outcome"]) == (pk, True, "ok")
    assert (call["input_tokens"], call["output_tokens"]) == (3, 10)
    assert marker.status_code == 200
    assert len(server.logs.events("genai_call", request_id=request_id)) == 1


@pytest.mark.parametrize("path", ["/open/stream", "/open/astream"])
def test_stream_refused_before_its_first_chunk_is_a_429_not_an_empty_200(
    server: Server, path: str
) -> None:
    with server.client() as http:
        _, pk = login(http)
        for _ in range(20):
            response = http.get(path)
            if response.status_code != 200:
                break
            assert response.text.endswith(f"charged_as={pk}\n\n")
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["limit"] == "daily"


def test_anonymous_requests_follow_the_session_strategy(server: Server) -> None:
    with server.client() as without_session:
        anonymous = chat(without_session)
    with server.client() as visitor:
        assert visitor.get("/visit").json() == {"visits": 1}
        session_key = visitor.cookies["sessionid"]
        in_session = chat(visitor)
    with server.client() as forger:
        forger.cookies.set("sessionid", uuid.uuid4().hex, domain="127.0.0.1")
        forged = chat(forger)
    assert [r.json()["charged_as"] for r in (anonymous, in_session, forged)] == [None] * 3
    users = [
        server.logs.wait("genai_call", request_id=r.headers["x-request-id"])[0]["user_id"]
        for r in (anonymous, in_session, forged)
    ]
    # Django's session, checked by its backend: a made-up cookie opens no bucket of its own,
    # and the session key itself is never written (it is a credential).
    assert users == ["anonymous", f"anonymous:{session_digest(session_key)}", "anonymous"]
    assert not any(session_key in str(line) for line in server.logs.events("genai_call"))


# ASGI only: a sync (WSGI) worker notices a client that went away only when it next
# writes; the in-process tests close a sync body early instead.
@pytest.mark.parametrize("server", ["asgi"], indirect=True)
def test_client_that_goes_away_mid_stream_is_charged_once(
    server: Server, held: HeldProvider
) -> None:
    with server.client() as http:
        _, pk = login(http)
        with http.stream("GET", "/held/astream") as response:
            first = next(response.iter_text())
            request_id = response.headers["x-request-id"]
        # The connection is closed; the provider still holds the rest of the stream.
    assert first == "data: Once\n\n"
    (call,) = server.logs.wait("genai_call", request_id=request_id)
    assert (call["user_id"], call["stream"]) == (pk, True)
    assert call["outcome"] != "ok"
    assert not held.release.is_set()


def test_the_example_runs_as_shipped(database: Path) -> None:
    # Its own settings and budgets file, its embedded fake provider, the real clock.
    # Its store is the budgets file's SQLite file unless the environment names another:
    # a file of the test's own, so runs never share spend.
    store = f"sqlite:///{database.parent / 'budgets.db'}"
    served = serve("wsgi", database, settings="chatsite.settings", PAYI_GUARD_STORAGE=store)
    with served as site, site.client() as http:
        _, pk = login(http)
        answer = chat(http)
        (call,) = site.logs.wait("genai_call", request_id=answer.headers["x-request-id"])
    assert answer.status_code == 200
    assert answer.json()["charged_as"] == pk
    assert answer.headers["ratelimit-policy"]  # budget_headers: True in its settings
    assert (call["user_id"], call["model"], call["outcome"]) == (pk, "gpt-4o-mini", "ok")
