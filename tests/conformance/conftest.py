"""Fixtures of the conformance suite: one loopback replay server per session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from conformance.harness import BREAK_RATIOS
from conformance.replay import ReplayServer


@pytest.fixture(scope="session")
def replay_server() -> Iterator[ReplayServer]:
    """The loopback server every ``loopback`` case is served from."""
    server = ReplayServer().start()
    yield server
    server.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the input charged for every broken-off stream against the real input."""
    if not BREAK_RATIOS:
        return
    reporter = terminalreporter
    reporter.section("conformance: broken-off streams, input charged / real input")
    ratios = sorted(BREAK_RATIOS.values(), key=lambda r: r.case)
    for item in ratios:
        reporter.write_line(f"{item.ratio:6.2f}  {item.charged:>7} / {item.real:<7} {item.case}")
    values = [r.ratio for r in ratios]
    mean = sum(values) / len(values)
    reporter.write_line(
        f"{len(values)} streams: min {min(values):.2f}, mean {mean:.2f}, max {max(values):.2f}"
    )
