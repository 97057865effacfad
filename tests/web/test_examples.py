"""The example apps, end to end: real OpenAI SDK, the meter, the fake provider."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from starlette.testclient import TestClient
from structlog.testing import capture_logs

from payi_guard import Guard
from payi_guard.clock import FakeClock
from payi_guard.config import check_file
from payi_guard.testing import FakeProvider
from web._support import serve_asgi, serve_wsgi

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def provider() -> Iterator[FakeProvider]:
    with FakeProvider() as fake:
        yield fake


def _store(folder: Path) -> str:
    """A store of the example's kind (SQLite) of the test's own, not the one beside it."""
    return f"sqlite:///{folder / 'budgets.db'}"


def test_the_budgets_file_is_valid_and_covers_every_section() -> None:
    config = check_file(EXAMPLES / "budgets.yaml")
    assert config.storage == f"sqlite:///{EXAMPLES.resolve() / 'budgets.db'}"
    assert config.tiers
    assert config.orgs
    assert config.global_limits
    assert config.users["acme:alice"] == config.tiers["pro"]
    assert config.anonymous.strategy == "shared"
    assert config.anonymous.limits


def test_fastapi_example_charges_users_and_refuses_over_budget(
    provider: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    example = _load("fastapi_app")
    guard = Guard.from_yaml(example.BUDGETS, clock=clock, storage=_store(tmp_path))
    app = example.create_app(guard, provider.openai_base_url)
    bob = {"authorization": "Bearer bob-token"}
    with TestClient(app) as client, capture_logs() as logs:
        statuses = []
        for _ in range(30):
            response = client.post("/api/chat", json={"prompt": "Say hello"}, headers=bob)
            statuses.append(response.status_code)
            if response.status_code == 429:
                break
        stream = client.get(
            "/api/stream",
            params={"prompt": "Count"},
            headers={"authorization": "Bearer alice-token"},
        )
    assert statuses[:-1] == [200] * (len(statuses) - 1)
    assert statuses[-1] == 429
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["limit"] == "daily"
    assert stream.status_code == 200
    assert stream.text.endswith("data: [DONE]\n\n")
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert {e["user_id"] for e in calls} == {"acme:bob", "acme:alice"}
    assert [e["stream"] for e in calls if e["user_id"] == "acme:alice"] == [True]
    spent = sum(e["cost_usd"] for e in calls if e["user_id"] == "acme:bob")
    assert float(guard.usage("acme:bob")[0].used) == pytest.approx(spent)


def test_flask_example_charges_the_session_user(
    provider: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    example = _load("flask_app")
    guard = Guard.from_yaml(example.BUDGETS, clock=clock, storage=_store(tmp_path))
    app = example.create_app(guard, provider.openai_base_url)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http, capture_logs() as logs:
        http.get("/login/carol")
        chat = http.post("/api/chat", json={"prompt": "Say hello"})
        stream = http.get("/api/stream", params={"prompt": "Count"})
        usage = http.get("/usage").json()
    assert chat.status_code == 200
    assert "ratelimit" in chat.headers
    assert stream.text.endswith("data: [DONE]\n\n")
    calls = [e for e in logs if e["event"] == "genai_call"]
    assert [e["user_id"] for e in calls] == ["carol", "carol"]
    assert usage[0]["counter"] == "carol"
    assert float(usage[0]["used"]) == pytest.approx(sum(e["cost_usd"] for e in calls))


def _chat_until_refused(http: httpx.Client, headers: dict[str, str]) -> httpx.Response:
    for _ in range(30):
        response = http.post("/api/chat", json={"prompt": "Say hello"}, headers=headers)
        if response.status_code != 200:
            return response
    raise AssertionError("the daily limit never refused a call")


def test_fastapi_example_refuses_a_stream_with_a_429_over_a_real_server(
    provider: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    example = _load("fastapi_app")
    guard = Guard.from_yaml(example.BUDGETS, clock=clock, storage=_store(tmp_path))
    app = example.create_app(guard, provider.openai_base_url)
    bob = {"authorization": "Bearer bob-token"}
    with serve_asgi(app) as url, httpx.Client(base_url=url) as http:
        chat = _chat_until_refused(http, bob)
        sent = len(provider.requests)
        stream = http.get("/api/stream", params={"prompt": "Count"}, headers=bob)
    assert chat.status_code == 429
    assert len(provider.requests) == sent  # the refused stream never reached the provider
    assert stream.status_code == 429, stream.text
    assert stream.headers["content-type"] == "application/problem+json"
    problem = stream.json()
    assert problem["limit"] == "daily"
    assert isinstance(problem["used"], str)
    assert "e-" not in stream.text
    assert int(stream.headers["retry-after"]) >= 1


def test_flask_example_refuses_a_stream_with_a_429_over_a_real_server(
    provider: FakeProvider, clock: FakeClock, tmp_path: Path
) -> None:
    example = _load("flask_app")
    guard = Guard.from_yaml(example.BUDGETS, clock=clock, storage=_store(tmp_path))
    app = example.create_app(guard, provider.openai_base_url)
    with serve_wsgi(app) as url, httpx.Client(base_url=url) as http:
        http.get("/login/carol")
        chat = _chat_until_refused(http, {})
        stream = http.get("/api/stream", params={"prompt": "Count"})
    assert chat.status_code == 429
    assert stream.status_code == 429, stream.text
    assert stream.headers["content-type"] == "application/problem+json"
    assert stream.json()["limit"] == "daily"
