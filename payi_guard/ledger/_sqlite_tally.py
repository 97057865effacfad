"""The SQLite ledger's tallies: one row per (tally, field), pruned like counters.

Layout 4 adds ``tallies(key, field, value, expires_at, PRIMARY KEY (key, field))`` and
an index on ``expires_at``; a row past its expiry reads as absent and a write to it
starts it afresh, as an expired Redis hash would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from payi_guard.ledger.base import Tally

__all__ = ["TALLY_SCHEMA", "add_tallies", "prune_tallies", "read_tallies", "tally_keys"]

TALLY_SCHEMA = (
    """CREATE TABLE tallies (
        key TEXT NOT NULL,
        field TEXT NOT NULL,
        value INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (key, field)
    ) WITHOUT ROWID""",
    "CREATE INDEX tallies_by_expiry ON tallies (expires_at)",
)
"""What layout 4 adds: the tallies (usage analytics)."""

_ADD = """
INSERT INTO tallies (key, field, value, expires_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (key, field) DO UPDATE SET
    value = CASE WHEN expires_at <= ?5 THEN excluded.value ELSE value + excluded.value END,
    expires_at = CASE WHEN expires_at <= ?5 THEN excluded.expires_at
                      ELSE max(expires_at, excluded.expires_at) END
"""
_READ = "SELECT field, value FROM tallies WHERE key = ?1 AND expires_at > ?2"
_DUE = """
DELETE FROM tallies WHERE (key, field) IN
    (SELECT key, field FROM tallies WHERE expires_at <= ?1 LIMIT ?2)
"""


def add_tallies(conn: sqlite3.Connection, tallies: Sequence[Tally], now: float) -> None:
    """Add every tally's increments (inside the caller's write transaction)."""
    conn.executemany(
        _ADD,
        [
            (tally.key, name, value, tally.expires_at, now)
            for tally in tallies
            for name, value in tally.fields
        ],
    )


def read_tallies(
    conn: sqlite3.Connection, keys: Sequence[str], now: float
) -> tuple[dict[str, int], ...]:
    """The live fields of each tally."""
    return tuple(
        {str(name): int(value) for name, value in conn.execute(_READ, (key, now))} for key in keys
    )


def tally_keys(conn: sqlite3.Connection, prefix: str, upper: str | None, now: float) -> list[str]:
    """The keys of live tallies from ``prefix`` up to ``upper`` (excluded; None: no bound)."""
    if upper is None:
        rows = conn.execute(
            "SELECT DISTINCT key FROM tallies WHERE key >= ?1 AND expires_at > ?2", (prefix, now)
        )
    else:
        rows = conn.execute(
            "SELECT DISTINCT key FROM tallies WHERE key >= ?1 AND key < ?2 AND expires_at > ?3",
            (prefix, upper, now),
        )
    return [str(key) for (key,) in rows]


def prune_tallies(conn: sqlite3.Connection, now: float, batch: int) -> int:
    """Delete up to ``batch`` tally rows past their expiry."""
    return int(conn.execute(_DUE, (now, batch)).rowcount)
