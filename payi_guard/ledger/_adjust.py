"""What every backend shares for ``adjust`` and ``read_journal``: checks and the arithmetic.

Every backend refuses the same inputs with the same messages (the contract suite holds
them to it), applies the same rule to the counters (:func:`adjusted`) and encodes a
journal entry the same way where it stores text (:func:`encode_entry`).
"""

from __future__ import annotations

from collections.abc import Sequence

from payi_guard.ledger._numbers import finite_number
from payi_guard.ledger.base import MAX_UNITS, Adjustment, JournalEntry

__all__ = [
    "MAX_KEEP",
    "MAX_NOTE",
    "MAX_UNITS",
    "AdjustmentOutOfRange",
    "adjusted",
    "check_adjust",
    "check_journal_read",
    "decode_entry",
    "encode_entry",
    "out_of_range",
]

MAX_KEEP = 1000
"""The most entries a journal may be asked to keep."""

MAX_NOTE = 4096
"""The longest note an adjustment may carry, in characters."""


def _tag(key: str) -> str | None:
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def check_adjust(
    adjustments: Sequence[Adjustment],
    now: float,
    journal: str,
    keep: int,
    journal_expires_at: float,
) -> None:
    """Refuse a malformed ``adjust`` call.

    Raises:
        ValueError: naming what is wrong (and the index of the offending adjustment).
    """
    if not finite_number(now):
        raise ValueError(f"now must be a finite number of epoch seconds, got {now!r}")
    if not isinstance(journal, str) or _tag(journal) is None or "\t" in journal:
        raise ValueError("journal must be a key with a {hash tag}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= MAX_KEEP:
        raise ValueError(f"keep must be an int from 1 to {MAX_KEEP}, got {keep!r}")
    if not finite_number(journal_expires_at):
        raise ValueError("journal_expires_at must be finite epoch seconds")
    if not adjustments:
        raise ValueError("adjust needs at least one Adjustment")
    tag = _tag(journal)
    keys: set[str] = set()
    for index, item in enumerate(adjustments):
        if not isinstance(item, Adjustment):
            raise ValueError(f"adjustment {index}: expected an Adjustment")
        key, amount = item.key, item.amount
        if not isinstance(key, str) or not key or "\t" in key:
            raise ValueError(f"adjustment {index}: key must be a non-empty string without tabs")
        if _tag(key) != tag:
            raise ValueError(
                f"adjustment {index}: its key and the journal must carry the same "
                "{hash tag} (one owner per call)"
            )
        if key == journal:
            raise ValueError(f"adjustment {index}: the journal cannot be one of the counters")
        if amount is not None and (
            isinstance(amount, bool) or not isinstance(amount, int) or abs(amount) > MAX_UNITS
        ):
            raise ValueError(
                f"adjustment {index}: amount must be None or an int of magnitude at most "
                f"{MAX_UNITS}, got {amount!r}"
            )
        if not finite_number(item.expires_at):
            raise ValueError(f"adjustment {index}: expires_at must be finite epoch seconds")
        if not isinstance(item.note, str) or len(item.note) > MAX_NOTE:
            raise ValueError(f"adjustment {index}: note must be a string of at most {MAX_NOTE}")
        keys.add(key)
    if len(keys) != len(adjustments):
        raise ValueError("a key may appear only once per call")


def check_journal_read(journal: str, now: float, limit: int) -> None:
    """Refuse a malformed ``read_journal`` call.

    Raises:
        ValueError: naming what is wrong.
    """
    if not isinstance(journal, str) or not journal:
        raise ValueError("journal must be a non-empty key")
    if not finite_number(now):
        raise ValueError(f"now must be a finite number of epoch seconds, got {now!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_KEEP:
        raise ValueError(f"limit must be an int from 1 to {MAX_KEEP}, got {limit!r}")


def adjusted(settled: int, amount: int | None) -> tuple[int, int]:
    """``settled`` after an adjustment, and what it added (a reset adds ``-settled``)."""
    if amount is None:
        return 0, -settled
    return settled + amount, amount


class AdjustmentOutOfRange(ValueError):
    """An adjustment would take its counter beyond what a counter can hold.

    Attributes:
        index: the index of the adjustment.
        value: what the counter would hold.
    """

    def __init__(self, index: int, value: int) -> None:
        super().__init__(
            f"adjustment {index}: the counter would hold {value}, beyond the {MAX_UNITS} "
            "a counter can hold; nothing was changed"
        )
        self.index = index
        self.value = value


def out_of_range(index: int, value: int) -> AdjustmentOutOfRange:
    """The refusal of an adjustment that would take its counter out of range."""
    return AdjustmentOutOfRange(index, value)


def encode_entry(entry: JournalEntry) -> str:
    """A journal entry as one line of text (the note last: it may hold tabs)."""
    return (
        f"{entry.at!r}\t{entry.amount}\t{entry.settled}\t{entry.pending}\t{entry.key}\t{entry.note}"
    )


def decode_entry(text: str) -> JournalEntry | None:
    """The entry :func:`encode_entry` (or the Redis script) wrote; ``None`` if malformed."""
    parts = text.split("\t", 5)
    if len(parts) != 6:
        return None
    try:
        return JournalEntry(
            at=float(parts[0]),
            key=parts[4],
            amount=int(parts[1]),
            settled=int(parts[2]),
            pending=int(parts[3]),
            note=parts[5],
        )
    except ValueError:
        return None
