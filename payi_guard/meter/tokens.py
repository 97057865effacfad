"""Token bounds of a request, read from its JSON body: input and output.

The guarding transport reserves what a call can cost at most, so every count here is an
upper bound: :func:`estimate_input_tokens` bounds the input (text by
:func:`text_token_bound`, images and files by allowances), :func:`max_output_tokens` the
output (the request's own cap from :data:`OUTPUT_CAP_FIELDS`, else the model's from
:func:`model_output_cap`). :mod:`payi_guard.meter.estimate` adds the facts that choose a
price; :mod:`payi_guard.pricing` never sees a request body.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Literal, get_args

from payi_guard.meter.text_bound import EstimateMode, text_token_bound

__all__ = [
    "ANTHROPIC_BUILTIN_TOOL_TOKENS",
    "ANTHROPIC_TOOLS_OVERHEAD_TOKENS",
    "DEFAULT_FILE_TOKENS",
    "DEFAULT_IMAGE_TOKENS",
    "DEFAULT_MAX_OUTPUT_TOKENS",
    "ENDPOINTS",
    "MESSAGE_OVERHEAD_TOKENS",
    "OPENAI_TOOLS_OVERHEAD_TOKENS",
    "OUTPUT_CAP_FIELDS",
    "REQUEST_OVERHEAD_TOKENS",
    "EndpointKind",
    "EstimateMode",
    "check_bound_args",
    "count_param",
    "estimate_input_tokens",
    "image_token_bound",
    "input_bound",
    "max_output_tokens",
    "model_output_cap",
    "output_bound",
    "request_output_cap",
    "text_token_bound",
]

EndpointKind = Literal["chat", "responses", "embeddings", "anthropic_messages", "completions"]
"""The request kinds estimates understand (OpenAI ``/chat/completions``, ``/responses``,
``/embeddings``, legacy ``/completions``, and Anthropic ``/v1/messages``)."""

ENDPOINTS: tuple[EndpointKind, ...] = get_args(EndpointKind)

DEFAULT_MAX_OUTPUT_TOKENS = 16_384
"""Output bound used when a request sets no cap and the model's own cap is not known."""

DEFAULT_IMAGE_TOKENS = 1_600
"""Tokens counted per image part when the model has no entry in the image table.

It covers the largest image of tile-priced OpenAI models (gpt-4o: 85 + 170 x 8 tiles =
1,445) and of Claude (about 1.15 megapixels / 750 = 1,600).
"""

DEFAULT_FILE_TOKENS = 32_000
"""Tokens counted for a file or document passed by reference (URL or file id).

Such a file's size is not in the request, so this is a documented allowance, not a
bound; files passed inline (base64) are counted from their data instead.
"""


MESSAGE_OVERHEAD_TOKENS = 10
"""Tokens added per message / input item for the chat format's role and separators
(OpenAI documents 3-4 per message)."""

REQUEST_OVERHEAD_TOKENS = 16
"""Tokens added per request (reply priming and format)."""

OPENAI_TOOLS_OVERHEAD_TOKENS = 64
"""Tokens added when OpenAI tools/functions are declared: their definitions are rendered
into a system section of their own."""

ANTHROPIC_TOOLS_OVERHEAD_TOKENS = 600
"""Tokens added when Anthropic tools are declared: Anthropic documents a tool-use system
prompt of 159 to 530 tokens depending on the model and ``tool_choice``."""

ANTHROPIC_BUILTIN_TOOL_TOKENS = 1_500
"""Tokens added per Anthropic built-in tool (``{"type": "bash_20250124", ...}``): their
definitions are not in the request; Anthropic documents 245 to 1,234 tokens each."""

_IMAGE_TOKEN_BOUNDS: tuple[tuple[str, int], ...] = (
    # gpt-4o-mini bills images at 2,833 + 5,667 per 512px tile (up to 4 tiles).
    ("gpt-4o-mini", 25_501),
    # Patch-priced models: up to 1,536 patches times a per-model multiplier (<= 2.46).
    ("gpt-4.1-mini", 3_800),
    ("gpt-4.1-nano", 3_800),
    ("gpt-5-mini", 3_800),
    ("gpt-5-nano", 3_800),
    ("o4-mini", 3_800),
)


