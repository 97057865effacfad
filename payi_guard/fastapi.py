"""FastAPI conveniences: dependencies that attribute and gate, and exception handlers.

::

    from fastapi import Depends, FastAPI
    from payi_guard.fastapi import guard_user, install_exception_handlers, require_budget
    from payi_guard.web import GuardMiddleware

    app = FastAPI()
    app.add_middleware(GuardMiddleware, guard=guard)

    current_user = guard_user(get_current_user, id=lambda u: u.id, tier=lambda u: u.plan)
    budget = require_budget(guard, user=current_user)

    @app.post("/chat", dependencies=[Depends(budget)])
    async def chat(user: User = Depends(current_user)) -> dict[str, str]:
        ...  # every GenAI call here is charged to user.id

``guard_user`` wraps the app's own authentication dependency (sync or async): the one
``Depends`` both authenticates and names the request's user with
:func:`~payi_guard.set_user`. The user is only known once the dependency ran, i.e. after
the middleware's early gate; :func:`require_budget` gates one route after it instead.
"""

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from payi_guard.context import current_request, set_user
from payi_guard.engine import Guard
from payi_guard.exceptions import (
    BudgetExceeded,
    InvalidUserId,
    MissingDependency,
    StorageError,
)
from payi_guard.web.core import WebCore
from payi_guard.web.gate import store_gate_headers
from payi_guard.web.identify import is_guarded_request, rebind_user
from payi_guard.web.problem import PROBLEM_CONTENT_TYPE, Problem

try:
    from fastapi import Depends, FastAPI, HTTPException, Request, Response
except ImportError as exc:  # pragma: no cover - the fastapi extra installs it
    raise MissingDependency("fastapi", "fastapi") from exc

__all__ = [
    "BudgetHTTPException",
    "guard_user",
    "install_exception_handlers",
    "problem_response",
    "require_budget",
]


class BudgetHTTPException(HTTPException):
    """An ``HTTPException`` carrying the guard's problem response (429, 401 or 503).

    FastAPI's default handler answers it as ``{"detail": <problem>}`` with the problem's
    status and headers; :func:`install_exception_handlers` answers it with the exact
    ``application/problem+json`` body.

    Attributes:
        problem: the response to send.
    """

    def __init__(self, problem: Problem) -> None:
        super().__init__(
            status_code=problem.status,
            detail=dict(problem.document),
            headers=dict(problem.headers),
        )
        self.problem = problem


def problem_response(problem: Problem) -> Response:
    """Return ``problem`` as a Starlette/FastAPI ``Response``."""
    return Response(
        content=problem.body,
        status_code=problem.status,
        headers=dict(problem.headers),
        media_type=PROBLEM_CONTENT_TYPE,
    )


def guard_user(
    dependency: Callable[..., Any],
    *,
    id: Callable[[Any], object] | None = None,
    tier: Callable[[Any], str | None] | None = None,
) -> Callable[..., Awaitable[Any]]:
    """Wrap an authentication dependency so that it also names the request's user.

    Args:
        dependency: the app's own dependency (sync or async, with its own
            sub-dependencies) that returns the current user, or ``None``.
        id: turns that user into its id (``lambda u: u.id``); default: the returned
            value is the id itself.
        tier: turns that user into the name of their tier (``lambda u: u.plan``), a
            tier under ``tiers:`` (``None``: the budgets file, ``tier_of`` or
            ``default`` decide).

    Returns:
        A dependency for ``Depends(...)`` that returns what ``dependency`` returned,
        after :func:`~payi_guard.set_user` of its id and tier (when the id is not
        ``None``).

    Raises:
        TypeError: ``dependency``, ``id`` or ``tier`` is not callable.

    The returned dependency raises ``InvalidUserId`` (answered 400 by the middleware)
    for an invalid id, and ``NoRequestScope`` when no ``GuardMiddleware`` runs.
    """
    if not callable(dependency):
        raise TypeError("guard_user() needs the app's authentication dependency")
    if id is not None and not callable(id):
        raise TypeError("id= must be a callable that returns the user id")
    if tier is not None and not callable(tier):
        raise TypeError("tier= must be a callable that returns the user's tier name or None")
    to_id, to_tier = id, tier

    async def attributed_user(user: Annotated[Any, Depends(dependency)]) -> Any:
        if user is not None:
            value = to_id(user) if to_id is not None else user
            if value is not None:
                plan = to_tier(user) if to_tier is not None else None
                rebind_user(set_user(value, tier=plan))
        return user

    attributed_user.__name__ = f"guard_user_{getattr(dependency, '__name__', 'dependency')}"
    attributed_user.__qualname__ = attributed_user.__name__
    return attributed_user


