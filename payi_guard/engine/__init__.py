"""The Guard: decides, reserves before each GenAI call, settles after it, logs."""

from payi_guard.engine.guard import (
    ANONYMOUS_USER,
    BoundLimit,
    CallRecord,
    CallRequest,
    Guard,
    Reservation,
    Subject,
    UnknownModelRefused,
    UserRequired,
)

__all__ = [
    "ANONYMOUS_USER",
    "BoundLimit",
    "CallRecord",
    "CallRequest",
    "Guard",
    "Reservation",
    "Subject",
    "UnknownModelRefused",
    "UserRequired",
]
