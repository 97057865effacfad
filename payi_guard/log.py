"""Structured log events of payi_guard and an optional JSON logging setup.

The library only ever calls ``structlog.get_logger("payi_guard")``: it never configures
structlog and never clears context variables, so the application's own structlog setup
decides the output. Apps that have none can call :func:`configure_json`.

Event names (contract):

* ``genai_call``: every metered call, with ``user_id``, ``org_id``, ``account_name``,
  ``use_case_name``, ``limit_ids``, ``model``, ``provider``, ``input_tokens``,
  ``output_tokens``, ``cost_usd``, ``reserved_usd``, ``latency_ms``, ``stream``,
  ``outcome``, ``request_id``;
* ``budget_warning``, ``budget_exceeded``, ``budget_overrun``: with ``user_id``,
  ``limit``, ``used``, ``max``, ``resets_at``;
* ``storage_error``: the counter store failed;
* ``unknown_model``: no price is known for a call's model, with ``user_id``, ``model``,
  ``provider``, ``unknown_model`` (the policy) and ``outcome``: ``refused`` under
  ``unknown_model: block`` (once per refused call), ``recorded`` for a manual event
  charged without a cost;
* ``usage_invalid``: a provider's usage report was missing or could not be trusted
  (a count that is negative, not an integer, or missing), with ``user_id``, ``model``,
  ``provider``, ``reason`` (the values at fault) and ``reserved_usd``; the call is
  charged its reservation and its ``genai_call`` says ``outcome="unverified"``;
* ``budget_adjusted``: an operator's ``adjust`` or ``reset``, with ``user_id``,
  ``limit``, ``amount``, ``used``, ``max``, ``reason`` (and ``by``, ``op``, ``unit``,
  ``adjustment_id``), one line per limit adjusted;
* ``storage_reset``: the store lost its data (a restart without persistence, a flush):
  logged at the first storage operation after it, with ``server``, ``previous`` and
  ``marker``.

Also: ``tier_unknown`` (a tier from the request or ``tier_of`` that the budgets file does
not define: the user gets ``default``) and ``tier_lookup_failed`` (``tier_of`` raised or
returned something that is not a tier name); ``storage_marker_created`` (info: this
process found a store without its marker: new, or emptied before the process started);
``storage_recovered`` (info) and ``storage_gave_up`` (error): a commit or release that
failed (or whose reply was lost) went through when retried in the background, or was
given up; ``reservation_lost``: a live call's reservation could not be renewed (it
expired, or the store lost it), the call goes on unreserved.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Container
from typing import Any, TextIO

import structlog
from structlog.contextvars import merge_contextvars
from structlog.processors import JSONRenderer, format_exc_info

__all__ = [
    "BUDGET_ADJUSTED",
    "BUDGET_EXCEEDED",
    "BUDGET_OVERRUN",
    "BUDGET_WARNING",
    "CONFIG_RELOADED",
    "CONFIG_RELOAD_FAILED",
    "GENAI_CALL",
    "LOGGER_NAME",
    "OBSERVER_ERROR",
    "RESERVATION_LOST",
    "STORAGE_ERROR",
    "STORAGE_GAVE_UP",
    "STORAGE_MARKER_CREATED",
    "STORAGE_RECOVERED",
    "STORAGE_RESET",
    "TIER_LOOKUP_FAILED",
    "TIER_UNKNOWN",
    "UNKNOWN_MODEL",
    "USAGE_INVALID",
    "DirectInfo",
    "configure_json",
    "direct_info",
    "encode_json",
    "get_logger",
    "iso_utc",
]

LOGGER_NAME = "payi_guard"

GENAI_CALL = "genai_call"
BUDGET_WARNING = "budget_warning"
BUDGET_EXCEEDED = "budget_exceeded"
BUDGET_OVERRUN = "budget_overrun"
STORAGE_ERROR = "storage_error"
STORAGE_RESET = "storage_reset"
STORAGE_MARKER_CREATED = "storage_marker_created"
STORAGE_RECOVERED = "storage_recovered"
STORAGE_GAVE_UP = "storage_gave_up"
RESERVATION_LOST = "reservation_lost"
UNKNOWN_MODEL = "unknown_model"
USAGE_INVALID = "usage_invalid"
CONFIG_RELOADED = "config_reloaded"
CONFIG_RELOAD_FAILED = "config_reload_failed"
OBSERVER_ERROR = "observer_error"
BUDGET_ADJUSTED = "budget_adjusted"
TIER_UNKNOWN = "tier_unknown"
TIER_LOOKUP_FAILED = "tier_lookup_failed"
PAYI_HEADER_SKIPPED = "payi_header_skipped"


def get_logger(**initial_values: Any) -> Any:
    """Return the library's structlog logger (``structlog.get_logger("payi_guard")``)."""
    return structlog.get_logger(LOGGER_NAME, **initial_values)


