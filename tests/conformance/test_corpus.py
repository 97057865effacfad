"""The corpus itself: free of credentials, every file sourced, big and varied enough."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from conformance.corpus import CASSETTES, SYNTHETIC, cassette_files, corpus, load_cassette
from conformance.credentials import scan_file, scan_headers, scan_text

FILES = cassette_files()
SYNTHETIC_FILES = cassette_files(SYNTHETIC)


@pytest.mark.parametrize(
    "path",
    [*FILES, *SYNTHETIC_FILES],
    ids=[p.relative_to(CASSETTES.parent).as_posix() for p in [*FILES, *SYNTHETIC_FILES]],
)
def test_no_credentials(path: Path) -> None:
    assert scan_file(path) == []


def test_scanner_catches_credentials() -> None:
    # Built at run time so that no credential-shaped string sits in the repository.
    openai_key = "sk-" + "proj-" + "A1b2C3d4" * 4
    anthropic_key = "sk-" + "ant-api03-" + "Z9y8X7w6" * 4
    aws_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    assert scan_text(f"key={openai_key}")
    assert scan_text(f"x {anthropic_key} y")
    assert scan_text(f"id: {aws_id}")
    assert scan_text("Authorization: Bearer " + "eyJhbGciOi" * 3)
    assert scan_text("Set-Cookie: sessionid=" + "0123456789abcdef" + "; Path=/")
    assert scan_headers({"authorization": ["Bearer " + "abcd1234" * 4]})
    assert scan_headers({"x-api-key": ["abcd1234" * 4]})
    assert scan_headers({"set-cookie": ["cf_clearance=" + "q" * 20 + "; path=/"]})


def test_scanner_allows_placeholders_and_cloudflare_cookies() -> None:
    assert scan_text("Authorization: Bearer <OPENAI_API_KEY>") == []
    assert scan_headers({"authorization": ["Bearer test-key"], "x-api-key": ["REDACTED"]}) == []
    cookie = "__cf_bm=abc.def-1; path=/; expires=Mon, 24-Feb-25 11:50:22 GMT; HttpOnly; Secure"
    assert scan_headers({"set-cookie": [cookie, "_cfuvid=xyz; SameSite=None"]}) == []


def _sourced_files() -> list[str]:
    text = (CASSETTES / "SOURCES.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `([^`]+\.yaml)` \|", text, flags=re.MULTILINE)
    return [name for name in listed if not name.startswith("synthetic/")]


def test_every_cassette_is_sourced() -> None:
    listed = _sourced_files()
    present = [p.relative_to(CASSETTES).as_posix() for p in FILES]
    assert sorted(listed) == sorted(present)
    assert len(listed) == len(set(listed))


def test_sources_name_repository_path_and_commit() -> None:
    text = (CASSETTES / "SOURCES.md").read_text(encoding="utf-8")
    rows = re.findall(
        r"^\| `([^`]+)` \| ([\w.-]+/[\w.-]+) \| `([^`]+)` \| `([0-9a-f]{40})` \|$",
        text,
        flags=re.MULTILINE,
    )
    assert len(rows) == len(FILES)


def test_every_cassette_has_a_metered_call() -> None:
    assert all(load_cassette(path) for path in FILES)


def test_corpus_size_and_breadth() -> None:
    interactions = corpus()
    sources = Counter(i.source for i in interactions)
    assert len(interactions) >= 60, f"{len(interactions)} interactions"
    assert len(sources) >= 3, sources
    kinds = {(i.kind, i.is_stream) for i in interactions if i.ok}
    for expected in [
        ("chat", False),
        ("chat", True),
        ("responses", False),
        ("responses", True),
        ("embeddings", False),
        ("messages", False),
        ("messages", True),
    ]:
        assert expected in kinds
    statuses = {i.status for i in interactions if not i.ok}
    assert {400, 404, 429} <= statuses
