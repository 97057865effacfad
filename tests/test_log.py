"""``configure_json`` writes what structlog's own processor chain writes."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import structlog

from payi_guard.log import configure_json

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
