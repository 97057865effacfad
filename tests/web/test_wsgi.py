"""WSGIGuardMiddleware: one context per request, streamed bodies, refusals, no leaks."""

from __future__ import annotations

import contextvars
import gc
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs
from werkzeug.test import EnvironBuilder

from payi_guard.context import current_request, get_context
from payi_guard.engine import Guard
from payi_guard.web import WSGIGuardMiddleware
from payi_guard.web.options import InvalidUserPolicy
from web._support import (
    call,
    config,
    cost_nano,
    exhaust,
    free_port,
    serve_wsgi,
    spend_most,
    usd,
    used,
)

StartResponse = Callable[..., Any]

_probe: contextvars.ContextVar[str] = contextvars.ContextVar("probe", default="clean")


def streaming_app(guard: Guard, seen: list[Any]) -> Callable[..., Iterable[bytes]]:
    """Each chunk reports the user it sees; the GenAI call happens after the last chunk."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            for i in range(3):
                context = get_context()
                seen.append((threading.get_ident(), context.user_id, context.request_id))
                yield f"{i}:{context.user_id}\n".encode()
            seen.append(call(guard))

        return body()

    return app


def test_streamed_body_is_attributed_over_a_real_server(guard: Guard) -> None:
    seen: list[Any] = []
    app = WSGIGuardMiddleware(streaming_app(guard, seen), guard=guard, trust_user_header=True)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        response = http.get("/", headers={"xProxy-User-ID": "acme:alice", "X-Request-ID": "w-1"})
    assert response.status_code == 200
    assert response.text == "0:acme:alice\n1:acme:alice\n2:acme:alice\n"
    assert response.headers["x-request-id"] == "w-1"
    assert [s[1:] for s in seen[:3]] == [("acme:alice", "w-1")] * 3
    record = seen[3]
    assert record.user_id == "acme:alice"
    assert used(guard, "acme:alice") == usd(cost_nano(100, 50))


def _environ(path: str = "/", headers: dict[str, str] | None = None) -> dict[str, Any]:
    environ: dict[str, Any] = EnvironBuilder(
        path=path, headers=list((headers or {}).items())
    ).get_environ()
    return environ


class StartRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def __call__(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.calls.append((status, headers, exc_info))
        return lambda data: None


def test_the_calling_thread_context_stays_clean_between_chunks(guard: Guard) -> None:
    seen: list[Any] = []
    app = WSGIGuardMiddleware(streaming_app(guard, seen), guard=guard, trust_user_header=True)
    start = StartRecorder()
    result = app(_environ(headers={"xProxy-User-ID": "bob"}), start)
    chunks = []
    iterator = iter(result)
    for _ in range(3):
        # Between steps the thread's own context has no request, no binding.
        assert current_request() is None
        assert structlog.contextvars.get_contextvars() == {}
        chunks.append(next(iterator))
    with pytest.raises(StopIteration):
        next(iterator)
    assert current_request() is None
    result.close()  # type: ignore[attr-defined]
    assert chunks == [b"0:bob\n", b"1:bob\n", b"2:bob\n"]
    assert seen[3].user_id == "bob"
    assert current_request() is None
    assert structlog.contextvars.get_contextvars() == {}
    headers = dict(start.calls[0][1])
    assert len(headers["X-Request-ID"]) == 32


def test_the_apps_close_runs_in_the_request_and_each_request_id_is_its_own(
    guard: Guard,
) -> None:
    seen: list[tuple[str | None, str | None, object]] = []
    shared_headers = [("Content-Type", "text/plain")]

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            context = get_context()
            log = structlog.contextvars.get_contextvars()
            seen.append((context.user_id, log.get("request_id"), current_request()))

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", shared_headers)  # the same list for every response
        return Body()

    middleware = WSGIGuardMiddleware(app, guard=guard, trust_user_header=True)
    for user, request_id in (("alice", "req-1"), ("bob", "req-2")):
        start = StartRecorder()
        result = middleware(
            _environ(headers={"xProxy-User-ID": user, "X-Request-ID": request_id}), start
        )
        assert list(result) == [b"x"]
        result.close()  # type: ignore[attr-defined]
        assert dict(start.calls[0][1])["X-Request-ID"] == request_id
        assert current_request() is None
        assert structlog.contextvars.get_contextvars() == {}
    # The app's close() still saw its request (the scope ends after it).
    assert [(u, r) for u, r, _ in seen] == [("alice", "req-1"), ("bob", "req-2")]
    assert all(scope is not None for _, _, scope in seen)
    assert shared_headers == [("Content-Type", "text/plain")]


def test_no_leak_across_sequential_requests_on_one_thread(guard: Guard) -> None:
    def sloppy(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        before = {
            "thread": threading.get_ident(),
            "probe": _probe.get(),
            "leak": structlog.contextvars.get_contextvars().get("leak"),
            "user": get_context().user_id,
        }
        # An app that sets context and never resets it, in the app and in the body.
        _probe.set("dirty")
        structlog.contextvars.bind_contextvars(leak="yes")
        start_response("200 OK", [("Content-Type", "application/json")])

        def body() -> Iterator[bytes]:
            _probe.set("dirty-body")
            yield json.dumps(before).encode()

        return body()

    app = WSGIGuardMiddleware(sloppy, guard=guard, trust_user_header=True)
    with serve_wsgi(app, threaded=False) as url, httpx.Client(base_url=url) as http:
        first = http.get("/", headers={"xProxy-User-ID": "alice"}).json()
        second = http.get("/").json()
        third = http.get("/", headers={"xProxy-User-ID": "carol"}).json()
    assert first["thread"] == second["thread"] == third["thread"]
    for seen in (first, second, third):
        assert seen["probe"] == "clean"
        assert seen["leak"] is None
    assert [first["user"], second["user"], third["user"]] == ["alice", None, "carol"]


def test_gate_refuses_before_the_app_with_the_exact_429(guard: Guard) -> None:
    ran = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        ran.append(True)
        start_response("200 OK", [])
        return [b"ran"]

    exhaust(guard, "alice")
    middleware = WSGIGuardMiddleware(
        app, guard=guard, trust_user_header=True, guarded_paths=["/api/*"]
    )
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        refused = http.get("/api/chat", headers={"xProxy-User-ID": "alice", "X-Request-ID": "w-2"})
        open_path = http.get("/other", headers={"xProxy-User-ID": "alice"})
    assert ran == [True]  # only the unguarded request ran
    assert open_path.text == "ran"
    assert refused.status_code == 429
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "43200"
    assert refused.headers["ratelimit-policy"] == '"daily";q=1000;w=86400'
    assert refused.headers["ratelimit"] == '"daily";r=0;t=43200'
    assert refused.headers["x-request-id"] == "w-2"
    body = refused.json()
    assert body["limit"] == "daily"
    assert body["retry_after"] == 43200
    assert body["request_id"] == "w-2"


def test_refusal_in_the_app_call_becomes_the_response(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        call(guard)
        start_response("200 OK", [])
        return [b"never"]

    exhaust(guard, "alice")
    middleware = WSGIGuardMiddleware(app, guard=guard, trust_user_header=True)
    start = StartRecorder()
    body = b"".join(middleware(_environ(headers={"xProxy-User-ID": "alice"}), start))
    assert start.calls[0][0] == "429 Too Many Requests"
    assert json.loads(body)["limit"] == "daily"


def test_refusal_before_the_first_chunk_replaces_the_headers(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            call(guard)  # in the first next(): nothing was sent yet
            yield b"never"

        return body()

    exhaust(guard, "alice")
    middleware = WSGIGuardMiddleware(app, guard=guard, trust_user_header=True)
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        response = http.get("/", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["limit"] == "daily"


def _refused_after(first: bytes, guard: Guard) -> Callable[..., Iterable[bytes]]:
    """A streamed body that sends ``first``, then makes a GenAI call."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/event-stream")])

        def body() -> Iterator[bytes]:
            yield first
            call(guard)
            yield b"data: never\n\n"

        return body()

    return app


