"""The Flask extension: users from the session and flask-login, streamed bodies, gates."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import flask
import httpx
import pytest
from flask_login import LoginManager, UserMixin, login_user
from structlog.testing import capture_logs

from payi_guard.context import current_request, get_context
from payi_guard.engine import Guard
from payi_guard.flask import PayiGuard
from web._support import call, config, cost_nano, exhaust, serve_wsgi, spend_most, usd, used


class Probe:
    def __init__(self) -> None:
        self.views = 0
        self.teardowns = 0
        self.stream: list[Any] = []


def make_app(guard: Guard, probe: Probe, **options: Any) -> flask.Flask:
    app = flask.Flask("flask_test")
    app.secret_key = "test-secret-key-not-for-production"

    @app.route("/login/<user>")
    def login(user: str) -> str:
        flask.session["user_id"] = user
        return "ok"

    @app.route("/api/chat")
    @app.route("/chat")
    def chat() -> dict[str, Any]:
        probe.views += 1
        record = call(guard)
        return {"user": record.user_id, "context": get_context().user_id}

    @app.route("/stream")
    def stream() -> flask.Response:
        def body() -> Iterator[str]:
            yield f"session:{flask.session.get('user_id')}\n"
            record = call(guard)  # a GenAI call while the body streams
            probe.stream.append((record.user_id, get_context().user_id, current_request()))
            yield f"charged:{record.user_id}\n"

        return flask.Response(flask.stream_with_context(body()), mimetype="text/plain")

    @app.route("/api/stream")
    @app.route("/stream-refused")
    def stream_refused() -> flask.Response:
        def body() -> Iterator[str]:
            yield ""  # flushes nothing: no body byte yet
            call(guard)
            yield "data: never\n\n"

        probe.views += 1
        return flask.Response(flask.stream_with_context(body()), mimetype="text/event-stream")

    @app.teardown_request
    def teardown(exc: BaseException | None) -> None:
        probe.teardowns += 1

    PayiGuard(app, guard=guard, **options)
    return app


def test_user_from_the_flask_session_over_a_real_server(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        anonymous = http.get("/chat").json()
        http.get("/login/acme:alice")
        response = http.get("/chat", headers={"X-Request-ID": "f-1"})
    assert anonymous == {"user": "anonymous", "context": None}
    assert response.json() == {"user": "acme:alice", "context": "acme:alice"}
    assert response.headers["x-request-id"] == "f-1"
    assert used(guard, "acme:alice") == usd(cost_nano(100, 50))


def test_streamed_body_with_stream_with_context(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/bob")
        teardowns_before = probe.teardowns
        with capture_logs() as logs:
            response = http.get("/stream")
    assert response.text == "session:bob\ncharged:bob\n"
    (charged, context_user, scope) = probe.stream[0]
    assert (charged, context_user) == ("bob", "bob")
    assert scope is not None
    # One call, charged once, even though teardown_request runs twice for this response.
    assert [e["user_id"] for e in logs if e["event"] == "genai_call"] == ["bob"]
    assert used(guard, "bob") == usd(cost_nano(100, 50))
    assert probe.teardowns - teardowns_before >= 1


def test_guarded_stream_refused_before_its_first_byte_is_a_429(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe, guarded_paths=["/api/*"])
    spend_most(guard, "bob")
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/bob")
        with capture_logs() as logs:
            response = http.get("/api/stream")
            unguarded = http.get("/stream-refused")
    assert probe.views == 2  # both views ran: the refusal came from inside the stream
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["limit"] == "daily"
    # Unguarded paths are not held: there the refusal came after the (empty) start.
    assert unguarded.status_code == 200
    after = [e for e in logs if e["event"] == "budget_exceeded_after_start"]
    assert [e["user_id"] for e in after] == ["bob"]


class LoginUser(UserMixin):  # type: ignore[misc]  # flask-login ships no types
    def __init__(self, user_id: str) -> None:
        self.id = user_id


def test_user_from_flask_login_wins_over_the_session_key(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe)
    login_manager = LoginManager(app)

    login_manager.user_loader(LoginUser)

    @app.route("/flask-login/<user>")
    def flask_login_route(user: str) -> str:
        login_user(LoginUser(user))
        flask.session["user_id"] = "session-user"
        return "ok"

    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/flask-login/acme:grace")
        response = http.get("/chat")
    assert response.json()["user"] == "acme:grace"
    assert used(guard, "session-user") == 0


def test_the_signed_in_user_wins_over_a_trusted_header(guard: Guard) -> None:
    app = make_app(guard, Probe(), trust_user_header=True, guarded_paths=["/api/*"])
    exhaust(guard, "victim")
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/carol")
        signed_in = http.get("/api/chat", headers={"xProxy-User-ID": "victim"})
        http.cookies.clear()
        header_only = http.get("/chat", headers={"xProxy-User-ID": "dave"})
    assert signed_in.status_code == 200, signed_in.text
    assert signed_in.json() == {"user": "carol", "context": "carol"}
    assert used(guard, "carol") == usd(cost_nano(100, 50))
    assert header_only.json()["user"] == "dave"  # no signed-in user: the trusted header


@pytest.mark.parametrize("on_invalid_user", ["reject", "anonymous"])
def test_duplicate_user_headers_are_a_400(guard: Guard, on_invalid_user: str) -> None:
    probe = Probe()
    app = make_app(guard, probe, trust_user_header=True, on_invalid_user=on_invalid_user)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/carol")
        response = http.get("/chat", headers=[("xProxy-User-ID", "a"), ("xProxy-User-ID", "b")])
    assert response.status_code == 400, response.text
    assert "names more than one user" in response.json()["detail"]
    assert probe.views == 0


def test_user_callable_replaces_the_defaults(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe, user=lambda: flask.request.args.get("as"))
    client = app.test_client()
    client.get("/login/session-user")
    assert client.get("/chat?as=heidi").json == {"user": "heidi", "context": "heidi"}
    assert client.get("/chat").json == {"user": "anonymous", "context": None}


def test_gate_in_before_request_refuses_before_the_view(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe, guarded_paths=["/api/*"])
    exhaust(guard, "ivan")
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/ivan")
        response = http.get("/api/chat", headers={"X-Request-ID": "f-429"})
    assert probe.views == 0
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "43200"
    assert response.headers["ratelimit-policy"] == '"daily";q=1000;w=86400'
    assert response.headers["ratelimit"] == '"daily";r=0;t=43200'
    assert response.headers["x-request-id"] == "f-429"
    body = response.json()
    assert (body["limit"], body["scope"], body["request_id"]) == ("daily", "user", "f-429")


def test_refusal_in_the_view_is_rendered_by_the_error_handler(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe)
    exhaust(guard, "judy")
    client = app.test_client()
    client.get("/login/judy")
    response = client.get("/chat")
    assert probe.views == 1
    assert response.status_code == 429
    assert response.content_type == "application/problem+json"
    assert response.json is not None
    assert response.json["limit"] == "daily"


def test_budget_headers_on_guarded_success(guard: Guard) -> None:
    app = make_app(guard, Probe(), guarded_paths=["/api/*"], budget_headers=True)
    client = app.test_client()
    client.get("/login/ken")
    first = client.get("/api/chat")
    second = client.get("/api/chat")
    unguarded = client.get("/chat")
    # Read as the response starts: each counts its own call (200 micro-USD).
    assert first.headers["RateLimit"] == '"daily";r=800;t=43200'
    assert second.headers["RateLimit"] == '"daily";r=600;t=43200'
    assert "RateLimit" not in unguarded.headers


def test_invalid_session_user_gets_400_without_echo(guard: Guard) -> None:
    probe = Probe()
    app = make_app(guard, probe)
    client = app.test_client()
    client.get("/login/bad user")
    response = client.get("/chat")
    assert response.status_code == 400
    assert b"bad user" not in response.data
    assert probe.views == 0


def test_anonymous_reject_answers_401(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(anonymous={"strategy": "reject"}))
    probe = Probe()
    client = make_app(guard, probe, guarded_paths=["/api/*"]).test_client()
    gated = client.get("/api/chat")
    escaped = client.get("/chat")
    assert gated.status_code == escaped.status_code == 401
    assert probe.views == 1


def test_session_strategy_with_a_session_id_callable(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(
        config(anonymous={"strategy": "session", "limits": [{"max": 0.001, "per": "day"}]})
    )
    app = make_app(guard, Probe(), session_id=lambda: flask.request.headers.get("X-Device"))
    client = app.test_client()
    assert client.get("/chat", headers={"X-Device": "d1"}).json == {
        "user": "anonymous:d1",
        "context": None,
    }


SESSION = config(anonymous={"strategy": "session", "limits": [{"max": 0.001, "per": "day"}]})
"""Anonymous calls get $0.001 a day per session: five calls of $0.0002."""


def test_fresh_raw_session_cookies_share_one_bucket(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(SESSION)
    app = make_app(guard, Probe())
    statuses, users = [], set()
    with serve_wsgi(app) as url:
        for i in range(40):
            # A new client each time: no cookie jar, a fresh raw cookie.
            with httpx.Client(base_url=url) as http:
                response = http.get("/chat", headers={"cookie": f"session_id=fresh-{i}"})
            statuses.append(response.status_code)
            if response.status_code == 200:
                users.add(response.json()["user"])
    assert statuses == [200] * 5 + [429] * 35
    assert users == {"anonymous"}


def test_the_flask_session_gets_its_own_bucket_from_its_second_request(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(SESSION)
    app = make_app(guard, Probe())
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        first = http.get("/chat").json()["user"]
        second = http.get("/chat").json()["user"]
        third = http.get("/chat").json()["user"]
    assert first == "anonymous"
    assert second.startswith("anonymous:")
    assert third == second
    assert used(guard, second) == usd(2 * cost_nano(100, 50))


def test_without_a_secret_key_there_is_no_session_and_one_bucket(
    make_guard: Callable[..., Guard],
) -> None:
    guard = make_guard(SESSION)
    app = make_app(guard, Probe())
    app.secret_key = None
    client = app.test_client()
    users = {client.get("/chat").json["user"] for _ in range(3)}  # type: ignore[index]
    assert users == {"anonymous"}


def test_installing_twice_is_refused(guard: Guard) -> None:
    app = make_app(guard, Probe())
    with pytest.raises(RuntimeError, match="already installed"):
        PayiGuard(app, guard=guard)


def test_factory_pattern(guard: Guard) -> None:
    extension = PayiGuard(guard=guard)
    app = flask.Flask("factory")
    app.secret_key = "k" * 32

    @app.route("/")
    def index() -> str:
        return str(get_context().user_id)

    extension.init_app(app)
    client = app.test_client()
    with client.session_transaction() as session:
        session["user_id"] = "leo"
    assert client.get("/").text == "leo"
