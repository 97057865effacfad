"""The transport's header reads give what ``httpx``/``httpx2`` ``Headers`` lookups give."""

from __future__ import annotations

import random
from types import ModuleType

import httpx
import httpx2
import pytest

from payi_guard.meter.request_body import content_type, has_header

_NAMES = [b"Content-Type", b"content-type", b"CONTENT-TYPE", b"Transfer-Encoding", b"x-a", b"Host"]
_VALUES = [
    b"application/json",
    b"text/plain; charset=utf-8",
    b"",
    b"caf\xc3\xa9",
    b"\xff\xfe",
    b"a,b",
]


@pytest.mark.parametrize("module", [httpx, httpx2])
def test_same_as_headers_lookups(module: ModuleType) -> None:
    rng = random.Random(11)
    for _ in range(3_000):
        raw = [(rng.choice(_NAMES), rng.choice(_VALUES)) for _ in range(rng.randint(0, 5))]
        headers = module.Headers(raw)
        assert content_type(headers) == module.Headers(raw).get("content-type"), raw
        assert has_header(headers, b"transfer-encoding") == (
            "transfer-encoding" in module.Headers(raw)
        ), raw
