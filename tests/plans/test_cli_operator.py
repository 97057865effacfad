"""``payi-guard adjust``, ``reset`` and ``users``, end to end: the commands run as their own
processes against the store an app's guard uses (Redis under a key prefix of the test's
own, or an SQLite file), and the app sees what they did.

The app and the commands both read the system clock. Limits here are monthly, and a
scenario that saw the month change while it ran is run again (it cannot change twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from payi_guard import Guard
from payi_guard.clock import SystemClock
from payi_guard.windows import WindowCache

BUDGETS = """\
version: 1
storage: {storage}
prices:
  test-model: {{input_per_mtok: 1, output_per_mtok: 2}}
limits:
  monthly: {{max: 1.00, per: month}}
  calls: {{requests: 1000, per: month}}
default: [monthly, calls]
tiers:
  pro: [{{max: 10.00, per: month}}, calls]
orgs:
  acme: [{{max: 50.00, per: month}}]
"""


def _month() -> int:
    return WindowCache().get("month", "UTC", SystemClock().now()).start


def same_month(scenario: Callable[[], None]) -> None:
    """Run ``scenario``; run it again if the calendar month changed meanwhile."""
    for _ in range(2):
        before = _month()
        scenario()
        if _month() == before:
            return
    raise AssertionError("the month changed twice during one test")  # pragma: no cover


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``payi-guard ARGS`` as its own process (80 columns, like a plain terminal)."""
    environment = {**os.environ, "COLUMNS": "80", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "payi_guard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
        check=False,
    )


