"""The transport's header reads give what ``httpx``/``httpx2`` ``Headers`` lookups give."""

from __future__ import annotations

import random
from types import ModuleType

import httpx
import httpx2
import pytest

from payi_guard.meter.request_body import content_type, has_header, header_text, set_header

_NAMES = [
    b"Content-Type",
    b"content-type",
    b"CONTENT-TYPE",
    b"Transfer-Encoding",
    b"Content-Encoding",
    b"x-a",
    b"Host",
]
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


class _PairsOnly:
    """Headers seen only through ``raw`` and ``get_list`` (no ``_list`` of triples)."""

    def __init__(self, headers: httpx2.Headers) -> None:
        self._headers = headers
        self._list = "not the triples"

    @property
    def raw(self) -> list[tuple[bytes, bytes]]:
        return self._headers.raw

    def get_list(self, name: str) -> list[str]:
        return self._headers.get_list(name)


@pytest.mark.parametrize("module", [httpx, httpx2])
def test_header_text_is_get_list_joined(module: ModuleType) -> None:
    rng = random.Random(12)
    checked = 0
    for _ in range(3_000):
        raw = [(rng.choice(_NAMES), rng.choice(_VALUES)) for _ in range(rng.randint(0, 5))]
        headers = module.Headers(raw)
        if rng.random() < 0.3 and raw:  # changed in place, as the transport changes them
            headers[raw[0][0].decode("latin-1")] = "gzip"
            headers.pop("host", None)
        for name in ("content-encoding", "transfer-encoding", "content-type"):
            values = headers.get_list(name)
            expected = ", ".join(values) if values else None
            assert header_text(headers, name) == expected, (raw, name)
            assert has_header(headers, name.encode()) == (name in headers), (raw, name)
            checked += values != []
    assert checked > 1_000


def test_headers_without_the_triples_are_read_through_raw() -> None:
    rng = random.Random(13)
    for _ in range(500):
        raw = [(rng.choice(_NAMES), rng.choice(_VALUES)) for _ in range(rng.randint(0, 5))]
        headers = httpx2.Headers(raw)
        pairs = _PairsOnly(headers)
        assert header_text(pairs, "content-type") == headers.get("content-type"), raw
        assert content_type(pairs) == headers.get("content-type"), raw
        assert has_header(pairs, b"content-encoding") == ("content-encoding" in headers), raw


@pytest.mark.parametrize("module", [httpx, httpx2])
def test_set_header_is_setitem(module: ModuleType) -> None:
    rng = random.Random(14)
    kinds = set()
    for _ in range(3_000):
        raw = [(rng.choice(_NAMES), rng.choice(_VALUES)) for _ in range(rng.randint(0, 5))]
        name = rng.choice(["content-length", "accept-encoding", "content-type", "host"])
        value = rng.choice(["identity", "42", ""])
        ours, theirs = module.Headers(raw), module.Headers(raw)
        set_header(ours, name, value)
        theirs[name] = value
        # The same headers, in the same order, with the same raw names and values.
        assert ours.raw == theirs.raw, (raw, name)
        assert ours.multi_items() == theirs.multi_items(), (raw, name)
        kinds.add(len([key for key, _ in raw if key.lower() == name.encode()]))
    assert kinds >= {0, 1, 2}  # appended, replaced in place, duplicates removed


def test_set_header_without_the_triples_uses_setitem() -> None:
    class Plain(dict[str, str]):
        _list = "not the triples"

    headers = Plain({"accept-encoding": "gzip"})
    set_header(headers, "accept-encoding", "identity")
    assert headers == {"accept-encoding": "identity"}
