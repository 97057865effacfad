"""OpenTelemetry for payi_guard: GenAI semantic-convention metrics, span attributes, cost.

``instrument(guard)`` (extra ``payi-guard[otel]``) makes every call the guard meters
appear where OpenTelemetry users look for it:

* metrics, named and shaped as the GenAI semantic conventions define them:
  ``gen_ai.client.token.usage`` (histogram, ``{token}``, by ``gen_ai.token.type``
  ``input`` / ``output``) and ``gen_ai.client.operation.duration`` (histogram, ``s``),
  with ``gen_ai.operation.name``, ``gen_ai.provider.name``, ``gen_ai.request.model``,
  ``gen_ai.response.model`` (when the response named one) and ``error.type`` (for calls
  that did not end well);
* ``payi_guard.cost`` (counter, ``USD``: exactly what the ledger was charged) and
  ``payi_guard.refusals`` (counter, by ``payi_guard.limit``);
* on the span current when a call ends: ``gen_ai.usage.input_tokens``,
  ``gen_ai.usage.output_tokens``, ``payi_guard.user_id``, ``payi_guard.cost_usd``. When
  no span is recording at that moment, a ``{operation} {model}`` client span covering
  the call is recorded instead, so a call outside any traced request is not lost.

User ids never become metric attributes (one time series per user would swamp a
metrics backend) unless the app asks for it with ``user_id_attribute=True``.

Nothing is imported from OpenTelemetry until :func:`instrument` is called, and nothing
happens unless it is.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from payi_guard.engine.observers import CallEnded, CallRefused
from payi_guard.exceptions import MissingDependency

if TYPE_CHECKING:
    from payi_guard.engine import Guard

__all__ = ["OPERATION_NAMES", "PROVIDER_NAMES", "Instrumentation", "instrument"]

OPERATION_NAMES: Mapping[str, str] = {
    "chat": "chat",
    "responses": "chat",
    "anthropic_messages": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "generate_content": "generate_content",
}
"""``gen_ai.operation.name`` of each endpoint kind the meter reports (else the kind itself)."""

PROVIDER_NAMES: Mapping[str, str] = {
    "openai": "openai",
    "anthropic": "anthropic",
    "azure": "azure.ai.openai",
    "google": "gcp.gemini",
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "aws": "aws.bedrock",
    "bedrock": "aws.bedrock",
    "mistral": "mistral_ai",
    "groq": "groq",
    "deepseek": "deepseek",
    "x-ai": "x_ai",
    "xai": "x_ai",
    "perplexity": "perplexity",
    "cohere": "cohere",
}
"""``gen_ai.provider.name`` of each provider id the meter reports (else the id itself)."""

# Bucket boundaries the GenAI semantic conventions recommend.
_TOKEN_BUCKETS = tuple(4**i for i in range(14))
_DURATION_BUCKETS = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_GOOD_OUTCOMES = frozenset({"ok", "recorded"})
_SCOPE = "payi_guard"


def _module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingDependency("opentelemetry-api", "otel") from exc


@dataclass
class Instrumentation:
    """The link between one guard and OpenTelemetry; :meth:`uninstrument` ends it.

    Built by :func:`instrument`, not by hand.
    """

    guard: Guard
    user_id_attribute: bool
    _tokens: Any
    _duration: Any
    _cost: Any
    _refusals: Any
    _tracer: Any
    _trace: Any = field(repr=False)

    def uninstrument(self) -> None:
        """Stop reporting this guard's calls (instruments already created stay)."""
        self.guard.observers.remove(self)

    def _attributes(self, provider: str, endpoint: str, model: str) -> dict[str, Any]:
        return {
            "gen_ai.operation.name": OPERATION_NAMES.get(endpoint, endpoint),
            "gen_ai.provider.name": PROVIDER_NAMES.get(provider, provider),
            "gen_ai.request.model": model,
        }

    def call_ended(self, event: CallEnded) -> None:
        """Record one call's metrics and span attributes."""
        record = event.record
        attributes = self._attributes(record.provider, event.endpoint, record.model)
        if record.response_model:
            attributes["gen_ai.response.model"] = record.response_model
        if record.outcome not in _GOOD_OUTCOMES:
            attributes["error.type"] = record.outcome
        if self.user_id_attribute:
            attributes["payi_guard.user_id"] = record.user_id
        usage = record.usage
        if usage is not None:
            input_tokens = usage.total_input_tokens
            self._tokens.record(input_tokens, {**attributes, "gen_ai.token.type": "input"})
            self._tokens.record(usage.output_tokens, {**attributes, "gen_ai.token.type": "output"})
        seconds = record.latency_ms / 1000.0
        self._duration.record(seconds, attributes)
        if record.cost_nano:
            self._cost.add(record.cost_nano / 1e9, attributes)
        self._annotate(event, attributes, seconds)

    def _annotate(self, event: CallEnded, attributes: dict[str, Any], seconds: float) -> None:
        record = event.record
        usage = record.usage
        facts: dict[str, Any] = {
            "payi_guard.user_id": record.user_id,
            "payi_guard.cost_usd": record.cost_nano / 1e9,
        }
        if usage is not None:
            facts["gen_ai.usage.input_tokens"] = usage.total_input_tokens  # as the metric
            facts["gen_ai.usage.output_tokens"] = usage.output_tokens
        span = self._trace.get_current_span()
        if span.is_recording():
            span.set_attributes(facts)
            return
        # No traced request around this call: record the call as its own client span.
        end = time.time_ns()  # span times are wall-clock nanoseconds, as OpenTelemetry's own
        start = end - int(seconds * 1e9)
        name = f"{attributes['gen_ai.operation.name']} {record.model}"
        own = self._tracer.start_span(
            name, kind=self._trace.SpanKind.CLIENT, start_time=start, attributes=attributes
        )
        own.set_attributes(facts)
        if "error.type" in attributes:
            own.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        own.end(end_time=end)

    def call_refused(self, event: CallRefused) -> None:
        """Count one refusal, by the limit that refused it."""
        attributes = self._attributes(event.provider, event.endpoint, event.model)
        attributes["payi_guard.limit"] = event.limit.name
        attributes["payi_guard.limit.scope"] = event.limit.scope
        if self.user_id_attribute:
            attributes["payi_guard.user_id"] = event.user_id
        self._refusals.add(1, attributes)