@pytest.fixture(params=["redis", "sqlite"])
def shop(request: pytest.FixtureRequest, key_prefix: str, tmp_path: Path) -> Iterator[Path]:
    """A budgets file naming a shared store: the test's Redis keys, or an SQLite file."""
    if request.param == "sqlite":
        storage = f"sqlite:///{tmp_path / 'budgets.db'}"
    else:
        storage = request.getfixturevalue("redis_url")
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS.format(storage=storage), encoding="utf-8")
    yield path
    if request.param == "redis":
        client = redis.Redis.from_url(storage)
        keys = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def app_guard(budgets: Path, key_prefix: str, **kwargs: Any) -> Guard:
    return Guard.from_yaml(budgets, key_prefix=key_prefix, **kwargs)


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_adjust_reset_and_users_change_what_the_app_enforces(shop: Path, key_prefix: str) -> None:
    store = ["-c", str(shop), "--key-prefix", key_prefix]

    def scenario() -> None:
        app = app_guard(shop, key_prefix)
        app.reset("acme:alice")  # a rerun starts from nothing
        app.reset("bob")
        app.record(user_id="acme:alice", model="test-model", cost_usd="0.60")
        app.record(user_id="bob", model="test-model", cost_usd="1.00")

        listed = cli("users", *store, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        users = {u["user_id"]: u for u in json.loads(listed.stdout)}
        assert {k: (v["cost_usd"], v["state"]) for k, v in users.items()} == {
            "acme:alice": ("0.6", "ok"),
            "bob": ("1", "exceeded"),
        }

        done = cli(
            "adjust", "acme:alice", "-0.25", "--limit", "monthly", *store,
            "--reason", "goodwill after outage", "--by", "ops:kim", "--format", "json",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["op"], answer["by"], answer["limits"][0]["used"]) == (
            "adjust",
            "ops:kim",
            "0.35",
        )
        (logged,) = [e for e in json_lines(done.stderr) if e["event"] == "budget_adjusted"]
        assert {k: logged[k] for k in ("user_id", "limit", "amount", "used", "max")} == {
            "user_id": "acme:alice",
            "limit": "monthly",
            "amount": -0.25,
            "used": 0.35,
            "max": 1.0,
        }
        assert (logged["reason"], logged["by"]) == ("goodwill after outage", "ops:kim")
        # The app sees it at once, and keeps it in alice's history.
        assert app.usage("acme:alice")[0].used == Decimal("0.35")
        assert app.usage("acme:alice")[2].used == Decimal("0.6")  # the org's: untouched
        (last, *_) = app.adjustments("acme:alice")
        assert (last.op, last.amount, last.reason, last.by) == (
            "adjust",
            Decimal("-0.25"),
            "goodwill after outage",
            "ops:kim",
        )

        exceeded = cli("users", *store, "--state", "exceeded", "--format", "csv")
        assert exceeded.stdout.splitlines() == [
            "user_id,state,blocked,cost_usd,max_usd,remaining_usd,limit",
            "bob,exceeded,true,1,1,0,monthly",
        ]
        cleared = cli("reset", "bob", *store, "--reason", "incident 12")
        assert cleared.returncode == 0, cleared.stderr
        assert "bob: reset" in cleared.stdout
        assert [e["limit"] for e in json_lines(cleared.stderr)] == ["monthly", "calls"]
        assert [u.used for u in app.usage("bob")] == [0, 0]
        table = cli("users", *store, "--sort", "spend")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split() == ["user", "state", "spend", "max", "remaining", "limit"]
        assert lines[1].split()[:3] == ["acme:alice", "ok", "$0.35"]
        assert lines[2].split()[:3] == ["bob", "ok", "$0"]
        assert max(len(line) for line in lines) <= 80
        # A credit is a negative number in the CSV, not text quoted against formulas.
        credit = cli("adjust", "bob", "-0.5", "--limit", "monthly", *store)
        assert credit.returncode == 0, credit.stderr
        rows = cli("users", *store, "--format", "csv").stdout.splitlines()
        assert "bob,ok,false,-0.5,1,1.5,monthly" in rows, rows
        app.close()

    same_month(scenario)


def test_the_commands_refuse_what_they_cannot_do(
    shop: Path, key_prefix: str, tmp_path: Path
) -> None:
    store = ["-c", str(shop), "--key-prefix", key_prefix]
    app = app_guard(shop, key_prefix)
    app.usage("bob")  # the app has opened its store (an SQLite file is created)
    app.close()
    unknown = cli("adjust", "bob", "5", "--limit", "weekly", *store)
    assert unknown.returncode == 2
    assert "bob has no limit 'weekly'; their limits: monthly, calls" in unknown.stderr
    shared = cli("adjust", "acme:bob", "5", "--limit", "org:0", *store)
    assert shared.returncode == 2
    assert "not one of acme:bob's own limits" in shared.stderr
    for bad in ("lots", "0.0000000001"):
        money = cli("adjust", "bob", bad, "--limit", "monthly", *store)
        assert money.returncode == 2, money.stdout
    invalid = cli("reset", "bob smith", *store)
    assert invalid.returncode == 2
    assert "whitespace" in invalid.stderr
    both = cli("reset", "bob", *store, "--tier", "pro", "--tier-of", "x:y")
    assert both.returncode == 2
    memory = tmp_path / "memory.yaml"
    memory.write_text(BUDGETS.format(storage="memory://"), encoding="utf-8")
    for command in (["users"], ["reset", "bob"], ["adjust", "bob", "1", "--limit", "monthly"]):
        refused = cli(*command, "-c", str(memory))
        assert refused.returncode == 2
        assert "memory://, inside each app process" in refused.stderr
    down = cli("reset", "bob", *store, "--storage", "redis://127.0.0.1:1/0")
    assert down.returncode == 1
    assert "error:" in down.stderr
    # A mistyped SQLite path is refused, not created empty and reported on.
    typo = tmp_path / "budget.db"
    for command in (
        ["users"],
        ["usage", "bob"],
        ["reset", "bob"],
        ["adjust", "bob", "1", "--limit", "monthly"],
        ["report", "--from-store"],
    ):
        refused = cli(*command, *store, "--storage", f"sqlite:///{typo}")
        assert refused.returncode == 2, (command, refused.stdout)
        assert "there is no ledger at" in refused.stderr, command
    assert not typo.exists()


def test_tier_and_tier_of_read_users_with_their_plans(
    shop: Path, key_prefix: str, tmp_path: Path
) -> None:
    store = ["-c", str(shop), "--key-prefix", key_prefix]
    (tmp_path / "plans_of_the_app.py").write_text(
        "def tier_of(user_id):\n    return 'pro' if user_id == 'carol' else None\n",
        encoding="utf-8",
    )
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}

    def scenario() -> None:
        app = app_guard(shop, key_prefix, tier_of=lambda uid: "pro" if uid == "carol" else None)
        app.reset("carol")
        app.record(user_id="carol", model="test-model", cost_usd="2.00")
        plain = json.loads(cli("users", *store, "--format", "json").stdout)
        assert [(u["user_id"], u["state"]) for u in plain] == [("carol", "exceeded")]
        tiered = cli(
            "users", *store, "--format", "json", "--tier-of", "plans_of_the_app:tier_of", env=env
        )
        assert tiered.returncode == 0, tiered.stderr
        (carol,) = json.loads(tiered.stdout)
        assert (carol["state"], carol["max_usd"], carol["limit"]) == ("ok", "10", "user:0")
        done = cli("adjust", "carol", "1", "--limit", "user:0", "--tier", "pro", *store)
        assert done.returncode == 0, done.stderr
        assert app.usage("carol")[0].used == Decimal("3")
        missing = cli("users", *store, "--tier-of", "no_such_module:tier_of")
        assert missing.returncode == 2
        assert "no_such_module" in missing.stderr
        # A mistyped --tier is a mistake in the command: refused, nothing changed (it
        # would have read and changed the user's default limits).
        for command in (["adjust", "carol", "1", "--limit", "monthly"], ["reset", "carol"]):
            typo = cli(*command, "--tier", "prro", *store)
            assert typo.returncode == 2, typo.stdout
            assert "--tier prro: no such tier under `tiers:`" in typo.stderr
            assert "(pro)" in typo.stderr
        typo = cli("usage", "carol", "--tier", "prro", *store)
        assert (typo.returncode, typo.stdout) == (2, "")
        assert app.usage("carol")[0].used == Decimal("3")
        # A tier_of naming an unknown tier is the app's to fix: warned on stderr, and the
        # usage printed as JSON stays JSON.
        (tmp_path / "plans_with_a_typo.py").write_text(
            "def tier_of(user_id):\n    return 'prro'\n", encoding="utf-8"
        )
        usage = cli(
            *("usage", "carol", *store, "--format", "json"),
            *("--tier-of", "plans_with_a_typo:tier_of"),
            env=env,
        )
        assert usage.returncode == 0, usage.stderr
        assert [u["name"] for u in json.loads(usage.stdout)] == ["monthly", "calls"]
        assert '"event": "tier_unknown"' in usage.stderr
        app.close()

    same_month(scenario)


def test_a_long_user_id_fits_80_columns(shop: Path, key_prefix: str) -> None:
    store = ["-c", str(shop), "--key-prefix", key_prefix]
    app = app_guard(shop, key_prefix)
    app.usage("bob")  # the app has opened its store (an SQLite file is created)
    app.close()
    user = "acme:" + "x" * 120  # user ids are up to 128 characters
    for command in (["adjust", user, "0.25", "--limit", "monthly"], ["reset", user]):
        done = cli(*command, *store)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80, done.stdout
        assert "".join(lines[:2]).replace("  ", "").startswith(user)  # wrapped, not cut
