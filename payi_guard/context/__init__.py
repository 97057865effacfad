"""Attribution context: who and what a GenAI call is charged to.

The API mirrors Pay-i's (``track_context``, ``@track``, the same keyword names) but the
state lives in :mod:`contextvars`, never in thread-locals, so concurrent asyncio tasks and
threads never see each other's user.

Nesting rules for :func:`track_context` and :func:`track`:

* ``None`` (or an omitted keyword) inherits the outer value;
* ``""``, ``[]`` and ``{}`` clear it;
* scalars: the inner value wins;
* ``limit_ids``: the ordered union, outer ids first, no duplicates;
* ``request_properties`` / ``use_case_properties``: merged, inner keys win.

A web request adds one more layer, a mutable :class:`RequestScope` opened by the
middleware (or :func:`request_scope`), that :func:`set_user` fills from anywhere inside
the request, thread pools included. The user an explicit ``track_context(user_id=...)``
names always wins over the request's user.
"""

from payi_guard.context.scope import (
    Attribution,
    RequestScope,
    check_tier,
    current_request,
    get_context,
    request_scope,
    set_user,
)
from payi_guard.context.track import track, track_context
from payi_guard.threads import ContextThreadPoolExecutor, bind_context

__all__ = [
    "Attribution",
    "ContextThreadPoolExecutor",
    "RequestScope",
    "bind_context",
    "check_tier",
    "current_request",
    "get_context",
    "request_scope",
    "set_user",
    "track",
    "track_context",
]