def instrument(
    guard: Guard,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    *,
    user_id_attribute: bool = False,
) -> Instrumentation:
    """Report every call ``guard`` meters to OpenTelemetry.

    Args:
        guard: the guard.
        meter_provider: where metrics go; the global one when ``None``.
        tracer_provider: where a call's own span goes when no span is current; the
            global one when ``None``.
        user_id_attribute: also put ``payi_guard.user_id`` on metrics (off by default:
            one time series per user).

    Returns:
        The :class:`Instrumentation`; its ``uninstrument()`` stops the reporting.

    Raises:
        MissingDependency: ``opentelemetry-api`` is not installed.
    """
    metrics = _module("opentelemetry.metrics")
    trace = _module("opentelemetry.trace")
    version = _package_version()
    meter = (
        metrics.get_meter(_SCOPE, version)
        if meter_provider is None
        else meter_provider.get_meter(_SCOPE, version)
    )
    tracer = (
        trace.get_tracer(_SCOPE, version)
        if tracer_provider is None
        else tracer_provider.get_tracer(_SCOPE, version)
    )
    link = Instrumentation(
        guard=guard,
        user_id_attribute=user_id_attribute,
        _tokens=meter.create_histogram(
            "gen_ai.client.token.usage",
            unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=list(_TOKEN_BUCKETS),
        ),
        _duration=meter.create_histogram(
            "gen_ai.client.operation.duration",
            unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=list(_DURATION_BUCKETS),
        ),
        _cost=meter.create_counter(
            "payi_guard.cost", unit="USD", description="Money charged to budgets for GenAI calls."
        ),
        _refusals=meter.create_counter(
            "payi_guard.refusals",
            unit="{refusal}",
            description="GenAI calls refused because a budget could be crossed.",
        ),
        _tracer=tracer,
        _trace=trace,
    )
    guard.observers.add(link)
    return link


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("payi-guard")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"
