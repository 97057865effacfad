"""Usage as Bedrock reports it, read and checked.

``converse`` returns ``usage`` (``inputTokens`` excludes ``cacheReadInputTokens`` and
``cacheWriteInputTokens``), as does the ``metadata`` event that ends ``converse-stream``;
``invoke`` answers with ``X-Amzn-Bedrock-*-Token-Count`` headers whatever the model
family; a response stream's last chunk carries ``amazon-bedrock-invocationMetrics``;
where those are missing, each family's own body holds its counts. Every count is
checked (:func:`~payi_guard.meter.providers.wire.count`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Final

from payi_guard.meter.providers.wire import Report, UntrustedUsage, count
from payi_guard.meter.usage_objects import ParsedUsage

__all__ = [
    "anthropic_1h_writes",
    "converse_usage",
    "family_usage",
    "header_report",
    "metrics_usage",
    "with_1h_writes",
]

_HEADERS: Final = {
    "input": "x-amzn-bedrock-input-token-count",
    "output": "x-amzn-bedrock-output-token-count",
    "cache_read": "x-amzn-bedrock-cache-read-input-token-count",
    "cache_write": "x-amzn-bedrock-cache-write-input-token-count",
}


def with_1h_writes(usage: ParsedUsage, writes_1h: int) -> ParsedUsage:
    """``usage`` with ``writes_1h`` of its cache writes moved to the 1-hour count.

    Bedrock reports one cache-write total; the writes with a 1-hour lifetime, billed at
    their own higher rate, are told apart only in a breakdown (Converse's
    ``cacheDetails``, an Anthropic body's ``cache_creation``). At most the total moves.
    """
    moved = min(writes_1h, usage.cache_write_tokens)
    if moved <= 0:
        return usage
    return replace(
        usage,
        cache_write_tokens=usage.cache_write_tokens - moved,
        cache_write_1h_tokens=usage.cache_write_1h_tokens + moved,
    )


def anthropic_1h_writes(usage: Mapping[str, Any]) -> int:
    """An Anthropic usage object's ``cache_creation.ephemeral_1h_input_tokens`` (or 0).

    Raises:
        UntrustedUsage: the count is there but negative or not a whole number.
    """
    creation = usage.get("cache_creation")
    if not isinstance(creation, Mapping):
        return 0
    return count(creation, "ephemeral_1h_input_tokens", default=0)


def converse_usage(usage: Mapping[str, Any]) -> ParsedUsage:
    """Read a Converse ``usage`` object (``inputTokens`` excludes the cache counts).

    The 1-hour writes are the ``cacheDetails`` entries whose ``ttl`` is ``1h``.

    Raises:
        UntrustedUsage: a count is missing, negative or not a whole number.
    """
    parsed = ParsedUsage(
        input_tokens=count(usage, "inputTokens"),
        output_tokens=count(usage, "outputTokens"),
        cache_read_tokens=count(usage, "cacheReadInputTokens", default=0),
        cache_write_tokens=count(usage, "cacheWriteInputTokens", default=0),
        complete=True,
    )
    details = usage.get("cacheDetails")
    if not isinstance(details, list) or not details:
        return parsed
    writes_1h = sum(
        count(detail, "inputTokens")
        for detail in details
        if isinstance(detail, Mapping) and detail.get("ttl") == "1h"
    )
    return with_1h_writes(parsed, writes_1h)


def metrics_usage(metrics: Mapping[str, Any]) -> ParsedUsage:
    """Read ``amazon-bedrock-invocationMetrics`` (the last chunk of a response stream)."""
    return ParsedUsage(
        input_tokens=count(metrics, "inputTokenCount"),
        output_tokens=count(metrics, "outputTokenCount"),
        cache_read_tokens=count(metrics, "cacheReadInputTokenCount", default=0),
        cache_write_tokens=count(metrics, "cacheWriteInputTokenCount", default=0),
        complete=True,
    )


def header_report(headers: Mapping[str, str] | Any, *, output: bool = True) -> Report | None:
    """The usage of the ``X-Amzn-Bedrock-*-Token-Count`` headers, if the response has them.

    Args:
        headers: the response's headers.
        output: whether the output count must be there (an embedding answer has none).
    """
    if headers.get(_HEADERS["input"]) is None and headers.get(_HEADERS["output"]) is None:
        return None
    values: dict[str, Any] = {}
    for key, name in _HEADERS.items():
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
        values[key] = int(text) if text.strip().isdigit() else text
    return Report.read(
        lambda: ParsedUsage(
            input_tokens=count(values, "input"),
            output_tokens=count(values, "output", default=None if output else 0),
            cache_read_tokens=count(values, "cache_read", default=0),
            cache_write_tokens=count(values, "cache_write", default=0),
            complete=True,
        )
    )


def family_usage(body: Mapping[str, Any]) -> ParsedUsage:
    """The usage a model family writes in its own ``invoke`` body.

    Anthropic (``usage.input_tokens``...), Nova (``usage.inputTokens``...), Titan
    (``inputTextTokenCount`` and the results' ``tokenCount``, or a stream chunk's
    ``totalOutputTextTokenCount``; an embedding's ``inputTextTokenCount`` alone), Meta
    (``prompt_token_count``, ``generation_token_count``), OpenAI-style
    (``usage.prompt_tokens``...).

    Raises:
        UntrustedUsage: none of these is there, or a count cannot be trusted.
    """
    usage = body.get("usage")
    if isinstance(usage, Mapping):
        if "input_tokens" in usage:
            parsed = ParsedUsage(
                input_tokens=count(usage, "input_tokens"),
                output_tokens=count(usage, "output_tokens"),
                cache_read_tokens=count(usage, "cache_read_input_tokens", default=0),
                cache_write_tokens=count(usage, "cache_creation_input_tokens", default=0),
                complete=True,
            )
            return with_1h_writes(parsed, anthropic_1h_writes(usage))
        if "inputTokens" in usage:
            return ParsedUsage(
                input_tokens=count(usage, "inputTokens"),
                output_tokens=count(usage, "outputTokens"),
                cache_read_tokens=count(usage, "cacheReadInputTokenCount", default=0),
                cache_write_tokens=count(usage, "cacheWriteInputTokenCount", default=0),
                complete=True,
            )
        if "prompt_tokens" in usage:
            cached = 0
            details = usage.get("prompt_tokens_details")
            if isinstance(details, Mapping):
                cached = count(details, "cached_tokens", default=0)
            prompt = count(usage, "prompt_tokens")
            return ParsedUsage(
                input_tokens=max(0, prompt - cached),
                output_tokens=count(usage, "completion_tokens"),
                cache_read_tokens=min(cached, prompt),
                complete=True,
            )
    if "inputTextTokenCount" in body:
        if "totalOutputTextTokenCount" in body:
            output = count(body, "totalOutputTextTokenCount")
        elif "embedding" in body or "embeddingsByType" in body:
            output = 0  # a Titan embedding: input only
        else:
            results = body.get("results")
            if not isinstance(results, list) or not results:
                raise UntrustedUsage("Titan results are missing")
            output = sum(count(r, "tokenCount") for r in results if isinstance(r, Mapping))
        return ParsedUsage(
            input_tokens=count(body, "inputTextTokenCount"), output_tokens=output, complete=True
        )
    if "prompt_token_count" in body:
        return ParsedUsage(
            input_tokens=count(body, "prompt_token_count"),
            output_tokens=count(body, "generation_token_count"),
            complete=True,
        )
    raise UntrustedUsage("the response reports no token counts")
