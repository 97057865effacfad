"""Counter ledgers: atomic reserve / commit / release on memory and Redis."""

from payi_guard.ledger.base import AsyncLedger, Charge, CounterState, Ledger, ReserveResult

__all__ = ["AsyncLedger", "Charge", "CounterState", "Ledger", "ReserveResult"]
