"""payi_guard: per-user attribution and budgets for GenAI calls.

Every GenAI call a web app makes is charged to the user who caused it, and a user who is
over budget is stopped before the call costs money.
"""

from importlib.metadata import PackageNotFoundError, version

from payi_guard.context import (
    Attribution,
    ContextThreadPoolExecutor,
    bind_context,
    get_context,
    request_scope,
    set_user,
    track,
    track_context,
)
from payi_guard.engine import CallRecord, Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    ConfigError,
    InvalidUserId,
    MissingDependency,
    NoRequestScope,
    PayiGuardError,
    StorageError,
    UnknownModelRefused,
    UserRequired,
    is_refusal,
)
from payi_guard.identity import Pseudonymizer, normalize_user_id, parse_user_id
from payi_guard.pricing import TokenUsage
from payi_guard.usage import BudgetAdjustment, LimitUsage
from payi_guard.web import GuardMiddleware, WSGIGuardMiddleware

try:
    __version__ = version("payi-guard")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Attribution",
    "BudgetAdjustment",
    "BudgetExceeded",
    "CallRecord",
    "ConfigError",
    "ContextThreadPoolExecutor",
    "Guard",
    "GuardMiddleware",
    "InvalidUserId",
    "LimitUsage",
    "MissingDependency",
    "NoRequestScope",
    "PayiGuardError",
    "Pseudonymizer",
    "StorageError",
    "TokenUsage",
    "UnknownModelRefused",
    "UserRequired",
    "WSGIGuardMiddleware",
    "__version__",
    "bind_context",
    "get_context",
    "is_refusal",
    "normalize_user_id",
    "parse_user_id",
    "request_scope",
    "set_user",
    "track",
    "track_context",
]
