"""The provider corpus is complete, sourced, consistent, and priced by genai-prices."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

from conformance.providers.cassette import CASSETTES, Exchange, cassette_files, load
from conformance.providers.corpus import PRICED_AT, PROVIDERS, RECORDINGS, Recording, charge_of


def test_every_cassette_has_one_recording() -> None:
    files = [str(path.relative_to(CASSETTES)) for path in cassette_files()]
    used = Counter(recording.cassette for recording in RECORDINGS)
    assert sorted(used) == sorted(files)
    assert max(used.values()) == 1


def test_every_cassette_is_sourced() -> None:
    sources = (CASSETTES / "SOURCES.md").read_text(encoding="utf-8")
    for recording in RECORDINGS:
        assert f"| `{recording.cassette}` |" in sources, recording.cassette


@pytest.mark.parametrize("provider", PROVIDERS)
def test_at_least_five_recordings_per_provider(provider: str) -> None:
    recordings = [r for r in RECORDINGS if r.provider == provider]
    assert len(recordings) >= 5
    assert len({r.source for r in recordings}) >= 1
    assert all(r.cassette.startswith(f"{provider}/") for r in recordings)


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda r: r.id)
def test_recording_is_consistent(recording: Recording) -> None:
    exchanges = load(recording.cassette)
    served = recording.served if recording.served is not None else range(len(exchanges))
    assert len(list(served)) == recording.call.calls
    assert all(exchanges[i].status == 200 for i in served)
    assert len(recording.usage) == len(recording.charge) == recording.call.calls
    for usage, charge in zip(recording.usage, recording.charge, strict=True):
        assert charge_of(recording.call, usage) == replace(charge, media={})
    if recording.provider == "gemini":
        media = [_gemini_media(exchanges[i]) for i in served]
        assert [charge.media for charge in recording.charge] == [m for m in media if m is not None]
    else:
        assert all(not charge.media for charge in recording.charge)


_SIDES = (
    ("promptTokensDetails", "input_{}_tokens"),
    ("cacheTokensDetails", "cache_{}_read_tokens"),
    ("candidatesTokensDetails", "output_{}_tokens"),
)


def _gemini_media(exchange: Exchange) -> dict[str, int] | None:
    """The media tokens of a Gemini response's last ``usageMetadata``, in genai-prices'
    usage keys, read from the recorded body (``None``: the response has no usage)."""
    body = exchange.body
    if exchange.content_encoding == "gzip":
        body = gzip.decompress(body)
    text = body.decode()
    if text.lstrip().startswith("data:"):
        found: Any = [
            json.loads(line[5:]) for line in text.splitlines() if line.startswith("data:")
        ]
    else:
        found = json.loads(text)
    objects = found if isinstance(found, list) else [found]
    metas = [o["usageMetadata"] for o in objects if isinstance(o, dict) and "usageMetadata" in o]
    if not metas:
        return None
    media: dict[str, int] = {}
    for side, key in _SIDES:
        for entry in metas[-1].get(side, ()):
            if entry["modality"] in ("AUDIO", "IMAGE", "VIDEO"):
                media[key.format(entry["modality"].lower())] = entry["tokenCount"]
    return media


@pytest.mark.parametrize("recording", RECORDINGS, ids=lambda r: r.id)
def test_genai_prices_knows_the_model(recording: Recording) -> None:
    genai_prices = pytest.importorskip("genai_prices")
    provider_id, model = recording.price
    usage = genai_prices.Usage(input_tokens=1000, output_tokens=1000)
    price = genai_prices.calc_price(
        usage, model, provider_id=provider_id, genai_request_timestamp=PRICED_AT
    )
    assert price.provider.id == provider_id
    assert price.total_price > 0
