"""No recording carries a credential, and the scanner finds the credentials it must."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conformance.providers.cassette import cassette_files
from conformance.providers.credentials import is_placeholder, scan, scan_document


@pytest.mark.parametrize("path", cassette_files(), ids=lambda p: p.parent.name + "/" + p.name)
def test_recording_carries_no_credential(path: Path) -> None:
    assert [str(finding) for finding in scan(path)] == []


# Synthetic credentials, assembled at run time so that no file holds one.
AWS_KEY_ID = "AKIA" + "Q" * 16
GOOGLE_KEY = "AIza" + "SyD3q" * 7
OPENAI_KEY = "sk-" + "proj-" + "a1" * 12
GROQ_KEY = "gsk_" + "b2" * 12
JWT = ".".join(["eyJ" + "a" * 20, "eyJ" + "b" * 20, "c" * 20])


def _cassette(
    *,
    uri: str = "https://example.invalid/v1/x",
    request_headers: dict[str, list[Any]] | None = None,
    request_body: Any = None,
    response_body: Any = "{}",
) -> dict[str, Any]:
    return {
        "interactions": [
            {
                "request": {
                    "method": "POST",
                    "uri": uri,
                    "headers": request_headers or {},
                    "body": request_body,
                },
                "response": {
                    "status": {"code": 200, "message": "OK"},
                    "headers": {},
                    "body": {"string": response_body},
                },
            }
        ],
        "version": 1,
    }


def _frame(payload: bytes) -> bytes:
    """One AWS event-stream frame without headers."""
    total = 16 + len(payload)
    prelude = struct.pack(">II", total, 0)
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + payload
    return body + struct.pack(">I", zlib.crc32(body))


LEAKS = {
    "authorization header": _cassette(request_headers={"Authorization": [f"Bearer {OPENAI_KEY}"]}),
    "binary header": _cassette(
        request_headers={"x-api-key": [b"0123456789abcdef0123456789abcdef"]}
    ),
    "google key header": _cassette(request_headers={"x-goog-api-key": [GOOGLE_KEY]}),
    "aws session token": _cassette(request_headers={"X-Amz-Security-Token": ["IQoJb3JpZ2luX2VjE"]}),
    "sigv4 authorization": _cassette(
        request_headers={
            "Authorization": [
                f"AWS4-HMAC-SHA256 Credential={AWS_KEY_ID}/20250101/us-east-1/bedrock/"
                "aws4_request, SignedHeaders=host, Signature=" + "0f" * 32
            ]
        }
    ),
    "key query parameter": _cassette(
        uri=f"https://example.invalid/v1beta/m:generate?key={GOOGLE_KEY}"
    ),
    "gzip body": _cassette(response_body=gzip.compress(json.dumps({"k": OPENAI_KEY}).encode())),
    "event-stream bytes": _cassette(
        response_body=_frame(
            json.dumps(
                {"bytes": base64.b64encode(json.dumps({"echo": AWS_KEY_ID}).encode()).decode()}
            ).encode()
        )
    ),
    "oauth id_token": _cassette(response_body=json.dumps({"id_token": JWT})),
    "jwt anywhere": _cassette(response_body=f"token is {JWT}"),
    "refresh token form": _cassette(
        request_body="grant_type=refresh_token&refresh_token=1abcdefgh"
    ),
    "groq key in body": _cassette(request_body=json.dumps({"api_key": GROQ_KEY})),
    "private key": _cassette(response_body="-----BEGIN RSA PRIVATE KEY-----\nMII"),
}


@pytest.mark.parametrize("name", sorted(LEAKS))
def test_scanner_finds_credential(name: str, tmp_path: Path) -> None:
    path = tmp_path / "leak.yaml"
    path.write_text(yaml.safe_dump(LEAKS[name]), encoding="utf-8")
    assert scan(path), name


def test_placeholders_pass() -> None:
    document = _cassette(
        uri="https://example.invalid/v1beta/m:generate?key=***",
        request_headers={
            "authorization": ["AUTHORIZATION-XXX"],
            "x-goog-api-key": ["DUMMY_GOOGLE_API_KEY"],
            "x-amz-security-token": ["X-AMZ-SECURITY-TOKEN-XXX"],
        },
        request_body="grant_type=refresh_token&client_secret=%5B%27scrubbed%27%5D",
        response_body=json.dumps({"access_token": "scrubbed", "id_token": "scrubbed"}),
    )
    assert scan_document(document, "placeholders") == []


@pytest.mark.parametrize(
    ("value", "placeholder"),
    [
        ("***", True),
        ("X-GOOG-API-KEY-XXX", True),
        ("Bearer XXX", True),
        ("%5B%27scrubbed%27%5D", True),
        ("<API_KEY>", True),
        (OPENAI_KEY, False),
        (GOOGLE_KEY, False),
        ("0123456789abcdef", False),
    ],
)
def test_is_placeholder(value: str, placeholder: bool) -> None:
    assert is_placeholder(value) is placeholder
