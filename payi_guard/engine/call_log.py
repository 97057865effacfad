"""The guard's log lines about settled calls: ``genai_call`` and the thresholds crossed.

A :class:`CallLog` writes ``genai_call`` for every call settled (its fields are contract,
see ``payi_guard.log``), ``budget_warning`` and ``budget_overrun`` for the commit that
crossed a limit's threshold, and tells the observers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import structlog

from payi_guard import log as events
from payi_guard.engine.calls import CallRecord
from payi_guard.engine.observers import CallEnded, Observers
from payi_guard.engine.plan import Counter, Plan
from payi_guard.engine.policy import BoundLimit
from payi_guard.ledger.base import CounterState
from payi_guard.money import NANO_USD, cost_usd, log_amount

__all__ = ["BoundLog", "CallLog"]


def _config_object() -> Any:
    """The configuration object of structlog, read without a ``get_config`` dict per call.

    ``None`` when this structlog keeps it elsewhere (``get_config`` is used then).
    """
    held = getattr(getattr(structlog, "_config", None), "_CONFIG", None)
    names = ("default_processors", "default_wrapper_class", "default_context_class")
    if held is None or not all(hasattr(held, name) for name in (*names, "logger_factory")):
        return None
    config = structlog.get_config()
    same = (
        config["processors"] is held.default_processors
        and config["wrapper_class"] is held.default_wrapper_class
        and config["context_class"] is held.default_context_class
        and config["logger_factory"] is held.logger_factory
    )
    return held if same else None


_STRUCTLOG_CONFIG = _config_object()


class BoundLog:
    """The library's structlog logger, bound once per structlog configuration.

    ``structlog.get_logger()`` returns a lazy proxy that assembles a new bound logger
    (and, with a ``WriteLoggerFactory``, a new output logger) on every call unless the
    app set ``cache_logger_on_first_use``. This keeps the one assembled for the
    configuration in effect and assembles again when ``structlog.configure`` changes
    the processors, wrapper class, context class or logger factory (compared by
    identity; a processor list changed in place is the same list, and is seen).
    """

    __slots__ = ("_bound", "_info", "_key")

    def __init__(self) -> None:
        self._key: tuple[object, object, object, object] | None = None
        self._bound: Any = None
        self._info: Callable[[str, dict[str, Any]], None] | None = None

    def current(self) -> Any:
        """The bound logger for the structlog configuration in effect now."""
        held = _STRUCTLOG_CONFIG
        if held is not None:
            processors = held.default_processors
            wrapper = held.default_wrapper_class
            context = held.default_context_class
            factory = held.logger_factory
        else:
            config = structlog.get_config()
            processors = config["processors"]
            wrapper = config["wrapper_class"]
            context = config["context_class"]
            factory = config["logger_factory"]
        key = self._key
        if (
            key is None
            or key[0] is not processors
            or key[1] is not wrapper
            or key[2] is not context
            or key[3] is not factory
        ):
            self._bound = events.get_logger().bind()
            self._info = None if self.info_is_noop(self._bound) else self._info_of(self._bound)
            self._key = (processors, wrapper, context, factory)
        return self._bound

    def info_writer(self) -> Callable[[str, dict[str, Any]], None] | None:
        """What writes an INFO line for the configuration in effect; ``None``: nothing does.

        Under :func:`payi_guard.log.configure_json` it renders and writes the line
        directly (:func:`payi_guard.log.direct_info`); otherwise it is ``info``.
        """
        held = _STRUCTLOG_CONFIG
        key = self._key
        if (
            held is None
            or key is None
            or key[0] is not held.default_processors
            or key[1] is not held.default_wrapper_class
            or key[2] is not held.default_context_class
            or key[3] is not held.logger_factory
        ):
            self.current()
        return self._info

    @staticmethod
    def _info_of(bound: Any) -> Callable[[str, dict[str, Any]], None]:
        direct = events.direct_info(bound)
        if direct is not None:
            return direct
        return lambda event, fields: bound.info(event, **fields)

    @staticmethod
    def info_is_noop(bound: Any) -> bool:
        """Whether ``bound.info`` does nothing at all: a filtering logger above INFO.

        Only then may a caller skip building the fields (any other wrapper runs its
        processors, which may have effects of their own, whatever the level).
        """
        method = getattr(type(bound), "info", None)
        return getattr(method, "__name__", "") == "_nop"

    def __getattr__(self, name: str) -> Any:
        return getattr(self.current(), name)


class CallLog:
    """Writes the log lines of settled calls and tells the observers.

    Args:
        log: the structlog logger.
        observers: the observers told of every call that ended.
    """

    def __init__(self, log: BoundLog, observers: Observers) -> None:
        self._log = log
        self.observers = observers
        # The (model, provider) pairs already said to have no price (bounded).
        self._unpriced: set[tuple[str, str]] = set()

    def thresholds(self, plan: Plan, counter: Counter, state: CounterState, amount: int) -> None:
        """Log the thresholds of ``counter``'s limits that adding ``amount`` crossed."""
        after = state.settled
        before = after - amount
        if amount <= 0:
            return
        for bound in counter.limits:
            spec = bound.spec
            if spec.warn_at is not None:
                threshold_num = spec.max * spec.warn_at.numerator
                den = spec.warn_at.denominator
                # The one commit that moves the settled total across the threshold logs
                # it; settled totals only grow, so that is once per window, fleet-wide.
                if before * den < threshold_num <= after * den:
                    self._threshold_log(events.BUDGET_WARNING, plan, bound, counter, after)
            if before <= spec.max < after:
                self._threshold_log(events.BUDGET_OVERRUN, plan, bound, counter, after)

    def _threshold_log(
        self, event: str, plan: Plan, bound: BoundLimit, counter: Counter, used: int
    ) -> None:
        spec = bound.spec
        self._log.warning(
            event,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            limit=spec.name,
            scope=bound.scope,
            unit=spec.unit,
            type=spec.type,
            used=log_amount(spec.unit, used),
            max=log_amount(spec.unit, spec.max),
            resets_at=counter.window.resets_at.isoformat(),
            request_id=plan.attribution.request_id,
        )

    def call(self, plan: Plan, record: CallRecord, *, ledger: str | None = None) -> None:
        """Log ``genai_call``.

        ``ledger`` is set when the commit was given up: ``failed`` (it was not applied)
        or ``unknown`` (an attempt may have been).
        """
        attribution = plan.attribution
        if not record.priced and record.outcome != "recorded":
            self._unpriced_model(plan)
        info = self._log.info_writer()
        if info is not None:
            direct = info if isinstance(info, events.DirectInfo) else None
            head = None if direct is None else _head(plan, record)
            if direct is None or head is None:
                info(events.GENAI_CALL, self._call_fields(plan, record, ledger))
            else:
                tail: dict[str, Any] = {}
                _add_extra_fields(tail, plan, record, ledger)
                if not direct.write_after(head, _HEAD_KEYS, events.GENAI_CALL, tail):
                    info(events.GENAI_CALL, self._call_fields(plan, record, ledger))
        if self.observers:
            self.observers.call_ended(CallEnded(record, plan.call.endpoint, attribution))

    def _unpriced_model(self, plan: Plan) -> None:
        """Log ``unknown_model`` once per model (and provider) a call was let through unpriced."""
        call = plan.call
        key = (call.model, call.provider)
        if key in self._unpriced:
            return
        if len(self._unpriced) >= _UNPRICED_KEPT:
            self._unpriced.clear()
        self._unpriced.add(key)
        self._log.warning(
            events.UNKNOWN_MODEL,
            user_id=plan.subject.user_id,
            org_id=plan.subject.org_id,
            model=call.model,
            provider=call.provider,
            unknown_model="allow",
            outcome="allowed",
            request_id=plan.attribution.request_id,
            detail=(
                "no price is known for this model: its calls go ahead and are charged "
                "nothing in money (said once per model in this process; each genai_call "
                "line says priced: false)"
            ),
        )

    @staticmethod
    def _call_fields(plan: Plan, record: CallRecord, ledger: str | None) -> dict[str, Any]:
        usage = record.usage
        attribution = plan.attribution
        fields: dict[str, Any] = {
            "user_id": record.user_id,
            "org_id": record.org_id,
            "account_name": attribution.account_name,
            "use_case_name": attribution.use_case_name,
            "limit_ids": list(attribution.limit_ids),
            "model": record.model,
            "provider": record.provider,
            "endpoint": plan.call.endpoint,
            "input_tokens": usage.input_tokens if usage else 0,
            "output_tokens": usage.output_tokens if usage else 0,
            "cache_read_tokens": usage.cache_read_tokens if usage else 0,
            "cache_write_tokens": usage.cache_write_tokens if usage else 0,
            "cost_usd": record.cost_nano / NANO_USD,  # cost_usd(), inline
            "reserved_usd": record.reserved_nano / NANO_USD,
            "latency_ms": record.latency_ms,
            "stream": record.stream,
            "outcome": record.outcome,
            "request_id": attribution.request_id,
        }
        _add_extra_fields(fields, plan, record, ledger)
        return fields


