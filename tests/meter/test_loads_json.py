"""``loads_json``: the result, or the error, of ``json.loads`` on any body."""

from __future__ import annotations

import json
import random

from payi_guard.meter.parse import loads_json

_BASE = [
    b'{"a":1}',
    b'{"a":[1,2,{"b":"\\u00e9"}]}',
    b"{}",
    b'{"x":"\xc3\xa9"}',
    b"[1]",
    b'"s"',
    b' {"a":1} ',
    b'{"a":1}x',
    b'{"a":1} ',
    b'{"a":',
    b"{",
    b"",
    b'\xef\xbb\xbf{"a":1}',
    '{"a":1}'.encode("utf-16-le"),
    '{"a":1}'.encode("utf-16"),
    '{"a":1}'.encode("utf-32-le"),
    b'{"a":"\xff"}',
    b'{"a":"\xed\xa0\x80"}',
    b"{\x00",
    b'{"a":NaN}',
    b'{"a":1}\n',
    b'{"a":1,}',
]


def _outcome(loads: object, content: bytes) -> tuple[str, ...]:
    try:
        return ("ok", repr(loads(content)))  # type: ignore[operator]
    except Exception as exc:
        return ("error", type(exc).__name__, str(exc))


def test_same_result_or_error_as_json_loads() -> None:
    rng = random.Random(3)
    cases: list[bytes] = list(_BASE)
    for _ in range(5_000):
        mutated = bytearray(rng.choice(_BASE))
        for _ in range(rng.randint(0, 3)):
            roll = rng.random()
            if roll < 0.4 and mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            elif roll < 0.7:
                mutated.insert(rng.randint(0, len(mutated)), rng.choice(b' \n{}[]":,0\x00\xc3a'))
            elif mutated:
                del mutated[rng.randrange(len(mutated))]
        cases.append(bytes(mutated))
    for content in cases:
        assert _outcome(loads_json, content) == _outcome(json.loads, content), content


def test_other_types_left_to_json_loads() -> None:
    for content in (bytearray(b'{"a":1}'), memoryview(b'{"a":1}'), '{"a":1}', None):
        assert _outcome(loads_json, content) == _outcome(json.loads, content)  # type: ignore[arg-type]
