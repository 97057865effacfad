"""The Pay-i bridge with the real ``payi`` package, offline: headers reach the provider."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx2
import openai
import pytest
from payi.lib.helpers import create_headers

from meter._support import make_guard, user_message
from payi_guard import track_context
from payi_guard.engine import Guard
from payi_guard.exceptions import MissingDependency
from payi_guard.meter.payi_bridge import payi_instrumented
from payi_guard.testing import FakeProvider

PROMPT = user_message("Plan my week")
ATTRIBUTION = {
    "user_id": "acme:alice",
    "account_name": "acme-prod",
    "use_case_name": "planner",
    "use_case_id": "uc-7",
    "use_case_version": 3,
    "use_case_step": "draft",
    "limit_ids": ["team-budget"],
    "request_properties": {"ticket": "T-1"},
    "use_case_properties": {"tier": "gold"},
}


@pytest.fixture
def payi_guard_with_limit() -> Guard:
    return make_guard(limits={"team-budget": {"max": 50, "per": "month"}})


def client_for(guard: Guard, fake: FakeProvider, **options: object) -> openai.OpenAI:
    client = openai.OpenAI(base_url=fake.openai_base_url, api_key="k", max_retries=0)
    return guard.wrap(client, **options)  # type: ignore[no-any-return]


def xproxy(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.startswith("xproxy-")}


def test_headers_are_payis_own_create_headers(
    payi_guard_with_limit: Guard, fake: FakeProvider
) -> None:
    assert not payi_instrumented()
    client = client_for(payi_guard_with_limit, fake, payi=True)
    with track_context(**ATTRIBUTION):  # type: ignore[arg-type]
        client.chat.completions.create(model="gpt-test", messages=PROMPT)
        list(client.chat.completions.create(model="gpt-test", messages=PROMPT, stream=True))
    expected = create_headers(
        limit_ids=["team-budget"],
        user_id="acme:alice",
        account_name="acme-prod",
        use_case_id="uc-7",
        use_case_name="planner",
        use_case_version=3,
        use_case_step="draft",
        use_case_properties={"tier": "gold"},
        request_properties={"ticket": "T-1"},
    )
    assert len(expected) == 9
    for record in fake.requests:
        assert xproxy(record.headers) == {k.lower(): v for k, v in expected.items()}
    assert json.loads(fake.requests[0].headers["xproxy-request-properties"]) == {"ticket": "T-1"}


def test_stale_payi_headers_are_replaced(guard: Guard, fake: FakeProvider) -> None:
    client = client_for(guard, fake, payi=True)
    with track_context(user_id="bob"):
        client.chat.completions.create(
            model="gpt-test",
            messages=PROMPT,
            extra_headers={"xProxy-User-ID": "mallory", "xProxy-UseCase-Name": "stale"},
        )
    (record,) = fake.requests
    assert xproxy(record.headers) == {"xproxy-user-id": "bob"}


def test_a_value_http_cannot_carry_loses_its_header_never_the_call(
    guard: Guard, fake: FakeProvider
) -> None:
    import datetime

    from structlog.testing import capture_logs

    from payi_guard.meter import payi_bridge

    payi_bridge._warned.clear()  # once per header name in a process: start afresh
    client = client_for(guard, fake, payi=True)
    odd: list[dict[str, object]] = [
        {"use_case_name": "Résumé builder"},  # not ASCII
        {"account_name": "acme\r\nX-Evil: 1"},  # a header of its own, if it went out
        {"use_case_id": "uc-7 "},  # an outer space
        {"use_case_step": "a\x00b"},
        {"request_properties": {"at": datetime.date(2026, 11, 27)}},  # not JSON
    ]
    with capture_logs() as logs:
        for fields in odd * 2:
            with track_context(user_id="bob", **fields):  # type: ignore[arg-type]
                client.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert len(fake.requests) == 10  # every call went out
    for record in fake.requests:
        assert xproxy(record.headers) == {"xproxy-user-id": "bob"}
        assert "x-evil" not in record.headers
    skipped = [e["header"] for e in logs if e["event"] == "payi_header_skipped"]
    assert sorted(skipped) == sorted(  # once each
        [
            "xProxy-UseCase-Name",
            "xProxy-Account-Name",
            "xProxy-UseCase-ID",
            "xProxy-UseCase-Step",
            "xProxy-*-Properties",
        ]
    )


def test_default_and_anonymous_users(guard: Guard, fake: FakeProvider) -> None:
    client = client_for(guard, fake, payi=True)
    with track_context(use_case_name="nightly"):
        client.chat.completions.create(model="gpt-test", messages=PROMPT)  # anonymous
    # The anonymous bucket named by its id, or a pseudonymous caller's: no Pay-i user.
    for named in ("anonymous", "anonymous:session-1"):
        with track_context(user_id=named):
            client.chat.completions.create(model="gpt-test", messages=PROMPT)
    guard.default_user_id = "system"
    client.chat.completions.create(model="gpt-test", messages=PROMPT)
    anonymous, bucket, session, default = fake.requests
    assert xproxy(anonymous.headers) == {"xproxy-usecase-name": "nightly"}
    assert xproxy(bucket.headers) == xproxy(session.headers) == {}
    assert xproxy(default.headers) == {"xproxy-user-id": "system"}


def test_bridge_off_unless_enabled_or_payi_instrumented(guard: Guard, fake: FakeProvider) -> None:
    auto = client_for(guard, fake)
    off = client_for(guard, fake, payi=False)
    with track_context(user_id="alice"):
        auto.chat.completions.create(model="gpt-test", messages=PROMPT)
        off.chat.completions.create(model="gpt-test", messages=PROMPT)
    assert [xproxy(r.headers) for r in fake.requests] == [{}, {}]


def test_payi_true_without_the_package(
    guard: Guard, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "payi.lib.helpers", None)
    with pytest.raises(MissingDependency, match=r"payi-guard\[payi\]"):
        client_for(guard, fake, payi=True)


async def test_concurrent_tasks_each_carry_their_own_user(guard: Guard, fake: FakeProvider) -> None:
    # A socket per call: the 16 calls overlap.
    http_client = openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=16))
    client = guard.wrap(
        openai.AsyncOpenAI(
            base_url=fake.openai_base_url, api_key="k", max_retries=0, http_client=http_client
        ),
        payi=True,
    )

    async def call(i: int) -> None:
        async with track_context(user_id=f"user-{i}"):
            await asyncio.sleep(0)
            await client.chat.completions.create(
                model="gpt-test", messages=user_message(f"user-{i}")
            )

    await asyncio.gather(*(call(i) for i in range(16)))
    await client.close()
    for record in fake.requests:
        assert record.headers["xproxy-user-id"] == record.json["messages"][0]["content"]


DEMO = textwrap.dedent(
    """
    import asyncio, json, os, sys

    import openai
    from payi.lib.instrument import get_context as payi_context
    from payi.lib.instrument import payi_instrument, track_context as payi_track_context

    from payi_guard import Guard, track_context

    # Offline: Pay-i never creates an API client and never reaches the network.
    payi_instrument(config={"offline_instrumentation": {"file_name": os.devnull}})
    base_url = sys.argv[1]


    async def main() -> None:
        guard = Guard({"prices": {"gpt-test": {"input_per_mtok": 1, "output_per_mtok": 2}}})
        client = guard.wrap(openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0))
        payi_saw = {}

        async def task(i):
            user = f"user-{i}"
            with payi_track_context(user_id=user):
                async with track_context(user_id=user):
                    await asyncio.sleep(0)  # let the other tasks enter their contexts
                    payi_saw[user] = payi_context().get("user_id")
                    await client.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": user}]
                    )

        await asyncio.gather(*(task(i) for i in range(8)))
        await client.close()
        print(json.dumps(payi_saw))


    asyncio.run(main())
    """
)


def test_payi_instrumented_process_thread_local_mixup_vs_bridge(
    fake: FakeProvider, tmp_path: Path
) -> None:
    script = tmp_path / "demo.py"
    script.write_text(DEMO)
    done = subprocess.run(
        [sys.executable, str(script), fake.openai_base_url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    payi_saw = json.loads(done.stdout.strip().splitlines()[-1])
    # Pay-i's own context is one thread-local stack: concurrent tasks see another user.
    wrong = {user for user, seen in payi_saw.items() if seen != user}
    assert len(wrong) >= 7
    # The bridge is on automatically (Pay-i is instrumented) and reads payi_guard's
    # contextvars: every request names its own user.
    assert len(fake.requests) == 8
    for record in fake.requests:
        assert record.headers["xproxy-user-id"] == record.json["messages"][0]["content"]
