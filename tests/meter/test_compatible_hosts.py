"""OpenAI-compatible hosts of known providers are priced as those providers.

The OpenAI SDK aimed at Groq, DeepSeek, OpenRouter and the like sends the same
requests as to OpenAI; the guard recognises the host from genai-prices' provider data
and prices the call at that provider's prices, which may differ from the model's
first-party price.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import genai_prices
import httpx2
import openai
import pytest
from structlog.testing import capture_logs

from meter._support import logged_usd, one_call, used, user_message
from payi_guard import Guard, track_context
from payi_guard.clock import FakeClock
from payi_guard.meter.options import MeterOptions
from payi_guard.meter.parse import classify
from payi_guard.meter.transport import TransportMeter

HOSTS = [
    ("https://api.groq.com/openai/v1", "groq"),
    ("https://api.deepseek.com", "deepseek"),
    ("https://api.together.xyz/v1", "together"),
    ("https://api.fireworks.ai/inference/v1", "fireworks"),
    ("https://openrouter.ai/api/v1", "openrouter"),
    ("https://api.x.ai/v1", "x-ai"),
    ("https://api.mistral.ai/v1", "mistral"),
    ("https://api.cerebras.ai/v1", "cerebras"),
    ("https://api.openai.com/v1", "openai"),
    ("http://127.0.0.1:8000/v1", "openai-compatible"),
]


def clock_datetime(clock: FakeClock) -> datetime:
    return datetime.fromtimestamp(clock.now(), tz=timezone.utc)


@pytest.mark.parametrize(("base_url", "provider"), HOSTS)
def test_the_provider_is_recognised_by_its_api_address(
    clock: FakeClock, base_url: str, provider: str
) -> None:
    guard = Guard(clock=clock)
    meter = TransportMeter(guard, MeterOptions(), httpx2)
    endpoint = classify("POST", "/v1/chat/completions")
    assert endpoint is not None
    assert meter.provider_for(endpoint, httpx2.URL(f"{base_url}/chat/completions")) == provider


def test_groq_is_charged_groq_prices(clock: FakeClock) -> None:
    usage = {"prompt_tokens": 178, "completion_tokens": 94, "total_tokens": 272}
    model = "openai/gpt-oss-120b"

    def handler(request: httpx2.Request) -> httpx2.Response:
        body: dict[str, Any] = {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        return httpx2.Response(200, content=json.dumps(body).encode(), request=request)

    guard = Guard({"default": [{"max": 1, "per": "day"}]}, clock=clock)
    http = httpx2.Client(transport=httpx2.MockTransport(handler))
    client = guard.wrap(
        openai.OpenAI(base_url="https://api.groq.com/openai/v1", api_key="k", http_client=http)
    )
    with track_context(user_id="alice"), capture_logs() as logs:
        client.chat.completions.create(model=model, messages=user_message("hi"))
    event = one_call(logs)
    price = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=178, output_tokens=94),
        model,
        provider_id="groq",
        genai_request_timestamp=clock_datetime(clock),
    ).total_price
    first_party = genai_prices.calc_price(
        genai_prices.Usage(input_tokens=178, output_tokens=94),
        "gpt-oss-120b",
        provider_id="openai",
        genai_request_timestamp=clock_datetime(clock),
    ).total_price
    assert event["provider"] == "groq"
    assert price != first_party  # the host's price, not the model's first-party one
    expected = Decimal(math.ceil(price * 10**9)) / 10**9
    assert logged_usd(event) == expected == used(guard, "alice")
