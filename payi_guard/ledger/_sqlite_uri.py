"""``sqlite://`` storage URIs: the file they name and the options they set.

``sqlite:///budgets.db`` is relative to a base folder (the budgets file's, when the URI
comes from one), ``sqlite:////var/lib/app/budgets.db`` is absolute; the path is
percent-decoded, and ``timeout``, ``lock_timeout`` and ``synchronous`` may be given as
query options.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote

from payi_guard.exceptions import ConfigError

__all__ = ["check_options", "parse_sqlite_uri", "positive_number", "resolve_sqlite_uri"]

_SCHEME = "sqlite"
_SYNCHRONOUS = ("normal", "full")
_URI_OPTIONS = ("timeout", "lock_timeout", "synchronous")
_FORMS = "sqlite:///relative/file.db or sqlite:////absolute/file.db"


def _split(uri: str) -> tuple[str, str]:
    """The percent-decoded path and the query of a ``sqlite://`` URI."""
    if not isinstance(uri, str):
        raise ConfigError(f"storage must be a URI string, got {type(uri).__name__}")
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme.lower() != _SCHEME:
        raise ConfigError(f"not a sqlite:// URI; write {_FORMS}")
    rest, _, query = rest.partition("?")
    if not rest.startswith("/"):
        raise ConfigError(
            f"sqlite:// takes a file path, not a host: write {_FORMS} (three slashes, "
            "then the path; a relative path is relative to the budgets file's folder)"
        )
    path = unquote(rest[1:])
    if not path:
        raise ConfigError(f"sqlite:/// needs a file name: write {_FORMS}")
    if "\x00" in path:
        raise ConfigError("the sqlite:// path contains a NUL character")
    if path == ":memory:" or path.startswith("file:"):
        raise ConfigError(
            "sqlite:// needs a file that the worker processes share; for a store in one "
            "process write memory://"
        )
    if path.endswith(("/", os.sep)):
        raise ConfigError(f"sqlite:// path {path!r} names a folder, not a file")
    return path, query


def positive_number(name: str, value: Any) -> float:
    try:
        number = float(value)
    except OverflowError:  # an int past a float's range: not a positive finite number
        number = math.inf
    except (TypeError, ValueError):
        raise ConfigError(f"sqlite:// option {name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise ConfigError(f"sqlite:// option {name} must be a positive number, got {value!r}")
    return number


def check_options(given: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``timeout``, ``lock_timeout`` and ``synchronous`` (strings or numbers)."""
    out: dict[str, Any] = {}
    for name, value in given.items():
        if name in ("timeout", "lock_timeout"):
            out[name] = positive_number(name, value)
        elif name == "synchronous":
            text = str(value).lower()
            if text not in _SYNCHRONOUS:
                raise ConfigError(
                    f"sqlite:// option synchronous must be normal or full, got {value!r}"
                )
            out[name] = text
        else:
            out[name] = value
    return out


def parse_sqlite_uri(
    uri: str, *, base_dir: str | os.PathLike[str] | None = None
) -> tuple[Path, dict[str, Any]]:
    """Parse a ``sqlite://`` storage URI.

    Args:
        uri: ``sqlite:///relative.db`` or ``sqlite:////absolute.db``, optionally with
            ``?timeout=SECONDS&lock_timeout=SECONDS&synchronous=normal|full``.
        base_dir: the folder a relative path is relative to (the budgets file's
            folder); the current directory when omitted.

    Returns:
        The absolute file path and the options given in the query.

    Raises:
        ConfigError: the URI is not a valid ``sqlite://`` URI or an option is wrong.
    """
    path_text, query = _split(uri)
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name not in _URI_OPTIONS:
            raise ConfigError(
                f"sqlite:// does not accept the option {name!r} "
                f"(accepted: {', '.join(_URI_OPTIONS)})"
            )
        options[name] = value
    path = Path(path_text)
    if not path.is_absolute():
        path = Path(base_dir if base_dir is not None else os.getcwd()) / path
    return Path(os.path.abspath(path)), check_options(options)


def resolve_sqlite_uri(uri: str, *, base_dir: str | os.PathLike[str]) -> str:
    """Return ``uri`` with a relative path made absolute against ``base_dir``.

    Args:
        uri: a ``sqlite://`` URI.
        base_dir: the folder of the budgets file the URI was read from.

    Returns:
        An equivalent ``sqlite:///`` URI naming an absolute path (query kept).

    Raises:
        ConfigError: the URI is not a valid ``sqlite://`` URI.
    """
    path, _ = parse_sqlite_uri(uri, base_dir=base_dir)
    _, _, query = uri.partition("?")
    text = quote(path.as_posix(), safe="/:")
    return f"sqlite:///{text}" + (f"?{query}" if query else "")
