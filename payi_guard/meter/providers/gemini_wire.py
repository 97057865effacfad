"""The Gemini wire (``generateContent`` and its kin): the bound, usage and streams.

:class:`GeminiDialect` (also used for LiteLLM's Gemini route):

* the model is in the URL, ``.../models/{model}:{method}`` (Vertex:
  ``.../publishers/google/models/{model}:{method}``), priced under genai-prices'
  ``google`` provider;
* the bound: every text part, tool declaration and response schema of the body, an
  allowance per image (:data:`~payi_guard.meter.tokens.DEFAULT_IMAGE_TOKENS`) and per
  file URI or inline audio, video or document
  (:data:`~payi_guard.meter.tokens.DEFAULT_FILE_TOKENS`, more for a large inline part:
  :func:`~payi_guard.meter.modality.gemini_part`);
  output ``generationConfig.maxOutputTokens`` (thoughts included) times
  ``candidateCount``, else the model's cap;
* usage: ``usageMetadata``; input = ``promptTokenCount - cachedContentTokenCount +
  toolUsePromptTokenCount``, cache reads = ``cachedContentTokenCount``, output =
  ``totalTokenCount - promptTokenCount - toolUsePromptTokenCount`` (thoughts included,
  whichever way the model counts them in ``candidatesTokenCount``). Stream chunks carry
  running totals: the last one is charged.

:func:`refuse` turns a refusal into google-genai's own ``ClientError``; installing the
meter on clients is :mod:`payi_guard.meter.providers.gemini`'s work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from functools import partial
from types import ModuleType
from typing import Any, Final

from payi_guard.exceptions import BudgetExceeded, PayiGuardError
from payi_guard.meter.modality import gemini_media, gemini_part
from payi_guard.meter.providers.meter import Dialect
from payi_guard.meter.providers.wire import (
    Bound,
    JsonBodyTracker,
    Report,
    SSETracker,
    UntrustedUsage,
    WireEndpoint,
    WireRequest,
    WireTracker,
    count,
    first_cap,
    model_cap,
)
from payi_guard.meter.refusal import refusal_response, refusal_status, sdk_refusal
from payi_guard.meter.server_tools import gemini_tool_tokens
from payi_guard.meter.tier import tier_context
from payi_guard.meter.tokens import EstimateMode, image_token_bound
from payi_guard.meter.usage_objects import ParsedUsage

__all__ = [
    "DEFAULT_OUTPUT_CAP",
    "DIALECT",
    "PROVIDER",
    "GeminiDialect",
    "GeminiStream",
    "gemini_usage",
    "refuse",
]

PROVIDER: Final = "google"

_GENERATE: Final = {"generateContent": False, "streamGenerateContent": True}
_EMBED: Final = frozenset({"embedContent", "batchEmbedContents"})

_OUTPUT_CAPS: Final = (
    ("gemini-1.0", 2_048),
    ("gemini-1.5", 8_192),
    ("gemini-2.0", 8_192),
    ("gemini-2.5", 65_536),
    ("gemini-3", 65_536),
    ("gemma", 8_192),
)
"""Output caps by model name fragment (thinking tokens included)."""

DEFAULT_OUTPUT_CAP: Final = 65_536
"""The output cap of a Gemini model not in the table."""


def _get(obj: Mapping[str, Any], *keys: str) -> Any:
    """The first of ``keys`` present (REST accepts camelCase and snake_case fields)."""
    for key in keys:
        if key in obj:
            return obj[key]
    return None


def gemini_usage(meta: Mapping[str, Any]) -> ParsedUsage:
    """Read a ``usageMetadata`` object (camelCase or snake_case).

    Raises:
        UntrustedUsage: a count is missing (``promptTokenCount``), negative or not a
            whole number, or the counts contradict each other.
    """
    names = _snake if "prompt_token_count" in meta else _camel
    prompt = count(meta, names("promptTokenCount"))
    cached = count(meta, names("cachedContentTokenCount"), default=0)
    tool = count(meta, names("toolUsePromptTokenCount"), default=0)
    thoughts = count(meta, names("thoughtsTokenCount"), default=0)
    candidates = count(meta, names("candidatesTokenCount"), default=0)
    total = count(meta, names("totalTokenCount"), default=prompt + tool + candidates + thoughts)
    if cached > prompt:
        raise UntrustedUsage("cachedContentTokenCount exceeds promptTokenCount")
    output = total - prompt - tool
    if output < 0:
        raise UntrustedUsage("totalTokenCount is below the prompt's tokens")
    return ParsedUsage(
        input_tokens=prompt - cached + tool,
        output_tokens=output,
        cache_read_tokens=cached,
        reasoning_tokens=min(thoughts, output),
        complete=True,
        media=gemini_media(meta, prompt - cached + tool, cached, output),
    )


def _camel(name: str) -> str:
    return name


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


def _usage_of(obj: Mapping[str, Any]) -> Any:
    return _get(obj, "usageMetadata", "usage_metadata")


def _model_of(obj: Mapping[str, Any]) -> str | None:
    """The model a response (or chunk) names: ``modelVersion``, if it names one."""
    model = _get(obj, "modelVersion", "model_version")
    return model if isinstance(model, str) and model else None


def _tier_of(meta: Mapping[str, Any]) -> Mapping[str, str] | None:
    """The tier ``usageMetadata.serviceTier`` says served the call, if it says."""
    tier = _get(meta, "serviceTier", "service_tier")
    return tier_context("service_tier", tier.lower() if isinstance(tier, str) else tier)


def _body_report(endpoint: WireEndpoint, obj: Any) -> Report:
    """The report of a whole response body (a JSON object, or a JSON array stream)."""
    if isinstance(obj, list):
        items = [item for item in obj if isinstance(item, Mapping)]
        metas = [meta for meta in map(_usage_of, items) if meta is not None]
        models = [model for model in map(_model_of, items) if model is not None]
        obj = {"usageMetadata": metas[-1]} if metas else {}
        obj.update({"modelVersion": models[-1]} if models else {})
    if not isinstance(obj, Mapping):
        return Report(invalid="the response body is not JSON")
    meta = _usage_of(obj)
    if isinstance(meta, Mapping):
        return Report.read(
            lambda: gemini_usage(meta), model=_model_of(obj), price_context=_tier_of(meta)
        )
    if endpoint.kind == "embeddings":
        return Report.read(lambda: _prediction_usage(obj))
    return Report(invalid="the response has no usageMetadata")


def _prediction_usage(obj: Mapping[str, Any]) -> ParsedUsage:
    """Vertex ``predict`` embeddings: ``predictions[].embeddings.statistics.token_count``."""
    predictions = obj.get("predictions")
    if not isinstance(predictions, list) or not predictions:
        raise UntrustedUsage("the response reports no usage")
    total = 0
    for prediction in predictions:
        stats: Any = prediction
        for key in ("embeddings", "statistics"):
            stats = stats.get(key) if isinstance(stats, Mapping) else None
        if not isinstance(stats, Mapping):
            raise UntrustedUsage("a prediction reports no token_count")
        total += count(stats, "token_count")
    return ParsedUsage(input_tokens=total, complete=True)


class GeminiStream(SSETracker):
    """A ``streamGenerateContent?alt=sse`` stream: running ``usageMetadata`` totals.

    The answer is finished once every candidate it has shown (``candidateCount`` above
    1 streams them side by side, by ``index``) has its finish reason: a candidate that
    finishes first leaves the others, and their output, still to come.
    """

    def __init__(self) -> None:
        super().__init__()
        self._last: Mapping[str, Any] | None = None
        self._open: set[object] = set()
        self._closed: set[object] = set()

    def on_event(self, name: str | None, obj: dict[str, Any]) -> None:
        """Read one chunk: its text, its running usage, its finish reason or error."""
        error = obj.get("error")
        if isinstance(error, Mapping):
            self.errors.append(str(error.get("message") or error.get("status") or "error"))
            return
        for candidate in obj.get("candidates") or ():
            if not isinstance(candidate, Mapping):
                continue
            index = candidate.get("index", 0)
            if _get(candidate, "finishReason", "finish_reason"):
                self._closed.add(index)
                self._open.discard(index)
            elif index not in self._closed:
                self._open.add(index)
            content = candidate.get("content")
            for part in (content.get("parts") if isinstance(content, Mapping) else None) or ():
                if isinstance(part, Mapping):
                    self.count_text(part.get("text"))
                    self.count_text(_get(part, "functionCall", "function_call"))
        model = _model_of(obj)
        if model is not None:
            self.model = model
        meta = _usage_of(obj)
        if isinstance(meta, Mapping):
            self._last = meta
            tier = _tier_of(meta)
            if tier is not None:
                self.price_context = tier
            with contextlib.suppress(UntrustedUsage):
                self.partial = gemini_usage(meta)
        # Finished while every candidate shown has finished (one shown later reopens it).
        self.finished = bool(self._closed) and not self._open
        if not self.finished:
            self.report = None
        elif self._last is not None:
            self._report(self._last)

    def on_end(self) -> None:
        """The last running total is the call's usage."""
        if self._last is not None:
            self._report(self._last)

    def _report(self, last: Mapping[str, Any]) -> None:
        self.report = Report.read(
            lambda: gemini_usage(last), model=self.model, price_context=self.price_context
        )


