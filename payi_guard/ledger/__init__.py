"""Counter ledgers: atomic reserve / commit / release on memory, SQLite and Redis."""

from payi_guard.ledger.base import AsyncLedger, Charge, CounterState, Ledger, ReserveResult
from payi_guard.ledger.factory import open_async_ledger, open_ledger
from payi_guard.ledger.memory import AsyncMemoryLedger, MemoryLedger
from payi_guard.ledger.redis import AsyncRedisLedger, RedisLedger
from payi_guard.ledger.sqlite import AsyncSqliteLedger, SqliteLedger

__all__ = [
    "AsyncLedger",
    "AsyncMemoryLedger",
    "AsyncRedisLedger",
    "AsyncSqliteLedger",
    "Charge",
    "CounterState",
    "Ledger",
    "MemoryLedger",
    "RedisLedger",
    "ReserveResult",
    "SqliteLedger",
    "open_async_ledger",
    "open_ledger",
]
