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

import pytest

from conformance.harness import Case, ChargedWrongly, ReservedTooLittle


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


_WEB_SEARCH_STREAM = (
    "pydantic-ai/test_openai_responses/test_openai_responses_model_web_search_tool_stream#0"
)

GAPS: tuple[Gap, ...] = (
    Gap(
        "azure-deployment-unpriced",
        "an Azure deployment name has no price before the response names its model: under "
        "unknown_model: allow nothing is reserved (README, What a call is charged), so the "
        "charge is more than the reservation",
        (ReservedTooLittle,),
        lambda case: case.interaction.file == "openllmetry/test_azure/test_chat.yaml",
    ),
    Gap(
        "responses-web-search-stream-broken-off",
        "a Responses stream with the web_search tool, left after its first event, is "
        "charged the request's own 26 input tokens, while the finished call billed 9,463 "
        "(8,320 of them cache reads) and a search: what the tool adds to the input, which "
        "the request does not show, is not counted for a broken-off stream",
        (ChargedWrongly,),
        lambda case: case.variant == "break" and case.interaction.id == _WEB_SEARCH_STREAM,
    ),
)
"""Every case read to its end is charged exactly; the Azure cases reserve less than they
cost, by design; a broken-off Responses web-search stream is charged too little input."""


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