_HEAD_KEYS = frozenset(
    [
        "user_id",
        "org_id",
        "account_name",
        "use_case_name",
        "limit_ids",
        "model",
        "provider",
        "endpoint",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cost_usd",
        "reserved_usd",
        "latency_ms",
        "stream",
        "outcome",
        "request_id",
    ]
)
"""The fields every ``genai_call`` line starts with (:meth:`CallLog._call_fields`)."""

_HEADS: dict[tuple[object, ...], str] = {}
"""The JSON text of the first eight of those fields, for each set of their values."""

_HEADS_KEPT = 4096
_UNPRICED_KEPT = 1024
_ESCAPE: Callable[[str], str] = json.encoder.encode_basestring_ascii  # what the line uses


def _head(plan: Plan, record: CallRecord) -> str | None:
    """The JSON text of the head fields of ``genai_call`` (without ``}``), or ``None``.

    The same text :func:`payi_guard.log.encode_json` gives for those fields of
    :meth:`CallLog._call_fields`: the first eight (who, what, where; text or null) are
    encoded once per set of values; the counts, amounts and the rest are formatted as
    the encoder formats them. ``None`` when a value is not of the plain type this
    relies on (the caller encodes the whole fields then).
    """
    attribution = plan.attribution
    key = (
        record.user_id,
        record.org_id,
        attribution.account_name,
        attribution.use_case_name,
        attribution.limit_ids,
        record.model,
        record.provider,
        plan.call.endpoint,
    )
    try:
        start = _HEADS.get(key)
    except TypeError:  # an unhashable value: not of a type encoded once
        return None
    if start is None:
        for index, value in enumerate(key):
            if index == 4:
                if type(value) is not tuple or any(type(v) is not str for v in value):
                    return None
            elif type(value) is not str and value is not None:
                return None
        fields: dict[str, Any] = {
            "user_id": key[0],
            "org_id": key[1],
            "account_name": key[2],
            "use_case_name": key[3],
            "limit_ids": list(attribution.limit_ids),
            "model": key[5],
            "provider": key[6],
            "endpoint": key[7],
        }
        if len(_HEADS) >= _HEADS_KEPT:
            _HEADS.clear()  # bounded; the hot ones come back at once
        start = _HEADS[key] = events.encode_json(fields)[:-1] + ', "input_tokens": '
    usage = record.usage
    if usage is None:
        tokens_in = tokens_out = cache_read = cache_write = 0
    else:
        tokens_in, tokens_out = usage.input_tokens, usage.output_tokens
        cache_read, cache_write = usage.cache_read_tokens, usage.cache_write_tokens
    latency = record.latency_ms
    stream = record.stream
    outcome = record.outcome
    request_id = attribution.request_id
    if not (
        type(tokens_in) is int
        and type(tokens_out) is int
        and type(cache_read) is int
        and type(cache_write) is int
        and type(record.cost_nano) is int
        and type(record.reserved_nano) is int
        and type(latency) is float
        and math.isfinite(latency)
        and type(stream) is bool
        and type(outcome) is str
        and (request_id is None or type(request_id) is str)
    ):
        return None
    cost = record.cost_nano / NANO_USD
    reserved = record.reserved_nano / NANO_USD
    if not (math.isfinite(cost) and math.isfinite(reserved)):
        return None
    return (
        f"{start}{tokens_in}, "
        f'"output_tokens": {tokens_out}, '
        f'"cache_read_tokens": {cache_read}, '
        f'"cache_write_tokens": {cache_write}, '
        f'"cost_usd": {cost!r}, '
        f'"reserved_usd": {reserved!r}, '
        f'"latency_ms": {latency!r}, '
        f'"stream": {"true" if stream else "false"}, '
        f'"outcome": {_ESCAPE(outcome)}, '
        f'"request_id": {"null" if request_id is None else _ESCAPE(request_id)}'
    )