def _nothing() -> None:
    return None


def require_budget(
    guard: Guard,
    *,
    user: Callable[..., Any] | None = None,
    block_status: int = 429,
    budget_headers: bool = False,
) -> Callable[..., Awaitable[None]]:
    """Return a dependency that refuses the route when the user's budget is used up.

    Inside a :class:`~payi_guard.web.GuardMiddleware` request it raises the refusal
    itself (``BudgetExceeded``, ``UserRequired`` or ``StorageError``) and the middleware
    writes the ``application/problem+json`` response; without the middleware it raises
    :class:`BudgetHTTPException`, an ``HTTPException`` with the same status and headers.

    Args:
        guard: the guard that holds the budgets.
        user: the dependency that names the user (``guard_user(...)``), so the gate
            runs after it; FastAPI caches it, so it still runs once per request.
        block_status: the status of a refusal (without the middleware).
        budget_headers: on success, add the tightest limit's ``RateLimit`` headers to
            the response: inside a :class:`~payi_guard.web.GuardMiddleware` request read
            as the response starts (what the endpoint spent counted); without it, read
            before the endpoint runs, and not applied when the endpoint returns a
            ``Response`` itself.

    Returns:
        The dependency, for ``Depends(...)`` or ``dependencies=[...]``.
    """
    core = WebCore(guard, block_status=block_status, budget_headers=budget_headers)
    before = user if user is not None else _nothing

    async def budget_gate(response: Response, _user: Annotated[Any, Depends(before)]) -> None:
        in_middleware = is_guarded_request()
        try:
            limit, headers = await core.gate.aevaluate()
        except BudgetExceeded as exc:  # UserRequired
            if in_middleware:
                raise
            raise BudgetHTTPException(core.problems.problem_for_refusal(exc)) from exc
        except StorageError as exc:
            result = core.gate.storage_failed(exc)
            if result.problem is None:
                return
            if in_middleware:
                raise
            raise BudgetHTTPException(result.problem) from exc
        if limit is not None:
            problem = core.gate.refuse(limit)
            if in_middleware:
                raise BudgetExceeded(
                    core.gate.refused_user(), limit, core.problems.retry_after(limit)
                )
            raise BudgetHTTPException(problem)
        if in_middleware:
            # The middleware adds them as the response starts, read then: they count
            # what the endpoint spent.
            scope = current_request()
            if scope is not None:
                store_gate_headers(scope, headers)
            return
        for name, value in headers:
            response.headers[name] = value

    return budget_gate


def install_exception_handlers(app: FastAPI, guard: Guard, *, block_status: int = 429) -> None:
    """Answer the guard's exceptions with ``application/problem+json`` (without middleware).

    ``BudgetExceeded`` -> ``block_status`` (``UserRequired`` -> 401), ``InvalidUserId``
    -> 400, ``StorageError`` -> 503, :class:`BudgetHTTPException` -> its problem.
    Starlette applies these handlers only before the response starts; a refusal in a
    streamed body is handled by :class:`~payi_guard.web.GuardMiddleware`.

    Args:
        app: the FastAPI (or Starlette) app.
        guard: the guard whose clock and config the responses use.
        block_status: the status of a budget refusal.
    """
    core = WebCore(guard, block_status=block_status)

    async def guard_error(request: Request, exc: Exception) -> Response:
        problem = (
            exc.problem if isinstance(exc, BudgetHTTPException) else core.problems.problem_for(exc)
        )
        if problem is None:  # pragma: no cover - only registered for the classes below
            raise exc
        return problem_response(problem)

    for exc_class in (BudgetHTTPException, BudgetExceeded, InvalidUserId, StorageError):
        app.add_exception_handler(exc_class, guard_error)
