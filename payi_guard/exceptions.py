"""The exception hierarchy of payi_guard.

Every error the library raises on purpose derives from :class:`PayiGuardError`::

    PayiGuardError
     ├── ConfigError          a budgets file or a config dict is wrong (names file, line, key)
     ├── InvalidUserId        a user id is refused (names the reason, never echoes the id)
     │    └── DuplicateUserHeader  ... because the trusted user header came more than once
     ├── BudgetExceeded       a call was refused before it was sent
     │    └── UserRequired    ... because no user is known and anonymous calls are rejected
     ├── UnknownModelRefused  a call was refused: no price is known for its model
     ├── UnknownModel         the price book knows no price for a model (the caller decides)
     ├── StorageError         the counter store failed and the policy is to fail closed
     ├── NoRequestScope       ``set_user`` was called outside a request
     └── MissingDependency    an optional extra is not installed

Nothing here reads a clock: a refusal's ``retry_after`` is computed by whoever raises it,
from the guard's own (injectable) clock.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from payi_guard.usage import LimitUsage

__all__ = [
    "BudgetExceeded",
    "ConfigError",
    "DuplicateUserHeader",
    "InvalidUserId",
    "MissingDependency",
    "NoRequestScope",
    "PayiGuardError",
    "StorageError",
    "UnknownModel",
    "UnknownModelRefused",
    "UserRequired",
    "is_refusal",
]


class PayiGuardError(Exception):
    """Base class of every error payi_guard raises on purpose."""


class ConfigError(PayiGuardError, ValueError):
    """A budget configuration is invalid.

    Attributes:
        message: what is wrong, including a "did you mean" hint where one applies.
        file: the file the configuration came from, if any.
        line: the 1-based line of the offending key or value, if known.
        key: the dotted path of the offending key (``limits.daily.per``), if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        key: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(self._render())

    def _render(self) -> str:
        where = ""
        if self.file is not None:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
            where += ": "
        elif self.line is not None:
            where = f"line {self.line}: "
        key = f"{self.key}: " if self.key else ""
        return f"{where}{key}{self.message}"


class InvalidUserId(PayiGuardError, ValueError):
    """A user id was refused.

    The message says why (``contains whitespace at position 3``) and never contains the
    refused value itself, so it is safe to log.

    Attributes:
        reason: why the id was refused.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"invalid user id: {reason}")


class DuplicateUserHeader(InvalidUserId):
    """The trusted user header came more than once (or listed several users).

    Never a fallback to anonymity, whatever ``on_invalid_user`` says: a request that
    names two users is malformed, or someone is trying to slip a second one in. The
    middleware answers 400.

    Attributes:
        header: the header's name.
    """

    def __init__(self, header: str) -> None:
        self.header = header
        super().__init__(f"the {header} header names more than one user (sent twice, or a list)")


class BudgetExceeded(PayiGuardError):
    """A GenAI call was refused because it could cross a hard (``block``) limit.

    The call was never sent and nothing was charged.

    Attributes:
        user_id: the user the call was attributed to.
        limit: the :class:`~payi_guard.LimitUsage` of the limit that refused it.
        retry_after: whole seconds until that limit's window resets (at least 1), as
            measured by the clock of the guard that refused the call.
    """

    user_id: str
    limit: LimitUsage
    retry_after: int

    def __init__(
        self,
        user_id: str,
        limit: LimitUsage,
        retry_after: float,
        message: str | None = None,
    ) -> None:
        self.user_id = user_id
        self.limit = limit
        self.retry_after = max(1, math.ceil(retry_after))
        super().__init__(message or self.describe())

    def describe(self) -> str:
        """Return the human message: which limit refused whom and when it resets."""
        unit = "USD" if self.limit.unit == "usd" else self.limit.unit
        return (
            f"budget exceeded for user {self.user_id!r}: limit {self.limit.name!r} "
            f"({self.limit.scope}) used {self.limit.used} of {self.limit.max} {unit}; "
            f"resets at {self.limit.resets_at.isoformat()} (retry after {self.retry_after}s)"
        )


class UserRequired(BudgetExceeded):
    """A call with no known user was refused (anonymous strategy ``reject``).

    The middleware answers it with 401; through an SDK it arrives like any refusal.
    """


class UnknownModelRefused(PayiGuardError):
    """A call was refused because no price is known for its model (``unknown_model: block``).

    Attributes:
        model: the model name.
        provider: the provider.
    """

    def __init__(self, model: str, provider: str) -> None:
        self.model = model
        self.provider = provider
        super().__init__(
            f"no price is known for model {model!r} (provider {provider!r}) and "
            "unknown_model is 'block': add it under `prices:` in the budgets file, or set "
            "`unknown_model` to 'allow' or to a fallback price"
        )


class UnknownModel(PayiGuardError, LookupError):
    """No price is known for a model, and the unknown-model policy sets none.

    Never charged as $0: the caller decides (refuse the call under ``block``, or send
    it and log it as unpriced under ``allow``).

    Attributes:
        model: the model name.
        provider: the provider name, if one was given.
        action: the policy's action (``"block"`` or ``"allow"``).
        reason: why no price applies.
    """

    def __init__(
        self, model: str, provider: str | None, action: str, reason: str = "no price is known"
    ) -> None:
        self.model = model
        self.provider = provider
        self.action = action
        self.reason = reason
        where = f" (provider {provider!r})" if provider else ""
        super().__init__(
            f"unknown model {model!r}{where}: {reason}; unknown_model policy is {action!r}"
        )


class StorageError(PayiGuardError):
    """The counter store could not be reached or answered an error."""


class NoRequestScope(PayiGuardError, RuntimeError):
    """:func:`~payi_guard.set_user` was called where no request scope is open."""


class MissingDependency(PayiGuardError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, module: str, extra: str) -> None:
        self.module = module
        self.extra = extra
        super().__init__(
            f"{module!r} is not installed: install it with `pip install 'payi-guard[{extra}]'`"
        )


def is_refusal(exc: BaseException) -> bool:
    """Tell a payi_guard budget refusal from any other error.

    A provider's own rate limit (a real HTTP 429 from OpenAI) is not a refusal; a call
    payi_guard refused before sending is, whichever SDK exception class carries it.

    Args:
        exc: any exception.

    Returns:
        True if ``exc`` is (or wraps, through ``__cause__``) a :class:`BudgetExceeded`.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, BudgetExceeded):
            return True
        seen.add(id(current))
        current = current.__cause__
    return False