@functools.lru_cache(maxsize=1024)
def image_token_bound(model: str) -> int:
    """Tokens counted per image part for ``model`` (longest matching name prefix).

    Models billed far above :data:`DEFAULT_IMAGE_TOKENS` per image have an entry (for
    example ``gpt-4o-mini``: 25,501); every other model uses the default.
    """
    name = model.rsplit("/", 1)[-1].lower()
    best, best_len = DEFAULT_IMAGE_TOKENS, -1
    for prefix, tokens in _IMAGE_TOKEN_BOUNDS:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = tokens, len(prefix)
    return best


_IMAGE_TYPES = frozenset({"image", "image_url", "input_image", "computer_screenshot"})
_FILE_TYPES = frozenset({"file", "input_file", "document"})
_INLINE_SOURCES = frozenset({"base64", "text", "content"})
_SKIPPED_KEYS = frozenset({"cache_control"})


class _Tally:
    """What a request body holds, gathered by :func:`_walk`."""

    __slots__ = ("exact", "files", "images", "items", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.items = 0
        self.images = 0
        self.files = 0
        self.exact = 0

    def add(self, obj: object) -> None:
        """Walk ``obj``: strings are text; images and files by reference are counted."""
        # A parsed body is plain dicts, lists and strings: their exact types first, the
        # (slower) ABC checks only for anything else.
        if obj is None:
            return
        cls = type(obj)
        if cls is str:
            self.text.append(obj)  # type: ignore[arg-type]
        elif cls is dict:
            self._add_mapping(obj)  # type: ignore[arg-type]
        elif cls is list:
            self._add_list(obj)  # type: ignore[arg-type]
        elif isinstance(obj, str):
            self.text.append(obj)
        elif isinstance(obj, Mapping):
            self._add_mapping(obj)
        elif isinstance(obj, list):
            self._add_list(obj)
        else:
            self.text.append(str(obj))

    def _add_mapping(self, obj: Mapping[str, Any]) -> None:
        kind = obj.get("type")
        if kind in _IMAGE_TYPES or (kind is None and "image_url" in obj):
            self.images += 1
            return
        if kind in _FILE_TYPES and not _inline_file(obj):
            self.files += 1
            return
        # One token per entry stands for the punctuation a rendering adds.
        self.exact += len(obj)
        text = self.text
        for key, value in obj.items():
            if key in _SKIPPED_KEYS:
                continue
            text.append(key if type(key) is str else str(key))
            if type(value) is str:
                text.append(value)
            else:
                self.add(value)

    def _add_list(self, obj: list[Any]) -> None:
        self.exact += len(obj)
        text = self.text
        add = self.add
        for value in obj:
            if type(value) is str:
                text.append(value)
            else:
                add(value)

    def add_items(self, items: object) -> None:
        """Walk a list of messages / input items, counting the per-item overhead."""
        if isinstance(items, list):
            self.items += len(items)
            for item in items:
                self.add(item)
        elif items is not None:
            self.items += 1
            self.add(items)

    def add_prompt(self, prompt: object) -> None:
        """Walk an embeddings ``input`` / completions ``prompt``: token ids count exactly."""
        if _is_token_ids(prompt):
            self.exact += len(prompt)  # type: ignore[arg-type]
            self.items += 1
        elif isinstance(prompt, list) and prompt and all(_is_token_ids(p) for p in prompt):
            self.exact += sum(len(p) for p in prompt)
            self.items += len(prompt)
        elif isinstance(prompt, list):
            self.items += len(prompt)
            for part in prompt:
                self.add(part)
        elif prompt is not None:
            self.items += 1
            self.add(prompt)


def _is_token_ids(value: object) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def _inline_file(part: Mapping[str, Any]) -> bool:
    """Whether a file/document part carries its content (counted as text) in the body."""
    if "file_data" in part:
        return True
    inner = part.get("file")
    if isinstance(inner, Mapping) and "file_data" in inner:
        return True
    source = part.get("source")
    return isinstance(source, Mapping) and source.get("type") in _INLINE_SOURCES


# The chat body members that are input besides messages and tool definitions.
_CHAT_PARTS = ("response_format", "tool_choice", "function_call", "prediction")


def _walk_body(body: Mapping[str, Any], endpoint: EndpointKind) -> tuple[_Tally, int]:
    """Gather the input parts of ``body``; returns the tally and fixed overhead tokens."""
    tally = _Tally()
    overhead = REQUEST_OVERHEAD_TOKENS
    if endpoint == "chat":
        get = body.get
        tally.add_items(get("messages"))
        for key in _CHAT_PARTS:
            part = get(key)
            if part is not None:
                tally.add(part)
        tools, functions = get("tools"), get("functions")
        if tools or functions:
            overhead += OPENAI_TOOLS_OVERHEAD_TOKENS
            tally.add_items(tools)
            tally.add_items(functions)
    elif endpoint == "responses":
        tally.add(body.get("instructions"))
        items = body.get("input")
        tally.add_items(items)
        for key in ("text", "tool_choice"):
            tally.add(body.get(key))
        if body.get("tools"):
            overhead += OPENAI_TOOLS_OVERHEAD_TOKENS
            tally.add_items(body.get("tools"))
    elif endpoint == "anthropic_messages":
        tally.add(body.get("system"))
        tally.add_items(body.get("messages"))
        tally.add(body.get("tool_choice"))
        tools = body.get("tools")
        if tools:
            overhead += ANTHROPIC_TOOLS_OVERHEAD_TOKENS
            tally.add_items(tools)
            if isinstance(tools, list):
                overhead += ANTHROPIC_BUILTIN_TOOL_TOKENS * sum(
                    1
                    for tool in tools
                    if isinstance(tool, Mapping) and tool.get("type") not in (None, "custom")
                )
    elif endpoint == "embeddings":
        tally.add_prompt(body.get("input"))
    elif endpoint == "completions":
        tally.add_prompt(body.get("prompt"))
        tally.add(body.get("suffix"))
    else:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}")
    return tally, overhead