# The level ``add_log_level`` writes for a method name (others are written as named).
_LEVEL_OF_METHOD = {"warn": "warning", "exception": "error"}
# ``json.dumps(obj, default=fallback)`` is ``JSONEncoder(default=fallback).encode(obj)``;
# one encoder (it keeps no state between calls) is made here instead of one per line.


def _fallback(obj: Any) -> Any:
    """``JSONRenderer``'s default for values JSON has no form for."""
    try:
        return obj.__structlog__()
    except AttributeError:
        return repr(obj)


_DEFAULT = getattr(JSONRenderer(), "_dumps_kw", {}).get("default", _fallback)
_ENCODE = json.JSONEncoder(default=_DEFAULT).encode
_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)
_ASCII: Any = json.encoder.encode_basestring_ascii


def encode_json(fields: dict[str, Any]) -> str:
    """The JSON text the line :func:`configure_json` writes gives a dict of fields."""
    return _encode(fields)


def _encode(event_dict: dict[str, Any]) -> str:
    """``_ENCODE(event_dict)`` for a dict: the C encoder ``JSONEncoder.encode`` would make.

    The same arguments ``JSONEncoder.iterencode`` gives it (a fresh dict of markers for
    the circular-reference check, ASCII output, ``": "`` and ``", "``), without the two
    Python frames and the float formatter it builds around it on every line.
    """
    if _C_ENCODER is None:
        return _ENCODE(event_dict)
    return "".join(
        _C_ENCODER({}, _DEFAULT, _ASCII, None, ": ", ", ", False, False, True)(event_dict, 0)
    )


# The last whole second formatted, as one tuple (swapped whole, so threads never mix
# a second with another's text).
_SECOND: tuple[int, str] = (-1, "")


