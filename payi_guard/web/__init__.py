"""Web integration: ASGI and WSGI middleware around one protocol-neutral core.

* :class:`GuardMiddleware` (ASGI: Starlette, FastAPI, any ASGI app);
* :class:`WSGIGuardMiddleware` (WSGI: Flask, Django, any WSGI app);
* :mod:`payi_guard.flask` (the ``PayiGuard`` extension) and :mod:`payi_guard.fastapi`
  (dependencies and exception handlers) build on them;
* :class:`WebCore` (:mod:`payi_guard.web.core`) is that core: the app's
  :class:`WebOptions` (:mod:`~payi_guard.web.options`), who a request is for
  (:mod:`~payi_guard.web.identify`), the early budget gate (:mod:`~payi_guard.web.gate`)
  and the responses the guard writes itself (:mod:`~payi_guard.web.problem`).
"""

from __future__ import annotations

from payi_guard.web.asgi import GuardMiddleware
from payi_guard.web.core import WebCore
from payi_guard.web.gate import GateResult
from payi_guard.web.options import REQUEST_ID_HEADER, USER_HEADER, WebOptions
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE, Problem
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
    "WebOptions",
]
