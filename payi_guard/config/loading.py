"""Budgets files read from disk.

The size and encoding are checked before parsing, and what the file names relative to
itself (a ``sqlite:///`` ledger) is resolved against its own folder.
"""

from __future__ import annotations

import dataclasses
import os
from urllib.parse import quote

from payi_guard.config.model import GuardConfig
from payi_guard.config.parser import parse_config
from payi_guard.config.yaml_tree import MAX_DOCUMENT_BYTES, too_large
from payi_guard.exceptions import ConfigError

__all__ = ["check_file", "load_config"]


def load_config(path: str | os.PathLike[str]) -> GuardConfig:
    """Load and validate a YAML budgets file.

    Args:
        path: the file to read (UTF-8).

    Returns:
        The frozen, validated :class:`GuardConfig`, with ``source`` set to ``path``.

    Raises:
        ConfigError: naming the file, line, key and what is wrong; also when the file
            is missing, unreadable or not UTF-8 text.
    """
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            # Checked before reading: a huge file is refused without being loaded.
            too_big = too_large(os.fstat(handle.fileno()).st_size, "file", name)
            if too_big is not None:
                raise too_big
            raw = handle.read(MAX_DOCUMENT_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("no such file", file=name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a budgets file", file=name) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", file=name) from None
    # A file that grew, or a pipe: what was read is checked too.
    too_big = too_large(len(raw), "file", name)
    if too_big is not None:
        raise too_big
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError("the file is not UTF-8 text", file=name, line=line) from None
    return _with_local_store(parse_config(text, source=name), name)


def _with_local_store(config: GuardConfig, name: str) -> GuardConfig:
    """Resolve a relative ``sqlite:///file.db`` against the budgets file's own folder.

    The app, ``payi-guard usage`` and a reload then all open the same file, wherever
    each is started from.
    """
    head = "sqlite:///"
    uri = config.storage
    if not uri.startswith(head) or uri.startswith(head + "/"):
        return config
    folder = quote(os.path.dirname(os.path.abspath(name)))
    return dataclasses.replace(config, storage=f"{head}{folder}/{uri[len(head) :]}")


def check_file(path: str | os.PathLike[str]) -> GuardConfig:
    """Validate a budgets file for ``payi-guard check``; same as :func:`load_config`.

    Args:
        path: the file to check.

    Returns:
        The validated :class:`GuardConfig` (see :func:`describe` for a summary).

    Raises:
        ConfigError: see :func:`load_config`.
    """
    return load_config(path)
