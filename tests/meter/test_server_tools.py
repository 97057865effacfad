"""Server-side tools: the reservation counts what their searches read, on recorded calls.

The recorded requests set generous caps (an output cap of thousands of tokens, no
``max_uses``), which cover the searches' results by themselves. Here each request is
tightened to what its recording used (``max_uses`` the searches it ran, the output cap the
output it wrote): the reservation must still cover the recorded bill, since what the
searches read is billed as input.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from conformance.corpus import Interaction, synthetic
from conformance.derived import recorded
from conformance.expected import bill

from payi_guard.meter.estimate import estimate_cost, estimate_request
from payi_guard.meter.server_tools import (
    DEFAULT_WEB_SEARCHES,
    SEARCH_RESULT_TOKENS,
    gemini_tool_tokens,
    tool_input_tokens,
)
from payi_guard.meter.tokens import DEFAULT_FILE_TOKENS
from payi_guard.pricing import PriceBook

ANTHROPIC_SEARCH = "synthetic/anthropic_web_search_stream"
RESPONSES_SEARCH = (
    "pydantic-ai/test_openai_responses/"
    "test_openai_responses_model_web_search_tool_with_user_location"
)


def _synthetic(interaction_id: str) -> Interaction:
    (found,) = (i for i in synthetic() if i.id == interaction_id)
    return found


def _tightened(interaction: Interaction, cap_field: str, searches: int | None) -> dict[str, Any]:
    body = copy.deepcopy(interaction.request)
    billed = bill(interaction)
    assert billed is not None
    body[cap_field] = billed.tokens.output_tokens
    if searches is not None:
        for tool in body["tools"]:
            tool["max_uses"] = searches
    return body


@pytest.mark.parametrize(
    ("interaction", "endpoint", "cap_field", "searches"),
    [
        (_synthetic(ANTHROPIC_SEARCH), "anthropic_messages", "max_tokens", 2),
        (recorded(RESPONSES_SEARCH), "responses", "max_output_tokens", None),
    ],
    ids=["anthropic-2-searches", "responses-1-search"],
)
def test_a_tightened_search_request_still_reserves_its_recorded_bill(
    interaction: Interaction, endpoint: Any, cap_field: str, searches: int | None
) -> None:
    billed = bill(interaction)
    assert billed is not None
    body = _tightened(interaction, cap_field, searches)
    estimate = estimate_cost(PriceBook({}), body["model"], None, body, endpoint)
    billed_nano = billed.nano()
    assert billed_nano is not None
    assert estimate.nano >= billed_nano
    # The body alone (what was reserved before) is far below what the searches read.
    alone = estimate_request(body, endpoint, body["model"])
    tools = tool_input_tokens(body, endpoint, alone.web_searches, alone.file_searches)
    assert alone.input_tokens - tools < billed.tokens.input_tokens <= alone.input_tokens


def test_each_search_and_fetch_adds_its_allowance() -> None:
    body = {
        "tools": [
            {"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
            {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2},
            {"type": "web_fetch_20250910", "name": "web_fetch", "max_content_tokens": 5000},
        ]
    }
    assert tool_input_tokens(body, "anthropic_messages", 3, 0) == (
        3 * SEARCH_RESULT_TOKENS + 2 * DEFAULT_FILE_TOKENS + DEFAULT_WEB_SEARCHES * 5000
    )
    assert tool_input_tokens({"tools": [{"type": "file_search"}]}, "responses", 0, 10) == (
        10 * SEARCH_RESULT_TOKENS
    )
    assert tool_input_tokens({"tools": "x"}, "anthropic_messages", 0, 0) == 0


def test_gemini_grounding_tools_count_their_searches_results() -> None:
    grounded = [{"googleSearch": {}}, {"url_context": {}}, {"functionDeclarations": []}]
    assert gemini_tool_tokens(grounded) == 2 * DEFAULT_WEB_SEARCHES * SEARCH_RESULT_TOKENS
    assert gemini_tool_tokens([{"codeExecution": {}}]) == 0
    assert gemini_tool_tokens(None) == 0
    assert gemini_tool_tokens("googleSearch") == 0
