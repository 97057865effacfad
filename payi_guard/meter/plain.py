"""Plain (non-streamed) responses: whether a body is an event stream, what to charge.

:func:`plain_result` reads a JSON response body's usage for the guarding transport
(:mod:`payi_guard.meter.transport`): an OpenAI-style usage whose counts can all be
trusted goes straight to a :class:`~payi_guard.pricing.TokenUsage`
(:func:`openai_token_usage`); anything else through
:func:`~payi_guard.meter.parse.usage_from_response`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from payi_guard.meter.modality import openai_media
from payi_guard.meter.parse import Endpoint, loads_json, usage_from_response
from payi_guard.meter.streams import Settlement, make_settlement
from payi_guard.meter.tier import response_tier, tier_context
from payi_guard.pricing import TokenUsage
from payi_guard.pricing.rates import make_token_usage

__all__ = ["is_event_stream", "openai_token_usage", "plain_result"]

# The endpoints whose usage object openai_token_usage reads.
_OPENAI_USAGE_KINDS: Final = frozenset({"chat", "completions", "embeddings"})

# Whether each response content type seen is an event stream (servers send a few).
_MEMO_SIZE: Final = 256
_event_stream_types: dict[str, bool] = {}


def is_event_stream(content_type: str) -> bool:
    """Whether a ``Content-Type`` value names ``text/event-stream`` (memoised)."""
    try:
        return _event_stream_types[content_type]
    except KeyError:
        pass
    stream = content_type.split(";", 1)[0].strip().lower() == "text/event-stream"
    if len(_event_stream_types) >= _MEMO_SIZE:
        _event_stream_types.clear()  # bounded
    _event_stream_types[content_type] = stream
    return stream


def plain_result(endpoint: Endpoint, content: bytes) -> Settlement:
    """What to charge for a JSON (non-stream) response body of ``endpoint``.

    A body without a usage object, or whose counts cannot be trusted, is charged the
    reservation (outcome ``unverified``); a usage is priced at the tier the body says
    served the call (:func:`~payi_guard.meter.tier.response_tier`).
    """
    try:
        obj: Any = loads_json(content)
    except (ValueError, UnicodeDecodeError):
        obj = None
    kind = endpoint.kind
    if type(obj) is dict and kind in _OPENAI_USAGE_KINDS:
        # The common case first: an OpenAI-style usage whose counts can be trusted.
        usage = obj.get("usage")
        if type(usage) is dict:
            tokens = openai_token_usage(usage, output=kind != "embeddings")
            if tokens is not None:
                named = obj.get("model")
                named = named if type(named) is str and named else None
                context = tier_context("service_tier", obj.get("service_tier"))
                return make_settlement(tokens, "ok", named, (), (), context)
    parsed = usage_from_response(endpoint, obj)
    problems = parsed.problems if parsed.complete else ("usage: missing",)
    outcome = "ok"
    model: Any = None
    context = None
    if isinstance(obj, dict):
        model = obj.get("model")
        context = response_tier(kind, obj)
        if kind == "responses":
            status = obj.get("status")
            if status == "incomplete":
                outcome = "incomplete"
            elif status == "failed":
                outcome = "error"
    return Settlement(
        parsed.to_token_usage(),
        outcome,
        response_model=model if isinstance(model, str) and model else None,
        other_models=parsed.other_models,
        problems=problems,
        price_context=context,
    )


def openai_token_usage(usage: dict[str, Any], *, output: bool = True) -> TokenUsage | None:
    """``openai_usage(usage, output=output).to_token_usage()`` when that has no problems.

    The plain-response path: one pass over the counts, no
    :class:`~payi_guard.meter.parse.ParsedUsage`.

    Returns:
        The usage to charge, or ``None`` when a count cannot be trusted (then
        :func:`~payi_guard.meter.parse.openai_usage` tells which) or ``total_tokens``
        counts output the other counts leave out (``openai_usage`` adds it).
    """
    total = usage.get("prompt_tokens")
    if type(total) is not int or total < 0:
        return None
    completion = usage.get("completion_tokens")
    if type(completion) is int and completion >= 0:
        out = completion
    elif completion is None and not output:
        out = 0
    else:
        return None
    grand = usage.get("total_tokens")
    if output and type(grand) is int and grand > total + out:
        return None  # output the counts leave out: read by openai_usage
    details = usage.get("prompt_tokens_details")
    answer = usage.get("completion_tokens_details")
    if type(details) is not dict:
        if details is not None and isinstance(details, Mapping):
            return None  # read by openai_usage
        media = None if answer is None else openai_media(usage, total, 0, out)
        return make_token_usage(total, out, 0, 0, 0, 0, 0, media)
    cached = details.get("cached_tokens")
    written = details.get("cache_write_tokens")
    if cached is None:
        cached = 0
    elif type(cached) is not int or cached < 0:
        return None
    if written is None:
        written = 0
    elif type(written) is not int or written < 0:
        return None
    cached = min(total, cached)
    written = min(total - cached, written)
    plain = total - cached - written
    media = None
    if (
        details.get("audio_tokens")
        or details.get("image_tokens")
        or (type(answer) is dict and (answer.get("audio_tokens") or answer.get("image_tokens")))
    ):
        media = openai_media(usage, plain, cached, out)
    return make_token_usage(plain, out, cached, written, 0, 0, 0, media)