def test_guarded_stream_refused_after_an_empty_chunk_is_a_429_over_a_real_server(
    guard: Guard,
) -> None:
    spend_most(guard, "alice")
    middleware = WSGIGuardMiddleware(
        _refused_after(b"", guard), guard=guard, trust_user_header=True, guarded_paths=["/api/*"]
    )
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            response = http.get("/api/stream", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 429, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["remaining"] == "0.0001"
    assert not [e for e in logs if e["event"] == "budget_exceeded_after_start"]


def test_a_guarded_start_response_waits_for_the_first_non_empty_chunk(guard: Guard) -> None:
    start = StartRecorder()
    seen: list[int] = []

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])

        def body() -> Iterator[bytes]:
            seen.append(len(start.calls))
            yield b""
            seen.append(len(start.calls))
            yield b"one"
            seen.append(len(start.calls))
            yield b"two"

        return body()

    middleware = WSGIGuardMiddleware(app, guard=guard, guarded_paths=["/api/*"])
    result = middleware(_environ("/api/x"), start)
    assert start.calls == []  # held
    chunks = list(result)
    result.close()  # type: ignore[attr-defined]
    assert chunks == [b"one", b"two"]  # the empty chunk carried nothing
    assert seen == [0, 0, 1]  # sent with the first byte; no chunk is buffered
    assert [c[0] for c in start.calls] == ["200 OK"]


