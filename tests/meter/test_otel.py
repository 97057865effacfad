"""OpenTelemetry: real SDK calls through the guard, read back with the OTel SDK's in-memory
metric reader and span exporter."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import openai
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from structlog.testing import capture_logs

from meter._support import calls, expected_cost, make_guard, user_message
from payi_guard import BudgetExceeded, track_context
from payi_guard.clock import FakeClock
from payi_guard.engine import CallEnded, CallRefused
from payi_guard.otel import instrument
from payi_guard.testing import FakeProvider, Scripted


class Telemetry:
    """An OTel SDK meter and tracer provider whose data the test reads back."""

    def __init__(self) -> None:
        self.reader = InMemoryMetricReader()
        self.meters = MeterProvider(metric_readers=[self.reader])
        self.spans = InMemorySpanExporter()
        self.tracers = TracerProvider()
        self.tracers.add_span_processor(SimpleSpanProcessor(self.spans))

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        found: list[Any] = []
        if data is None:
            return found
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        found.extend(metric.data.data_points)
        return found

    def unit(self, name: str) -> str:
        data = self.reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        return str(metric.unit)
        raise AssertionError(f"no metric {name}")


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    yield t
    t.meters.shutdown()
    t.tracers.shutdown()


def _client(guard: Any, fake: FakeProvider) -> openai.OpenAI:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    return guard.wrap(client)  # type: ignore[no-any-return]


def test_a_call_gives_the_semantic_convention_metrics_and_its_cost(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock)
    instrument(guard, telemetry.meters, telemetry.tracers)
    client = _client(guard, fake)
    with capture_logs() as logs, track_context(user_id="acme:alice"):
        client.chat.completions.create(model="gpt-test", messages=user_message("hello there"))
    (event,) = calls(logs)
    (record,) = fake.requests
    tokens = {
        p.attributes["gen_ai.token.type"]: p for p in telemetry.points("gen_ai.client.token.usage")
    }
    assert set(tokens) == {"input", "output"}
    assert tokens["input"].sum == event["input_tokens"] + event["cache_read_tokens"]
    assert tokens["output"].sum == event["output_tokens"]
    assert telemetry.unit("gen_ai.client.token.usage") == "{token}"
    attributes = dict(tokens["input"].attributes)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai-compatible",
        "gen_ai.request.model": "gpt-test",
        "gen_ai.response.model": "gpt-test",
        "gen_ai.token.type": "input",
    }
    (duration,) = telemetry.points("gen_ai.client.operation.duration")
    assert telemetry.unit("gen_ai.client.operation.duration") == "s"
    assert duration.count == 1
    assert duration.sum == pytest.approx(event["latency_ms"] / 1000.0)
    (cost,) = telemetry.points("payi_guard.cost")
    assert telemetry.unit("payi_guard.cost") == "USD"
    assert Decimal(str(cost.value)) == expected_cost(record, "gpt-test")
    # No user ids on metrics unless asked: one series per user would swamp a backend.
    for name in (
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "payi_guard.cost",
    ):
        for point in telemetry.points(name):
            assert "payi_guard.user_id" not in point.attributes


def test_the_current_span_gets_usage_user_and_cost(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock)
    instrument(guard, telemetry.meters, telemetry.tracers)
    client = _client(guard, fake)
    tracer = telemetry.tracers.get_tracer("app")
    with capture_logs() as logs:
        with tracer.start_as_current_span("POST /api/chat"), track_context(user_id="bob"):
            client.chat.completions.create(model="gpt-test", messages=user_message("hi"))
    (event,) = calls(logs)
    (span,) = telemetry.spans.get_finished_spans()  # the app's span, no extra span
    assert span.name == "POST /api/chat"
    assert span.attributes is not None
    assert span.attributes["payi_guard.user_id"] == "bob"
    assert span.attributes["gen_ai.usage.input_tokens"] == event["input_tokens"]
    assert span.attributes["gen_ai.usage.output_tokens"] == event["output_tokens"]
    assert span.attributes["payi_guard.cost_usd"] == pytest.approx(event["cost_usd"])


def test_a_call_outside_any_span_is_recorded_as_its_own_client_span(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock)
    instrument(guard, telemetry.meters, telemetry.tracers)
    client = _client(guard, fake)
    with track_context(user_id="carol"):
        stream = client.chat.completions.create(
            model="gpt-test", messages=user_message("stream me"), stream=True
        )
        for _ in stream:
            pass
    (span,) = telemetry.spans.get_finished_spans()
    assert span.name == "chat gpt-test"
    assert span.kind.name == "CLIENT"
    assert span.attributes is not None
    assert span.attributes["gen_ai.provider.name"] == "openai-compatible"
    assert span.attributes["payi_guard.user_id"] == "carol"
    output_tokens = span.attributes["gen_ai.usage.output_tokens"]
    assert isinstance(output_tokens, int)
    assert output_tokens > 0
    assert span.end_time is not None
    assert span.start_time is not None
    assert span.end_time >= span.start_time


def test_refusals_are_counted_by_limit_and_user_ids_only_when_asked(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock, limits={"tiny": {"max": "0.000001", "per": "day"}}, default=["tiny"])
    instrument(guard, telemetry.meters, telemetry.tracers, user_id_attribute=True)
    client = _client(guard, fake)
    with track_context(user_id="dave"), pytest.raises(BudgetExceeded):
        client.chat.completions.create(model="gpt-test", messages=user_message("too much"))
    assert fake.requests == []
    (refusal,) = telemetry.points("payi_guard.refusals")
    assert refusal.value == 1
    assert refusal.attributes["payi_guard.limit"] == "tiny"
    assert refusal.attributes["payi_guard.limit.scope"] == "user"
    assert refusal.attributes["gen_ai.request.model"] == "gpt-test"
    assert refusal.attributes["payi_guard.user_id"] == "dave"


def test_a_provider_error_carries_error_type(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock)
    instrument(guard, telemetry.meters, telemetry.tracers)
    client = _client(guard, fake)
    fake.enqueue(Scripted(status=500))
    with track_context(user_id="erin"), pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-test", messages=user_message("fail"))
    (duration,) = telemetry.points("gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] not in ("", None, "ok")
    assert telemetry.points("payi_guard.cost") == []  # nothing was charged


def test_uninstrument_stops_reporting(
    clock: FakeClock, fake: FakeProvider, telemetry: Telemetry
) -> None:
    guard = make_guard(clock)
    link = instrument(guard, telemetry.meters, telemetry.tracers)
    link.uninstrument()
    assert len(guard.observers) == 0
    client = _client(guard, fake)
    with track_context(user_id="frank"):
        client.chat.completions.create(model="gpt-test", messages=user_message("hi"))
    assert telemetry.points("gen_ai.client.token.usage") == []


class _Broken:
    def call_ended(self, event: CallEnded) -> None:
        raise RuntimeError("observer bug")

    def call_refused(self, event: CallRefused) -> None:
        raise RuntimeError("observer bug")


def test_a_failing_observer_never_breaks_a_call_and_is_logged_once(
    clock: FakeClock, fake: FakeProvider
) -> None:
    guard = make_guard(clock)
    guard.observers.add(_Broken())
    client = _client(guard, fake)
    with capture_logs() as logs, track_context(user_id="gina"):
        for _ in range(2):
            client.chat.completions.create(model="gpt-test", messages=user_message("hi"))
    assert len(calls(logs)) == 2
    errors = [e for e in logs if e["event"] == "observer_error"]
    assert len(errors) == 1
    assert errors[0]["observer"] == "_Broken"


def test_nothing_is_imported_until_instrument_and_a_missing_api_names_the_extra() -> None:
    script = textwrap.dedent(
        """
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError("blocked: " + name)
                return None

        import payi_guard, payi_guard.otel
        assert not any(m.startswith("opentelemetry") for m in sys.modules), sorted(
            m for m in sys.modules if m.startswith("opentelemetry"))
        sys.meta_path.insert(0, Block())
        try:
            payi_guard.otel.instrument(payi_guard.Guard())
        except payi_guard.MissingDependency as exc:
            print(exc)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'payi-guard[otel]'" in done.stdout


def test_the_span_counts_every_input_token_the_metric_counts(
    clock: FakeClock, telemetry: Telemetry
) -> None:
    # 1-hour cache writes are input tokens too (an Anthropic call's).
    from payi_guard.engine import CallRequest
    from payi_guard.pricing import TokenUsage

    guard = make_guard(clock)
    instrument(guard, telemetry.meters, telemetry.tracers)
    usage = TokenUsage(
        100, 10, cache_read_tokens=20, cache_write_tokens=30, cache_write_1h_tokens=1000
    )
    tracer = telemetry.tracers.get_tracer("app")
    with tracer.start_as_current_span("POST /api/chat"), track_context(user_id="bob"):
        request = CallRequest(model="gpt-4o", input_tokens=2000, max_output_tokens=10)
        guard.begin(request).settle(usage)
    (span,) = telemetry.spans.get_finished_spans()
    assert span.attributes is not None
    (point,) = [
        p
        for p in telemetry.points("gen_ai.client.token.usage")
        if p.attributes["gen_ai.token.type"] == "input"
    ]
    assert span.attributes["gen_ai.usage.input_tokens"] == point.sum == 1150
