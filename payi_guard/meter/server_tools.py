"""What server-side tools add to a request's bound: searches, and what they read.

A tool the provider runs itself (Anthropic's ``web_search`` and ``web_fetch``, the
Responses API's ``web_search`` and ``file_search``, Gemini's Google Search grounding and
URL context) is billed twice: a fee per search or call (genai-prices prices the web
searches and file search calls), and its results as input tokens, since the model reads
them. Neither shows in the request body, so the bound counts, for each search the tool
may run (its ``max_uses``, else :data:`DEFAULT_WEB_SEARCHES` or
:data:`DEFAULT_FILE_SEARCHES`), the fee and :data:`SEARCH_RESULT_TOKENS` of input;
for each fetch, its ``max_content_tokens`` (else the file allowance). These are
allowances, not bounds: a call whose searches read more is charged in full (and logged
with ``under_estimated_usd``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from payi_guard.meter.tokens import DEFAULT_FILE_TOKENS, EndpointKind, count_param

__all__ = [
    "DEFAULT_FILE_SEARCHES",
    "DEFAULT_WEB_SEARCHES",
    "GEMINI_SEARCH_TOOLS",
    "SEARCH_RESULT_TOKENS",
    "file_search_bound",
    "gemini_tool_tokens",
    "tool_input_tokens",
    "web_search_bound",
]

DEFAULT_WEB_SEARCHES = 10
"""Web searches reserved for a web search tool that sets no ``max_uses`` (Anthropic) or
for a Responses web search tool (which has no cap): each search is billed on its own."""

DEFAULT_FILE_SEARCHES = 10
"""File search calls reserved for each Responses ``file_search`` tool (billed per call;
the tool sets no cap on how often the model calls it)."""

SEARCH_RESULT_TOKENS = 16_000
"""Input tokens counted for each server-side search: its results, which the model reads.

Recorded: a Responses web search on gpt-5 read 9,440 tokens of results; two Anthropic
searches added 20,330 input tokens to the call (the prompt is read again after each).
"""

GEMINI_SEARCH_TOOLS = (
    "googleSearch",
    "google_search",
    "googleSearchRetrieval",
    "google_search_retrieval",
    "urlContext",
    "url_context",
)
"""The keys of a Gemini tool the model runs on Google's side (grounding, URL context)."""


def web_search_bound(body: Mapping[str, Any], endpoint: EndpointKind) -> int:
    """An upper bound of the web searches a request lets the provider run (billed each).

    Anthropic ``web_search_*`` tools count their ``max_uses``, or
    :data:`DEFAULT_WEB_SEARCHES` without one; each Responses ``web_search*`` tool
    counts :data:`DEFAULT_WEB_SEARCHES`. Other requests run none (chat completions'
    ``web_search_options`` are billed per call, which genai-prices does not price).
    """
    if endpoint not in ("anthropic_messages", "responses"):
        return 0
    tools = body.get("tools")
    if not isinstance(tools, list):
        return 0
    total = 0
    for tool in tools:
        kind = tool.get("type") if isinstance(tool, Mapping) else None
        if not isinstance(kind, str) or not kind.startswith("web_search"):
            continue
        cap = count_param(tool, "max_uses") if endpoint == "anthropic_messages" else None
        total += DEFAULT_WEB_SEARCHES if cap is None else cap
    return total


def file_search_bound(body: Mapping[str, Any], endpoint: EndpointKind) -> int:
    """An upper bound of the file search calls a request lets the provider run.

    Each Responses ``file_search`` tool counts :data:`DEFAULT_FILE_SEARCHES`; other
    requests run none.
    """
    if endpoint != "responses":
        return 0
    tools = body.get("tools")
    if not isinstance(tools, list):
        return 0
    kinds = (tool.get("type") for tool in tools if isinstance(tool, Mapping))
    return DEFAULT_FILE_SEARCHES * sum(1 for kind in kinds if kind == "file_search")


def tool_input_tokens(
    body: Mapping[str, Any], endpoint: EndpointKind, web_searches: int, file_searches: int
) -> int:
    """The input tokens a request's server-side tools may add: their results.

    Args:
        body: the request body.
        endpoint: its kind.
        web_searches: :func:`web_search_bound` of it.
        file_searches: :func:`file_search_bound` of it.
    """
    tokens = (web_searches + file_searches) * SEARCH_RESULT_TOKENS
    if endpoint == "anthropic_messages":
        tools = body.get("tools")
        for tool in tools if isinstance(tools, list) else ():
            kind = tool.get("type") if isinstance(tool, Mapping) else None
            if isinstance(kind, str) and kind.startswith("web_fetch"):
                uses = count_param(tool, "max_uses")
                size = count_param(tool, "max_content_tokens")
                tokens += (DEFAULT_WEB_SEARCHES if uses is None else uses) * (
                    DEFAULT_FILE_TOKENS if size is None else size
                )
    return tokens


def gemini_tool_tokens(tools: object) -> int:
    """The input tokens a Gemini request's grounding tools may add (their results).

    Each tool naming one of :data:`GEMINI_SEARCH_TOOLS` counts
    :data:`DEFAULT_WEB_SEARCHES` searches of :data:`SEARCH_RESULT_TOKENS` (Gemini sets
    no cap on the queries it runs).
    """
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        return 0
    grounded = sum(
        1
        for tool in tools
        if isinstance(tool, Mapping) and any(key in tool for key in GEMINI_SEARCH_TOOLS)
    )
    return grounded * DEFAULT_WEB_SEARCHES * SEARCH_RESULT_TOKENS