def _infer_endpoint(body: Mapping[str, Any]) -> EndpointKind:
    if "messages" in body:
        return "anthropic_messages" if "system" in body else "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        items = body["input"]
        if isinstance(items, str) or _is_token_ids(items):
            return "embeddings" if "instructions" not in body else "responses"
        if isinstance(items, list) and all(isinstance(i, str) or _is_token_ids(i) for i in items):
            return "embeddings"
        return "responses"
    return "chat"


def estimate_input_tokens(
    body: Mapping[str, Any],
    *,
    mode: EstimateMode = "ratio",
    endpoint: EndpointKind | None = None,
    image_tokens: int = DEFAULT_IMAGE_TOKENS,
    file_tokens: int = DEFAULT_FILE_TOKENS,
) -> int:
    """An upper bound of the input tokens of a request, from its JSON body.

    What counts, by endpoint:

    * ``chat``: ``messages`` (string or list-of-parts content, names, tool calls and
      their arguments, tool results), ``tools`` / ``functions`` definitions (plus
      :data:`OPENAI_TOOLS_OVERHEAD_TOKENS`), ``response_format`` (its JSON schema),
      ``tool_choice``, ``prediction``;
    * ``responses``: ``instructions``, ``input`` (a string or a list of items),
      ``tools``, ``text`` (its format schema), ``tool_choice``;
    * ``embeddings``: ``input`` (a string, a list of strings, a list of token ids or a
      list of lists of token ids: token ids are counted exactly);
    * ``anthropic_messages``: ``system`` (string or blocks), ``messages`` (every content
      block: text, tool_use, tool_result, documents), ``tools`` (plus
      :data:`ANTHROPIC_TOOLS_OVERHEAD_TOKENS`, and
      :data:`ANTHROPIC_BUILTIN_TOOL_TOKENS` per built-in tool), ``tool_choice``;
    * ``completions``: ``prompt`` (string, list of strings, token ids) and ``suffix``.

    Text (values and keys alike) is bounded by :func:`text_token_bound`; each mapping
    or list entry adds one token for punctuation; each message / input item adds
    :data:`MESSAGE_OVERHEAD_TOKENS`; each request :data:`REQUEST_OVERHEAD_TOKENS`. An
    image part counts ``image_tokens`` whatever its size or detail (its data is not
    text); a file or document passed by reference counts ``file_tokens``; inline file
    or audio data is counted as text (a large over-estimate). Server-side state the
    body only points to (``previous_response_id``, ``conversation``, stored prompts)
    is not counted.

    Args:
        body: the parsed JSON request body.
        mode: ``"ratio"`` (the default, see :func:`text_token_bound`) or ``"bytes"``
            (UTF-8 bytes plus overheads: a true bound for byte-level BPE text).
        endpoint: the request kind; inferred from the body's keys when ``None``.
        image_tokens: tokens per image part.
        file_tokens: tokens per file passed by reference.

    Returns:
        The input token bound.

    Raises:
        ValueError: unknown ``mode`` or ``endpoint``, or a negative allowance.
        TypeError: ``body`` is not a mapping.
    """
    check_bound_args(body, mode, image_tokens, file_tokens)
    kind = _infer_endpoint(body) if endpoint is None else endpoint
    return input_bound(body, kind, mode, image_tokens, file_tokens)


