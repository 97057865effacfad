"""``configure_json`` writes what structlog's own processor chain writes."""

from __future__ import annotations

import datetime
import io
import logging
import re
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from payi_guard.log import configure_json, direct_info, iso_utc

STAMP = re.compile(r'"timestamp": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z)"')


class _Custom:
    def __structlog__(self) -> str:
        return "custom-form"


class _Opaque:
    def __repr__(self) -> str:
        return "<opaque>"


def _reference(stream: io.StringIO) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def _emit() -> None:
    log = structlog.get_logger("payi_guard").bind(bound="yes", user_id="from-bind")
    log.info(
        "genai_call",
        user_id="u-1",
        cost_usd=1.2e-05,
        reserved_usd=0.008204,
        limit_ids=["a", "b"],
        org_id=None,
        stream=False,
        name="naïve ☃ \u2028",
        amount=Decimal("1.50"),
        custom=_Custom(),
        opaque=_Opaque(),
        nested={"k": [1, 2.5, None, True]},
    )
    log.warning("budget_warning", used=3)
    log.warn("budget_overrun", used=4)
    log.debug("tier_unknown")
    log.info("timestamp_given", timestamp="ignored", level="ignored")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("storage_error", where="commit")
        log.error("storage_gave_up", exc_info=True)
    log.error("no_exception", exc_info=False)


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)
    structlog.contextvars.clear_contextvars()


def _lines(configure: Any) -> list[str]:
    stream = io.StringIO()
    configure(stream)
    with structlog.contextvars.bound_contextvars(request_id="r-1", user_id="ctx-user"):
        _emit()
    lines = stream.getvalue().splitlines()
    for line in lines:
        assert STAMP.search(line), line
    return [STAMP.sub('"timestamp": "T"', line) for line in lines]


def test_configure_json_lines_match_structlog_chain() -> None:
    ours = _lines(lambda stream: configure_json(stream, level=logging.DEBUG))
    reference = _lines(_reference)
    assert len(ours) == 8
    assert ours == reference
    assert '"exception": "Traceback' in ours[5]


def test_configure_json_level_filters() -> None:
    ours = _lines(configure_json)
    assert not any('"tier_unknown"' in line for line in ours)
    assert len(ours) == 7


def _mark(logger: Any, method_name: str, event_dict: Any) -> Any:
    event_dict["marked"] = True
    return event_dict


def _guard_lines(configure: Any, *, change_in_place: bool = False) -> list[str]:
    from payi_guard import Guard, track_context
    from payi_guard.engine import CallRequest
    from payi_guard.pricing import TokenUsage
    from payi_guard.testing import FakeClock

    stream = io.StringIO()
    configure(stream)
    clock = FakeClock(1_800_000_000.0)
    guard = Guard(
        {
            "prices": {"m": {"input_per_mtok": 1, "output_per_mtok": 2}},
            "default": [{"max": 1, "per": "day"}],
        },
        clock=clock,
    )
    try:
        with (
            structlog.contextvars.bound_contextvars(request_id="r-1", extra="ctx"),
            track_context(user_id="acme:alice", use_case_name="chat"),
        ):
            call = CallRequest(model="m", provider="openai", input_tokens=30, max_output_tokens=50)
            guard.begin(call).settle(TokenUsage(12, 20))
            if change_in_place:
                processors = structlog.get_config()["processors"]
                processors.insert(0, _mark)
            guard.begin(call).settle(TokenUsage(3, 4), outcome="incomplete")
            guard.begin(call).release()
    finally:
        guard.close()
    lines = [line for line in stream.getvalue().splitlines() if '"genai_call"' in line]
    return [STAMP.sub('"timestamp": "T"', line) for line in lines]


def test_genai_call_lines_written_directly_match_structlog_chain() -> None:
    ours = _guard_lines(configure_json)
    reference = _guard_lines(_reference)
    assert len(ours) == 3
    assert ours == reference
    assert '"user_id": "acme:alice", "org_id": "acme"' in ours[0]
    assert '"extra": "ctx"' in ours[0]