@pytest.mark.parametrize("body", [[], [b""]], ids=["no-chunk", "empty-chunk"])
def test_a_guarded_empty_body_sends_its_start_at_the_end(guard: Guard, body: list[bytes]) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("204 No Content", [])
        return body

    start = StartRecorder()
    result = WSGIGuardMiddleware(app, guard=guard, guarded_paths=["/api/*"])(
        _environ("/api/x"), start
    )
    assert list(result) == []
    assert [c[0] for c in start.calls] == ["204 No Content"]


def test_a_guarded_write_callable_sends_the_start_first(guard: Guard) -> None:
    def legacy(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written")
        return [b"-returned"]

    middleware = WSGIGuardMiddleware(legacy, guard=guard, guarded_paths=["/api/*"])
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        response = http.get("/api/x")
    assert response.status_code == 200
    assert response.text == "written-returned"


def test_unguarded_paths_pass_start_response_through_at_once(guard: Guard) -> None:
    start = StartRecorder()

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"", b"x"]

    middleware = WSGIGuardMiddleware(app, guard=guard, guarded_paths=["/api/*"])
    result = middleware(_environ("/open"), start)
    assert [c[0] for c in start.calls] == ["200 OK"]
    assert list(result) == [b"", b"x"]


def test_refusal_after_the_first_chunk_is_logged_and_ends_the_body(guard: Guard) -> None:
    closed = []

    class Body:
        def __init__(self) -> None:
            self.parts = iter([b"first", None, b"never"])

        def __iter__(self) -> Body:
            return self

        def __next__(self) -> bytes:
            part = next(self.parts)
            if part is None:
                call(guard)
                raise AssertionError("the call should have been refused")
            return part

        def close(self) -> None:
            closed.append(get_context().user_id)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()

    exhaust(guard, "alice")
    middleware = WSGIGuardMiddleware(app, guard=guard, trust_user_header=True)
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        with capture_logs() as logs:
            response = http.get("/", headers={"xProxy-User-ID": "alice"})
    assert response.status_code == 200
    assert response.text == "first"
    after = [e for e in logs if e["event"] == "budget_exceeded_after_start"]
    assert [(e["user_id"], e["limit"]) for e in after] == [("alice", "daily")]
    # close() ran inside the request's context.
    assert closed == ["alice"]


