"""The OpenAI-style chat wire format as Mistral and Groq speak it.

Both APIs take OpenAI's ``chat/completions`` and ``embeddings`` bodies, so their bounds
are those of :func:`~payi_guard.meter.estimate.estimate_request`, with each provider's
own output caps. Their usage differs from OpenAI's in where it arrives, never in what
it says: a stream always ends with its usage (no ``stream_options`` is injected),
Mistral's in the last chunk's ``usage``, Groq's in the last chunk's ``x_groq.usage``.
Counts are read from the wire and checked (an SDK object would default a missing count
to 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any, Final

from payi_guard.meter.estimate import estimate_request
from payi_guard.meter.modality import openai_media
from payi_guard.meter.providers.meter import Dialect
from payi_guard.meter.providers.wire import (
    JsonBodyTracker,
    Report,
    SSETracker,
    UntrustedUsage,
    WireEndpoint,
    WireRequest,
    WireTracker,
    count,
    model_cap,
)
from payi_guard.meter.tokens import EndpointKind, EstimateMode
from payi_guard.meter.usage_objects import ParsedUsage

__all__ = ["ChatDialect", "ChatStream", "chat_usage"]

_DETAILS: Final = ("prompt_tokens_details", "prompt_token_details")
_COMPLETION: Final = "completion_tokens_details"


def chat_usage(usage: Mapping[str, Any], *, kind: EndpointKind = "chat") -> ParsedUsage:
    """Read an OpenAI-style ``usage`` object, checked.

    ``prompt_tokens`` is required, ``completion_tokens`` too except for embeddings;
    ``prompt_tokens_details.cached_tokens`` (cache reads, part of the prompt) and
    ``completion_tokens_details.reasoning_tokens`` (part of the completion) are read
    when present.

    Raises:
        UntrustedUsage: a count is missing, negative or not a whole number, or the
            cached tokens exceed the prompt.
    """
    prompt = count(usage, "prompt_tokens")
    completion = count(usage, "completion_tokens", default=0 if kind == "embeddings" else None)
    cached = 0
    for key in _DETAILS:
        details = usage.get(key)
        if isinstance(details, Mapping):
            cached = count(details, "cached_tokens", default=0)
            break
    if cached > prompt:
        raise UntrustedUsage("cached_tokens exceeds prompt_tokens")
    reasoning = 0
    details = usage.get("completion_tokens_details")
    if isinstance(details, Mapping):
        reasoning = count(details, "reasoning_tokens", default=0)
    return ParsedUsage(
        input_tokens=prompt - cached,
        output_tokens=completion,
        cache_read_tokens=cached,
        reasoning_tokens=min(reasoning, completion),
        complete=True,
        media=openai_media(usage, prompt - cached, cached, completion, (key, _COMPLETION)),
    )


def _usage_object(obj: Mapping[str, Any]) -> Any:
    usage = obj.get("usage")
    if usage is None:
        x_groq = obj.get("x_groq")
        if isinstance(x_groq, Mapping):
            usage = x_groq.get("usage")
    return usage


def _body_report(kind: EndpointKind, obj: Any) -> Report:
    if not isinstance(obj, Mapping):
        return Report(invalid="the response body is not JSON")
    usage = _usage_object(obj)
    if not isinstance(usage, Mapping):
        return Report(invalid="the response has no usage object")
    return Report.read(lambda: chat_usage(usage, kind=kind))


_DELTA_TEXT: Final = ("content", "reasoning_content", "reasoning", "refusal", "text")


class ChatStream(SSETracker):
    """A chat stream: deltas counted, the usage of the chunk that carries it read."""

    def on_event(self, name: str | None, obj: dict[str, Any]) -> None:
        """Read one chunk."""
        error = obj.get("error")
        if error:
            message = error.get("message") if isinstance(error, Mapping) else error
            self.errors.append(str(message or "error"))
            return
        for choice in obj.get("choices") or ():
            if not isinstance(choice, Mapping):
                continue
            delta = choice.get("delta")
            delta = delta if isinstance(delta, Mapping) else choice
            for key in _DELTA_TEXT:
                self.count_text(delta.get(key))
            for call in delta.get("tool_calls") or ():
                function = call.get("function") if isinstance(call, Mapping) else None
                if isinstance(function, Mapping):
                    self.count_text(function.get("arguments"))
        usage = _usage_object(obj)
        if isinstance(usage, Mapping):
            self.report = Report.read(lambda: chat_usage(usage))


class ChatDialect(Dialect):
    """The chat / embeddings endpoints of an OpenAI-style API.

    Args:
        provider: the provider charged.
        hosts: the hosts it answers for (``None``: any host, for the SDK's own clients
            whose ``server_url`` / ``base_url`` may point anywhere).
        suffixes: the metered path endings (segment tuples) and their kinds.
        caps: output caps by model name fragment, and the default cap.
    """

    def __init__(
        self,
        provider: str,
        *,
        hosts: Iterable[str] | None,
        suffixes: Iterable[tuple[tuple[str, ...], EndpointKind]],
        caps: Iterable[tuple[str, int]],
        default_cap: int,
    ) -> None:
        self.provider = provider
        self.hosts = None if hosts is None else frozenset(hosts)
        self.suffixes = tuple(suffixes)
        self.caps = tuple(caps)
        self.default_cap = default_cap

    def for_hosts(self, hosts: Iterable[str]) -> ChatDialect:
        """The same dialect answering only for ``hosts`` (LiteLLM's shared clients)."""
        return ChatDialect(
            self.provider,
            hosts=hosts,
            suffixes=self.suffixes,
            caps=self.caps,
            default_cap=self.default_cap,
        )

    def classify(
        self, method: str, host: str, path: list[str], headers: Any = None
    ) -> WireEndpoint | None:
        """A ``POST`` whose path ends with a metered suffix (on one of the hosts)."""
        if method != "POST" or (self.hosts is not None and host not in self.hosts):
            return None
        for suffix, kind in self.suffixes:
            if tuple(path[-len(suffix) :]) == suffix:
                return WireEndpoint(kind, "/".join(suffix))
        return None

    def describe(
        self, endpoint: WireEndpoint, body: Mapping[str, Any], mode: EstimateMode
    ) -> WireRequest:
        """The model, stream flag and bounds of an OpenAI-style body."""
        model = body.get("model")
        model = model if isinstance(model, str) and model else None
        cap = model_cap(model or "", self.caps, self.default_cap)
        estimate = estimate_request(
            body, endpoint.kind, model or "", mode=mode, default_max_output=cap
        )
        return WireRequest(
            model,
            body.get("stream") is True,
            estimate.input_tokens,
            estimate.output_tokens,
        )

    def tracker(
        self, endpoint: WireEndpoint, content_type: str, headers: Mapping[str, str] | Any
    ) -> WireTracker:
        """A chat stream tracker, or a whole-body one."""
        if content_type == "text/event-stream":
            return ChatStream()
        return JsonBodyTracker(partial(_body_report, endpoint.kind))
