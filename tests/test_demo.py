"""`payi-guard demo` runs end to end in a subprocess, offline, and exits 0."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    logs = tmp_path / "demo.jsonl"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "payi_guard", "demo", "--json-logs", str(logs)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stdout + done.stderr
    assert elapsed < 30
    out = done.stdout
    # The live table, a warning, a 429 block, then the report.
    assert "spend vs daily budget" in out
    assert "WARN " in out
    assert "429 " in out
    assert "blocked (429)" in out
    assert "Report from the JSON logs" in out
    assert "user_id" in out
    assert "TOTAL" in out

    events = [json.loads(line, parse_float=Decimal) for line in logs.read_text().splitlines()]
    calls = [e for e in events if e["event"] == "genai_call"]
    assert calls
    assert {e["user_id"] for e in calls} >= {"acme:alice", "globex:carol"}
    assert any(e["stream"] for e in calls)
    assert any(e["event"] == "budget_exceeded" for e in events)
    assert any(e["event"] == "budget_warning" for e in events)
    total = sum((e["cost_usd"] for e in calls), Decimal(0))
    # The report's total equals the exact sum of the logged costs.
    assert f"${total}" in out or f"${total:.6f}" in out
