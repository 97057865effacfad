"""``frozen_maker`` builds the same objects the dataclass constructors build."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import random
from collections.abc import Callable
from typing import Any

import pytest

from payi_guard._frozen import frozen_maker
from payi_guard.engine.calls import CallRecord, CallRequest, make_call_record, make_call_request
from payi_guard.ledger.base import (
    Charge,
    CounterState,
    ReserveResult,
    Tally,
    make_charge,
    make_counter_state,
    make_reserve_result,
    make_tally,
)
from payi_guard.meter.parse import Endpoint, RequestInfo, make_request_info
from payi_guard.meter.streams import Settlement, make_settlement
from payi_guard.pricing import TokenUsage
from payi_guard.pricing.media import MediaTokens
from payi_guard.pricing.rates import make_token_usage


def _usage(rng: random.Random) -> TokenUsage:
    c = [rng.randint(1_000, 10**9) for _ in range(7)]
    media = rng.choice([None, MediaTokens(input_audio=10, cache_audio_read=20, output_image=30)])
    return TokenUsage(c[0], c[1], c[2], c[3], c[4], c[5], c[6], media)


def _text(rng: random.Random) -> str | None:
    return rng.choice([None, "", "a", "org:user", "ü" * rng.randint(1, 4)])


_VALUES: dict[type[Any], Callable[[random.Random], tuple[Any, ...]]] = {
    TokenUsage: lambda rng: (
        *(rng.randint(1, 10**12) for _ in range(7)),
        rng.choice([None, MediaTokens(input_audio=1, output_video=1)]),
    ),
    CallRequest: lambda rng: (
        rng.choice(["gpt-4o", "claude-sonnet-4"]),
        "openai",
        rng.choice(["chat", "responses"]),
        rng.randint(0, 10**6),
        rng.randint(0, 10**6),
        rng.random() < 0.5,
        rng.random() < 0.5,
        rng.choice([None, {"service_tier": "flex"}]),
        rng.randint(0, 3),
        rng.randint(0, 3),
    ),
    CallRecord: lambda rng: (
        "u",
        _text(rng),
        "m",
        "openai",
        rng.choice([None, _usage(rng)]),
        rng.randint(0, 10**12),
        rng.randint(0, 10**12),
        rng.choice(["ok", "unverified", "error"]),
        rng.random() * 1000,
        rng.random() < 0.5,
        rng.random() < 0.5,
        _text(rng),
        rng.choice([(), (("gpt-4o-mini", _usage(rng)),)]),
        rng.choice([(), (("service_tier", "priority"),)]),
    ),
    Charge: lambda rng: (
        "k",
        rng.randint(0, 10**9),
        rng.choice([None, 5]),
        rng.random() * 1e9,
    ),
    Tally: lambda rng: ("t", (("c", rng.randint(0, 9)),), rng.random() * 1e9),
    CounterState: lambda rng: tuple(rng.randint(0, 10**9) for _ in range(3)),
    ReserveResult: lambda rng: (
        rng.random() < 0.5,
        rng.choice([None, 0, 2]),
        (CounterState(1, 2, 3),),
        rng.random() < 0.5,
    ),
    Settlement: lambda rng: (
        _usage(rng),
        rng.choice(["ok", "incomplete"]),
        _text(rng),
        (),
        rng.choice([(), ("usage: missing",)]),
        rng.choice([None, {}, {"speed": "fast"}]),
    ),
    RequestInfo: lambda rng: (
        Endpoint("chat"),
        _text(rng),
        rng.random() < 0.5,
        rng.randint(1, 4),
        rng.random() < 0.5,
        rng.choice([None, 100]),
        {"model": "m"},
    ),
}

_MAKERS: dict[type[Any], Callable[..., Any]] = {
    TokenUsage: make_token_usage,
    CallRequest: make_call_request,
    CallRecord: make_call_record,
    Charge: make_charge,
    Tally: make_tally,
    CounterState: make_counter_state,
    ReserveResult: make_reserve_result,
    Settlement: make_settlement,
    RequestInfo: make_request_info,
}


@pytest.mark.parametrize("cls", list(_MAKERS), ids=lambda cls: cls.__name__)
def test_made_objects_are_the_constructors(cls: type[Any]) -> None:
    rng = random.Random(cls.__name__)
    make = _MAKERS[cls]
    for _ in range(200):
        values = _VALUES[cls](rng)
        built, made = cls(*values), make(*values)
        assert type(made) is cls
        assert made == built
        assert repr(made) == repr(built)
        assert dataclasses.astuple(made) == dataclasses.astuple(built)
        try:
            expected_hash: int | None = hash(built)
        except TypeError:
            expected_hash = None
        if expected_hash is None:
            with pytest.raises(TypeError):
                hash(made)
        else:
            assert hash(made) == expected_hash
        assert pickle.loads(pickle.dumps(made)) == built
        assert copy.copy(made) == built
        assert copy.deepcopy(made) == built
        name = dataclasses.fields(cls)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(made, name, values[0])
        assert getattr(made, name) is values[0]


def test_post_init_checks_run_as_in_the_constructor() -> None:
    checked = frozen_maker(TokenUsage)  # with post_init, the default
    for bad, error in (
        ((-1, 0, 0, 0, 0, 0, 0, None), ValueError),
        ((1, 2.0, 0, 0, 0, 0, 0, None), TypeError),
    ):
        with pytest.raises(error) as built:
            TokenUsage(*bad)
        with pytest.raises(error) as made:
            checked(*bad)
        assert str(made.value) == str(built.value)
    with pytest.raises(TypeError, match="bool"):
        checked(True, 0, 0, 0, 0, 0, 0, None)


def test_a_maker_without_post_init_skips_only_the_checks() -> None:
    unchecked = make_token_usage  # frozen_maker(TokenUsage, post_init=False)
    assert unchecked(1, 2, 3, 4, 5, 6, 7, None) == TokenUsage(1, 2, 3, 4, 5, 6, 7)
    assert type(unchecked(1, 2, 3, 4, 5, 6, 7, None)) is TokenUsage
    # What the checks would refuse is made as given: the caller checked it (or not).
    assert unchecked(-1, 0, 0, 0, 0, 0, 0, None).input_tokens == -1


def test_every_field_is_required_in_order() -> None:
    with pytest.raises(TypeError):
        make_counter_state(1, 2)
    with pytest.raises(TypeError):
        make_counter_state(1, 2, 3, 4)
    assert make_counter_state(1, 2, 3) == CounterState(settled=1, pending=2, refused=3)


@dataclasses.dataclass(frozen=True)
class _NoSlots:
    a: int


@dataclasses.dataclass(slots=True)
class _NotFrozen:
    a: int


@dataclasses.dataclass(frozen=True, slots=True)
class _NotInInit:
    a: int
    b: int = dataclasses.field(init=False, default=0)


@dataclasses.dataclass(frozen=True, slots=True)
class _Base:
    a: int


@dataclasses.dataclass(frozen=True, slots=True)
class _Derived(_Base):
    b: int


@pytest.mark.parametrize("cls", [_NoSlots, _NotFrozen, _NotInInit, _Derived, dict])
def test_other_classes_are_refused(cls: type[Any]) -> None:
    with pytest.raises(TypeError, match="not a frozen, slotted dataclass"):
        frozen_maker(cls)