class GeminiDialect(Dialect):
    """The Gemini REST wire format (Developer API and Vertex AI)."""

    provider = PROVIDER

    def classify(
        self, method: str, host: str, path: list[str], headers: Any = None
    ) -> WireEndpoint | None:
        """A generate or embed call (``models/{model}:{method}``), or a tuned model's.

        A tuned model (``endpoints/{id}``, ``tunedModels/{id}``) is priced as the model
        its response names; ``unknown_model`` decides whether it is sent.
        """
        if method != "POST" or len(path) < 2 or ":" not in path[-1]:
            return None
        name, _, operation = path[-1].rpartition(":")
        if not name:
            return None
        if path[-2] in _TUNED and operation in _GENERATE:
            return WireEndpoint("chat", operation, f"{path[-2]}/{name}", _GENERATE[operation])
        if path[-2] != "models":
            return None
        if operation in _GENERATE:
            return WireEndpoint("chat", operation, name, _GENERATE[operation])
        if operation in _EMBED or (operation == "predict" and "embedding" in name.lower()):
            return WireEndpoint("embeddings", operation, name, False)
        return None

    def describe(
        self, endpoint: WireEndpoint, body: Mapping[str, Any], mode: EstimateMode
    ) -> WireRequest:
        """The model, stream flag and bounds of a request body."""
        model = endpoint.model
        bound = Bound(image_tokens=image_token_bound(model or ""), media=gemini_part)
        if endpoint.kind == "embeddings":
            for key in ("content", "requests", "instances"):
                bound.add_items(body.get(key))
            return WireRequest(model, False, bound.tokens(mode), 0)
        bound.add_items(body.get("contents"))
        for keys in (
            ("systemInstruction", "system_instruction"),
            ("tools",),
            ("toolConfig", "tool_config"),
        ):
            bound.add(_get(body, *keys))
        config = _get(body, "generationConfig", "generation_config")
        config = config if isinstance(config, Mapping) else {}
        for key in ("responseSchema", "response_schema", "responseJsonSchema"):
            bound.add(config.get(key))
        cap = first_cap(config, "maxOutputTokens", "max_output_tokens")
        if cap is None:
            cap = model_cap(model or "", _OUTPUT_CAPS, DEFAULT_OUTPUT_CAP)
        candidates = first_cap(config, "candidateCount", "candidate_count") or 1
        tier = _tier_of(body)  # the tier asked for: the request's own serviceTier
        return WireRequest(
            model,
            bool(endpoint.stream),
            bound.tokens(mode) + gemini_tool_tokens(body.get("tools")),
            cap * candidates,
            price_context=dict(tier) if tier else {},
        )

    def tracker(
        self, endpoint: WireEndpoint, content_type: str, headers: Mapping[str, str] | Any
    ) -> WireTracker:
        """An SSE stream tracker, or a whole-body one (JSON object or array)."""
        if content_type == "text/event-stream":
            return GeminiStream()
        return JsonBodyTracker(partial(_body_report, endpoint))


_TUNED: Final = frozenset({"endpoints", "tunedModels"})  # before a tuned model's id

DIALECT: Final = GeminiDialect()

_STATUS_NAMES: Final = {
    429: "RESOURCE_EXHAUSTED",
    403: "PERMISSION_DENIED",
    503: "UNAVAILABLE",
    400: "INVALID_ARGUMENT",
}


def refuse(module: ModuleType, request: Any, exc: PayiGuardError) -> BaseException:
    """The exception a refused Gemini call raises: the SDK's and payi_guard's at once.

    ``google.genai.errors.ClientError`` with code 429 (403 for an unknown model, 400 for
    another refusal), or ``ServerError`` with code 503 when the store failed closed.
    """
    from google.genai import errors

    status = refusal_status(exc)
    message = exc.describe() if isinstance(exc, BudgetExceeded) else str(exc)
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES[status]}}
    response = refusal_response(module, request, exc)
    cls = errors.ClientError if status < 500 else errors.ServerError
    return sdk_refusal(cls(status, body, response), exc)
