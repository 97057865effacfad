"""Audio, image and video tokens: the parts of a call some models bill at their own rates.

Gemini reports a call's tokens by modality (``promptTokensDetails``,
``cacheTokensDetails``, ``candidatesTokensDetails``) and bills audio input (and, on its
image models, image output) at other rates than text; OpenAI's audio models report
``prompt_tokens_details.audio_tokens`` and ``completion_tokens_details.audio_tokens``
and bill them at audio rates. genai-prices carries those rates (``input_audio_mtok``,
``cache_audio_read_mtok``, ``output_image_mtok``...); a rate it does not give falls back
to the rate of the kind the tokens are part of, as genai-prices falls back.

:class:`MediaTokens` is the media part of a :class:`~payi_guard.pricing.TokenUsage`,
each count a part of one of its counts (never added to them); :class:`MediaRates` the
media rates of a :class:`~payi_guard.pricing.RateBand`, every one resolved.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Final

__all__ = ["MEDIA_KINDS", "MediaRates", "MediaTokens"]

MEDIA_KINDS: Final = (
    "input_audio",
    "cache_audio_read",
    "output_audio",
    "input_image",
    "cache_image_read",
    "output_image",
    "input_video",
    "cache_video_read",
    "output_video",
)
"""The media kinds, each ``<side>_<modality>``: ``input_*`` is a part of the plain input
tokens, ``cache_*_read`` of the cache reads, ``output_*`` of the output tokens."""


def check_count(name: str, value: object) -> None:
    """Refuse a count or rate that is not a non-negative ``int`` (``bool`` included).

    Raises:
        TypeError: ``value`` is not an ``int``, or is a ``bool``.
        ValueError: ``value`` is negative.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True, slots=True)
class MediaTokens:
    """The audio, image and video tokens within a call's token counts.

    Every count is a part of a count of the :class:`~payi_guard.pricing.TokenUsage` it
    belongs to, not an addition to it: ``input_audio`` + ``input_image`` +
    ``input_video`` are at most its ``input_tokens`` (the plain input, cache reads
    excluded), the ``cache_*_read`` counts at most its ``cache_read_tokens``, the
    ``output_*`` counts at most its ``output_tokens``. What is left of each count is
    text.

    Raises:
        TypeError: a count is not an ``int`` (``bool`` is refused too).
        ValueError: a count is negative.
    """

    input_audio: int = 0
    cache_audio_read: int = 0
    output_audio: int = 0
    input_image: int = 0
    cache_image_read: int = 0
    output_image: int = 0
    input_video: int = 0
    cache_video_read: int = 0
    output_video: int = 0

    def __post_init__(self) -> None:
        for name in MEDIA_KINDS:
            check_count(name, getattr(self, name))

    @property
    def inputs(self) -> int:
        """The plain input tokens that are audio, image or video."""
        return self.input_audio + self.input_image + self.input_video

    @property
    def cache_reads(self) -> int:
        """The cache reads that are audio, image or video."""
        return self.cache_audio_read + self.cache_image_read + self.cache_video_read

    @property
    def outputs(self) -> int:
        """The output tokens that are audio, image or video."""
        return self.output_audio + self.output_image + self.output_video

    def __add__(self, other: MediaTokens) -> MediaTokens:
        """The media tokens of two parts of one call together, kind by kind."""
        return MediaTokens(*(getattr(self, k) + getattr(other, k) for k in MEDIA_KINDS))

    def problem(self, input_tokens: int, cache_read_tokens: int, output_tokens: int) -> str:
        """Why these counts cannot be parts of those, or ``""`` when they can."""
        if self.inputs > input_tokens:
            return f"{self.inputs} media input tokens exceed the {input_tokens} input tokens"
        if self.cache_reads > cache_read_tokens:
            return (
                f"{self.cache_reads} media cache reads exceed the {cache_read_tokens} cache reads"
            )
        if self.outputs > output_tokens:
            return f"{self.outputs} media output tokens exceed the {output_tokens} output tokens"
        return ""

    def within(self, input_tokens: int, cache_read_tokens: int, output_tokens: int) -> MediaTokens:
        """These counts, cut (modality by modality, in order) to fit within those."""
        budgets = {"input": input_tokens, "cache": cache_read_tokens, "output": output_tokens}
        values: list[int] = []
        for name in MEDIA_KINDS:
            side = name.split("_", 1)[0]
            value = min(getattr(self, name), budgets[side])
            budgets[side] -= value
            values.append(value)
        return MediaTokens(*values)

    def extra_pico(
        self, input_rate: int, cache_read_rate: int, output_rate: int, media: MediaRates
    ) -> int:
        """What these tokens cost beyond their price as text, in pico-USD (may be < 0).

        Args:
            input_rate: the band's plain input rate.
            cache_read_rate: the band's cache-read rate.
            output_rate: the band's output rate.
            media: the band's media rates.
        """
        return (
            self.input_audio * (media.input_audio - input_rate)
            + self.input_image * (media.input_image - input_rate)
            + self.input_video * (media.input_video - input_rate)
            + self.cache_audio_read * (media.cache_audio_read - cache_read_rate)
            + self.cache_image_read * (media.cache_image_read - cache_read_rate)
            + self.cache_video_read * (media.cache_video_read - cache_read_rate)
            + self.output_audio * (media.output_audio - output_rate)
            + self.output_image * (media.output_image - output_rate)
            + self.output_video * (media.output_video - output_rate)
        )


@dataclass(frozen=True, slots=True)
class MediaRates:
    """The per-token rates of audio, image and video tokens in one band (pico-USD).

    Each is resolved: a rate the price does not give is the rate of the kind the tokens
    are part of (plain input, cache reads or output), or, for a cache read of a medium
    whose input is priced when cache reads are not, that input rate.

    Raises:
        TypeError: a rate is not an ``int``.
        ValueError: a rate is negative.
    """

    input_audio: int
    cache_audio_read: int
    output_audio: int
    input_image: int
    cache_image_read: int
    output_image: int
    input_video: int
    cache_video_read: int
    output_video: int

    def __post_init__(self) -> None:
        for name in MEDIA_KINDS:
            check_count(name, getattr(self, name))

    @staticmethod
    def plain(input_rate: int, cache_read_rate: int, output_rate: int) -> MediaRates:
        """Media rates that are the text rates (a band that prices no medium apart)."""
        i, c, o = input_rate, cache_read_rate, output_rate
        return MediaRates(i, c, o, i, c, o, i, c, o)

    @property
    def output_ceiling(self) -> int:
        """The highest rate of a media output token."""
        return max(self.output_audio, self.output_image, self.output_video)

    @staticmethod
    def highest(rates: list[MediaRates]) -> MediaRates:
        """The rate-by-rate maximum of ``rates`` (at least one)."""
        return MediaRates(*(max(getattr(r, f.name) for r in rates) for f in fields(MediaRates)))
