"""Usage objects as the providers report them, read into one :class:`ParsedUsage`.

OpenAI chat and legacy completions (``usage``: ``prompt_tokens``, ``completion_tokens``
and their details), the Responses API (``input_tokens``, ``output_tokens``, web and
file search calls), Anthropic messages (``input_tokens``, cache reads and 5-minute and
1-hour writes, ``usage.iterations``, server tool use). Counts that cannot be trusted
are named in ``problems``. :func:`~payi_guard.meter.parse.usage_from_response` picks
the reader for an endpoint; streams read the same objects
(:mod:`payi_guard.meter.sse.usage`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from payi_guard.meter.modality import openai_media
from payi_guard.pricing import MediaTokens, TokenUsage

__all__ = [
    "ParsedUsage",
    "anthropic_usage",
    "openai_usage",
    "responses_file_searches",
    "responses_usage",
    "responses_web_searches",
]


@dataclass(frozen=True, slots=True)
class ParsedUsage:
    """Token usage of one call, in the same terms for every provider.

    Attributes:
        input_tokens: input tokens billed at the full input rate: cache reads and cache
            writes excluded. For OpenAI, ``prompt_tokens - cached_tokens -
            cache_write_tokens`` (both in ``prompt_tokens_details``; Responses:
            ``input_tokens`` and ``input_tokens_details``); Anthropic's
            ``input_tokens`` already excludes its cache fields.
        output_tokens: output tokens, reasoning (thinking) tokens included, as every
            provider bills them.
        cache_read_tokens: input tokens read from the prompt cache.
        cache_write_tokens: input tokens written to the prompt cache with the default
            (5 minute) lifetime: Anthropic's ``cache_creation_input_tokens`` minus the
            1-hour writes; OpenAI's ``cache_write_tokens``.
        cache_write_1h_tokens: input tokens written with a 1-hour lifetime (Anthropic's
            ``cache_creation.ephemeral_1h_input_tokens``), billed at a higher rate.
        reasoning_tokens: the part of ``output_tokens`` spent on reasoning (informative).
        complete: whether the provider's final usage report was seen. When false, some
            counts may be missing or partial.
        web_searches: server-side web searches billed per search (Anthropic's
            ``server_tool_use.web_search_requests``; for the Responses API
            ``tool_usage.web_search.num_requests``, else one per ``web_search_call``
            output item).
        file_searches: server-side file search calls billed per call (the Responses
            API's ``tool_usage.file_search.num_requests``, else one per
            ``file_search_call`` output item).
        media: the audio, image and video tokens within these counts (``None``: none).
        other_models: usage billed at another model's prices, as ``(model, usage)``
            pairs: Anthropic ``usage.iterations`` that name another model (the advisor
            tool's). The counts above are the call's own model's only.
        problems: the counts that cannot be trusted (negative, not an integer, or
            missing where the provider always sends them), each as ``"name: value"``;
            empty when the usage can be trusted.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    reasoning_tokens: int = 0
    complete: bool = False
    web_searches: int = 0
    file_searches: int = 0
    media: MediaTokens | None = None
    other_models: tuple[tuple[str, TokenUsage], ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def total_input_tokens(self) -> int:
        """All input tokens: full-rate, cache reads and cache writes together."""
        return (
            self.input_tokens
            + self.cache_read_tokens
            + self.cache_write_tokens
            + self.cache_write_1h_tokens
        )

    def to_token_usage(self) -> TokenUsage:
        """Convert to :class:`payi_guard.pricing.TokenUsage` (media cut to fit)."""
        media = self.media and self.media.within(
            self.input_tokens, self.cache_read_tokens, self.output_tokens
        )
        return TokenUsage(
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            cache_read_tokens=self.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens,
            cache_write_1h_tokens=self.cache_write_1h_tokens,
            web_searches=self.web_searches,
            file_searches=self.file_searches,
            media=media,
        )


def responses_web_searches(response: Mapping[str, Any]) -> int:
    """The web searches a Responses API call is billed for.

    ``tool_usage.web_search.num_requests`` where the response reports it, else one per
    ``web_search_call`` item of its ``output``.
    """
    return _tool_calls(response, "web_search")


def responses_file_searches(response: Mapping[str, Any]) -> int:
    """The file search calls a Responses API call is billed for.

    ``tool_usage.file_search.num_requests`` where the response reports it, else one per
    ``file_search_call`` item of its ``output``.
    """
    return _tool_calls(response, "file_search")


def _tool_calls(response: Mapping[str, Any], tool: str) -> int:
    reported = _dig(response, "tool_usage", tool, "num_requests")
    if isinstance(reported, int) and not isinstance(reported, bool) and reported >= 0:
        return reported
    output = response.get("output")
    if not isinstance(output, list):
        return 0
    item_type = f"{tool}_call"
    return sum(1 for item in output if isinstance(item, Mapping) and item.get("type") == item_type)


def openai_usage(usage: Mapping[str, Any], *, output: bool = True) -> ParsedUsage:
    """Read an OpenAI ``usage`` object of chat, legacy completions or embeddings.

    These count ``prompt_tokens`` (cache reads and cache writes included, as
    ``prompt_tokens_details.cached_tokens`` and ``.cache_write_tokens``) and
    ``completion_tokens``. A ``total_tokens`` above their sum counts output the two leave
    out (Gemini's thoughts through its OpenAI-compatible API, billed as output): it is
    added to the output, as reasoning.

    Args:
        usage: the object.
        output: whether ``completion_tokens`` must be there (not for embeddings).
    """
    return _openai_style(
        usage,
        ("prompt_tokens", "prompt_tokens_details"),
        ("completion_tokens", "completion_tokens_details"),
        output_required=output,
    )


def responses_usage(usage: Mapping[str, Any]) -> ParsedUsage:
    """Read a Responses API ``usage`` object.

    Its ``input_tokens`` include cache reads and writes (``input_tokens_details``'s
    ``cached_tokens`` and ``cache_write_tokens``).
    """
    return _openai_style(
        usage, ("input_tokens", "input_tokens_details"), ("output_tokens", "output_tokens_details")
    )


def _openai_style(
    usage: Mapping[str, Any],
    prompt: tuple[str, str],
    completion: tuple[str, str],
    *,
    output_required: bool = True,
) -> ParsedUsage:
    """The usage of an OpenAI-style object (``prompt``, ``completion``: count, details)."""
    counts = _Counts()
    total_input = counts.read(usage, prompt[0], required=True)
    output = counts.read(usage, completion[0], required=output_required)
    details = usage.get(prompt[1])
    cached = written = 0
    if type(details) is dict or isinstance(details, Mapping):
        cached = min(total_input, counts.read(details, "cached_tokens", prompt[1]))
        written = counts.read(details, "cache_write_tokens", prompt[1])
        written = min(total_input - cached, written)
    reasoning = min(_int(_dig(usage, completion[1], "reasoning_tokens")), output)
    total = usage.get("total_tokens")
    if output_required and type(total) is int and total > total_input + output:
        # Output the counts leave out: Gemini's OpenAI-compatible API reports its
        # thoughts, billed as output, only in the total.
        hidden = total - total_input - output
        output += hidden
        reasoning += hidden
    return ParsedUsage(
        input_tokens=total_input - cached - written,
        output_tokens=output,
        cache_read_tokens=cached,
        cache_write_tokens=written,
        reasoning_tokens=reasoning,
        complete=True,
        media=openai_media(
            usage, total_input - cached - written, cached, output, (prompt[1], completion[1])
        ),
        problems=counts.problems,
    )


def anthropic_usage(
    usage: Mapping[str, Any], *, complete: bool, model: str | None = None
) -> ParsedUsage:
    """Read an Anthropic ``usage`` object (its ``input_tokens`` exclude cache tokens).

    When it lists ``iterations`` (compaction, the advisor tool), the call is billed the
    sum of the iterations, not the top-level counts (which cover only the last ones):
    the iterations of the call's own model (those naming no model, or ``model``) add up
    to the counts returned; those naming another model are returned in
    :attr:`ParsedUsage.other_models`, to be priced as that model.

    Args:
        usage: the object, or the fields of a stream's events merged so far.
        complete: whether this is the final usage report.
        model: the model the response names.
    """
    counts = _Counts()
    own = _anthropic_counts(usage, counts)
    others: list[tuple[str, TokenUsage]] = []
    iterations = usage.get("iterations")
    if isinstance(iterations, list) and iterations:
        own = TokenUsage(0, 0)
        for index, iteration in enumerate(iterations):
            if not isinstance(iteration, Mapping):
                counts.problems += (f"iterations[{index}] is not an object",)
                continue
            part = _anthropic_counts(iteration, counts, f"iterations[{index}]")
            name = iteration.get("model")
            if isinstance(name, str) and name and name != model:
                others.append((name, part))
            else:
                own = own + part
    output = own.output_tokens
    thinking = _int(_dig(usage, "output_tokens_details", "thinking_tokens"))
    return ParsedUsage(
        input_tokens=own.input_tokens,
        output_tokens=output,
        cache_read_tokens=own.cache_read_tokens,
        cache_write_tokens=own.cache_write_tokens,
        cache_write_1h_tokens=own.cache_write_1h_tokens,
        reasoning_tokens=min(thinking, output),
        complete=complete,
        web_searches=counts.read(_as_map(usage.get("server_tool_use")), "web_search_requests"),
        other_models=tuple(others),
        problems=counts.problems,
    )


def _anthropic_counts(usage: Mapping[str, Any], counts: _Counts, where: str = "") -> TokenUsage:
    """The token counts of one Anthropic usage object (or one of its iterations)."""
    writes = counts.read(usage, "cache_creation_input_tokens", where)
    creation = _as_map(usage.get("cache_creation"))
    nested = f"{where}.cache_creation" if where else "cache_creation"
    writes_1h = min(writes, counts.read(creation, "ephemeral_1h_input_tokens", nested))
    return TokenUsage(
        input_tokens=counts.read(usage, "input_tokens", where, required=True),
        output_tokens=counts.read(usage, "output_tokens", where, required=True),
        cache_read_tokens=counts.read(usage, "cache_read_input_tokens", where),
        cache_write_tokens=writes - writes_1h,
        cache_write_1h_tokens=writes_1h,
    )


class _Counts:
    """Reads token counts from usage objects, noting every value that cannot be trusted.

    A count is a non-negative JSON integer. A count that is there but is anything else
    (negative, a float, a string, a boolean), or a required count that is missing or
    ``null``, reads as 0 and is noted in :attr:`problems`.
    """

    __slots__ = ("problems",)

    def __init__(self) -> None:
        self.problems: tuple[str, ...] = ()

    def read(
        self, obj: Mapping[str, Any], key: str, where: str = "", *, required: bool = False
    ) -> int:
        """The count ``obj[key]`` (0 when absent); ``where`` names ``obj`` in problems."""
        value = obj.get(key)
        if type(value) is int and value >= 0:
            return value
        if value is not None or required:
            name = f"{where}.{key}" if where else key
            shown = "missing" if value is None else f"{value!r:.40}"
            self.problems += (f"{name}: {shown}",)
        return 0


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _as_map(value: object) -> Mapping[str, Any]:
    return value if type(value) is dict or isinstance(value, Mapping) else _EMPTY


def _int(value: object) -> int:
    """A token count from JSON: non-negative ints, integral floats; anything else is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(0, value)
    if isinstance(value, float) and value.is_integer():
        return max(0, int(value))
    return 0


def _dig(obj: object, *keys: str) -> object:
    for key in keys:
        if type(obj) is not dict and not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj
