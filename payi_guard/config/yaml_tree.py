"""A small, line-aware document tree for the budgets file.

YAML text is composed with PyYAML's ``SafeLoader`` (never a loader that builds arbitrary
objects) and turned into :class:`Scalar`, :class:`Map` and :class:`Seq` nodes that each
remember the 1-based line they start on, so every validation error can name its line.
Plain Python data (a config dict) becomes the same tree without lines, so one validator
serves both.

The conversion also rejects what PyYAML lets through silently: duplicate keys in a
mapping (PyYAML keeps the last one), documents that expand to huge trees through aliases,
and recursive aliases. Documents larger than :data:`MAX_DOCUMENT_BYTES` or nested deeper
than :data:`MAX_DEPTH` are refused before they can exhaust time, memory or the stack.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import TypeAlias

import yaml

from payi_guard.config.yaml_errors import syntax_error
from payi_guard.exceptions import ConfigError

__all__ = [
    "MAX_DEPTH",
    "MAX_DOCUMENT_BYTES",
    "Entry",
    "Map",
    "Node",
    "Scalar",
    "Seq",
    "child_path",
    "from_python",
    "from_yaml",
    "item_path",
    "too_large",
]

ALIAS_EXPANSION = 100_000
"""Values a YAML document may expand to beyond its own length (through aliases).

An alias-free document can never hold more values than characters, so a budget of
``len(text) + ALIAS_EXPANSION`` never refuses one, whatever its size, yet stops an
alias bomb (a few lines that expand exponentially) long before it exhausts memory.
"""

MAX_DEPTH = 64
"""Deepest nesting accepted (a budgets file needs 4): stops recursive aliases and deeply
nested documents long before Python's recursion limit."""

MAX_DOCUMENT_BYTES = 1 << 20
"""The largest budgets document accepted, in UTF-8 bytes (1 MiB: tens of thousands of
``users:`` entries). PyYAML's pure-Python parser takes seconds per megabyte and many
times the text in memory, so a larger document is refused before it is parsed."""

_TAG = "tag:yaml.org,2002:"
# Scalars of these tags are built by SafeLoader's own constructors; every other scalar
# keeps its source text, and money is always read from that text, never from a float.
_CONSTRUCTED_TAGS = frozenset(_TAG + name for name in ("int", "float", "bool", "null"))
_TEXT_TAGS = frozenset(_TAG + name for name in ("str", "timestamp"))
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_:-]+\Z")
# The integers that read as they look: YAML 1.1 (PyYAML) also reads 0100 as octal 64
# and 1:30 as 90 (base 60); in a budgets file those are mistakes, refused. The 0x and
# 0b prefixes say what they are.
_PLAIN_INT = re.compile(r"[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)\Z")


@dataclass(frozen=True, slots=True)
class Scalar:
    """A single value.

    Attributes:
        value: the value: for YAML, what ``SafeLoader`` makes of an int, float, bool or
            null, and the source text for anything else; for Python data, the object.
        line: the 1-based line it starts on (``None`` for Python data).
        text: the source text of a YAML scalar (``None`` for Python data).
    """

    value: object
    line: int | None = None
    text: str | None = None

    def show(self) -> str:
        """Return the value as the user wrote it, for error messages."""
        if self.text is not None:
            return repr(self.text) if isinstance(self.value, str) else self.text
        return repr(self.value)


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``key: value`` pair of a :class:`Map`; ``line`` is the line of the key."""

    key: str
    value: Node
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Map:
    """A mapping, its entries in document order; keys are unique strings."""

    entries: tuple[Entry, ...]
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Seq:
    """A list."""

    items: tuple[Node, ...]
    line: int | None = None


Node: TypeAlias = "Scalar | Map | Seq"


def child_path(path: str, key: str) -> str:
    """Return the dotted path of ``key`` under ``path`` (``limits.daily``).

    Keys that would make the path ambiguous or unreadable (dots, spaces, control or
    non-ASCII characters) are quoted and escaped: ``users."john.doe"``.
    """
    segment = key if _PLAIN_KEY.match(key) else json.dumps(key)
    return f"{path}.{segment}" if path else segment


def item_path(path: str, index: int) -> str:
    """Return the path of list item ``index`` under ``path`` (``tiers.pro[1]``)."""
    return f"{path}[{index}]"


class _Counter:
    """Counts nodes across one conversion (aliases make a tree larger than its text)."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int) -> None:
        self.count = 0
        self.limit = limit

    def tick(self, line: int | None, path: str, source: str | None) -> None:
        self.count += 1
        if self.count > self.limit:
            raise ConfigError(
                f"the document expands to more than {self.limit} values through aliases",
                file=source,
                line=line,
                key=path or None,
            )


