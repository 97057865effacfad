"""The options of the guard middleware, declared once: :class:`WebOptions`.

Every adapter (:class:`~payi_guard.web.GuardMiddleware`,
:class:`~payi_guard.web.WSGIGuardMiddleware`, :class:`payi_guard.flask.PayiGuard`) takes
the same keyword arguments, :class:`WebOptionArgs`, next to its own ``user`` and
``session_id`` resolvers, whose argument depends on the protocol.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from typing_extensions import TypedDict

__all__ = [
    "REQUEST_ID_HEADER",
    "USER_HEADER",
    "GateMode",
    "InvalidUserPolicy",
    "WebOptionArgs",
    "WebOptions",
]

USER_HEADER = "xProxy-User-ID"
"""The request header that names the user (Pay-i's name); honoured only when trusted."""

REQUEST_ID_HEADER = "X-Request-ID"
"""The request header whose valid value becomes the request id, echoed in the response."""

InvalidUserPolicy = Literal["reject", "anonymous"]
"""What a request whose source names an invalid user id gets: a 400, or anonymity."""

GateMode = Literal["cache", "storage"]
"""How guarded paths are checked before the app runs (see :attr:`WebOptions.gate`)."""

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+\Z")


class WebOptionArgs(TypedDict, total=False):
    """The keyword arguments every adapter passes on to :class:`WebOptions` (see there)."""

    trust_user_header: bool
    user_header: str
    guarded_paths: Sequence[str]
    block_status: int
    budget_headers: bool
    gate: GateMode
    on_invalid_user: InvalidUserPolicy
    request_id_header: str | None
    www_authenticate: str | None


def _check_header_name(option: str, value: str) -> str:
    if not isinstance(value, str) or not _HEADER_NAME.match(value):
        raise ValueError(f"{option} must be an HTTP header name, not {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class WebOptions:
    """The validated options of one app's guard middleware.

    Attributes:
        user: a resolver called with the request (the adapter decides the type: a
            Starlette ``Request`` for ASGI, the environ for WSGI) that returns the user
            id, a ``(user_id, tier)`` pair, or ``None``.
        trust_user_header: honour the ``user_header`` request header. Only for apps
            behind their own authenticating proxy: otherwise anyone could spend someone
            else's budget.
        user_header: the header that names the user.
        guarded_paths: ``fnmatch``-style globs (``"/api/*"``, ``"/chat"``; ``*`` also
            matches ``/``) of the paths gated before the app runs (``OPTIONS``
            requests, i.e. CORS preflights, never are). Default: none, so only the
            refusal of each GenAI call applies. Kept as a tuple.
        block_status: the status of a budget refusal (429 by default).
        budget_headers: add the ``RateLimit`` headers of the user's tightest limit to
            successful responses of guarded paths, read as the response starts so that
            they count what the request spent (a storage read by the gate, and one as
            the response starts).
        gate: how guarded paths are checked before the app runs: ``"cache"`` (default)
            asks the guard's local "spent until the window ends" cache, with no storage
            round trip; ``"storage"`` reads the user's counters from the store (one round
            trip, exact across processes). Either way each GenAI call is still reserved
            atomically, so a user the cache does not know to be spent is refused at the
            call, with the same response.
        on_invalid_user: ``"reject"`` answers 400 when a source names an invalid user
            id; ``"anonymous"`` treats the request as anonymous instead.
        session_id: for the ``session`` anonymous strategy: a callable given the request
            that returns the session or device id, or ``None``. Without it the id comes
            from a signed or server-side session (see :mod:`payi_guard.web.identify`),
            never from a raw cookie.
        request_id_header: the request-id header honoured and echoed; ``None`` to only
            generate ids (still logged, not echoed).
        www_authenticate: the ``WWW-Authenticate`` challenge sent with a 401.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    user: Callable[[Any], Any] | None = None
    trust_user_header: bool = False
    user_header: str = USER_HEADER
    guarded_paths: Sequence[str] = ()
    block_status: int = 429
    budget_headers: bool = False
    gate: GateMode = "cache"
    on_invalid_user: InvalidUserPolicy = "reject"
    session_id: Callable[[Any], Any] | None = None
    request_id_header: str | None = REQUEST_ID_HEADER
    www_authenticate: str | None = None

    def __post_init__(self) -> None:
        if self.user is not None and not callable(self.user):
            raise TypeError("user= must be a callable that returns the user id, or None")
        if self.session_id is not None and not callable(self.session_id):
            raise TypeError("session_id= must be a callable that returns a session id, or None")
        if isinstance(self.guarded_paths, str):
            raise TypeError(f"guarded_paths must be a list of globs, like [{self.guarded_paths!r}]")
        patterns = tuple(self.guarded_paths)
        for pattern in patterns:
            if not isinstance(pattern, str) or not pattern:
                raise TypeError("guarded_paths must contain non-empty strings")
        block_status = self.block_status
        if isinstance(block_status, bool) or not isinstance(block_status, int):
            raise TypeError("block_status must be an int")
        if not 400 <= block_status <= 599:
            raise ValueError(f"block_status must be a 4xx or 5xx status, not {block_status}")
        if self.on_invalid_user not in ("reject", "anonymous"):
            raise ValueError(
                f"on_invalid_user must be 'reject' or 'anonymous', not {self.on_invalid_user!r}"
            )
        _check_header_name("user_header", self.user_header)
        if self.request_id_header is not None:
            _check_header_name("request_id_header", self.request_id_header)
        if self.gate not in ("cache", "storage"):
            raise ValueError(f"gate must be 'cache' or 'storage', not {self.gate!r}")
        # Frozen: normalise through object.__setattr__, as dataclasses document.
        object.__setattr__(self, "guarded_paths", patterns)
        object.__setattr__(self, "trust_user_header", bool(self.trust_user_header))
        object.__setattr__(self, "budget_headers", bool(self.budget_headers))

    @property
    def read_storage(self) -> bool:
        """True when the gate reads the counters from storage (``gate="storage"``)."""
        return self.gate == "storage"
