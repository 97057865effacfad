"""Pay-i attribution headers computed from payi_guard's attribution (``payi_guard[payi]``).

Pay-i reads who a GenAI call belongs to from ``xProxy-*`` request headers (its proxy
does; its SDK builds them with :func:`payi.lib.helpers.create_headers`). Pay-i's own
``track_context`` keeps its context on a **thread-local** stack, so two asyncio tasks of
one thread see each other's user: the headers it adds under concurrency can name the
wrong user.

When the bridge is on, the guarding transport computes those headers at request time
from payi_guard's attribution (held in :mod:`contextvars`, so every task sees its own),
with Pay-i's own ``create_headers``, and sets them on the HTTP request, replacing any
``xProxy-*`` attribution header already there. The guard's budget and Pay-i's
attribution then name the same user for every call. Attribution is given with
:func:`payi_guard.track_context` (the same keyword names as Pay-i's).

The bridge is on when ``payi=True`` is passed to ``wrap``/``instrument``; with the
default ``payi=None`` it is on whenever Pay-i's instrumentation is active
(``payi_instrument()`` was called) at the time of the request. Headers reach the HTTP
request; Pay-i's *ingest* mode reads its attribution at the SDK method call, above the
transport, so there the bridge cannot change what Pay-i ingests (use Pay-i's proxy mode,
or name the user with payi_guard's ``track_context`` only).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Final

from payi_guard import log as events
from payi_guard.context import Attribution
from payi_guard.exceptions import MissingDependency

__all__ = [
    "MANAGED_HEADERS",
    "PayiBridge",
    "attribution_headers",
    "payi_instrumented",
]

MANAGED_HEADERS: Final = (
    "xProxy-Limit-IDs",
    "xProxy-Request-Properties",
    "xProxy-UseCase-ID",
    "xProxy-UseCase-Name",
    "xProxy-UseCase-Version",
    "xProxy-UseCase-Step",
    "xProxy-UseCase-Properties",
    "xProxy-User-ID",
    "xProxy-Account-Name",
)
"""The Pay-i attribution headers the bridge owns (replaced on every bridged request)."""


def payi_instrumented() -> bool:
    """Whether Pay-i's instrumentation is active in this process (never imports Pay-i)."""
    module = sys.modules.get("payi.lib.instrument")
    return module is not None and getattr(module, "_instrumentor", None) is not None


def _create_headers() -> Callable[..., dict[str, str]]:
    try:
        from payi.lib.helpers import create_headers
    except ImportError:
        raise MissingDependency("payi", "payi") from None
    return create_headers


def attribution_headers(attribution: Attribution, user_id: str | None) -> dict[str, str]:
    """Pay-i's headers for one call, built by Pay-i's own ``create_headers``.

    Args:
        attribution: the attribution captured when the request was sent.
        user_id: the user charged (``None`` for anonymous calls: no user header).

    Returns:
        The ``xProxy-*`` headers (only those with a value).

    Raises:
        MissingDependency: the ``payi`` package is not installed.
    """
    create_headers = _create_headers()
    kwargs: dict[str, Any] = {
        "limit_ids": list(attribution.limit_ids) or None,
        "user_id": user_id,
        "account_name": attribution.account_name,
        "use_case_id": attribution.use_case_id,
        "use_case_name": attribution.use_case_name,
        "use_case_version": attribution.use_case_version,
        "use_case_step": attribution.use_case_step,
        "use_case_properties": dict(attribution.use_case_properties) or None,
        "request_properties": dict(attribution.request_properties) or None,
    }
    try:
        made = create_headers(**kwargs)
    except (TypeError, ValueError):
        # Properties Pay-i cannot write as JSON (a date, say): the call goes without them.
        _skipped("xProxy-*-Properties", "the properties are not JSON")
        made = create_headers(**{**kwargs, "use_case_properties": None, "request_properties": None})
    headers: dict[str, str] = {}
    for name, value in made.items():
        if (
            isinstance(value, str)
            and value.isascii()
            and value.isprintable()
            and value == value.strip()
        ):
            headers[name] = value
        else:
            # HTTP cannot carry it (non-ASCII, control characters, outer spaces): the call
            # goes without this header rather than fail.
            _skipped(name, "the value is not printable ASCII without outer spaces")
    return headers


_warned: set[str] = set()


def _skipped(name: str, reason: str) -> None:
    """Log, once per header name in this process, that a Pay-i header was left out."""
    if name in _warned:
        return
    _warned.add(name)
    events.get_logger().warning(events.PAYI_HEADER_SKIPPED, header=name, reason=reason)


class PayiBridge:
    """Decides per request whether to add Pay-i headers, and computes them.

    Args:
        mode: ``True`` (always), ``False`` (never) or ``None`` (whenever Pay-i's
            instrumentation is active).

    Raises:
        MissingDependency: ``mode`` is ``True`` and ``payi`` is not installed.
    """

    __slots__ = ("mode",)

    def __init__(self, mode: bool | None) -> None:
        if mode is True:
            _create_headers()
        self.mode = mode

    def enabled(self) -> bool:
        """Whether the next request gets Pay-i headers."""
        if self.mode is None:
            return payi_instrumented()
        return self.mode

    def apply(self, headers: Any, attribution: Attribution, user_id: str | None) -> None:
        """Replace the Pay-i attribution headers of a request's ``headers`` in place.

        Args:
            headers: the request's ``Headers`` (httpx or httpx2).
            attribution: the attribution captured when the request was sent.
            user_id: the user charged, or ``None`` for an anonymous call.
        """
        for name in MANAGED_HEADERS:
            if name in headers:
                del headers[name]
        for name, value in attribution_headers(attribution, user_id).items():
            headers[name] = value
