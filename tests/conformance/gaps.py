"""Known gaps: where payi_guard is not yet exact on recorded traffic.

Each :class:`Gap` says which cases it affects and which failure it causes there. A case
touched by gaps is marked ``xfail(strict=True, raises=...)`` for exactly those
failures: any other failure still fails the suite, and once a gap is fixed its cases
pass, which strict mode reports as a failure until the gap is removed from
:data:`GAPS`. Removing a gap is the last step of fixing it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import genai_prices
import pytest

from conformance.calls import azure_deployment
from conformance.corpus import Interaction
from conformance.expected import PRICED_AT, bill
from conformance.harness import (
    Case,
    ChargedWrongly,
)


@dataclass(frozen=True)
class Gap:
    """A known way the package falls short.

    Attributes:
        name: a short key.
        reason: the gap, one line (the xfail reason).
        failures: the failures it causes.
        applies: whether it affects a case.
    """

    name: str
    reason: str
    failures: tuple[type[AssertionError], ...]
    applies: Callable[[Case], bool]


def _searches(interaction: Interaction) -> int:
    expected = bill(interaction) if interaction.ok else None
    return sum(p.web_searches for p in expected.parts) if expected else 0


def _full_read(case: Case) -> bool:
    return case.interaction.ok and case.variant != "break"


def _cache_writes(case: Case) -> bool:
    interaction = case.interaction
    if not _full_read(case) or interaction.kind not in ("chat", "responses"):
        return False
    expected = bill(interaction)
    return expected is not None and expected.tokens.cache_write_tokens > 0


def _iterations(case: Case) -> bool:
    if not _full_read(case) or case.interaction.kind != "messages":
        return False
    expected = bill(case.interaction)
    return expected is not None and len(expected.parts) > 1


def _measured(*ids: str, variant: str | None = None) -> Callable[[Case], bool]:
    """Cases of the listed interactions (measured: the gap depends on an estimate)."""
    listed = frozenset(ids)

    def applies(case: Case) -> bool:
        if variant is not None and case.variant != variant:
            return False
        if variant is None and not _full_read(case):
            return False
        return case.interaction.id in listed

    return applies


def _error_chunk_with_usage(case: Case) -> bool:
    """A chat stream whose chunk carries an ``error`` and the usage together."""
    interaction = case.interaction
    if not _full_read(case) or interaction.kind != "chat" or not interaction.is_stream:
        return False
    return any(
        isinstance(data, dict) and data.get("error") and isinstance(data.get("usage"), dict)
        for _, data in interaction.events()
    )


@cache
def _deployment_unpriced(interaction: Interaction) -> bool:
    deployment = azure_deployment(interaction)
    if deployment is None:
        return False
    try:
        genai_prices.calc_price(
            genai_prices.Usage(input_tokens=1), deployment, genai_request_timestamp=PRICED_AT
        )
    except LookupError:
        return True
    return False


GAPS: tuple[Gap, ...] = (
    Gap(
        "early_break",
        "a stream broken off before its usage is charged the input's upper bound",
        (ChargedWrongly,),
        _measured(
            "pydantic-ai/test_openai/test_openai_moderation_stream",
            "pydantic-ai/test_openai/test_run_stream_sync_streams_real_model#0",
            "pydantic-ai/test_openai/test_run_stream_sync_streams_real_model#1",
            "logfire/test_openai/test_responses_stream",
            "llm/test_openai_responses/test_responses_basic_streaming",
            variant="break",
        ),
    ),
)


def gaps_of(case: Case) -> list[Gap]:
    """The known gaps that affect ``case``."""
    return [gap for gap in GAPS if gap.applies(case)]


def marks(case: Case) -> list[pytest.MarkDecorator]:
    """The strict xfail mark of a case touched by known gaps (none otherwise)."""
    found = gaps_of(case)
    if not found:
        return []
    raises = tuple(dict.fromkeys(f for gap in found for f in gap.failures))
    reason = "; ".join(gap.reason for gap in found)
    return [pytest.mark.xfail(strict=True, raises=raises, reason=reason)]


def expected_failures(case: Case) -> tuple[type[AssertionError], ...]:
    """The failures the known gaps of ``case`` explain."""
    return tuple(dict.fromkeys(f for gap in gaps_of(case) for f in gap.failures))
