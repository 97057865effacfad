"""Audio, image and video token counts, read from the usage objects that report them.

* OpenAI-style ``usage`` (chat completions, and the providers that copy it):
  ``prompt_tokens_details.audio_tokens`` and ``.image_tokens`` are parts of
  ``prompt_tokens``, ``completion_tokens_details.audio_tokens`` and ``.image_tokens``
  parts of ``completion_tokens``. Which of the prompt's media tokens were cache reads
  is not said: they are taken as plain input first (the dearer rate), the rest as cache
  reads.
* Gemini ``usageMetadata``: ``promptTokensDetails`` breaks ``promptTokenCount`` down
  by modality (``AUDIO``, ``VIDEO``, ``IMAGE``, and ``DOCUMENT`` billed as image;
  ``TEXT`` is text; any case),
  ``cacheTokensDetails`` the cached part of it, ``toolUsePromptTokensDetails`` the tool
  prompt and ``candidatesTokensDetails`` the answer (thoughts are text).

A detail that is not a non-negative whole number is read as text (no media), and the
counts are cut to fit within the counts they are part of: they can only move tokens
from the text rate to a medium's rate, never add tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from payi_guard.pricing.media import MediaTokens

__all__ = ["INLINE_BYTES_PER_TOKEN", "gemini_media", "gemini_part", "openai_media"]

_MODALITIES: Final = {"AUDIO": "audio", "IMAGE": "image", "VIDEO": "video", "DOCUMENT": "image"}

INLINE_BYTES_PER_TOKEN: Final = 8
"""Bytes of inline (base64) audio, video or document data a request's bound counts as
one token. Gemini bills 32 tokens a second of audio and 263 of video: one token per 8
bytes covers audio above about 7 kbit/s at the dearest audio-to-text price ratio
genai-prices lists for Gemini (7x), and any video above 17 kbit/s."""


def gemini_part(part: Mapping[str, Any]) -> str | int | None:
    """What a Gemini content part counts in a request's bound.

    ``"image"`` for an image (the image allowance), ``"file"`` for a file URI (the file
    allowance), for inline audio, video or document data the tokens its size is worth
    (one per :data:`INLINE_BYTES_PER_TOKEN` bytes; the bound counts that or the file
    allowance, the larger), ``None`` for any other part.
    """
    data = part.get(
        "inlineData", part.get("inline_data", part.get("fileData", part.get("file_data")))
    )
    if not isinstance(data, Mapping):
        return None
    mime = data.get("mimeType", data.get("mime_type"))
    if isinstance(mime, str) and mime.startswith("image/"):
        return "image"
    inline = data.get("data")
    if not isinstance(inline, str):
        return "file"
    return len(inline) * 3 // (4 * INLINE_BYTES_PER_TOKEN) + 1


def _count(obj: Any, key: str) -> int:
    value = obj.get(key) if isinstance(obj, Mapping) else None
    return value if type(value) is int and value > 0 else 0


def openai_media(
    usage: Mapping[str, Any],
    input_tokens: int,
    cache_read_tokens: int,
    output_tokens: int,
    details: tuple[str, str] = ("prompt_tokens_details", "completion_tokens_details"),
) -> MediaTokens | None:
    """The media tokens of an OpenAI-style ``usage``, or ``None`` when it reports none.

    Args:
        usage: the usage object.
        input_tokens: its plain input tokens (cache reads and writes excluded).
        cache_read_tokens: its cache reads.
        output_tokens: its output tokens.
        details: the names of its input and output details objects.
    """
    prompt = usage.get(details[0])
    completion = usage.get(details[1])
    audio_in = _count(prompt, "audio_tokens")
    image_in = _count(prompt, "image_tokens")
    audio_out = _count(completion, "audio_tokens")
    image_out = _count(completion, "image_tokens")
    if not (audio_in or image_in or audio_out or image_out):
        return None
    plain_audio = min(audio_in, input_tokens)
    plain_image = min(image_in, input_tokens - plain_audio)
    return MediaTokens(
        input_audio=plain_audio,
        cache_audio_read=audio_in - plain_audio,
        output_audio=audio_out,
        input_image=plain_image,
        cache_image_read=image_in - plain_image,
        output_image=image_out,
    ).within(input_tokens, cache_read_tokens, output_tokens)


def _by_modality(meta: Mapping[str, Any], camel: str, snake: str) -> dict[str, int]:
    """A ``*TokensDetails`` list of ``usageMetadata`` as ``{"audio": n, ...}``."""
    entries = meta.get(camel, meta.get(snake))
    found: dict[str, int] = {}
    if not isinstance(entries, list):
        return found
    for entry in entries:
        if not isinstance(entry, Mapping):
            continue
        medium = _MODALITIES.get(str(entry.get("modality")).upper())
        if medium is not None:
            tokens = _count(entry, "tokenCount") or _count(entry, "token_count")
            found[medium] = found.get(medium, 0) + tokens
    return found


def gemini_media(
    meta: Mapping[str, Any], input_tokens: int, cache_read_tokens: int, output_tokens: int
) -> MediaTokens | None:
    """The media tokens of a Gemini ``usageMetadata``, or ``None`` when it reports none.

    Args:
        meta: the ``usageMetadata`` object (camelCase or snake_case).
        input_tokens: its plain input tokens (the prompt and tool prompt, cache reads
            excluded).
        cache_read_tokens: its cache reads (``cachedContentTokenCount``).
        output_tokens: its output tokens (the answer and the thoughts).
    """
    prompt = _by_modality(meta, "promptTokensDetails", "prompt_tokens_details")
    cached = _by_modality(meta, "cacheTokensDetails", "cache_tokens_details")
    tool = _by_modality(meta, "toolUsePromptTokensDetails", "tool_use_prompt_tokens_details")
    answer = _by_modality(meta, "candidatesTokensDetails", "candidates_tokens_details")
    if not (prompt or cached or tool or answer):
        return None
    counts: dict[str, int] = {}
    for medium in ("audio", "image", "video"):
        read = min(cached.get(medium, 0), prompt.get(medium, 0))
        counts[f"input_{medium}"] = prompt.get(medium, 0) - read + tool.get(medium, 0)
        counts[f"cache_{medium}_read"] = read
        counts[f"output_{medium}"] = answer.get(medium, 0)
    if not any(counts.values()):
        return None
    return MediaTokens(**counts).within(input_tokens, cache_read_tokens, output_tokens)