def test_resolver_gets_the_environ_and_invalid_ids_get_400(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [str(get_context().user_id).encode()]

    middleware = WSGIGuardMiddleware(
        app, guard=guard, user=lambda environ: environ.get("REMOTE_USER")
    )
    start = StartRecorder()
    environ = _environ()
    environ["REMOTE_USER"] = "acme:frank"
    assert b"".join(middleware(environ, start)) == b"acme:frank"
    bad = _environ()
    bad["REMOTE_USER"] = "frank smith"
    body = b"".join(middleware(bad, start))
    assert start.calls[-1][0] == "400 Bad Request"
    assert b"frank" not in body


SESSION = config(anonymous={"strategy": "session", "limits": [{"max": 0.001, "per": "day"}]})
"""Anonymous calls get $0.001 a day per session: five calls of $0.0002."""


def _charging_app(guard: Guard) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        record = call(guard)
        start_response("200 OK", [])
        return [record.user_id.encode()]

    return app


def test_fresh_raw_session_cookies_share_one_bucket(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(SESSION)
    middleware = WSGIGuardMiddleware(_charging_app(guard), guard=guard)
    statuses, users = [], set()
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        for i in range(40):
            response = http.get("/", headers={"cookie": f"session_id=fresh-{i}"})
            statuses.append(response.status_code)
            if response.status_code == 200:
                users.add(response.text)
    assert statuses == [200] * 5 + [429] * 35
    assert users == {"anonymous"}


def test_session_id_callable_and_budget_headers(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(SESSION)
    middleware = WSGIGuardMiddleware(
        _charging_app(guard),
        guard=guard,
        guarded_paths=["/*"],
        budget_headers=True,
        session_id=lambda environ: environ.get("REMOTE_USER"),  # a device the app vouches for
    )
    first_environ = _environ()
    first_environ["REMOTE_USER"] = "device-7"
    start = StartRecorder()
    first = b"".join(middleware(first_environ, start))
    second = b"".join(middleware(dict(first_environ), start))
    assert first == second == b"anonymous:device-7"
    # Read as the start goes out: each counts its own call (200 micro-USD).
    assert dict(start.calls[0][1])["RateLimit"] == '"anonymous:0";r=800;t=43200'
    assert dict(start.calls[1][1])["RateLimit"] == '"anonymous:0";r=600;t=43200'


@pytest.mark.parametrize("on_invalid_user", ["reject", "anonymous"])
def test_duplicate_user_headers_are_a_400_over_a_real_server(
    guard: Guard, on_invalid_user: InvalidUserPolicy
) -> None:
    middleware = WSGIGuardMiddleware(
        _charging_app(guard),
        guard=guard,
        trust_user_header=True,
        on_invalid_user=on_invalid_user,
        user=lambda environ: environ.get("HTTP_X_APP_USER"),
    )
    two = [("xProxy-User-ID", "alice"), ("xProxy-User-ID", "bob")]
    with serve_wsgi(middleware) as url, httpx.Client(base_url=url) as http:
        twice = http.get("/", headers=two)
        signed_in = http.get("/", headers=[*two, ("X-App-User", "carol")])
        once = http.get("/", headers={"xProxy-User-ID": "dave", "X-App-User": "carol"})
    for response in (twice, signed_in):
        assert response.status_code == 400, response.text
        assert "names more than one user" in response.json()["detail"]
        assert "alice" not in response.text
    assert once.text == "carol"  # the app's own user wins over the header
    assert used(guard, "dave") == 0


def test_storage_failure_blocks_with_503(make_guard: Callable[..., Guard]) -> None:
    guard = make_guard(config(), storage=f"redis://127.0.0.1:{free_port()}/0")

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"ran"]

    middleware = WSGIGuardMiddleware(app, guard=guard, guarded_paths=["/api/*"], gate="storage")
    start = StartRecorder()
    body = b"".join(middleware(_environ("/api/x"), start))
    assert start.calls[0][0] == "503 Service Unavailable"
    assert json.loads(body)["status"] == 503


def test_a_body_never_closed_is_cleaned_up_quietly(guard: Guard) -> None:
    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return iter([b"x"])

    middleware = WSGIGuardMiddleware(app, guard=guard)
    result = middleware(_environ(), StartRecorder())
    assert b"".join(result) == b"x"
    del result  # no close(): the finalizer ends the request scope in its own context
    gc.collect()
    assert current_request() is None