def too_large(size: int, what: str, source: str | None) -> ConfigError | None:
    """The error for a document of ``size`` bytes, or ``None`` when it is small enough.

    Args:
        size: the size in bytes.
        what: ``"file"`` or ``"document"``, for the message.
        source: the file name, for the message.
    """
    if size <= MAX_DOCUMENT_BYTES:
        return None
    return ConfigError(
        f"the {what} is {size:,} bytes; a budgets file may be at most "
        f"{MAX_DOCUMENT_BYTES:,} bytes ({MAX_DOCUMENT_BYTES >> 20} MiB)",
        file=source,
    )


class _TooDeep(Exception):
    """Raised by :class:`_Loader` when nesting goes past the limit."""

    def __init__(self, mark: yaml.Mark) -> None:
        super().__init__()
        self.mark = mark


class _Loader(yaml.SafeLoader):
    """``SafeLoader`` whose composer stops at :data:`MAX_DEPTH` levels.

    PyYAML composes a document recursively (a few Python frames per level), so a
    document nested a few hundred levels deep would raise ``RecursionError``.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        """Compose one node, counting how deep it is."""
        if self._depth > MAX_DEPTH:
            raise _TooDeep(self.peek_event().start_mark)  # type: ignore[no-untyped-call]
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def from_yaml(text: str, *, source: str | None = None) -> Node | None:
    """Compose YAML text into a tree of line-aware nodes.

    Args:
        text: the YAML document.
        source: the file name, for error messages.

    Returns:
        The root node, or ``None`` for a document with no content (empty or only
        comments).

    Raises:
        ConfigError: a syntax error, several documents, a duplicate key, an unsupported
            tag, or a document that expands to too many nodes; always with its line.
    """
    # A character takes at least one byte: only a long text needs encoding to be measured.
    if len(text) * 4 > MAX_DOCUMENT_BYTES:
        error = too_large(len(text.encode("utf-8", "surrogatepass")), "document", source)
        if error is not None:
            raise error
    try:
        # The reader checks every character up front, in the constructor.
        loader = _Loader(text)
    except yaml.YAMLError as exc:
        raise syntax_error(exc, text, source) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise syntax_error(exc, text, source) from None
        except _TooDeep as exc:
            raise ConfigError(
                f"nested deeper than {MAX_DEPTH} levels (a budgets file needs 4)",
                file=source,
                line=exc.mark.line + 1,
            ) from None
        if root is None:
            return None
        return _Converter(loader, source, len(text) + ALIAS_EXPANSION).convert(root, "", 0)
    finally:
        loader.dispose()


class _Converter:
    """Walks composed PyYAML nodes, checking keys, tags and size on the way."""

    def __init__(self, loader: yaml.SafeLoader, source: str | None, limit: int) -> None:
        self._loader = loader
        self._source = source
        self._counter = _Counter(limit)

    def _error(self, message: str, node: yaml.Node, path: str) -> ConfigError:
        return ConfigError(
            message, file=self._source, line=node.start_mark.line + 1, key=path or None
        )

    def convert(self, node: yaml.Node, path: str, depth: int) -> Node:
        line = node.start_mark.line + 1
        self._counter.tick(line, path, self._source)
        if depth > MAX_DEPTH:
            raise self._error(
                f"nested deeper than {MAX_DEPTH} levels (a recursive alias?)", node, path
            )
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if isinstance(node, yaml.SequenceNode):
            if node.tag != _TAG + "seq":
                raise self._error(f"unsupported YAML tag {node.tag!r}", node, path)
            items = tuple(
                self.convert(item, item_path(path, index), depth + 1)
                for index, item in enumerate(node.value)
            )
            return Seq(items, line)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        raise self._error("unsupported YAML node", node, path)  # pragma: no cover

    def _scalar(self, node: yaml.ScalarNode, path: str) -> Scalar:
        line = node.start_mark.line + 1
        text: str = node.value
        if node.tag in _TEXT_TAGS:
            return Scalar(text, line, text)
        if node.tag in _CONSTRUCTED_TAGS:
            try:
                value = self._loader.construct_object(node, deep=True)
            except (yaml.YAMLError, ValueError, OverflowError) as exc:
                kind = node.tag.rsplit(":", 1)[-1]
                raise self._error(f"invalid {kind}: {exc}", node, path) from None
            if node.tag == _TAG + "int" and not _PLAIN_INT.match(text):
                raise self._error(
                    f"YAML reads {text} as {value} (a leading 0 makes an octal number, "
                    "colons a base-60 one): write it in plain decimal",
                    node,
                    path,
                )
            return Scalar(value, line, text)
        raise self._error(f"unsupported YAML tag {node.tag!r}", node, path)

    def _key(self, node: yaml.Node, path: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self._error("a key must be a plain string, not a list or mapping", node, path)
        # Keys are names here (limits, tiers, user ids): keep the text as written, so
        # `no:` stays the user "no" and `007:` stays "007" instead of a bool or an int.
        key: str = node.value
        return key

    def _mapping(self, node: yaml.MappingNode, path: str, depth: int) -> Map:
        line = node.start_mark.line + 1
        if node.tag != _TAG + "map":
            raise self._error(f"unsupported YAML tag {node.tag!r}", node, path)
        entries: list[Entry] = []
        seen: dict[str, int] = {}
        merges: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _TAG + "merge":
                merges.append(value_node)
                continue
            key = self._key(key_node, path)
            key_line = key_node.start_mark.line + 1
            entry_path = child_path(path, key)
            if key in seen:
                raise ConfigError(
                    f"duplicate key {key!r} (first defined on line {seen[key]}); "
                    "YAML would silently keep only the last one",
                    file=self._source,
                    line=key_line,
                    key=entry_path,
                )
            seen[key] = key_line
            entries.append(Entry(key, self.convert(value_node, entry_path, depth + 1), key_line))
        # `<<: *base` (or `<<: [*a, *b]`): keys written here win, then earlier sources.
        for merge in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source_node in sources:
                if not isinstance(source_node, yaml.MappingNode):
                    raise self._error("'<<' merges only mappings", source_node, path)
                merged = self._mapping(source_node, path, depth + 1)
                for entry in merged.entries:
                    if entry.key not in seen:
                        seen[entry.key] = entry.line or line
                        entries.append(entry)
        return Map(tuple(entries), line)


_PY_SCALARS = (str, int, float, Decimal, Fraction, bool, type(None))


def from_python(data: object, *, path: str = "", source: str | None = None) -> Node:
    """Turn plain Python data (dicts, lists, scalars) into the same tree, without lines.

    Args:
        data: mappings with ``str`` (or ``int``) keys, lists or tuples, and scalars
            (``str``, ``int``, ``float``, ``Decimal``, ``Fraction``, ``bool``, ``None``).
        path: the path of ``data`` itself, for error messages.
        source: a name for the data, for error messages.

    Returns:
        The root node.

    Raises:
        ConfigError: a key that is not a string (or int), two keys that are equal as
            strings, a value of another type, or data nested too deeply.
    """
    return _from_python(data, path, source, 0)


def _from_python(data: object, path: str, source: str | None, depth: int) -> Node:
    if depth > MAX_DEPTH:
        raise ConfigError(
            f"nested deeper than {MAX_DEPTH} levels (a recursive structure?)",
            file=source,
            key=path or None,
        )
    if isinstance(data, Mapping):
        entries: list[Entry] = []
        seen: set[str] = set()
        for raw_key, value in data.items():
            if isinstance(raw_key, bool) or not isinstance(raw_key, (str, int)):
                raise ConfigError(
                    f"keys must be strings, not {type(raw_key).__name__}",
                    file=source,
                    key=path or None,
                )
            key = str(raw_key)
            entry_path = child_path(path, key)
            if key in seen:
                raise ConfigError(f"duplicate key {key!r}", file=source, key=entry_path)
            seen.add(key)
            entries.append(Entry(key, _from_python(value, entry_path, source, depth + 1)))
        return Map(tuple(entries))
    if isinstance(data, (list, tuple)):
        return Seq(
            tuple(
                _from_python(item, item_path(path, index), source, depth + 1)
                for index, item in enumerate(data)
            )
        )
    if isinstance(data, _PY_SCALARS):
        return Scalar(data)
    raise ConfigError(
        f"unsupported value of type {type(data).__name__}", file=source, key=path or None
    )
