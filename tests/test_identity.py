"""User ids: alphabet, composite ids, length bound, reasons, pseudonymisation."""

from __future__ import annotations

import string
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payi_guard import InvalidUserId, Pseudonymizer, normalize_user_id, parse_user_id
from payi_guard.identity import DEFAULT_MAX_LENGTH, KNOWN_USER_IDS, org_of

SEGMENT_ALPHABET = string.ascii_letters + string.digits + ".-_"
segments = st.text(alphabet=SEGMENT_ALPHABET, min_size=1, max_size=20)
valid_ids = (
    st.lists(segments, min_size=1, max_size=4)
    .map(":".join)
    .filter(lambda s: len(s) <= DEFAULT_MAX_LENGTH)
)


@given(valid_ids)
def test_every_accepted_id_round_trips_unchanged(user_id: str) -> None:
    assert normalize_user_id(user_id) == user_id
    ref = parse_user_id(user_id)
    assert ref.user_id == user_id
    assert ref.org_id == (user_id.split(":")[0] if ":" in user_id else None)


@given(valid_ids, st.integers(min_value=0, max_value=20), st.characters())
def test_any_character_outside_the_alphabet_is_refused(
    user_id: str, position: int, char: str
) -> None:
    if char in SEGMENT_ALPHABET or char == ":":
        return
    position = min(position, len(user_id))
    bad = user_id[:position] + char + user_id[position:]
    with pytest.raises(InvalidUserId) as info:
        normalize_user_id(bad)
    # The reason names the first offending character by code point, never raw.
    first_bad = next(c for c in bad if c not in SEGMENT_ALPHABET and c != ":")
    assert f"U+{ord(first_bad):04X}" in str(info.value)


@given(
    st.text(alphabet=st.characters(whitelist_categories=("Zs", "Cc", "Zl", "Zp")), min_size=1),
    valid_ids,
)
def test_whitespace_and_control_characters_are_refused_and_never_echoed(
    junk: str, user_id: str
) -> None:
    bad = user_id + junk
    with pytest.raises(InvalidUserId) as info:
        normalize_user_id(bad)
    message = str(info.value)
    assert all(ch not in message for ch in junk if ch != " ")
    assert "U+" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "empty"),
        ("a b", "whitespace (U+0020) at position 1"),
        ("tab\there", "whitespace (U+0009) at position 3"),
        ("nul\x00", "control character (U+0000) at position 3"),
        ("esc\x1b[31m", "control character (U+001B)"),
        ("caf\u00e9", "character U+00E9 at position 3"),
        ("a/b", "character U+002F"),
        ("alice@example.com", "character U+0040"),
        (":alice", "non-empty segments"),
        ("acme:", "non-empty segments"),
        ("acme::alice", "non-empty segments"),
        ("x" * 129, "129 characters long, the maximum is 128"),
        (".", "'.' and '..' name folders in a web address"),  # the users page links ids
        ("..", "'.' and '..' name folders in a web address"),
    ],
)
def test_reasons_are_specific(value: str, reason: str) -> None:
    with pytest.raises(InvalidUserId, match="invalid user id") as info:
        normalize_user_id(value)
    assert reason in str(info.value)
    assert info.value.reason in str(info.value)


@pytest.mark.parametrize("value", [None, 1.5, True, b"alice", ["a"], object()])
def test_other_types_are_refused(value: object) -> None:
    with pytest.raises(InvalidUserId, match="must be a str, int or UUID"):
        normalize_user_id(value)


def test_ints_and_uuids_are_converted() -> None:
    assert normalize_user_id(123) == "123"
    assert normalize_user_id(-5) == "-5"
    uid = uuid.uuid4()
    assert normalize_user_id(uid) == str(uid)


def test_an_int_with_more_digits_than_an_id_may_have_is_invalid() -> None:
    # Python will not even write out an int of 5,000 digits (ValueError from str()).
    assert normalize_user_id(10**127) == "1" + "0" * 127
    for value in (10**128, 10**200, 10**5000, -(10**5000)):
        with pytest.raises(InvalidUserId, match=r"maximum of 128 characters|maximum is 128"):
            normalize_user_id(value)


def test_length_bound_is_configurable() -> None:
    assert normalize_user_id("x" * 200, max_length=200) == "x" * 200
    with pytest.raises(InvalidUserId):
        normalize_user_id("x" * 11, max_length=10)


def test_org_of() -> None:
    assert org_of("acme:alice") == "acme"
    assert org_of("acme:team:alice") == "acme"
    assert org_of("alice") is None


def test_invalid_user_id_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        normalize_user_id("bad id")


# --- pseudonymisation ----------------------------------------------------------------------