def _add_extra_fields(
    fields: dict[str, Any], plan: Plan, record: CallRecord, ledger: str | None
) -> None:
    """Add the fields ``genai_call`` has after its head fields, when they apply."""
    usage = record.usage
    attribution = plan.attribution
    if record.response_model is not None:
        fields["response_model"] = record.response_model
    if record.price_context:
        fields["price_context"] = dict(record.price_context)  # the tier charged at
    if usage is not None and usage.web_searches:
        fields["web_searches"] = usage.web_searches
    if usage is not None and usage.file_searches:
        fields["file_searches"] = usage.file_searches
    if record.other_models:
        fields["other_models"] = [
            {
                "model": model,
                "input_tokens": part.input_tokens,
                "output_tokens": part.output_tokens,
                "cache_read_tokens": part.cache_read_tokens,
                "cache_write_tokens": part.cache_write_tokens + part.cache_write_1h_tokens,
            }
            for model, part in record.other_models
        ]
    if attribution.use_case_id is not None:
        fields["use_case_id"] = attribution.use_case_id
    if not record.priced:
        fields["priced"] = False
    if ledger is not None:
        fields["ledger"] = ledger
    if record.cost_nano > record.reserved_nano and record.outcome != "recorded":
        fields["under_estimated_usd"] = cost_usd(record.cost_nano - record.reserved_nano)
