"""Every recorded interaction, replayed bare and guarded through the real SDKs.

One case per interaction, transport (loopback server, in-memory bytes) and variant
(see :mod:`conformance.calls`), for the copied recordings and for the synthetic cases
derived from recordings too large to copy whole (``synthetic/*.yaml``) or built from one
for what no recording shows (:mod:`conformance.derived`). Cases touched
by a known gap are strict xfails for the failures that gap causes
(:mod:`conformance.gaps`); any other failure fails.
"""

from __future__ import annotations

import pytest

from conformance.calls import TRANSPORTS, variants
from conformance.corpus import corpus, synthetic
from conformance.derived import replayable
from conformance.gaps import expected_failures, marks
from conformance.harness import Case, failures, run_bare, run_guarded
from conformance.replay import ReplayServer


def _cases() -> list[pytest.ParameterSet]:
    cases = [
        Case(interaction, transport, variant)
        for interaction in (*corpus(), *synthetic(), *replayable())
        for transport in TRANSPORTS
        for variant in variants(interaction, transport)
    ]
    return [pytest.param(case, id=case.id, marks=marks(case)) for case in cases]


@pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")
# The SDK's .stream() helper dumps web_search_call items whose sources are newer than
# its models (a source of type "api"): pydantic warns, bare and guarded alike.
@pytest.mark.filterwarnings("ignore:Pydantic serializer warnings:UserWarning")
@pytest.mark.parametrize("case", _cases())
def test_replay(case: Case, replay_server: ReplayServer) -> None:
    bare = run_bare(case, replay_server)
    guarded = run_guarded(case, replay_server)
    found = failures(case, bare, guarded)
    explained = expected_failures(case)
    unexplained = [f for f in found if not isinstance(f, explained)]
    if unexplained:
        raise AssertionError("; ".join(f"{type(f).__name__}: {f}" for f in unexplained))
    if found:
        raise found[0]
