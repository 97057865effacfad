"""The early budget gate: guarded paths are checked before the app runs.

A guarded request whose user has a block limit used up is answered with the refusal
problem without running the app; ``budget_headers=True`` adds the ``RateLimit`` fields of
the user's tightest limit to successful responses, read again as the response starts (so
they count what the request's own calls spent). Each GenAI call is still reserved
atomically by the guard, whatever the gate said.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from payi_guard import log as events
from payi_guard.context import RequestScope, get_context
from payi_guard.engine import ANONYMOUS_USER, Guard
from payi_guard.engine.plan import blocking
from payi_guard.exceptions import BudgetExceeded, PayiGuardError, StorageError
from payi_guard.usage import LimitUsage
from payi_guard.web.options import WebOptions
from payi_guard.web.problem import Problem, Problems, json_number

__all__ = ["RATE_HEADERS_KEY", "Gate", "GateResult", "store_gate_headers"]

RATE_HEADERS_KEY = "payi_guard.web.rate_headers"
"""The request scope's mark that its response gets ``RateLimit`` headers (internal)."""


@dataclass(frozen=True, slots=True)
class GateResult:
    """What the early budget gate decided for one request.

    Attributes:
        problem: the response to send instead of running the app, or ``None`` to run it.
        headers: the ``RateLimit`` headers as the gate read them (``budget_headers=True``
            only): when any, the response gets them read again as it starts
            (:meth:`Gate.response_headers`), so they count the request's own calls.
    """

    problem: Problem | None = None
    headers: tuple[tuple[str, str], ...] = ()


_PASS = GateResult()
_DECIDED_MAX = 1024


