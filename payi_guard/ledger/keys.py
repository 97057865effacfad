"""The storage key of a counter: built and parsed here, and nowhere else.

A counter key is::

    {prefix}:{<kind>:<owner>}:{unit}:{per}:{window_start}

for example ``pg:{u:acme:alice}:usd:day:1795737600``:

* ``prefix`` is the guard's ``key_prefix`` (several apps can share one Redis);
* ``{<kind>:<owner>}`` is the owner's **hash tag**: Redis Cluster puts every counter of
  one owner in one slot, so a reserve over them is one atomic script. ``kind`` is one
  letter per scope (:data:`SCOPE_KINDS`): ``u`` a user, ``o`` an org, ``g`` global (owner
  ``*``), ``a`` an anonymous bucket, ``l`` a limit id;
* ``unit`` is ``usd``, ``requests`` or ``tokens``, ``per`` the calendar period, and
  ``window_start`` the window's first instant in epoch seconds: every window has a
  counter of its own, and an old one simply expires.

Every limit of one owner with the same unit and period shares one counter.

An owner's adjustments journal (an operator's ``adjust`` and ``reset``) is
``{prefix}:{<kind>:<owner>}:adjustments`` (:func:`journal_key`): the same hash tag as the
owner's counters, so one atomic step covers both; :func:`parse_key` never takes it for a
counter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import get_args

from payi_guard.ledger._glob import escape
from payi_guard.usage import Scope, Unit
from payi_guard.windows import PERIODS, Period

__all__ = [
    "SCOPE_KINDS",
    "CounterKey",
    "check_prefix",
    "counter_key",
    "hash_tag",
    "journal_key",
    "owner_tag",
    "owners_glob",
    "parse_key",
]

SCOPE_KINDS: Mapping[Scope, str] = MappingProxyType(
    {"user": "u", "org": "o", "global": "g", "anonymous": "a", "limit_id": "l"}
)
"""The letter that stands for each scope in a hash tag."""

_SCOPE_OF_KIND: Mapping[str, Scope] = MappingProxyType(
    {kind: scope for scope, kind in SCOPE_KINDS.items()}
)
_UNIT_OF: Mapping[str, Unit] = MappingProxyType({unit: unit for unit in get_args(Unit)})
_PERIOD_OF: Mapping[str, Period] = MappingProxyType({per: per for per in PERIODS})


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can start a key: non-empty, no braces, no whitespace.

    Raises:
        ValueError: it cannot.
    """
    if not prefix or any(c in prefix for c in "{} \n"):
        raise ValueError("key_prefix must be non-empty without braces or whitespace")
    return prefix


def owner_tag(scope: Scope, owner: str) -> str:
    """The hash tag's content for ``owner`` in ``scope`` (``u:acme:alice``, ``g:*``)."""
    return f"{SCOPE_KINDS[scope]}:{owner}"


def counter_key(
    prefix: str, scope: Scope, owner: str, unit: Unit, per: Period, window_start: int
) -> str:
    """The key of one owner's counter of ``unit`` in the window starting at ``window_start``.

    Args:
        prefix: the key prefix (see :func:`check_prefix`).
        scope: the owner's scope.
        owner: the user, org, anonymous bucket or limit id (``*`` for global).
        unit: what the counter counts.
        per: the calendar period of the window.
        window_start: the window's first instant, epoch seconds.
    """
    return f"{prefix}:{{{owner_tag(scope, owner)}}}:{unit}:{per}:{window_start}"


def journal_key(prefix: str, scope: Scope, owner: str) -> str:
    """The key of the adjustments journal of ``owner`` in ``scope``.

    Args:
        prefix: the key prefix (see :func:`check_prefix`).
        scope: the owner's scope.
        owner: the user, org, anonymous bucket or limit id.
    """
    return f"{prefix}:{{{owner_tag(scope, owner)}}}:adjustments"


def hash_tag(key: str) -> str:
    """The content of a key's hash tag: between its first ``{`` and the next ``}``.

    Raises:
        ValueError: the key has no hash tag.
    """
    start = key.index("{") + 1
    return key[start : key.index("}", start)]


@dataclass(frozen=True, slots=True)
class CounterKey:
    """A counter key, parsed (see :func:`parse_key`); ``str()`` builds it back.

    Attributes:
        prefix: the key prefix.
        scope: the owner's scope.
        owner: the owner, exactly as written in the key (not validated as a user id).
        unit: what the counter counts.
        per: the calendar period.
        window_start: the window's first instant, epoch seconds.
    """

    prefix: str
    scope: Scope
    owner: str
    unit: Unit
    per: Period
    window_start: int

    def __str__(self) -> str:
        return counter_key(
            self.prefix, self.scope, self.owner, self.unit, self.per, self.window_start
        )


def parse_key(prefix: str, key: str) -> CounterKey | None:
    """Parse a counter key built with ``prefix``; anything else gives ``None``.

    ``None`` for keys of another prefix (``pgx:`` is not ``pg:``), an unknown scope
    letter, an empty owner, or any part missing or malformed (the Redis ledger's
    reservation index ``<key>:x`` included). The owner is returned as written: a caller
    that needs a user id validates it.

    Args:
        prefix: the key prefix the key was built with.
        key: a storage key.
    """
    head = prefix + ":{"
    if not key.startswith(head):
        return None
    end = key.find("}", len(head))
    if end < 0:
        return None
    kind, sep, owner = key[len(head) : end].partition(":")
    scope = _SCOPE_OF_KIND.get(kind)
    if not sep or scope is None or not owner:
        return None
    tail = key[end + 1 :].split(":")
    if len(tail) != 4 or tail[0]:
        return None
    unit, per = _UNIT_OF.get(tail[1]), _PERIOD_OF.get(tail[2])
    start = tail[3]
    if unit is None or per is None:
        return None
    try:
        window_start = int(start)
    except ValueError:
        return None
    if str(window_start) != start:  # one spelling per window: no "+5", "05" or "5_0"
        return None
    return CounterKey(prefix, scope, owner, unit, per, window_start)


def owners_glob(prefix: str, scopes: Iterable[Scope]) -> str:
    """A storage glob (for a ledger's ``scan``) matching every counter of these scopes.

    ``owners_glob("pg", ["user", "anonymous"])`` is ``pg:{[ua]:*``; the prefix is
    escaped, so a prefix holding glob characters matches only itself.

    Raises:
        ValueError: no scope given.
    """
    kinds = "".join(SCOPE_KINDS[scope] for scope in scopes)
    if not kinds:
        raise ValueError("owners_glob() needs at least one scope")
    pattern = kinds if len(kinds) == 1 else f"[{kinds}]"
    return f"{escape(prefix)}:{{{pattern}:*"
