"""The options of wrap() / instrument(): validation and effect."""

from __future__ import annotations

from typing import Any

import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import one_call, user_message
from payi_guard import track_context
from payi_guard.engine import Guard
from payi_guard.meter.tokens import estimate_input_tokens
from payi_guard.testing import FakeProvider


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"include_usage": "yes"}, TypeError, "include_usage must be True or False"),
        ({"retry_without_stream_options": 1}, TypeError, "retry_without_stream_options"),
        ({"skip_include_usage": [3]}, TypeError, "list of URL prefixes"),
        ({"provider": ""}, TypeError, "provider must be a non-empty string"),
        ({"payi": "auto"}, TypeError, "payi must be True, False or None"),
        ({"estimate_mode": "words"}, ValueError, "estimate_mode must be"),
        ({"refusal": "silent"}, ValueError, "'raise' or 'response'"),
        ({"include_usages": False}, TypeError, "unknown option"),
    ],
)
def test_invalid_options_are_refused(
    guard: Guard, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        guard.wrap(httpx2.Client(), **options)


def test_estimate_mode_bytes_reserves_a_true_bound(guard: Guard, fake: FakeProvider) -> None:
    prompt = user_message("Reserve for this prompt, bounded by bytes")
    ratio = guard.wrap(openai.OpenAI(base_url=fake.openai_base_url, api_key="k"))
    exact = guard.wrap(
        openai.OpenAI(base_url=fake.openai_base_url, api_key="k"), estimate_mode="bytes"
    )
    reserved = []
    for client in (ratio, exact):
        with track_context(user_id="alice"), capture_logs() as logs:
            client.chat.completions.create(model="gpt-test", messages=prompt, max_tokens=10)
        reserved.append(one_call(logs)["reserved_usd"])
    body = {"model": "gpt-test", "messages": prompt, "max_tokens": 10}
    by_ratio = estimate_input_tokens(body, endpoint="chat")
    by_bytes = estimate_input_tokens(body, endpoint="chat", mode="bytes")
    assert by_bytes > by_ratio
    assert reserved == [(by_ratio * 1 + 10 * 2) / 1e6, (by_bytes * 1 + 10 * 2) / 1e6]