class Gate:
    """Decides, before the app runs, whether a guarded request may spend.

    Args:
        guard: the guard that holds the budgets.
        options: ``guarded_paths``, ``gate`` and ``budget_headers`` drive it.
        problems: builds the refusal and storage problems.
        log: where refusals and storage failures are logged.
    """

    def __init__(self, guard: Guard, options: WebOptions, problems: Problems, log: Any) -> None:
        self.guard = guard
        self.options = options
        self.problems = problems
        self.log = log
        self._budget_headers = options.budget_headers
        self._read_storage = options.read_storage
        patterns = options.guarded_paths
        # fnmatchcase semantics: paths are case-sensitive on every platform.
        self._paths = (
            re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
            if patterns
            else None
        )
        # Decisions of paths seen lately: an app serves a few paths again and again, and
        # a dict lookup costs a fraction of the match. Bounded (cleared when full), as
        # paths come from clients.
        self.decided: dict[str, bool] = {}
        """What :meth:`guarded` answered for the paths seen lately (read it, never write)."""
        self.sync = not self._budget_headers and not self._read_storage
        """:meth:`check` does no I/O here: async code may call it instead of :meth:`acheck`."""

    def guarded(self, path: str) -> bool:
        """Return True if ``path`` matches one of ``guarded_paths``."""
        decided = self.decided.get(path)
        if decided is not None:
            return decided
        if self._paths is None:
            return False
        decided = self._paths.match(path) is not None
        if len(self.decided) >= _DECIDED_MAX:
            self.decided.clear()
        self.decided[path] = decided
        return decided

    def _usage_owner(self) -> tuple[str, tuple[str, ...], str | None]:
        attribution = get_context()
        subject = self.guard.subject_for(attribution)
        owner = subject.user_id if subject.anonymous else (subject.policy_user or subject.user_id)
        return owner, attribution.limit_ids, attribution.tier

    def evaluate(self) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        """Read the current user's budget once (sync).

        Returns:
            The exhausted block limit (``None`` when the user may spend) and, with
            ``budget_headers``, the ``RateLimit`` headers of the tightest limit.

        Raises:
            UserRequired: no user is known and anonymous calls are rejected.
            StorageError: the storage failed.
            ConfigError: ``limit_ids`` in the context names an undefined limit.
        """
        if self._budget_headers:
            owner, limit_ids, tier = self._usage_owner()
            return self._verdict(self.guard.usage(owner, limit_ids=limit_ids, tier=tier))
        return (
            self.guard.exhausted_limit(get_context(), read_storage=self._read_storage),
            (),
        )

    async def aevaluate(self) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        """Async :meth:`evaluate`; never blocks the event loop."""
        if self._budget_headers:
            owner, limit_ids, tier = self._usage_owner()
            return self._verdict(await self.guard.ausage(owner, limit_ids=limit_ids, tier=tier))
        return (
            await self.guard.aexhausted_limit(get_context(), read_storage=self._read_storage),
            (),
        )

    def response_headers(self, scope: RequestScope) -> tuple[tuple[str, str], ...]:
        """The ``RateLimit`` headers of a successful response, read as it starts (sync).

        With ``budget_headers``, after :meth:`check` passed the request: the user's
        tightest limit read again, so ``r`` counts what the request's own calls spent
        (and still hold, for a stream under way). Empty for any other request, and when
        the read fails (the response is never held up for its headers).
        """
        if RATE_HEADERS_KEY not in scope.extra:
            return ()
        try:
            owner, limit_ids, tier = self._usage_owner()
            return self._headers_of(self.guard.usage(owner, limit_ids=limit_ids, tier=tier))
        except (PayiGuardError, ValueError):
            return ()

    async def aresponse_headers(self, scope: RequestScope) -> tuple[tuple[str, str], ...]:
        """Async :meth:`response_headers`; never blocks the event loop."""
        if RATE_HEADERS_KEY not in scope.extra:
            return ()
        try:
            owner, limit_ids, tier = self._usage_owner()
            usages = await self.guard.ausage(owner, limit_ids=limit_ids, tier=tier)
            return self._headers_of(usages)
        except (PayiGuardError, ValueError):
            return ()

    def _headers_of(self, usages: Sequence[LimitUsage]) -> tuple[tuple[str, str], ...]:
        tightest = _tightest(usages)
        return () if tightest is None else self.problems.rate_limit_headers(tightest)

    def check(self) -> GateResult:
        """Gate the current request before the app runs (sync; the WSGI twin).

        Returns:
            What to do: answer a problem, or run the app (with optional headers).

        Raises:
            ConfigError: ``limit_ids`` in the context names an undefined limit.
        """
        try:
            if self._budget_headers:
                limit, headers = self.evaluate()
            else:
                # evaluate() without its tuple (this runs on every guarded request).
                headers = ()
                limit = self.guard.exhausted_limit(read_storage=self._read_storage)
        except BudgetExceeded as exc:  # UserRequired: anonymous calls are rejected
            return GateResult(self.problems.problem_for_refusal(exc))
        except StorageError as exc:
            return self.storage_failed(exc)
        if limit is None and not headers:
            return _PASS
        return self._result(limit, headers)

    async def acheck(self) -> GateResult:
        """Async :meth:`check` (the ASGI twin); never blocks the event loop."""
        if self.sync:
            # The cache gate does no I/O: answer without another coroutine hop.
            return self.check()
        try:
            limit, headers = await self.aevaluate()
        except BudgetExceeded as exc:
            return GateResult(self.problems.problem_for_refusal(exc))
        except StorageError as exc:
            return self.storage_failed(exc)
        return self._result(limit, headers)

    def _result(self, limit: LimitUsage | None, headers: tuple[tuple[str, str], ...]) -> GateResult:
        if limit is not None:
            return GateResult(self.refuse(limit))
        return GateResult(headers=headers) if headers else _PASS

    def _verdict(
        self, usages: Sequence[LimitUsage]
    ) -> tuple[LimitUsage | None, tuple[tuple[str, str], ...]]:
        limit = blocking(usages)  # nothing left; the one that resets last
        if limit is not None:
            return limit, ()
        return None, self._headers_of(usages)

    def refused_user(self) -> str:
        """The id a refusal of the current request is logged and raised with."""
        try:
            return self.guard.subject_for(get_context()).user_id
        except BudgetExceeded:
            return ANONYMOUS_USER

    def refuse(self, limit: LimitUsage) -> Problem:
        """Log ``budget_exceeded`` for the gate and return the refusal problem."""
        context = get_context()
        self.log.warning(
            events.BUDGET_EXCEEDED,
            user_id=self.refused_user(),
            limit=limit.name,
            scope=limit.scope,
            unit=limit.unit,
            used=json_number(limit.used, limit.unit),
            max=json_number(limit.max, limit.unit),
            resets_at=limit.resets_at.isoformat(),
            request_id=context.request_id,
            source="gate",
        )
        return self.problems.budget_problem(limit)

    def storage_failed(self, exc: StorageError) -> GateResult:
        """Log a gate storage failure and apply ``on_storage_error`` (503 or pass)."""
        policy = self.guard.config.on_storage_error
        self.log.error(
            events.STORAGE_ERROR,
            op="gate",
            error=str(exc),
            error_type=type(exc).__name__,
            policy=policy,
        )
        if policy == "allow":
            return _PASS
        return GateResult(self.problems.storage_problem())


def _tightest(usages: Sequence[LimitUsage]) -> LimitUsage | None:
    """The block limit with the smallest share left (ties: the one that resets first)."""
    best: LimitUsage | None = None
    best_key: tuple[Decimal, float] | None = None
    for usage in usages:
        if usage.type != "block":
            continue
        share = Decimal(usage.remaining) / Decimal(usage.max) if usage.max else Decimal(0)
        key = (share, usage.resets_at.timestamp())
        if best_key is None or key < best_key:
            best, best_key = usage, key
    return best


def store_gate_headers(scope: RequestScope, headers: tuple[tuple[str, str], ...]) -> None:
    """Mark a request the gate passed with ``RateLimit`` headers (internal).

    Its response gets them, read again as it starts (:meth:`Gate.response_headers`).
    """
    if headers:
        scope.extra[RATE_HEADERS_KEY] = True
