"""Counter ledgers: atomic reserve / commit / release / renew on memory, SQLite and Redis."""

from payi_guard.ledger.base import (
    DEFAULT_CLOSED_TTL,
    MAX_UNITS,
    Adjustment,
    AsyncLedger,
    CapacityExceeded,
    Charge,
    CounterState,
    JournalEntry,
    Ledger,
    ReserveResult,
    StorageEvent,
    StorageOutcomeUnknown,
    Tally,
)
from payi_guard.ledger.factory import open_async_ledger, open_ledger
from payi_guard.ledger.memory import AsyncMemoryLedger, MemoryLedger
from payi_guard.ledger.redis import AsyncRedisLedger, RedisLedger
from payi_guard.ledger.sqlite import AsyncSqliteLedger, SqliteLedger

__all__ = [
    "DEFAULT_CLOSED_TTL",
    "MAX_UNITS",
    "Adjustment",
    "AsyncLedger",
    "AsyncMemoryLedger",
    "AsyncRedisLedger",
    "AsyncSqliteLedger",
    "CapacityExceeded",
    "Charge",
    "CounterState",
    "JournalEntry",
    "Ledger",
    "MemoryLedger",
    "RedisLedger",
    "ReserveResult",
    "SqliteLedger",
    "StorageEvent",
    "StorageOutcomeUnknown",
    "Tally",
    "open_async_ledger",
    "open_ledger",
]
