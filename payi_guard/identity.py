"""User ids: validation, composite ``org:user`` ids and keyed pseudonymisation.

A user id is a short ASCII string of letters, digits, ``.``, ``-`` and ``_``; ``:``
separates the segments of a composite id (``acme:alice`` is user ``acme:alice`` in org
``acme``). Integers and UUIDs are converted to their string form. Anything else is refused
with :class:`~payi_guard.InvalidUserId`, whose message names the reason and never repeats
the refused value, so a hostile id can never reach a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from dataclasses import dataclass

from payi_guard.exceptions import InvalidUserId

__all__ = [
    "ANONYMOUS_USER",
    "DEFAULT_MAX_LENGTH",
    "MIN_DIGEST_CHARS",
    "PSEUDONYM_COLLISION_BOUND",
    "PSEUDONYM_SCALE",
    "Pseudonymizer",
    "UserRef",
    "is_anonymous_id",
    "normalize_user_id",
    "org_of",
    "parse_user_id",
]

ANONYMOUS_USER = "anonymous"
"""The user id that calls with no known user are charged to (``shared`` strategy)."""


def is_anonymous_id(user_id: str) -> bool:
    """True for ``anonymous`` and ``anonymous:<session>``: the anonymous bucket, never a user.

    An id means the same wherever it appears: a call whose attribution (or the
    middleware, or ``default_user_id``) names it, :meth:`~payi_guard.Guard.usage`,
    :meth:`~payi_guard.Guard.record` and the users page all read and charge the anonymous
    bucket with the ``anonymous`` limits, never a user of that name with ``default``.

    Args:
        user_id: a validated user id.
    """
    return user_id == ANONYMOUS_USER or user_id.startswith(ANONYMOUS_USER + ":")


DEFAULT_MAX_LENGTH = 128
"""Longest user id accepted unless a caller asks for another bound."""

PSEUDONYM_SCALE = 10**9
"""How many distinct user ids pseudonyms must keep apart (a billion)."""

PSEUDONYM_COLLISION_BOUND = 1e-6
"""The highest accepted chance that two of :data:`PSEUDONYM_SCALE` ids share a pseudonym."""


def _min_digest_chars() -> int:
    # Birthday bound: n distinct ids hashed to d hex characters share a digest with
    # probability at most n(n-1)/2 / 16**d.
    pairs = PSEUDONYM_SCALE * (PSEUDONYM_SCALE - 1) // 2
    chars = 1
    while pairs > PSEUDONYM_COLLISION_BOUND * 16**chars:
        chars += 1
    return chars


MIN_DIGEST_CHARS = _min_digest_chars()
"""The shortest digest (hex characters) :class:`Pseudonymizer` accepts: 20 (80 bits).

At 20 characters, a billion distinct ids share a pseudonym with probability at most
4.1e-7 (the birthday bound); at 8 characters (32 bits), 200,000 ids already share one
about 4.7 times.
"""

SEPARATOR = ":"
_SEGMENT_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789.-_")
_VALID = re.compile(r"[A-Za-z0-9._-]+(?::[A-Za-z0-9._-]+)*\Z")
_DOT_NAMES = frozenset((".", ".."))
"""Ids a URL cannot hold as a path segment (the users page links each user)."""
KNOWN_USER_IDS: dict[str, None] = {}
"""Valid ``str`` ids seen lately, each at most :data:`DEFAULT_MAX_LENGTH` long (internal).