def test_only_configure_json_loggers_are_written_directly() -> None:
    configure_json(io.StringIO())
    assert direct_info(structlog.get_logger("payi_guard").bind()) is not None
    assert direct_info(structlog.get_logger("payi_guard").bind(bound="yes")) is None
    _reference(io.StringIO())
    assert direct_info(structlog.get_logger("payi_guard").bind()) is None


def test_a_processor_list_changed_in_place_is_honoured() -> None:
    lines = _guard_lines(configure_json, change_in_place=True)
    assert len(lines) == 3
    assert '"marked": true' not in lines[0]
    assert '"marked": true' in lines[1]
    assert '"marked": true' in lines[2]


@settings(max_examples=2000, deadline=None)
@given(st.integers(min_value=0, max_value=253_402_300_799_999_999_999))
def test_iso_utc_is_the_time_stampers_text(ns: int) -> None:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    expected = epoch + datetime.timedelta(microseconds=ns // 1000)
    text = expected.isoformat().replace("+00:00", "Z")
    assert iso_utc(ns) == text
    assert iso_utc(ns) == text  # from the cached second


def test_iso_utc_matches_now() -> None:
    before = datetime.datetime.now(tz=datetime.timezone.utc)
    stamp = datetime.datetime.fromisoformat(iso_utc(time.time_ns()).replace("Z", "+00:00"))
    after = datetime.datetime.now(tz=datetime.timezone.utc)
    assert before <= stamp <= after


_text = st.text(max_size=12)
_maybe = st.none() | _text


@settings(max_examples=500, deadline=None)
@given(
    who=st.tuples(_text.filter(bool), _maybe, _maybe, _maybe),
    limit_ids=st.lists(_text, max_size=3).map(tuple),
    what=st.tuples(_text.filter(bool), _text, _text),
    tokens=st.none() | st.tuples(*[st.integers(min_value=0, max_value=10**12)] * 4),
    nanos=st.tuples(st.integers(0, 10**16), st.integers(0, 10**16)),
    latency=st.floats(min_value=0, max_value=1e9),
    stream=st.booleans(),
    outcome=st.sampled_from(["ok", "error", "released", "unverified", 'q"\\\n']),
    request_id=_maybe,
    extra=st.tuples(_maybe, st.none() | st.sampled_from(["failed", "unknown"]), st.booleans()),
)
def test_genai_call_head_text_is_what_the_encoder_gives(
    who: tuple[str, str | None, str | None, str | None],
    limit_ids: tuple[str, ...],
    what: tuple[str, str, str],
    tokens: tuple[int, int, int, int] | None,
    nanos: tuple[int, int],
    latency: float,
    stream: bool,
    outcome: str,
    request_id: str | None,
    extra: tuple[str | None, str | None, bool],
) -> None:
    from payi_guard.context import Attribution
    from payi_guard.engine.call_log import _HEAD_KEYS, CallLog, _add_extra_fields, _head
    from payi_guard.engine.calls import CallRecord, CallRequest
    from payi_guard.engine.plan import Plan
    from payi_guard.engine.policy import Subject
    from payi_guard.log import encode_json
    from payi_guard.pricing import TokenUsage

    user, org, account, case = who
    model, provider, endpoint = what
    response_model, ledger, priced = extra
    attribution = Attribution(
        user_id=user,
        account_name=account,
        use_case_name=case,
        limit_ids=limit_ids,
        request_id=request_id,
    )
    policy: Any = None
    plan = Plan(
        "r",
        Subject(user, org, user, org),
        attribution,
        CallRequest(model, provider, endpoint),
        policy,
        [],
        [],
        nanos[1],
        None,
        1.0,
    )
    usage = None if tokens is None else TokenUsage(*tokens)
    record = CallRecord(
        user,
        org,
        model,
        provider,
        usage,
        nanos[0],
        nanos[1],
        outcome,
        latency,
        stream,
        priced,
        response_model,
    )
    fields = CallLog._call_fields(plan, record, ledger)
    fields["event"] = "genai_call"
    head = _head(plan, record)
    assert head is not None
    tail: dict[str, Any] = {}
    _add_extra_fields(tail, plan, record, ledger)
    assert not _HEAD_KEYS & tail.keys()
    tail["event"] = "genai_call"
    assert head + ", " + encode_json(tail)[1:] == encode_json(fields)
    assert _head(plan, record) == head  # from the cached text of the first fields
