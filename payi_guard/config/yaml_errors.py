"""PyYAML's syntax errors, said in plain words and pinned to the line to fix.

PyYAML reports where its parser gave up, in the parser's own terms ("expected <block
end>, but found '<block mapping start>'"). That is often one line after the mistake: an
unclosed ``[`` is noticed at the next key, a missing ``:`` at the next line, a key
without a space after its colon at the line after it. :func:`syntax_error` reads the
tokens PyYAML scanned before it failed (the unclosed brackets, the value that ran on)
and names the line where the fix goes, with what to do there.
"""

from __future__ import annotations

from dataclasses import dataclass

import yaml

from payi_guard.exceptions import ConfigError

__all__ = ["syntax_error"]

_SHOWN = 40  # characters of a line quoted in a message


@dataclass(frozen=True, slots=True)
class _Scan:
    """What the scanner read before the error."""

    open_brackets: tuple[yaml.Token, ...]
    last_scalar: yaml.ScalarToken | None


def _scan(text: str, mark: yaml.Mark) -> _Scan:
    """Scan ``text`` up to ``mark``, noting the brackets still open and the last value."""
    stack: list[yaml.Token] = []
    last: yaml.ScalarToken | None = None
    try:
        for token in yaml.scan(text, Loader=yaml.SafeLoader):
            if token.start_mark.index >= mark.index:
                break
            if isinstance(token, (yaml.FlowSequenceStartToken, yaml.FlowMappingStartToken)):
                stack.append(token)
            elif isinstance(token, (yaml.FlowSequenceEndToken, yaml.FlowMappingEndToken)):
                if stack:
                    stack.pop()
            elif isinstance(token, yaml.ScalarToken):
                last = token
    except yaml.YAMLError:
        pass
    return _Scan(tuple(stack), last)


