"""``POST /api/events``: manual usage events, validated and priced, each id charged once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from decimal import Decimal

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from payi_guard.admin.dedupe import Claim, RequestIds
from payi_guard.admin.events import (
    MAX_COST_USD,
    BodyError,
    EventError,
    ManualEvent,
    parse_body,
    validate_events,
)
from payi_guard.admin.responses import problem as _problem
from payi_guard.admin.responses import read_limited as _read_limited
from payi_guard.admin.security import TokenAuth
from payi_guard.config import MAX_AMOUNT, GuardConfig
from payi_guard.engine import Guard
from payi_guard.exceptions import PayiGuardError, StorageError
from payi_guard.money import NANO_USD, decimal_text, decimal_usd, parse_usd
from payi_guard.pricing import PriceBook, TokenUsage, UnknownModel
from payi_guard.web.options import USER_HEADER

__all__ = ["EventsEndpoint"]

_MAX_EVENT_NANO = int(MAX_COST_USD) * NANO_USD
_MAX_ERRORS_SHOWN = 100


def _dollars(nano: int) -> str:
    """``10,000,000`` or ``9,007,199.254740991``: exact, grouped, never in exponent form."""
    text = format(decimal_usd(nano), ",f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


class EventsEndpoint:
    """The events endpoint of the users app (see :meth:`post_events`).

    Args:
        guard: the guard that charges the events.
        auth: the app's token check.
        request_ids: where recorded ``request_id`` values are remembered.
        unauthorized: the answer to a request without the token.
        storage_failed: the answer when the store cannot be reached.
        max_body_bytes: the largest body accepted.
        max_batch: the most events per request.
    """

    def __init__(
        self,
        guard: Guard,
        auth: TokenAuth,
        request_ids: RequestIds,
        unauthorized: Callable[[], Response],
        storage_failed: Callable[[], Response],
        *,
        max_body_bytes: int,
        max_batch: int,
    ) -> None:
        self.guard = guard
        self._auth = auth
        self._request_ids = request_ids
        self._unauthorized = unauthorized
        self._storage_failed = storage_failed
        self.max_body_bytes = max_body_bytes
        self.max_batch = max_batch
        self._prices: tuple[GuardConfig, PriceBook] | None = None

    def _book(self) -> PriceBook:
        """A price book of the guard's current config (rebuilt after a reload)."""
        config = self.guard.config
        cached = self._prices
        if cached is None or cached[0] is not config:
            cached = self._prices = (
                config,
                PriceBook(config.prices, config.unknown_model, clock=self.guard.clock),
            )
        return cached[1]

    def _can_price(self, model: str, provider: str) -> bool:
        """False when ``model`` has no price and ``unknown_model`` is ``block``."""
        if self.guard.config.unknown_model.action != "block":
            return True
        try:
            self._book().rates(model, provider)
        except UnknownModel:
            return False
        return True

    async def post_events(self, request: Request) -> Response:
        """``POST /api/events``: charge manual usage events (Bearer token only).

        The body is one event or a JSON array of up to ``max_batch`` events; each event
        has ``model`` and optionally ``user_id`` (else the ``xProxy-User-ID`` header),
        ``provider`` (``openai``), the four token counts, ``cost_usd`` (a string or
        number of dollars, used instead of the model's price), ``use_case_name``,
        ``limit_ids`` and ``request_id``. Every event is validated and priced before
        anything is charged: one bad event, or one whose cost a counter cannot hold,
        refuses the whole batch (400, with every error found, naming each event). Valid
        events are charged and logged by :meth:`Guard.arecord`, in order.

        A ``request_id`` names one event: an event whose id was already recorded (within
        ``request_id_ttl``, by any process sharing the store) is not charged again and
        is reported as ``duplicate``; an id repeated within one batch is an error; an id
        another request is recording at this very moment refuses the batch (409, nothing
        charged). So a delivery can be retried safely when every event has an id.

        Returns 200 with one result per event: ``user_id``, ``cost_usd`` (the exact
        amount charged, as a decimal string), ``outcome`` (``recorded`` or
        ``duplicate``), ``priced`` and ``request_id``; and ``count``, ``duplicates`` and
        the total ``cost_usd``.
        """
        if not self._auth.bearer_ok(request):
            return self._unauthorized()
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            return _problem(
                415,
                "unsupported-media-type",
                "Unsupported media type",
                "Send the events as JSON with `Content-Type: application/json`.",
            )
        body = await _read_limited(request, self.max_body_bytes)
        if body is None:
            return _problem(
                413,
                "body-too-large",
                "Body too large",
                f"The body is over {self.max_body_bytes} bytes: split the batch.",
            )
        try:
            raw_events, batch = parse_body(body)
        except BodyError as exc:
            return _problem(400, "invalid-body", "Invalid body", f"{exc}.")
        if len(raw_events) > self.max_batch:
            return _problem(
                400,
                "batch-too-large",
                "Batch too large",
                f"A batch holds at most {self.max_batch} events; this one has {len(raw_events)}.",
            )
        named = request.headers.getlist(USER_HEADER)
        if len(named) > 1 or any("," in value for value in named):
            # The rule of every integration: two users named at once is never guessed.
            return _problem(
                400,
                "invalid-user-header",
                "Invalid user header",
                f"The {USER_HEADER} header came more than once, or lists several users: "
                "name one user; nothing was charged.",
            )
        events, errors = validate_events(
            raw_events,
            header_user=named[0] if named else None,
            limit_ids=self.guard.config.limits.keys(),
            can_price=self._can_price,
        )
        if not errors:
            errors = self._priced(events)
        if errors:
            detail = (
                f"{len(errors)} error(s) in {'the batch' if batch else 'the event'}; "
                "nothing was charged."
            )
            return _problem(
                400,
                "invalid-event",
                "Invalid usage event",
                detail,
                errors=[e.as_dict() for e in errors[:_MAX_ERRORS_SHOWN]],
                error_count=len(errors),
            )
        return await self._charge(events)

    def _priced(self, events: list[ManualEvent]) -> list[EventError]:
        """Price every event as the guard will, and refuse what a counter cannot hold.

        One event may charge at most ``MAX_COST_USD``; the whole batch at most what one
        counter holds (the global counter, for one, takes every event of the batch).
        """
        errors: list[EventError] = []
        total = 0
        for index, event in enumerate(events):
            cost = self._cost_nano(event)
            if cost > _MAX_EVENT_NANO:
                errors.append(
                    EventError(
                        index,
                        None,
                        f"its tokens cost ${_dollars(cost)} at the price of this model, more "
                        f"than one event may charge (${_dollars(_MAX_EVENT_NANO)}): check the "
                        "token counts, or send cost_usd",
                    )
                )
                continue
            total += cost
            if total > MAX_AMOUNT:
                errors.append(
                    EventError(
                        index,
                        None,
                        f"the events up to this one cost ${_dollars(total)} together, more "
                        f"than one counter holds (${_dollars(MAX_AMOUNT)}): split the batch",
                    )
                )
                break
        return errors

    def _cost_nano(self, event: ManualEvent) -> int:
        """What :meth:`Guard.arecord` will charge for ``event``, in nano-USD."""
        if event.cost_usd is not None:
            return parse_usd(event.cost_usd)
        book = self._book()
        try:
            rates = book.rates(event.model, event.provider)
        except UnknownModel:
            return 0  # allowed and recorded without a USD cost (validation checked)
        usage = TokenUsage(
            event.input_tokens,
            event.output_tokens,
            event.cache_read_tokens,
            event.cache_write_tokens,
        )
        return book.cost_with(rates, usage)

    async def _charge(self, events: list[ManualEvent]) -> Response:
        """Charge valid, priced events; each ``request_id`` at most once.

        See :mod:`payi_guard.admin.dedupe` for how ids are remembered in the store.
        """
        ids = [(i, e.request_id) for i, e in enumerate(events) if e.request_id is not None]
        try:
            seen = await self._request_ids.check([rid for _, rid in ids])
        except StorageError:
            return self._storage_failed()
        busy = [index for (index, _), state in zip(ids, seen, strict=True) if state == "busy"]
        if busy:
            return self._busy(busy[0])
        duplicates = {index for (index, _), state in zip(ids, seen, strict=True) if state != "new"}
        fresh = [(index, rid) for index, rid in ids if index not in duplicates]
        try:
            claim, taken = await self._request_ids.claim([rid for _, rid in fresh])
        except StorageError:
            return self._storage_failed()
        if claim is None:
            return self._busy(fresh[taken or 0][0])
        marker = dict(zip((index for index, _ in fresh), claim.keys, strict=True))
        results: list[dict[str, object]] = []
        total = Decimal(0)
        charged: list[str] = []
        for index, event in enumerate(events):
            if index in duplicates:
                results.append(
                    {
                        "index": index,
                        "user_id": event.user_id,
                        "cost_usd": "0",
                        "outcome": "duplicate",
                        "priced": True,
                        "request_id": event.request_id,
                    }
                )
                continue
            try:
                record = await self.guard.arecord(**event.record_kwargs())
            except (PayiGuardError, ValueError):
                # Validation ran first, so only a config reloaded meanwhile lands here.
                pending = [key for i, key in marker.items() if i >= index]
                await self._settle_markers(claim, charged, pending)
                return _problem(
                    500,
                    "record-failed",
                    "Recording failed",
                    f"Event {index} could not be recorded; the events before it were "
                    "(a retry with the same request_ids charges only the others).",
                    charged=index,
                )
            if index in marker:
                charged.append(marker[index])
            total += record.cost_usd
            results.append(
                {
                    "index": index,
                    "user_id": record.user_id,
                    "cost_usd": decimal_text(record.cost_usd),
                    "outcome": record.outcome,
                    "priced": record.priced,
                    "request_id": event.request_id,
                }
            )
        await self._settle_markers(claim, charged, [])
        return JSONResponse(
            {
                "results": results,
                "count": len(results),
                "duplicates": len(duplicates),
                "cost_usd": decimal_text(total),
            }
        )

    async def _settle_markers(self, claim: Claim, charged: list[str], pending: list[str]) -> None:
        """Mark the charged events' ids as recorded; give back the others' claims.

        A store that fails here leaves the claims to expire after ``reservation_ttl``.
        """
        with contextlib.suppress(StorageError):
            await self._request_ids.confirm(claim, charged)
            await self._request_ids.release(claim, pending)

    @staticmethod
    def _busy(index: int) -> Response:
        return _problem(
            409,
            "request-in-progress",
            "Request in progress",
            f"Event {index}'s request_id is being recorded by another request right now; "
            "nothing was charged. Retry shortly: events already recorded are skipped.",
            index=index,
        )