KEY = b"0123456789abcdef-test-key"


@given(valid_ids)
def test_pseudonym_is_deterministic_and_a_valid_id(user_id: str) -> None:
    p = Pseudonymizer(KEY)
    out = p(user_id)
    assert out == p(user_id)
    assert normalize_user_id(out) == out
    assert user_id not in out.split(":") or len(user_id) >= 20


def test_pseudonym_keeps_org_separable() -> None:
    p = Pseudonymizer(KEY)
    alice, bob, other = p("acme:alice"), p("acme:bob"), p("globex:alice")
    assert org_of(alice) == org_of(bob)
    assert org_of(alice) != org_of(other)
    assert alice != bob
    assert org_of(alice) != "acme"
    assert org_of(p("alice")) is None


def test_pseudonym_can_keep_org_readable() -> None:
    p = Pseudonymizer(KEY, keep_org=True)
    out = p("acme:alice")
    assert out.startswith("acme:")
    assert "alice" not in out


def test_pseudonym_depends_on_the_key() -> None:
    assert Pseudonymizer(KEY)("alice") != Pseudonymizer(KEY + b"x")("alice")
    # A plain (unkeyed) hash of the id is not the pseudonym.
    import hashlib

    assert Pseudonymizer(KEY)("alice") not in hashlib.sha256(b"alice").hexdigest()


def test_pseudonymizer_validates() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Pseudonymizer(b"short")
    with pytest.raises(ValueError, match="digest_chars"):
        Pseudonymizer(KEY, digest_chars=4)
    with pytest.raises(InvalidUserId):
        Pseudonymizer(KEY)("bad id")
    assert "0123" not in repr(Pseudonymizer(KEY))


def _collision_bound(ids: int, digest_chars: int) -> float:
    """The birthday bound: the chance that any two of ``ids`` distinct ids share a digest."""
    return ids * (ids - 1) / 2 / float(16**digest_chars)


def test_digests_too_short_to_be_unique_are_refused() -> None:
    from payi_guard.identity import (
        MIN_DIGEST_CHARS,
        PSEUDONYM_COLLISION_BOUND,
        PSEUDONYM_SCALE,
    )

    # The documented minimum is the shortest digest that keeps the stated scale under
    # the stated bound: one hex character fewer would not.
    assert _collision_bound(PSEUDONYM_SCALE, MIN_DIGEST_CHARS) <= PSEUDONYM_COLLISION_BOUND
    assert _collision_bound(PSEUDONYM_SCALE, MIN_DIGEST_CHARS - 1) > PSEUDONYM_COLLISION_BOUND
    assert (PSEUDONYM_SCALE, PSEUDONYM_COLLISION_BOUND, MIN_DIGEST_CHARS) == (10**9, 1e-6, 20)
    # 8 hex characters (32 bits) would collide about 4.7 times among 200,000 ids.
    assert _collision_bound(200_000, 8) > 4
    for short in (8, 12, MIN_DIGEST_CHARS - 1):
        with pytest.raises(ValueError, match=r"at least 20 .*1,000,000,000 ids") as caught:
            Pseudonymizer(KEY, digest_chars=short)
        assert f"digest_chars={short}" in str(caught.value)
    assert len(Pseudonymizer(KEY, digest_chars=MIN_DIGEST_CHARS)("alice")) == 20
    assert len(Pseudonymizer(KEY, digest_chars=64)("alice")) == 64
    for bad in (65, 20.5, True):
        with pytest.raises(ValueError, match="digest_chars"):
            Pseudonymizer(KEY, digest_chars=bad)  # type: ignore[arg-type]


def test_an_id_seen_before_still_obeys_a_smaller_max_length() -> None:
    assert normalize_user_id("seen-before-alice") == "seen-before-alice"
    assert normalize_user_id("seen-before-alice") == "seen-before-alice"
    with pytest.raises(InvalidUserId):
        normalize_user_id("seen-before-alice", max_length=5)


def test_an_id_accepted_under_a_larger_max_length_is_still_too_long_by_default() -> None:
    long_id = "l" * (DEFAULT_MAX_LENGTH + 1)
    assert normalize_user_id(long_id, max_length=DEFAULT_MAX_LENGTH + 1) == long_id
    assert long_id not in KNOWN_USER_IDS  # the cache holds ids valid at the default only
    with pytest.raises(InvalidUserId, match="long"):
        normalize_user_id(long_id)


def test_a_str_subclass_is_checked_every_time() -> None:
    class Name(str):
        pass

    assert normalize_user_id("subclassed") == "subclassed"
    assert type(normalize_user_id(Name("subclassed"))) is Name
    with pytest.raises(InvalidUserId):
        normalize_user_id(Name("bad id"))