def check_bound_args(body: object, mode: object, image_tokens: int, file_tokens: int) -> None:
    """Refuse what :func:`estimate_input_tokens` cannot bound.

    Raises:
        TypeError: ``body`` is not a mapping.
        ValueError: unknown ``mode``, or a negative allowance.
    """
    if type(body) is not dict and not isinstance(body, Mapping):
        raise TypeError(f"body must be a mapping, not {type(body).__name__}")
    if mode not in ("ratio", "bytes"):
        raise ValueError(f"mode must be 'ratio' or 'bytes', not {mode!r}")
    if image_tokens < 0 or file_tokens < 0:
        raise ValueError("image_tokens and file_tokens must be >= 0")


def input_bound(
    body: Mapping[str, Any],
    endpoint: EndpointKind,
    mode: EstimateMode,
    image_tokens: int,
    file_tokens: int,
) -> int:
    """:func:`estimate_input_tokens` of arguments already checked (the per-call path).

    Raises:
        ValueError: unknown ``endpoint``.
    """
    tally, overhead = _walk_body(body, endpoint)
    per_item = 1 if endpoint in ("embeddings", "completions") else MESSAGE_OVERHEAD_TOKENS
    return (
        text_token_bound("\n".join(tally.text), mode)
        + tally.exact
        + tally.items * per_item
        + tally.images * image_tokens
        + tally.files * file_tokens
        + overhead
    )


_OUTPUT_CAPS: tuple[tuple[str, int], ...] = (
    ("gpt-3.5-turbo", 4_096),
    ("gpt-4", 8_192),
    ("gpt-4-turbo", 4_096),
    ("gpt-4o", 16_384),
    ("gpt-4o-mini", 16_384),
    ("chatgpt-4o", 16_384),
    ("gpt-4.1", 32_768),
    ("gpt-4.5", 16_384),
    ("gpt-5", 128_000),
    ("gpt-6", 128_000),
    ("o1", 100_000),
    ("o1-mini", 65_536),
    ("o1-preview", 32_768),
    ("o3", 100_000),
    ("o4", 100_000),
    ("claude-2", 4_096),
    ("claude-instant", 4_096),
    ("claude-3-haiku", 4_096),
    ("claude-3-opus", 4_096),
    ("claude-3-sonnet", 4_096),
    ("claude-3-5", 8_192),
    ("claude-3-7", 128_000),
    ("claude-sonnet-4", 64_000),
    ("claude-opus-4", 32_000),
    ("claude-opus-4-5", 64_000),
    ("claude-haiku-4", 64_000),
    ("claude-opus-4-6", 128_000),
    ("claude", 128_000),
)
"""Longest output (completion) each model family can produce, by name prefix (the
longest matching prefix wins). Families whose limit grew over versions use the largest
(``claude-3-7`` allows 128k output with Anthropic's output-128k beta header)."""