def iso_utc(ns: int) -> str:
    """``TimeStamper(fmt="iso", utc=True)``'s text for an epoch time in nanoseconds.

    The same text as ``datetime.now(tz=UTC).isoformat()`` with ``Z`` for ``+00:00``
    (microseconds rounded down, left out when zero), with the date and time of day
    formatted once per second.
    """
    global _SECOND
    second, micro = divmod(ns // 1000, 1_000_000)
    cached = _SECOND
    if cached[0] != second:
        cached = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        _SECOND = cached
    return f"{cached[1]}.{micro:06d}Z" if micro else f"{cached[1]}Z"


def _json_line(logger: Any, method_name: str, event_dict: Any) -> str:
    """The line ``configure_json`` writes, in one processor.

    The same text as the chain ``merge_contextvars``, ``add_log_level``,
    ``TimeStamper(fmt="iso", utc=True)``, ``format_exc_info``, ``JSONRenderer()``: the
    same keys in the same order, with the same values.
    """
    event_dict = merge_contextvars(logger, method_name, event_dict)
    event_dict["level"] = _LEVEL_OF_METHOD.get(method_name, method_name)
    event_dict["timestamp"] = iso_utc(time.time_ns())
    if "exc_info" in event_dict:
        event_dict = format_exc_info(logger, method_name, event_dict)
    if type(event_dict) is dict:
        return _encode(event_dict)
    return _ENCODE(event_dict)


def direct_info(bound: Any) -> DirectInfo | None:
    """A writer of ``bound.info(event, **fields)`` lines that skips structlog's layers.

    Only for a logger made under :func:`configure_json`'s configuration: a structlog
    filtering logger with no bound context, whose one processor is the JSON line and
    whose output is a ``WriteLogger``. The writer then renders the same event dict
    (the fields, then ``event``) with the same processor and writes it with the same
    ``WriteLogger`` (its lock, write and flush): the same line, without the method,
    proxy and event-copy layers around it. Returns ``None`` for any other logger. The
    writer checks the processor list on each line: once it is changed in place, the
    writer hands its lines to ``bound.info``.

    Args:
        bound: a bound logger whose ``info`` is known to be enabled.
    """
    processors = getattr(bound, "_processors", None)
    output = getattr(bound, "_logger", None)
    if (
        type(bound).__module__ != "structlog._native"
        or getattr(bound, "_context", None)
        or type(output) is not structlog.WriteLogger
        or not isinstance(processors, list)
        or processors != [_json_line]
    ):
        return None
    return DirectInfo(bound, output, processors)


class DirectInfo:
    """The writer :func:`direct_info` returns: ``writer(event, fields)`` writes a line.

    It checks the processor list on each line: once it is changed in place, it hands
    its lines to ``bound.info``.

    Args:
        bound: the bound logger.
        output: its ``WriteLogger``.
        rules: its processor list (``[_json_line]`` when made).
    """

    __slots__ = ("_bound", "_msg", "_output", "_rules")

    def __init__(self, bound: Any, output: Any, rules: list[Any]) -> None:
        self._bound = bound
        self._output = output
        self._msg = output.msg
        self._rules = rules

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        """Write the line of ``bound.info(event, **fields)``."""
        rules = self._rules
        if len(rules) == 1 and rules[0] is _json_line:
            fields["event"] = event
            self._msg(_json_line(self._output, "info", fields))
        else:
            self._bound.info(event, **fields)

    def write_after(
        self, head: str, head_keys: Container[str], event: str, tail: dict[str, Any]
    ) -> bool:
        """Write the line of ``bound.info(event, **head_fields, **tail)``, its head given.

        Args:
            head: the JSON text :func:`encode_json` gives for the head fields (dict
                ``head_fields``), without its closing ``}``.
            head_keys: the keys of the head fields (none of them is in ``tail``).
            event: the event.
            tail: the fields after them (this dict is used up).

        Returns:
            False when the processor list was changed: nothing was written, and the
            caller writes the line with the whole fields through ``writer(event, fields)``.
        """
        rules = self._rules
        if not (len(rules) == 1 and rules[0] is _json_line):
            return False
        # What _json_line does to the whole event dict, done to its tail: the head's
        # keys are there already, so context variables of those names are left out.
        tail["event"] = event
        for key, value in merge_contextvars(self._output, "info", {}).items():
            if key not in head_keys:
                tail.setdefault(key, value)
        tail["level"] = "info"
        tail["timestamp"] = iso_utc(time.time_ns())
        rendered: Any = tail
        if "exc_info" in tail:
            rendered = format_exc_info(self._output, "info", tail)
        rest = _encode(rendered) if type(rendered) is dict else _ENCODE(rendered)
        self._msg(head + ", " + rest[1:])
        return True


def configure_json(stream: TextIO | None = None, *, level: int = logging.INFO) -> None:
    """Configure structlog to write one JSON object per line (for apps that want it).

    This changes the process-wide structlog configuration, so only applications call it,
    never libraries. Context bound with ``structlog.contextvars`` (the middleware binds
    ``user_id`` and ``request_id``) is merged into every line.

    Args:
        stream: where to write; defaults to ``sys.stdout``.
        level: the minimum level logged.
    """
    structlog.configure(
        processors=[_json_line],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
