"""Web integration: ASGI and WSGI middleware around one protocol-neutral core.

* :class:`GuardMiddleware` (ASGI: Starlette, FastAPI, any ASGI app);
* :class:`WSGIGuardMiddleware` (WSGI: Flask, Django, any WSGI app);
* :mod:`payi_guard.flask` (the ``PayiGuard`` extension) and :mod:`payi_guard.fastapi`
  (dependencies and exception handlers) build on them;
* :mod:`payi_guard.web.core` holds the shared decisions and the problem responses.
"""

from __future__ import annotations

from payi_guard.web.asgi import GuardMiddleware
from payi_guard.web.core import (
    PROBLEM_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    USER_HEADER,
    GateResult,
    Problem,
    WebCore,
)
from payi_guard.web.wsgi import WSGIGuardMiddleware

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "REQUEST_ID_HEADER",
    "USER_HEADER",
    "GateResult",
    "GuardMiddleware",
    "Problem",
    "WSGIGuardMiddleware",
    "WebCore",
]
