"""The counter key format: what the guard writes, parsed back exactly."""

from __future__ import annotations

from typing import get_args

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payi_guard.clock import FakeClock
from payi_guard.engine import Guard
from payi_guard.ledger._glob import glob_regex
from payi_guard.ledger.analytics import analytics_owner
from payi_guard.ledger.keys import (
    SCOPE_KINDS,
    CounterKey,
    check_prefix,
    counter_key,
    hash_tag,
    owner_tag,
    owners_glob,
    parse_key,
)
from payi_guard.usage import Scope, Unit
from payi_guard.windows import PERIODS, Period

_OWNER = st.from_regex(r"[A-Za-z0-9._-]{1,12}(:[A-Za-z0-9._-]{1,12})?", fullmatch=True)
_PREFIX = st.from_regex(r"[A-Za-z0-9:_.-]{1,16}", fullmatch=True)


def test_the_documented_example() -> None:
    key = counter_key("pg", "user", "acme:alice", "usd", "day", 1795737600)
    assert key == "pg:{u:acme:alice}:usd:day:1795737600"
    assert hash_tag(key) == "u:acme:alice"
    assert parse_key("pg", key) == CounterKey("pg", "user", "acme:alice", "usd", "day", 1795737600)


@given(
    _PREFIX,
    st.sampled_from(list(SCOPE_KINDS)),
    _OWNER,
    st.sampled_from(get_args(Unit)),
    st.sampled_from(PERIODS),
    st.integers(min_value=-(10**10), max_value=10**10),
)
def test_build_and_parse_round_trip(
    prefix: str, scope: Scope, owner: str, unit: Unit, per: Period, start: int
) -> None:
    key = counter_key(prefix, scope, owner, unit, per, start)
    parsed = parse_key(prefix, key)
    assert parsed == CounterKey(prefix, scope, owner, unit, per, start)
    assert str(parsed) == key
    assert hash_tag(key) == owner_tag(scope, owner)


@pytest.mark.parametrize(
    "key",
    [
        "pgx:{u:alice}:usd:day:1",  # another prefix that starts alike
        "other:{u:alice}:usd:day:1",
        "pg:{u:alice",  # no end to the hash tag
        "pg:{x:alice}:usd:day:1",  # unknown scope letter
        "pg:{u:}:usd:day:1",  # empty owner
        "pg:{alice}:usd:day:1",  # no scope letter
        "pg:{u:alice}:usd:day",  # no window
        "pg:{u:alice}:usd",
        "pg:{u:alice}:usd:day:1:x",  # a reservation index, not a counter
        "pg:{u:alice}:euro:day:1",
        "pg:{u:alice}:usd:year:1",
        "pg:{u:alice}:usd:day:01",  # one spelling per window
        "pg:{u:alice}:usd:day:+1",
        "pg:{u:alice}:usd:day:1_0",
        "pg:{u:alice}:usd:day: 1",
        "pg:{u:alice}usd:day:1",
    ],
)
def test_anything_else_is_not_a_counter_key(key: str) -> None:
    assert parse_key("pg", key) is None


def test_parse_reads_the_guards_own_keys(clock: FakeClock) -> None:
    guard = Guard(
        {
            "prices": {"m": {"input_per_mtok": 1, "output_per_mtok": 1}},
            "default": [{"max": 1, "per": "day"}, {"requests": 5, "per": "minute"}],
            "orgs": {"acme": [{"tokens": 1000, "per": "month"}]},
            "global": [{"max": 100, "per": "week"}],
            "limits": {"project": {"max": 10, "per": "day"}},
        },
        clock=clock,
        key_prefix="app:1",
    )
    guard.record(user_id="acme:alice", model="m", input_tokens=10, limit_ids=["project"])
    found = guard.ledger.scan(owners_glob("app:1", list(SCOPE_KINDS)), now=clock.now())
    # The owners' usage analytics live under the same tags, and are no counters.
    tallies = {key for key in found if analytics_owner("app:1", key) is not None}
    assert {analytics_owner("app:1", key) for key in tallies} == {
        ("user", "acme:alice", "2026-11-27"),
        ("org", "acme", "2026-11-27"),
    }
    keys = [key for key in found if key not in tallies]
    parsed = {parse_key("app:1", key) for key in keys}
    assert {(p.scope, p.owner, p.unit, p.per) for p in parsed if p is not None} == {
        ("user", "acme:alice", "usd", "day"),
        ("user", "acme:alice", "requests", "minute"),
        ("org", "acme", "tokens", "month"),
        ("global", "*", "usd", "week"),
        ("limit_id", "project", "usd", "day"),
    }
    assert all(p is not None and p.window_start <= clock.now() for p in parsed)


def test_owners_glob_matches_only_those_owners() -> None:
    pattern = glob_regex(owners_glob("p*g", ["user", "anonymous"]))
    assert owners_glob("pg", ["user", "anonymous"]) == "pg:{[ua]:*"
    assert owners_glob("pg", ["org"]) == "pg:{o:*"
    assert pattern.match(counter_key("p*g", "user", "alice", "usd", "day", 1))
    assert pattern.match(counter_key("p*g", "anonymous", "anonymous", "usd", "day", 1))
    assert not pattern.match(counter_key("p*g", "org", "acme", "usd", "day", 1))
    assert not pattern.match(counter_key("pxg", "user", "alice", "usd", "day", 1))
    with pytest.raises(ValueError, match="scope"):
        owners_glob("pg", [])


@pytest.mark.parametrize("prefix", ["", "a{b", "a}b", "a b", "a\nb"])
def test_a_prefix_cannot_break_the_hash_tag(prefix: str) -> None:
    with pytest.raises(ValueError, match="key_prefix"):
        check_prefix(prefix)
    assert check_prefix("pg:tenant-1") == "pg:tenant-1"
