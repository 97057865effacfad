"""An openai release that still sends through ``httpx`` (2.x), in a subprocess.

The release is installed once into ``<repo>/.cache/openai-httpx`` (``pip install
--target``; kept between runs) and put first on ``PYTHONPATH`` of a child interpreter,
so it shadows the openai 3.x of the virtualenv. Without a reachable package index the
test is skipped on a laptop and fails under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path

import pytest

from meter._support import PRICES, expected_cost
from payi_guard.testing import FakeProvider

LEGACY_VERSION = "2.54.0"
REPO = Path(__file__).resolve().parents[2]
TARGET = REPO / ".cache" / "openai-httpx"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def legacy_openai() -> Path:
    """The directory holding openai 2.x (installed on first use)."""
    marker = TARGET / f"openai-{LEGACY_VERSION}.dist-info"
    if not marker.is_dir():
        # Its other dependencies (httpx, pydantic, anyio, ...) are the virtualenv's.
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--upgrade",
            "--target",
            str(TARGET),
            f"openai=={LEGACY_VERSION}",
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        except subprocess.TimeoutExpired:
            done = None
        if done is None or done.returncode != 0 or not marker.is_dir():
            problem = f"cannot install openai=={LEGACY_VERSION}: " + (
                "pip timed out" if done is None else done.stderr.strip()[-500:]
            )
            if IN_CI:
                pytest.fail(problem)
            pytest.skip(problem)
    return TARGET


CHILD = textwrap.dedent(
    """
    import asyncio, json, sys

    import openai
    from structlog.testing import capture_logs

    from payi_guard import BudgetExceeded, Guard, is_refusal, track_context

    base_url, prices = sys.argv[1], json.loads(sys.argv[2])
    assert openai.__version__ == "{version}", openai.__version__
    messages = [{{"role": "user", "content": "Hello from the legacy SDK"}}]
    out = {{}}

    guard = Guard({{"prices": prices, "default": [{{"max": 1, "per": "day"}}]}})
    client = guard.wrap(openai.OpenAI(base_url=base_url, api_key="k", max_retries=0))
    out["http_client"] = type(client._client).__mro__[2].__module__
    out["transport"] = type(client._client._transport).__qualname__
    with track_context(user_id="alice"):
        reply = client.chat.completions.create(model="gpt-test", messages=messages)
        out["plain_text"] = reply.choices[0].message.content
        chunks = list(
            client.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        )
        out["every_chunk_has_choices"] = all(c.choices for c in chunks)
        out["stream_text"] = "".join(c.choices[0].delta.content or "" for c in chunks)

    async def async_calls():
        aclient = guard.wrap(openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0))
        async with track_context(user_id="bob"):
            await aclient.chat.completions.create(model="gpt-test", messages=messages)
            stream = await aclient.chat.completions.create(
                model="gpt-test", messages=messages, stream=True
            )
            async for _ in stream:
                pass
        await aclient.close()

    asyncio.run(async_calls())
    out["alice"] = str(guard.usage("alice")[0].used)
    out["bob"] = str(guard.usage("bob")[0].used)

    # A refusal: one exception, both classes, no retry although max_retries=5.
    tight = Guard({{"prices": prices, "default": [{{"max": 0.000001, "per": "day"}}]}})
    refused = tight.wrap(openai.OpenAI(base_url=base_url, api_key="k", max_retries=5))
    with track_context(user_id="carol"), capture_logs() as logs:
        try:
            refused.chat.completions.create(model="gpt-test", messages=messages, stream=True)
        except Exception as exc:
            out["refusal"] = {{
                "rate_limit_error": isinstance(exc, openai.RateLimitError),
                "budget_exceeded": isinstance(exc, BudgetExceeded),
                "is_refusal": is_refusal(exc),
                "user_id": exc.user_id,
                # every attempt that reached the guard logged one refusal
                "attempts": sum(1 for e in logs if e["event"] == "budget_exceeded"),
            }}

    # instrument() on this SDK version, too.
    guard.instrument(default_user_id="dave")
    later = openai.OpenAI(base_url=base_url, api_key="k", max_retries=0)
    later.chat.completions.create(model="gpt-test", messages=messages)
    guard.uninstrument()
    out["dave"] = str(guard.usage("dave")[0].used)
    print(json.dumps(out))
    """
).format(version=LEGACY_VERSION)


def test_openai_2x_over_httpx(legacy_openai: Path, fake: FakeProvider, tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(legacy_openai)}
    done = subprocess.run(
        [sys.executable, str(script), fake.openai_base_url, json.dumps(PRICES)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["http_client"] == "httpx"
    assert out["transport"] == "GuardTransport[httpx]"
    assert out["every_chunk_has_choices"] is True
    assert out["plain_text"] == out["stream_text"]
    records = fake.requests
    assert len(records) == 5  # alice x2, bob x2, dave; carol's refusal never left
    assert all(r.headers["accept-encoding"] == "identity" for r in records)
    assert [("stream_options" in r.json) for r in records] == [False, True, False, True, False]
    costs = [expected_cost(r, "gpt-test") for r in records]
    assert Decimal(out["alice"]) == costs[0] + costs[1]
    assert Decimal(out["bob"]) == costs[2] + costs[3]
    assert Decimal(out["dave"]) == costs[4]
    assert out["refusal"] == {
        "rate_limit_error": True,
        "budget_exceeded": True,
        "is_refusal": True,
        "user_id": "carol",
        "attempts": 1,
    }
