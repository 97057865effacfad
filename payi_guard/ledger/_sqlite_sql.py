"""The SQLite ledger's schema and the SQL of each operation.

Every operation here is a function of one open connection, run inside the transaction
that :class:`payi_guard.ledger._sqlite_store.Store` opens around it (``BEGIN IMMEDIATE``
for writes); it returns its result and whether the transaction is to be committed.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`, ``application_id`` =
:data:`APPLICATION_ID`)::

    counters(key PRIMARY KEY, settled, pending, expires_at, refused) -- one row per counter
    holds(key, rid, amount, deadline, PRIMARY KEY (key, rid))
        -- reservation ``rid`` holds ``amount`` on ``key`` until ``deadline``
    closed(rid PRIMARY KEY, keys, until)
        -- ``rid`` was committed or released on ``keys`` (a JSON array); remembered
        -- until ``until``
    journal(journal, seq, at, key, amount, settled, pending, note, expires_at,
            PRIMARY KEY (journal, seq))                          -- operators' adjustments
    index counters(expires_at)   -- pruning of past windows
    index holds(key, deadline)   -- purging of expired reservations
    index closed(until)          -- forgetting closed ids, oldest first
    index journal(expires_at)    -- pruning of journals nobody adjusted for a while

Layout 1 had no journal, and layouts 1 and 2 kept closed ids as rows of ``holds`` (an
``open`` column) and had no ``refused``: opening such a file brings it to this layout
(:data:`MIGRATIONS`; the closed ids it remembered are forgotten, nothing else is).

``pending`` is the sum of the open holds of a counter, kept in the row (as Redis keeps
field ``p``) so that a reserve reads one row per key; holds whose deadline has passed
are subtracted on the fly and deleted by the next write that touches their counter.
``refused`` is what the last reserve the counter refused needed (Redis field ``f``),
written by that refusal and cleared by the next reserve on it that fits.

Closed ids live in a table of their own, whether their counters exist or not (a release
that arrives before its reserve closes the id on keys that have no counter yet, as Redis
keeps ``K:d`` apart from ``K``): one row per id, naming the keys it is closed on, as
the memory ledger keeps them, so a reserve or a settle looks an id up once and a call
adds one row whatever its number of counters. The store's pruning turns forget expired
ones, oldest first through the ``until`` index, at least as many as were closed since
the previous turn, so the table stays the size of the calls settled within
``closed_ttl``.

Amounts are computed in Python and written back whole, so an integer never overflows
into SQLite's floating point. Every table is ``WITHOUT ROWID``: a row is found by its
key in one B-tree descent.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from payi_guard.ledger._adjust import MAX_UNITS, adjusted, out_of_range
from payi_guard.ledger._glob import glob_regex, literal_prefix
from payi_guard.ledger._sqlite_tally import TALLY_SCHEMA, add_tallies, tally_keys
from payi_guard.ledger.base import (
    Adjustment,
    Charge,
    CounterState,
    JournalEntry,
    ReserveResult,
    Tally,
)

__all__ = [
    "APPLICATION_ID",
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "adjust",
    "forget",
    "prune",
    "read",
    "read_journal",
    "renew_many",
    "reserve",
    "scan",
    "settle",
]

SCHEMA_VERSION = 4
"""``PRAGMA user_version`` of the layout this module writes."""

APPLICATION_ID = 0x70677264
"""``PRAGMA application_id`` of a payi_guard ledger file ("pgrd")."""

SCHEMA = (
    """CREATE TABLE counters (
        key TEXT PRIMARY KEY NOT NULL,
        settled INTEGER NOT NULL,
        pending INTEGER NOT NULL,
        expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX counters_by_expiry ON counters (expires_at)",
    """CREATE TABLE holds (
        key TEXT NOT NULL,
        rid TEXT NOT NULL,
        amount INTEGER NOT NULL,
        deadline REAL NOT NULL,
        open INTEGER NOT NULL,
        PRIMARY KEY (key, rid)
    ) WITHOUT ROWID""",
    "CREATE INDEX holds_by_deadline ON holds (key, deadline)",
)
"""The statements of layout 1."""

