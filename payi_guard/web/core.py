"""The protocol-neutral core shared by the ASGI and WSGI middleware: :class:`WebCore`.

Everything here works on plain values (paths, header strings, a
:class:`~payi_guard.context.RequestScope`), never on a framework's request object, so
:class:`~payi_guard.web.GuardMiddleware`, :class:`~payi_guard.web.WSGIGuardMiddleware`
and the Flask and FastAPI conveniences are thin adapters around one :class:`WebCore`.
It bundles the app's :class:`~payi_guard.web.options.WebOptions` with the parts that
act on them: :mod:`~payi_guard.web.identify` (who the request is for),
:mod:`~payi_guard.web.gate` (may they spend) and :mod:`~payi_guard.web.problem` (the
responses the guard writes itself).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterable, MutableMapping
from typing import Any, TypeVar

from typing_extensions import Unpack

from payi_guard import log as events
from payi_guard.context import RequestScope
from payi_guard.engine import Guard
from payi_guard.exceptions import BudgetExceeded, InvalidUserId, StorageError
from payi_guard.usage import LimitUsage
from payi_guard.web.gate import Gate, GateResult
from payi_guard.web.identify import Identifier, request_id_of
from payi_guard.web.options import WebOptionArgs, WebOptions
from payi_guard.web.problem import AFTER_START_EVENT, Problem, Problems

__all__ = ["WebCore", "with_headers"]

_Text = TypeVar("_Text", str, bytes)


def with_headers(
    headers: Iterable[tuple[_Text, _Text]], extra: list[tuple[_Text, _Text]]
) -> list[tuple[_Text, _Text]] | None:
    """``headers`` and the ``extra`` ones they do not name (by any case), in a new list.

    ``None`` when ``headers`` already name every one of ``extra`` (or it is empty), so
    the caller keeps its own list: the app's headers are never changed, since an app may
    send the same list again. ASGI headers (bytes) and WSGI ones (text) alike.
    """
    if len(extra) == 1:  # the request id alone: no set to build
        item = extra[0]
        key = item[0].lower()
        for name, _ in headers:
            if name.lower() == key:
                return None
        out = list(headers)
        out.append(item)
        return out
    if not extra:
        return None
    present = {name.lower() for name, _ in headers}
    missing = [h for h in extra if h[0].lower() not in present]
    return list(headers) + missing if missing else None


class WebCore:
    """Options and decisions of the guard middleware, independent of ASGI or WSGI.

    Build it once per app (the middleware does); every method is safe to call from many
    threads and tasks at once.

    Args:
        guard: the :class:`~payi_guard.engine.Guard` that holds the budgets.
        user: a resolver called with the request (the adapter decides the type) that
            returns the user id or ``None``.
        session_id: for the ``session`` anonymous strategy: a callable given the request
            that returns the session or device id, or ``None``.
        **options: the other :class:`~payi_guard.web.options.WebOptions`.

    Attributes:
        guard: the guard.
        options: the validated options.
        problems: builds the responses the guard writes itself.
        identify: names the user of a request.
        gate: the early budget check of guarded paths.
        log: the library's structlog logger.

    Raises:
        TypeError: an option has the wrong type.
        ValueError: an option has an invalid value.
    """

    def __init__(
        self,
        guard: Guard,
        *,
        user: Callable[[Any], Any] | None = None,
        session_id: Callable[[Any], Any] | None = None,
        **options: Unpack[WebOptionArgs],
    ) -> None:
        if not isinstance(guard, Guard):
            raise TypeError(f"guard= must be a payi_guard Guard, not {type(guard).__name__}")
        self.guard = guard
        self.options = WebOptions(user=user, session_id=session_id, **options)
        self.log = events.get_logger()
        self.problems = Problems(guard, self.options)
        self.identify = Identifier(guard, self.options, self.problems, self.log)
        self.gate = Gate(guard, self.options, self.problems, self.log)

    # -- request ids and paths ------------------------------------------------------------

    @staticmethod
    def request_id(incoming: str | None) -> str:
        """See :func:`~payi_guard.web.identify.request_id_of`."""
        return request_id_of(incoming)

    def guarded(self, path: str) -> bool:
        """Return True if ``path`` matches one of ``guarded_paths``."""
        return self.gate.guarded(path)

    # -- users ----------------------------------------------------------------------------

    def assign_user(
        self, scope: RequestScope, value: object, source: str, tier: str | None = None
    ) -> Problem | None:
        """See :meth:`Identifier.assign_user <payi_guard.web.identify.Identifier.assign_user>`."""
        return self.identify.assign_user(scope, value, source, tier)

    def invalid_user(self, exc: InvalidUserId, source: str) -> Problem | None:
        """See :meth:`Identifier.invalid_user <payi_guard.web.identify.Identifier.invalid_user>`."""
        return self.identify.invalid_user(exc, source)

    def header_user(self, value: str | None) -> str | None:
        """See :meth:`Identifier.header_user <payi_guard.web.identify.Identifier.header_user>`."""
        return self.identify.header_user(value)

    def wants_session(self) -> bool:
        """True when the guard's anonymous strategy is ``session``."""
        return self.identify.wants_session()

    @staticmethod
    def stored_session(session: MutableMapping[str, Any] | None) -> str | None:
        """The id kept in a signed or server-side session (see :mod:`~payi_guard.web.identify`)."""
        return Identifier.stored_session(session)

    @staticmethod
    def set_session(scope: RequestScope, session: object) -> None:
        """Store the session id the ``session`` strategy charges anonymous calls to."""
        Identifier.set_session(scope, session)

    # -- the gate -------------------------------------------------------------------------

    def evaluate(self) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        """See :meth:`Gate.evaluate <payi_guard.web.gate.Gate.evaluate>`."""
        return self.gate.evaluate()

    def aevaluate(
        self,
    ) -> Coroutine[Any, Any, tuple[LimitUsage | None, tuple[tuple[str, str], ...]]]:
        """See :meth:`Gate.aevaluate <payi_guard.web.gate.Gate.aevaluate>` (awaitable)."""
        return self.gate.aevaluate()

    def check(self) -> GateResult:
        """See :meth:`Gate.check <payi_guard.web.gate.Gate.check>`."""
        return self.gate.check()

    def acheck(self) -> Coroutine[Any, Any, GateResult]:
        """See :meth:`Gate.acheck <payi_guard.web.gate.Gate.acheck>` (awaitable)."""
        return self.gate.acheck()

    def refused_user(self) -> str:
        """The id a refusal of the current request is logged and raised with."""
        return self.gate.refused_user()

    def refuse(self, limit: LimitUsage) -> Problem:
        """Log ``budget_exceeded`` for the gate and return the refusal problem."""
        return self.gate.refuse(limit)

    def storage_failed(self, exc: StorageError) -> GateResult:
        """Log a gate storage failure and apply ``on_storage_error`` (503 or pass)."""
        return self.gate.storage_failed(exc)

    # -- problems -------------------------------------------------------------------------

    def problem_for(self, exc: BaseException) -> Problem | None:
        """See :meth:`Problems.problem_for <payi_guard.web.problem.Problems.problem_for>`."""
        return self.problems.problem_for(exc)

    def problem_for_refusal(self, exc: BudgetExceeded) -> Problem:
        """The 401 (``UserRequired``) or budget problem of a refusal."""
        return self.problems.problem_for_refusal(exc)

    def refused_after_start(self, exc: BudgetExceeded, request_id: str | None) -> None:
        """Log ``budget_exceeded_after_start``: a call refused once the response had started.

        The status line was sent, so no refusal can be answered; the response is closed
        early instead, and this line says why.
        """
        self.log.error(
            AFTER_START_EVENT,
            user_id=exc.user_id,
            limit=exc.limit.name,
            request_id=request_id,
            detail="a GenAI call was refused after the response started; the response "
            "was closed early",
        )

    def retry_after(self, limit: LimitUsage) -> int:
        """Whole seconds until ``limit`` resets, at least 1 (from the guard's clock)."""
        return self.problems.retry_after(limit)

    def budget_problem(self, limit: LimitUsage) -> Problem:
        """See :meth:`Problems.budget_problem <payi_guard.web.problem.Problems.budget_problem>`."""
        return self.problems.budget_problem(limit)

    def rate_limit_headers(self, limit: LimitUsage) -> tuple[tuple[str, str], ...]:
        """Return the ``RateLimit-Policy`` and ``RateLimit`` headers of ``limit``."""
        return self.problems.rate_limit_headers(limit)