A request names the same few users again and again, and a lookup costs a sixth of the
checks; an id found here is valid as it is. Bounded (cleared when full). Read only."""
_KNOWN_MAX = 4096


@dataclass(frozen=True, slots=True)
class UserRef:
    """A validated user id and the org it rolls up to.

    Attributes:
        user_id: the full, normalised id (``acme:alice``).
        org_id: the first segment of a composite id (``acme``), else ``None``.
    """

    user_id: str
    org_id: str | None


def _explain(text: str, max_length: int) -> str:
    """Say why ``text`` is not a valid id, without quoting it."""
    if not text:
        return "it is empty"
    if len(text) > max_length:
        return f"it is {len(text)} characters long, the maximum is {max_length}"
    for position, char in enumerate(text):
        if char in _SEGMENT_CHARS or char == SEPARATOR:
            continue
        code = f"U+{ord(char):04X}"
        if char.isspace():
            what = f"whitespace ({code})"
        elif ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            what = f"a control character ({code})"
        else:
            what = f"the character {code}"
        return (
            f"it contains {what} at position {position}; allowed are ASCII letters, digits, "
            f"'.', '-', '_' and ':' between non-empty segments"
        )
    return "a composite id needs non-empty segments around each ':' (like 'org:user')"


def normalize_user_id(value: object, *, max_length: int = DEFAULT_MAX_LENGTH) -> str:
    """Validate a user id and return its canonical string.

    Args:
        value: a ``str``, an ``int`` or a :class:`uuid.UUID`.
        max_length: the longest id accepted.

    Returns:
        The id as a string, unchanged when it was already a valid string.

    Raises:
        InvalidUserId: the value is of another type, empty, too long, contains a
            character outside the allowed alphabet, or has an empty composite segment.
    """
    if type(value) is str and value in KNOWN_USER_IDS and len(value) <= max_length:
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int, uuid.UUID)):
        raise InvalidUserId(f"a user id must be a str, int or UUID, not {type(value).__name__}")
    if isinstance(value, int) and value.bit_length() > 4 * max_length:
        # More digits than an id may have (and than str() converts): refused unread.
        raise InvalidUserId(f"it has more digits than the maximum of {max_length} characters")
    text = value if isinstance(value, str) else str(value)
    if len(text) > max_length or not _VALID.match(text):
        raise InvalidUserId(_explain(text, max_length))
    if text in _DOT_NAMES:
        raise InvalidUserId("'.' and '..' name folders in a web address, never a user")
    if type(value) is str and len(text) <= DEFAULT_MAX_LENGTH:
        if len(KNOWN_USER_IDS) >= _KNOWN_MAX:
            KNOWN_USER_IDS.clear()
        KNOWN_USER_IDS[value] = None
    return text


def org_of(user_id: str) -> str | None:
    """Return the org of a validated composite id (``acme`` for ``acme:alice``), else None."""
    org, sep, _ = user_id.partition(SEPARATOR)
    return org if sep else None


def parse_user_id(value: object, *, max_length: int = DEFAULT_MAX_LENGTH) -> UserRef:
    """Validate a user id and split off its org.

    Args:
        value: see :func:`normalize_user_id`.
        max_length: the longest id accepted.

    Returns:
        A :class:`UserRef`.

    Raises:
        InvalidUserId: see :func:`normalize_user_id`.
    """
    user_id = normalize_user_id(value, max_length=max_length)
    return UserRef(user_id=user_id, org_id=org_of(user_id))


class Pseudonymizer:
    """Replace user ids by keyed HMAC digests, keeping org roll-ups working.

    ``acme:alice`` becomes ``<digest of acme>:<digest of acme:alice>``, so every user of
    org ``acme`` still shares the same (pseudonymous) org segment; with ``keep_org=True``
    the org stays readable (``acme:<digest>``). The same key always gives the same
    pseudonym; without the key, ids cannot be recovered or guessed by brute force of a
    plain hash.

    Args:
        key: the secret key (at least 16 bytes). Keep it out of source control.
        digest_chars: hex characters kept from each digest, from
            :data:`MIN_DIGEST_CHARS` (20: a billion ids collide with probability under
            one in a million) to 64.
        keep_org: leave the org segment in clear text.

    Raises:
        ValueError: the key is too short, or ``digest_chars`` is out of range (too short
            a digest makes different users share a pseudonym, and so a budget).
    """

    def __init__(self, key: bytes | str, *, digest_chars: int = 20, keep_org: bool = False) -> None:
        raw = key.encode() if isinstance(key, str) else bytes(key)
        if len(raw) < 16:
            raise ValueError("a pseudonymisation key needs at least 16 bytes")
        if isinstance(digest_chars, bool) or not isinstance(digest_chars, int):
            raise ValueError(f"digest_chars must be an int, got {digest_chars!r}")
        if digest_chars < MIN_DIGEST_CHARS:
            raise ValueError(
                f"digest_chars={digest_chars} is too short to keep users apart: use at least "
                f"{MIN_DIGEST_CHARS} hex characters, so that {PSEUDONYM_SCALE:,} ids share a "
                f"pseudonym with probability under {PSEUDONYM_COLLISION_BOUND:g} "
                "(two users with one pseudonym would share one budget)"
            )
        if digest_chars > 64:
            raise ValueError(f"digest_chars must be at most 64, got {digest_chars}")
        self._key = raw
        self._chars = digest_chars
        self._keep_org = keep_org

    def _digest(self, domain: str, text: str) -> str:
        mac = hmac.new(self._key, f"{domain}\x00{text}".encode(), hashlib.sha256)
        return mac.hexdigest()[: self._chars]

    def __call__(self, user_id: str) -> str:
        """Return the pseudonym of a valid user id (itself a valid user id).

        Raises:
            InvalidUserId: ``user_id`` is not valid.
        """
        ref = parse_user_id(user_id, max_length=max(len(user_id), 1))
        user_part = self._digest("user", ref.user_id)
        if ref.org_id is None:
            return user_part
        org_part = ref.org_id if self._keep_org else self._digest("org", ref.org_id)
        return f"{org_part}{SEPARATOR}{user_part}"

    def __repr__(self) -> str:
        return f"Pseudonymizer(digest_chars={self._chars}, keep_org={self._keep_org})"