def model_output_cap(model: str, default: int = DEFAULT_MAX_OUTPUT_TOKENS) -> int:
    """The known output cap of ``model`` (longest name-prefix match), else ``default``.

    A provider prefix (``openai/``) is ignored and names compare case-insensitively.
    """
    cap = _family_output_cap(model)
    return default if cap is None else cap


@functools.lru_cache(maxsize=1024)
def _family_output_cap(model: str) -> int | None:
    """The cap of the longest :data:`_OUTPUT_CAPS` prefix of ``model`` (memoised: hot path)."""
    name = model.rsplit("/", 1)[-1].lower()
    best, best_len = None, -1
    for prefix, cap in _OUTPUT_CAPS:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = cap, len(prefix)
    return best


_CAP_FIELDS: dict[EndpointKind, tuple[str, ...]] = {
    "chat": ("max_completion_tokens", "max_tokens"),
    "responses": ("max_output_tokens",),
    "anthropic_messages": ("max_tokens",),
    "completions": ("max_tokens",),
    "embeddings": (),
}

OUTPUT_CAP_FIELDS: Mapping[EndpointKind, tuple[str, ...]] = MappingProxyType(_CAP_FIELDS)
"""The body fields that cap a request's output (per choice), first one set wins."""


def count_param(body: Mapping[str, Any], name: str) -> int | None:
    """``body[name]`` when it is a non-negative ``int`` (a ``bool`` is not), else ``None``."""
    value = body.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def request_output_cap(endpoint: EndpointKind, body: Mapping[str, Any]) -> int | None:
    """The output cap a request sets itself (per choice), from :data:`OUTPUT_CAP_FIELDS`.

    Returns:
        The first of the endpoint's cap fields that holds a non-negative integer, else
        ``None`` (embeddings have none).
    """
    for name in _CAP_FIELDS.get(endpoint, ()):
        value = body.get(name)
        if type(value) is int:
            if value >= 0:
                return value
        elif value is not None:
            cap = count_param(body, name)  # another int type (bool is refused)
            if cap is not None:
                return cap
    return None


def max_output_tokens(
    body: Mapping[str, Any],
    *,
    endpoint: EndpointKind,
    model: str,
    default: int = DEFAULT_MAX_OUTPUT_TOKENS,
) -> int:
    """An upper bound of the output tokens of a request.

    The request's cap is ``max_completion_tokens`` (then ``max_tokens``) for chat,
    ``max_output_tokens`` for Responses, ``max_tokens`` for Anthropic and legacy
    completions (:func:`request_output_cap`). Without one, the model's known cap
    (:func:`model_output_cap`), else ``default``; legacy completions too (OpenAI
    defaults to 16 there, compatible servers differ). Chat multiplies by ``n``; legacy
    completions by ``max(n, best_of)`` (every candidate is billed). Embeddings have no
    output. A value that is not a non-negative
    integer is ignored (the provider refuses such a request anyway).

    Args:
        body: the parsed JSON request body.
        endpoint: the request kind.
        model: the model name (for its cap).
        default: the cap of a model not in the table.

    Raises:
        ValueError: unknown ``endpoint`` or a negative ``default``.
    """
    if endpoint not in ENDPOINTS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINTS)}; got {endpoint!r}")
    if default < 0:
        raise ValueError("default must be >= 0")
    if endpoint == "embeddings":
        return 0
    return output_bound(body, endpoint, model, default, request_output_cap(endpoint, body))


def output_bound(
    body: Mapping[str, Any],
    endpoint: EndpointKind,
    model: str,
    default: int,
    cap: int | None,
) -> int:
    """:func:`max_output_tokens` of checked arguments, given the request's own ``cap``.

    ``cap`` is :func:`request_output_cap` of ``body`` (read once per call, by
    :meth:`~payi_guard.meter.parse.RequestInfo.parse`).
    """
    if endpoint == "embeddings":
        return 0
    if cap is None:
        cap = model_output_cap(model, default)
    choices = 1
    if endpoint in ("chat", "completions"):
        choices = max(1, count_param(body, "n") or 1)
        if endpoint == "completions":
            choices = max(choices, count_param(body, "best_of") or 1)
    return cap * choices
