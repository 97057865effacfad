"""The middleware options are declared once: the keyword arguments match WebOptions."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from payi_guard.engine import Guard
from payi_guard.flask import PayiGuard
from payi_guard.web import GuardMiddleware, WebOptions, WSGIGuardMiddleware
from payi_guard.web.options import WebOptionArgs


def test_the_adapter_arguments_are_the_options_fields() -> None:
    fields = {f.name for f in dataclasses.fields(WebOptions)}
    # user and session_id are the adapters' own: their argument depends on the protocol.
    assert set(WebOptionArgs.__annotations__) == fields - {"user", "session_id"}


def test_options_are_frozen_and_normalised() -> None:
    options = WebOptions(guarded_paths=["/api/*"], trust_user_header=1, budget_headers=0)  # type: ignore[arg-type]
    assert options.guarded_paths == ("/api/*",)
    assert options.trust_user_header is True
    assert options.budget_headers is False
    assert not options.read_storage
    assert WebOptions(gate="storage").read_storage
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.block_status = 402  # type: ignore[misc]


@pytest.mark.parametrize(
    "build",
    [
        lambda guard, **kw: GuardMiddleware(lambda *a: None, guard=guard, **kw),  # type: ignore[arg-type]
        lambda guard, **kw: WSGIGuardMiddleware(lambda *a: [], guard=guard, **kw),
        lambda guard, **kw: PayiGuard(guard=guard, **kw),
    ],
    ids=["asgi", "wsgi", "flask"],
)
def test_every_adapter_takes_the_same_options(guard: Guard, build: Any) -> None:
    build(guard, guarded_paths=["/api/*"], block_status=402, gate="storage", budget_headers=True)
    with pytest.raises(ValueError, match="block_status"):
        build(guard, block_status=200)
    with pytest.raises(TypeError):
        build(guard, not_an_option=True)
