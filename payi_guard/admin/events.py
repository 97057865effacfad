"""Manual usage events posted by other services: strict parsing and validation.

A body is one event object or an array of them. Everything is checked before anything
is charged, and every problem found is reported (with the index of its event and the
field), so a service can fix a whole batch at once. Values that are refused are never
repeated in the errors: a user id, a model name or a field name could carry anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from payi_guard.exceptions import InvalidUserId
from payi_guard.identity import normalize_user_id

__all__ = [
    "FIELDS",
    "MAX_COST_USD",
    "MAX_TOKENS",
    "BodyError",
    "EventError",
    "ManualEvent",
    "parse_body",
    "validate_events",
]

FIELDS = (
    "user_id",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "use_case_name",
    "limit_ids",
    "request_id",
)
"""The fields an event may carry."""

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
MAX_TOKENS = 10**12
"""The largest token count one event may carry."""

MAX_COST_USD = Decimal(1_000_000)
"""The largest ``cost_usd`` one event may carry (counters hold about $9M each)."""

_MAX_TEXT = 256
_MAX_LIMIT_IDS = 32
_PROVIDER = re.compile(r"[A-Za-z0-9._/-]{1,64}\Z")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:+=/-]{1,128}\Z")
# ASCII digits only: "\d" (and Decimal) would also read "١" or "１" as digits.
_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\Z")


class BodyError(ValueError):
    """The body as a whole is unusable (not JSON, wrong shape, too many events)."""


@dataclass(frozen=True, slots=True)
class EventError:
    """One problem with one event.

    Attributes:
        index: the position of the event in the batch (0 for a single event).
        field: the field at fault (``limit_ids[2]``), or ``None`` for the event itself.
        message: what is wrong, without the refused value.
    """

    index: int
    field: str | None
    message: str

    def as_dict(self) -> dict[str, object]:
        """Return the JSON form."""
        return {"index": self.index, "field": self.field, "message": self.message}


@dataclass(frozen=True, slots=True)
class ManualEvent:
    """A validated event, ready for :meth:`Guard.arecord`."""

    user_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: Decimal | None
    use_case_name: str | None
    limit_ids: tuple[str, ...]
    request_id: str | None

    def record_kwargs(self) -> dict[str, Any]:
        """Return the keyword arguments of :meth:`Guard.arecord` for this event."""
        return {
            "user_id": self.user_id,
            "model": self.model,
            "provider": self.provider,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "cost_usd": self.cost_usd,
            "use_case_name": self.use_case_name,
            "limit_ids": self.limit_ids,
            "request_id": self.request_id,
        }


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise BodyError("the body repeats a field within one object")
        out[name] = value
    return out


def _no_constants(name: str) -> Any:
    raise BodyError("the body contains NaN or Infinity, which JSON does not allow")


def parse_body(body: bytes) -> tuple[list[object], bool]:
    """Decode a request body into its events.

    Numbers with a fraction are read as :class:`~decimal.Decimal`, so a ``cost_usd``
    sent as a JSON number keeps its exact decimal value.

    Args:
        body: the raw body (UTF-8 JSON).

    Returns:
        The events (not yet validated) and whether the body was a batch (an array).

    Raises:
        BodyError: the body is not UTF-8 JSON, or is neither an object nor a non-empty
            array.
    """
    try:
        text = body.decode("utf-8")
        payload = json.loads(
            text,
            parse_float=Decimal,
            parse_constant=_no_constants,
            object_pairs_hook=_no_duplicates,
        )
    except BodyError:
        raise
    except (UnicodeDecodeError, RecursionError, ValueError):
        # ValueError covers JSONDecodeError and integers too long to convert.
        raise BodyError("the body is not valid UTF-8 JSON") from None
    if isinstance(payload, dict):
        return [payload], False
    if isinstance(payload, list):
        if not payload:
            raise BodyError("the batch is empty: send at least one event")
        return payload, True
    raise BodyError("the body must be an event object or an array of event objects")


def _text(value: object, limit: int) -> str | None:
    """The value if it is a non-empty string of printable characters up to ``limit``.

    Controls are refused, and so are the characters that change how the text around
    them reads (bidirectional overrides and isolates, line and paragraph separators): a
    name shown on the users page must read as what it is.
    """
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        return None
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in _LAYOUT_CHARS for c in value):
        return None
    return value


_LAYOUT_CHARS = frozenset(
    "\u061c\u200e\u200f\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
"""Marks that reorder or break the text they sit in (U+202E shows "evil" as "live")."""


def _tokens(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        return None
    return value


def _cost(value: object) -> Decimal | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        if not _DECIMAL.match(value):
            return None
        try:
            value = Decimal(value)
        except InvalidOperation:
            return None
    if isinstance(value, int):
        value = Decimal(value)
    if not isinstance(value, Decimal) or not value.is_finite():
        return None
    if not 0 <= value <= MAX_COST_USD:
        return None
    return value


class _Checker:
    """Validates the events of one body, collecting every error."""

    def __init__(
        self,
        header_user: str | None,
        limit_ids: Collection[str],
        can_price: Callable[[str, str], bool],
    ) -> None:
        self.header_user = header_user
        self.limit_ids = limit_ids
        self.can_price = can_price
        self.errors: list[EventError] = []
        self.request_ids: dict[str, int] = {}

    def fail(self, index: int, field: str | None, message: str) -> None:
        self.errors.append(EventError(index, field, message))

    def user(self, index: int, event: Mapping[str, object]) -> str | None:
        value = event.get("user_id")
        if value is None:
            if self.header_user is None:
                self.fail(index, "user_id", "is required (or send the xProxy-User-ID header)")
                return None
            try:
                return normalize_user_id(self.header_user)
            except InvalidUserId as exc:
                self.fail(index, "user_id", f"the xProxy-User-ID header is invalid: {exc.reason}")
                return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.fail(index, "user_id", "must be a string")
            return None
        try:
            return normalize_user_id(value)
        except InvalidUserId as exc:
            self.fail(index, "user_id", f"is invalid: {exc.reason}")
            return None

    def optional_text(
        self, index: int, event: Mapping[str, object], field: str, limit: int
    ) -> str | None:
        value = event.get(field)
        if value is None:
            return None
        text = _text(value, limit)
        if text is None:
            self.fail(index, field, f"must be a string of 1 to {limit} printable characters")
        return text

    def limits(self, index: int, event: Mapping[str, object]) -> tuple[str, ...]:
        value = event.get("limit_ids")
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > _MAX_LIMIT_IDS:
            self.fail(index, "limit_ids", f"must be a list of at most {_MAX_LIMIT_IDS} limit ids")
            return ()
        out: list[str] = []
        for position, item in enumerate(value):
            field = f"limit_ids[{position}]"
            if not isinstance(item, str):
                self.fail(index, field, "must be a string")
            elif item not in self.limit_ids:
                self.fail(index, field, "names a limit that is not defined under `limits:`")
            else:
                out.append(item)
        return tuple(out)

    def event(self, index: int, raw: object) -> ManualEvent | None:
        if not isinstance(raw, dict):
            self.fail(index, None, "an event must be a JSON object")
            return None
        before = len(self.errors)
        for name in raw:
            if name not in FIELDS:
                shown = name if _text(name, 64) is not None else None
                what = f"unknown field {shown!r}" if shown else "an unknown field"
                self.fail(index, shown, f"{what}; accepted: {', '.join(FIELDS)}")
        user_id = self.user(index, raw)
        model = raw.get("model")
        if model is None:
            self.fail(index, "model", "is required")
        elif _text(model, _MAX_TEXT) is None:
            self.fail(index, "model", f"must be a string of 1 to {_MAX_TEXT} printable characters")
        provider = raw.get("provider", "openai")
        if provider is None:
            provider = "openai"
        if not isinstance(provider, str) or not _PROVIDER.match(provider):
            self.fail(index, "provider", "must be 1 to 64 letters, digits or '._/-'")
        tokens: dict[str, int] = {}
        for field in TOKEN_FIELDS:
            value = raw.get(field, 0)
            count = _tokens(0 if value is None else value)
            if count is None:
                self.fail(index, field, f"must be an integer from 0 to {MAX_TOKENS}")
            else:
                tokens[field] = count
        cost: Decimal | None = None
        if raw.get("cost_usd") is not None:
            cost = _cost(raw["cost_usd"])
            if cost is None:
                self.fail(
                    index,
                    "cost_usd",
                    f"must be a decimal number of dollars from 0 to {MAX_COST_USD}, "
                    'as a JSON number or a string such as "0.0012"',
                )
        use_case = self.optional_text(index, raw, "use_case_name", _MAX_TEXT)
        limit_ids = self.limits(index, raw)
        request_id = raw.get("request_id")
        if request_id is not None and (
            not isinstance(request_id, str) or not _REQUEST_ID.match(request_id)
        ):
            self.fail(index, "request_id", "must be 1 to 128 letters, digits or '._:+=/-'")
        elif isinstance(request_id, str):
            first = self.request_ids.setdefault(request_id, index)
            if first != index:
                self.fail(
                    index,
                    "request_id",
                    f"repeats the request_id of event {first}: a request_id names one event",
                )
        if len(self.errors) > before:
            return None
        model_name, provider_name = str(model), str(provider)
        if cost is None and not self.can_price(model_name, provider_name):
            self.fail(
                index,
                "model",
                "no price is known for this model and unknown_model is 'block': "
                "send cost_usd, or add the model under `prices:`",
            )
            return None
        return ManualEvent(
            user_id=str(user_id),
            model=model_name,
            provider=provider_name,
            input_tokens=tokens["input_tokens"],
            output_tokens=tokens["output_tokens"],
            cache_read_tokens=tokens["cache_read_tokens"],
            cache_write_tokens=tokens["cache_write_tokens"],
            cost_usd=cost,
            use_case_name=use_case,
            limit_ids=limit_ids,
            request_id=None if request_id is None else str(request_id),
        )


def validate_events(
    raw_events: list[object],
    *,
    header_user: str | None,
    limit_ids: Collection[str],
    can_price: Callable[[str, str], bool],
) -> tuple[list[ManualEvent], list[EventError]]:
    """Validate every event of a body; nothing is charged here.

    Args:
        raw_events: the events from :func:`parse_body`.
        header_user: the ``xProxy-User-ID`` header, the user of events without
            ``user_id``.
        limit_ids: the limit ids the config defines.
        can_price: tells whether an event of ``(model, provider)`` without ``cost_usd``
            may be recorded: False when no price is known and ``unknown_model`` is
            ``block`` (the guard would otherwise record it at no cost).

    Returns:
        The valid events and every error; the events are only usable when there is no
        error.
    """
    checker = _Checker(header_user, limit_ids, can_price)
    events: list[ManualEvent] = []
    for index, raw in enumerate(raw_events):
        event = checker.event(index, raw)
        if event is not None:
            events.append(event)
    return events, checker.errors