class _Lines:
    """The document's lines, 0-based, with the helpers the messages need."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def text(self, index: int) -> str:
        return self.lines[index] if 0 <= index < len(self.lines) else ""

    def indent(self, index: int) -> int:
        line = self.text(index)
        return len(line) - len(line.lstrip(" "))

    def content(self, index: int) -> bool:
        stripped = self.text(index).strip()
        return bool(stripped) and not stripped.startswith("#")

    def previous_content(self, index: int) -> int | None:
        """The last line before ``index`` that holds more than a comment."""
        for candidate in range(min(index, len(self.lines)) - 1, -1, -1):
            if self.content(candidate):
                return candidate
        return None

    def shown(self, index: int, column: int = 0) -> str:
        """Line ``index`` from ``column``, stripped and cut for a message."""
        part = self.text(index)[column:].strip()
        return part if len(part) <= _SHOWN else part[: _SHOWN - 1] + "…"


def _spaces(count: int) -> str:
    return "1 space" if count == 1 else f"{count} spaces"


def _closer(opener: yaml.Token) -> tuple[str, str, str]:
    if isinstance(opener, yaml.FlowSequenceStartToken):
        return "[", "]", "list"
    return "{", "}", "mapping"


def _unclosed(
    opener: yaml.Token, problem_line: int, lines: _Lines, *, at_end: bool
) -> tuple[int, str]:
    """An unclosed bracket: the fix goes after the last value before the error."""
    left, right, kind = _closer(opener)
    start = opener.start_mark
    last = lines.previous_content(problem_line + (1 if at_end else 0))
    line = start.line if last is None or last < start.line else last
    where = f"the '{left}' opened on line {start.line + 1} (column {start.column + 1})"
    if at_end:
        return line, f"{where} is never closed: end the {kind} with '{right}'"
    return line, (
        f"{where} is not closed before line {problem_line + 1}: "
        f"end the {kind} with '{right}' after its last entry"
    )


def _flow(
    exc: yaml.MarkedYAMLError, scan: _Scan, lines: _Lines, mark: yaml.Mark
) -> tuple[int, str] | None:
    """Errors inside ``[...]`` and ``{...}``."""
    problem = exc.problem or ""
    if "expected the node content, but found ','" in problem:
        return mark.line, f"an empty entry: remove the extra ',' at column {mark.column + 1}"
    if "expected the node content" in problem and "<stream end>" not in problem:
        char = lines.text(mark.line)[mark.column : mark.column + 1]
        return mark.line, (
            f"a value is missing before {char!r} at column {mark.column + 1}: write the "
            "value, or quote it if it is text"
        )
    if not scan.open_brackets:
        return None
    opener = scan.open_brackets[-1]
    if "<stream end>" in problem or "end of stream" in problem:
        return _unclosed(opener, mark.line, lines, at_end=True)
    if problem.startswith("expected ',' or"):
        left, _, kind = _closer(opener)
        last = lines.previous_content(mark.line)
        same_line = opener.start_mark.line == mark.line or (
            last is not None and last < opener.start_mark.line
        )
        if same_line or lines.indent(mark.line) > lines.indent(opener.start_mark.line):
            return _missing_comma(scan, mark, left, kind, opener)
        return _unclosed(opener, mark.line, lines, at_end=False)
    return None


def _missing_comma(
    scan: _Scan, mark: yaml.Mark, left: str, kind: str, opener: yaml.Token
) -> tuple[int, str]:
    """Two entries without a comma read as one value (``max: 1 per: day``)."""
    line, where = mark.line, f"column {mark.column + 1}"
    value = scan.last_scalar
    if value is not None and value.end_mark.line == mark.line and " " in value.value:
        word = value.value.rsplit(" ", 1)[1]
        line = value.end_mark.line
        where = f"{word!r} (column {value.end_mark.column - len(word) + 1})"
    return line, (
        f"a ',' is missing before {where}: separate the entries of the {kind} that "
        f"starts with '{left}' on line {opener.start_mark.line + 1} with commas"
    )


def _block_end(exc: yaml.MarkedYAMLError, lines: _Lines, mark: yaml.Mark) -> tuple[int, str] | None:
    """``expected <block end>``: a line that does not fit the block around it."""
    context = exc.context or ""
    problem = exc.problem or ""
    start = exc.context_mark
    if start is None:
        return None
    kind, items = ("list", "items") if "collection" in context else ("mapping", "keys")
    column, expected = lines.indent(mark.line), start.column
    if "found '-'" in problem and kind == "mapping":
        return mark.line, (
            f"a list item ('- ') where the mapping from line {start.line + 1} expects "
            "'key: value' lines: put the list under a key that ends with ':'"
        )
    if "found '?'" in problem and kind == "list":
        return mark.line, (
            f"a 'key: value' line where the list from line {start.line + 1} expects "
            "'- ' items: start it with '- ', or indent it under an item"
        )
    if mark.column != column:
        return mark.line, (
            f"unexpected text at column {mark.column + 1} after a complete value: "
            "quote the whole value if it is one"
        )
    message = (
        f"bad indentation: this line is indented {_spaces(column)}, but the {kind} it "
        f"belongs to (from line {start.line + 1}) has its {items} at {expected}"
    )
    above = lines.previous_content(mark.line)
    if above is not None and lines.indent(above) not in (column, expected):
        message += f", and the line above is indented {lines.indent(above)}"
    return mark.line, message + f": indent it like the {items} it belongs with"


def _colon(scan: _Scan, lines: _Lines, mark: yaml.Mark) -> tuple[int, str]:
    """``mapping values are not allowed here``: a ':' that YAML reads inside a value."""
    value = scan.last_scalar
    start = value.start_mark.line if value is not None else mark.line
    if start < mark.line:
        if lines.indent(mark.line) > lines.indent(start):
            return mark.line, (
                f"this line is indented deeper than line {start + 1}, so YAML reads it as "
                f"more of line {start + 1}'s value: indent it like line {start + 1}, or end "
                f"line {start + 1} with ':' to nest it"
            )
        head = lines.text(start).strip()
        word = head.split(" ", 1)[0]
        if ":" in word.rstrip(":"):
            key, _, rest = word.partition(":")
            return start, (
                f"no space after ':' in {word!r}: write '{key}: {rest}' (YAML reads "
                f"'{word}' as text, not as a key)"
            )
        return start, (
            f"the value on line {start + 1} runs on to line {mark.line + 1}, where ': ' "
            "cannot follow it: quote the value, or check the indentation"
        )
    return mark.line, (
        f"a ':' that YAML cannot place (column {mark.column + 1}): write a space after a "
        "key's ':' (daily: {max: 1}), and quote a value that holds ': '"
    )


def _explain(exc: yaml.MarkedYAMLError, text: str, mark: yaml.Mark) -> tuple[int, str] | None:
    problem = exc.problem or ""
    context = exc.context or ""
    lines = _Lines(text)
    start = exc.context_mark
    if "'\\t'" in problem:
        return mark.line, "a tab character where YAML expects spaces: indent with spaces, not tabs"
    if isinstance(exc, yaml.composer.ComposerError) and "another document" in problem:
        return mark.line, (
            "only one YAML document is allowed: remove the second '---' and what follows"
        )
    if "expected '<document start>'" in problem:
        return mark.line, ("only one YAML document is allowed: remove the '...' and what follows")
    if "quoted scalar" in context and "end of stream" in problem and start is not None:
        quote = lines.text(start.line)[start.column : start.column + 1] or '"'
        return start.line, (
            f"the quote ({quote}) opened at column {start.column + 1} is never closed: "
            "end the value with the same quote"
        )
    if "found undefined alias" in problem:
        name = problem.rsplit(" ", 1)[-1].strip("'")
        return mark.line, (f"'*{name}' refers to an anchor '&{name}' that is not defined before it")
    if "cannot start any token" in problem:
        char = lines.text(mark.line)[mark.column : mark.column + 1]
        return mark.line, (
            f"a plain value cannot start with {char!r} (column {mark.column + 1}): quote the value"
        )
    if "unknown escape character" in problem:
        return mark.line, (
            f"an unknown escape (column {mark.column + 1}) inside a double-quoted value: "
            "use single quotes, or write a backslash as '\\\\'"
        )
    if "while scanning an anchor" in context or "while scanning an alias" in context:
        sign = "&" if "anchor" in context else "*"
        return mark.line, (
            f"'{sign}' must be followed by a name (an anchor or an alias), at column "
            f"{mark.column + 1}: quote the value if it is text"
        )
    if "block scalar" in context or "expected a comment or a line break" in problem:
        return mark.line, (
            f"unexpected text at column {mark.column + 1} after '|' or '>' (which start a "
            "block of text): quote the value, or start the text on the next line"
        )
    if "sequence entries are not allowed here" in problem:
        return mark.line, (
            f"a '- ' list item at column {mark.column + 1} where a value is expected: put "
            "the list on the next lines, indented under its key"
        )
    scan = _scan(text, mark)
    if "flow" in context or "<stream end>" in problem:
        flow = _flow(exc, scan, lines, mark)
        if flow is not None:
            return flow
    if "simple key" in context and "expected ':'" in problem and start is not None:
        key = lines.shown(start.line, start.column)
        return start.line, (
            f"{key!r} is not followed by ':': a key needs a colon ({key}:), "
            f"a list item a dash (- {key})"
        )
    if problem.startswith("expected <block end>"):
        return _block_end(exc, lines, mark)
    if problem == "mapping values are not allowed here":
        return _colon(scan, lines, mark)
    return None


_PLAIN_WORDS = (
    ("<block mapping start>", "an indented key"),
    ("<block sequence start>", "an indented list"),
    ("<block end>", "the end of the block"),
    ("<flow mapping start>", "'{'"),
    ("<flow sequence start>", "'['"),
    ("<scalar>", "a value"),
    ("<stream end>", "the end of the file"),
    ("<document start>", "'---'"),
    ("'?'", "a key"),
)


def syntax_error(exc: yaml.YAMLError, text: str, source: str | None) -> ConfigError:
    """Turn a PyYAML error into a :class:`ConfigError` naming the line to fix.

    Args:
        exc: the error PyYAML raised while reading or composing ``text``.
        text: the whole document.
        source: the file name, for the message.

    Returns:
        The error: plain words, and the line where the mistake is (which is not always
        the line where PyYAML noticed it).
    """
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, max(exc.position, 0)) + 1
        if isinstance(exc.character, int):
            code = exc.character
        else:
            code = ord(exc.character) if exc.character else 0
        return ConfigError(
            f"invalid character U+{code:04X}: YAML does not allow control characters",
            file=source,
            line=line,
        )
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        explained = _explain(exc, text, mark)
        if explained is not None:
            line, message = explained
            return ConfigError(message, file=source, line=line + 1)
        problem = exc.problem or "invalid YAML"
        for raw, plain in _PLAIN_WORDS:
            problem = problem.replace(raw, plain)
        message = f"invalid YAML at column {mark.column + 1}: {problem}"
        return ConfigError(message, file=source, line=mark.line + 1)
    return ConfigError(f"invalid YAML: {exc}", file=source)