JOURNAL_SCHEMA = (
    """CREATE TABLE journal (
        journal TEXT NOT NULL,
        seq INTEGER NOT NULL,
        at REAL NOT NULL,
        key TEXT NOT NULL,
        amount INTEGER NOT NULL,
        settled INTEGER NOT NULL,
        pending INTEGER NOT NULL,
        note TEXT NOT NULL,
        expires_at REAL NOT NULL,
        PRIMARY KEY (journal, seq)
    ) WITHOUT ROWID""",
    "CREATE INDEX journal_by_expiry ON journal (expires_at)",
)
"""What layout 2 adds: the operators' adjustments journal."""

CLOSED_SCHEMA = (
    "ALTER TABLE counters ADD COLUMN refused INTEGER NOT NULL DEFAULT 0",
    # Holds keep the open reservations only (a table is rebuilt, never altered in place,
    # so that any SQLite 3 does it); the closed ids get a table of their own.
    """CREATE TABLE open_holds (
        key TEXT NOT NULL,
        rid TEXT NOT NULL,
        amount INTEGER NOT NULL,
        deadline REAL NOT NULL,
        PRIMARY KEY (key, rid)
    ) WITHOUT ROWID""",
    """INSERT INTO open_holds (key, rid, amount, deadline)
        SELECT key, rid, amount, deadline FROM holds WHERE open = 1""",
    "DROP TABLE holds",
    "ALTER TABLE open_holds RENAME TO holds",
    "CREATE INDEX holds_by_deadline ON holds (key, deadline)",
    """CREATE TABLE closed (
        rid TEXT PRIMARY KEY NOT NULL,
        keys TEXT NOT NULL,
        until REAL NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX closed_by_until ON closed (until)",
)
"""What layout 3 changes: ``counters.refused``; closed ids in ``closed``, not ``holds``."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (SCHEMA, JOURNAL_SCHEMA, CLOSED_SCHEMA, TALLY_SCHEMA)
"""``MIGRATIONS[v]`` takes a file from layout ``v`` to ``v + 1`` (0: an empty file)."""

# One row per key: the totals, what expired holds still count in ``pending`` (NULL when
# no hold of the key has expired, so the purge can be skipped), what reservation ?2
# holds on the key if it has not expired (NULL when it holds nothing), and ``refused``.
_STATE = """
SELECT c.settled, c.pending, c.expires_at,
       (SELECT sum(x.amount) FROM holds AS x WHERE x.key = ?1 AND x.deadline <= ?3),
       h.amount, c.refused
FROM counters AS c
LEFT JOIN holds AS h ON h.key = ?1 AND h.rid = ?2 AND h.deadline > ?3
WHERE c.key = ?1
"""
_READ = """
SELECT c.settled,
       c.pending - coalesce((SELECT sum(x.amount) FROM holds AS x
                             WHERE x.key = ?1 AND x.deadline <= ?2), 0),
       c.refused
FROM counters AS c WHERE c.key = ?1 AND c.expires_at > ?2
"""
_CLOSED_KEYS = "SELECT keys FROM closed WHERE rid = ?1 AND until > ?2"
_CLOSE = """
INSERT INTO closed (rid, keys, until) VALUES (?1, ?2, ?3)
ON CONFLICT (rid) DO UPDATE SET keys = excluded.keys, until = excluded.until
"""
_FORGET = """
DELETE FROM closed WHERE rid IN
    (SELECT rid FROM closed WHERE until <= ?1 ORDER BY until LIMIT ?2)
"""
_PURGE = "DELETE FROM holds WHERE key = ?1 AND deadline <= ?2"
_DROP_HOLDS = "DELETE FROM holds WHERE key = ?1"
_DROP_HOLD = "DELETE FROM holds WHERE key = ?1 AND rid = ?2"
# A counter afresh (a new one, or a past window's row started again): nothing refused.
_PUT_COUNTER = """
INSERT INTO counters (key, settled, pending, expires_at) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (key) DO UPDATE SET
    settled = excluded.settled, pending = excluded.pending, refused = 0,
    expires_at = excluded.expires_at
"""
_SET_COUNTER = "UPDATE counters SET settled = ?2, pending = ?3, expires_at = ?4 WHERE key = ?1"
_HOLD_COUNTER = "UPDATE counters SET pending = ?2, refused = 0, expires_at = ?3 WHERE key = ?1"
_REFUSE = "UPDATE counters SET refused = ?2, expires_at = max(expires_at, ?3) WHERE key = ?1"
_PUT_REFUSED = """
INSERT INTO counters (key, settled, pending, refused, expires_at) VALUES (?1, 0, 0, ?2, ?3)
ON CONFLICT (key) DO UPDATE SET
    settled = 0, pending = 0, refused = excluded.refused, expires_at = excluded.expires_at
"""
_PUT_HOLD = """
INSERT INTO holds (key, rid, amount, deadline) VALUES (?1, ?2, ?3, ?4)
ON CONFLICT (key, rid) DO UPDATE SET amount = excluded.amount, deadline = excluded.deadline
"""
_RENEW = """
UPDATE holds SET deadline = max(deadline, ?4)
WHERE key = ?1 AND rid = ?2 AND deadline > ?3
  AND EXISTS (SELECT 1 FROM counters WHERE key = ?1 AND expires_at > ?3)
"""
_JOURNAL_LAST = "SELECT max(seq), max(expires_at) FROM journal WHERE journal = ?1"
_JOURNAL_PUT = """
INSERT INTO journal (journal, seq, at, key, amount, settled, pending, note, expires_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
"""
_JOURNAL_TRIM = "DELETE FROM journal WHERE journal = ?1 AND seq <= ?2"
_JOURNAL_EXTEND = "UPDATE journal SET expires_at = ?2 WHERE journal = ?1"
_JOURNAL_READ = """
SELECT at, key, amount, settled, pending, note FROM journal
WHERE journal = ?1 AND expires_at > ?2 ORDER BY seq DESC LIMIT ?3
"""
_JOURNAL_DUE = """
DELETE FROM journal WHERE (journal, seq) IN
    (SELECT journal, seq FROM journal WHERE expires_at <= ?1 LIMIT ?2)
"""
_DUE = "SELECT key FROM counters WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2"
_DROP_COUNTER = "DELETE FROM counters WHERE key = ?1"

_ZERO = CounterState(0, 0)


_Row = tuple[int, int, float, "int | None", "int | None", int]
"""settled, pending, expires_at, expired (see ``_STATE``), what the reservation holds,
refused."""


def _state(conn: sqlite3.Connection, key: str, rid: str, now: float) -> tuple[_Row | None, bool]:
    """The row of ``key`` (or None) and whether it is live (not past its expiry)."""
    row: _Row | None = conn.execute(_STATE, (key, rid, now)).fetchone()
    return row, row is not None and row[2] > now


def _current(row: _Row | None, live: bool) -> CounterState:
    """The visible state of a ``_STATE`` row (zero when missing or past its expiry)."""
    if row is None or not live:
        return _ZERO
    return CounterState(row[0], row[1] - (row[3] or 0), row[5])


def _closed_keys(conn: sqlite3.Connection, rid: str, now: float) -> list[str]:
    """The keys ``rid`` is closed on (committed or released there, not yet forgotten)."""
    row = conn.execute(_CLOSED_KEYS, (rid, now)).fetchone()
    if row is None:
        return []
    keys: list[str] = json.loads(row[0])
    return keys


def reserve(
    conn: sqlite3.Connection,
    rid: str,
    charges: Sequence[Charge],
    now: float,
    deadline: float,
    tallies: Sequence[Tally] = (),
) -> tuple[ReserveResult, bool]:
    """Reserve every charge or none; the flag says whether to commit the transaction."""
    closed = _closed_keys(conn, rid, now)
    found = [_state(conn, charge.key, rid, now) for charge in charges]
    states = [_current(row, live) for row, live in found]
    if closed and any(charge.key in closed for charge in charges):
        return ReserveResult(False, None, tuple(states), closed=True), False
    refused: int | None = None
    for index, (charge, (row, live), state) in enumerate(zip(charges, found, states, strict=True)):
        # An id already open here is replaced: its old amount does not count.
        held = (row[4] or 0) if row is not None and live else 0
        if charge.max is not None and state.used - held + charge.amount > charge.max:
            refused = index
            break
    if refused is not None:
        # The counter that refused remembers what the call needed, so that readers see
        # a limit that refuses calls; it lives as long as a reserve would make it live.
        charge = charges[refused]
        row, live = found[refused]
        if row is None or not live:
            if row is not None:  # a past window's row: start afresh
                conn.execute(_DROP_HOLDS, (charge.key,))
            conn.execute(_PUT_REFUSED, (charge.key, charge.amount, charge.expires_at))
            states[refused] = CounterState(0, 0, charge.amount)
        else:
            conn.execute(_REFUSE, (charge.key, charge.amount, charge.expires_at))
            current = states[refused]
            states[refused] = CounterState(current.settled, current.pending, charge.amount)
        if tallies:
            add_tallies(conn, tallies, now)
        return ReserveResult(False, refused, tuple(states)), True
    out: list[CounterState] = []
    for charge, (row, live), state in zip(charges, found, states, strict=True):
        key = charge.key
        if row is None or not live:
            if row is not None:  # a past window's row: start afresh
                conn.execute(_DROP_HOLDS, (key,))
            conn.execute(_PUT_COUNTER, (key, 0, charge.amount, charge.expires_at))
            new = CounterState(0, charge.amount)
        else:
            if row[3] is not None:
                conn.execute(_PURGE, (key, now))
            new = CounterState(state.settled, state.pending - (row[4] or 0) + charge.amount)
            expires_at = max(row[2], charge.expires_at)
            conn.execute(_HOLD_COUNTER, (key, new.pending, expires_at))
        conn.execute(_PUT_HOLD, (key, rid, charge.amount, deadline))
        out.append(new)
    return ReserveResult(True, None, tuple(out)), True


def settle(
    conn: sqlite3.Connection,
    rid: str,
    charges: Sequence[Charge],
    now: float,
    until: float,
    tallies: Sequence[Tally] = (),
) -> tuple[tuple[CounterState, ...], bool]:
    """Close ``rid`` where it is open and add the amounts (a release adds zeros).

    ``rid`` is then remembered as closed on each key until ``until``; a key it is
    already closed on is left alone (a retry).
    """
    closed = _closed_keys(conn, rid, now)
    out: list[CounterState] = []
    closing: list[str] = []
    for charge in charges:
        key, amount = charge.key, charge.amount
        row, live = _state(conn, key, rid, now)
        if key in closed:
            out.append(_current(row, live))
            continue
        closing.append(key)
        if row is None or not live:
            if amount == 0:  # nothing to add: create no counter (the id is closed all the same)
                out.append(_ZERO)
                continue
            if row is not None:  # a past window's row: start afresh
                conn.execute(_DROP_HOLDS, (key,))
            conn.execute(_PUT_COUNTER, (key, amount, 0, charge.expires_at))
            out.append(CounterState(amount, 0))
            continue
        settled, pending = row[0], row[1] - (row[3] or 0)
        if row[3] is not None:
            conn.execute(_PURGE, (key, now))
        if row[4] is not None:
            conn.execute(_DROP_HOLD, (key, rid))
            pending -= row[4]
        settled += amount
        # Only an actual charge extends a counter's life (as in the memory ledger).
        expires_at = max(row[2], charge.expires_at) if amount else row[2]
        conn.execute(_SET_COUNTER, (key, settled, pending, expires_at))
        out.append(CounterState(settled, pending, row[5]))
    if closing:
        conn.execute(_CLOSE, (rid, json.dumps(closed + closing), until))
        if tallies:
            add_tallies(conn, tallies, now)
    return tuple(out), bool(closing)


def adjust(
    conn: sqlite3.Connection,
    adjustments: Sequence[Adjustment],
    now: float,
    journal: str,
    keep: int,
    journal_expires_at: float,
) -> tuple[tuple[JournalEntry, ...], bool]:
    """Apply every adjustment or none, and journal them (see ``Ledger.adjust``).

    Raises:
        ValueError: a counter would go out of range (the transaction is rolled back).
    """
    found = [_state(conn, item.key, "", now) for item in adjustments]
    changes: list[tuple[int, int, int]] = []
    for index, (item, (row, live)) in enumerate(zip(adjustments, found, strict=True)):
        settled, pending = (row[0], row[1] - (row[3] or 0)) if row is not None and live else (0, 0)
        new, added = adjusted(settled, item.amount)
        if abs(new) > MAX_UNITS:
            raise out_of_range(index, new)
        changes.append((new, added, pending))
    entries: list[JournalEntry] = []
    for item, (row, live), (new, added, pending) in zip(adjustments, found, changes, strict=True):
        key = item.key
        if row is None or not live:
            if new != 0:
                if row is not None:  # a past window's row: start afresh
                    conn.execute(_DROP_HOLDS, (key,))
                conn.execute(_PUT_COUNTER, (key, new, 0, item.expires_at))
        else:
            if row[3] is not None:
                conn.execute(_PURGE, (key, now))
            expires_at = max(row[2], item.expires_at) if added else row[2]
            conn.execute(_SET_COUNTER, (key, new, pending, expires_at))
        entries.append(JournalEntry(now, key, added, new, pending, item.note))
    last, until = conn.execute(_JOURNAL_LAST, (journal,)).fetchone()
    seq = last or 0
    until = journal_expires_at if until is None else max(until, journal_expires_at)
    for entry in entries:
        seq += 1
        conn.execute(
            _JOURNAL_PUT,
            (journal, seq, entry.at, entry.key, entry.amount, entry.settled, entry.pending,
             entry.note, until),
        )  # fmt: skip
    conn.execute(_JOURNAL_TRIM, (journal, seq - keep))
    conn.execute(_JOURNAL_EXTEND, (journal, until))
    return tuple(entries), True


def read_journal(
    conn: sqlite3.Connection, journal: str, now: float, limit: int
) -> tuple[JournalEntry, ...]:
    """The ``limit`` newest entries of ``journal`` (newest first; none once it expired)."""
    rows = conn.execute(_JOURNAL_READ, (journal, now, limit)).fetchall()
    return tuple(JournalEntry(*row) for row in rows)


def renew_many(
    conn: sqlite3.Connection,
    reservations: Sequence[tuple[str, Sequence[str]]],
    now: float,
    deadline: float,
) -> tuple[tuple[bool, ...], bool]:
    """Push the deadline of each open reservation to ``deadline`` (never earlier).

    Returns one flag per reservation (open on every one of its keys) and whether
    anything was written.
    """
    flags: list[bool] = []
    wrote = False
    for rid, keys in reservations:
        renewed = sum(conn.execute(_RENEW, (key, rid, now, deadline)).rowcount for key in keys)
        flags.append(renewed == len(keys))
        wrote = wrote or renewed > 0
    return tuple(flags), wrote


def read(conn: sqlite3.Connection, keys: Sequence[str], now: float) -> tuple[CounterState, ...]:
    """The state of each counter (missing or past its expiry: zero)."""
    out: list[CounterState] = []
    for key in keys:
        row = conn.execute(_READ, (key, now)).fetchone()
        out.append(_ZERO if row is None else CounterState(*row))
    return tuple(out)


def _upper_bound(prefix: str) -> str | None:
    """The smallest string above every string that starts with ``prefix`` (or None)."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:  # surrogates cannot be encoded: skip them
            code = 0xE000
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None


def scan(conn: sqlite3.Connection, match: str, now: float, limit: int | None) -> list[str]:
    """The live counters whose key matches the Redis glob ``match``."""
    regex = glob_regex(match)
    prefix = literal_prefix(match)
    upper = _upper_bound(prefix)
    if upper is None:
        cursor = conn.execute(
            "SELECT key FROM counters WHERE key >= ?1 AND expires_at > ?2", (prefix, now)
        )
    else:
        cursor = conn.execute(
            "SELECT key FROM counters WHERE key >= ?1 AND key < ?2 AND expires_at > ?3",
            (prefix, upper, now),
        )
    found: list[str] = []
    for key in [*(row[0] for row in cursor), *tally_keys(conn, prefix, upper, now)]:
        if regex.fullmatch(key) is not None:
            found.append(key)
            if limit is not None and len(found) >= limit:
                break
    cursor.close()
    return found


def forget(conn: sqlite3.Connection, now: float, batch: int) -> int:
    """Delete up to ``batch`` closed ids whose time is over, oldest first."""
    return int(conn.execute(_FORGET, (now, batch)).rowcount)


def prune(conn: sqlite3.Connection, now: float, batch: int) -> int:
    """Delete up to ``batch`` counters past their expiry, with their holds.

    Up to ``batch`` expired journal entries go too (they are not counted).
    """
    due = conn.execute(_DUE, (now, batch)).fetchall()
    if due:
        conn.executemany(_DROP_HOLDS, due)
        conn.executemany(_DROP_COUNTER, due)
    conn.execute(_JOURNAL_DUE, (now, batch))
    return len(due)
