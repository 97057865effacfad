"""The ``send`` a guarded ASGI app is given: the guard's headers, the held start.

:class:`GuardedSend` wraps the server's ``send`` for one request of
:class:`~payi_guard.web.GuardMiddleware`: it adds the request id (and, when asked, the
``RateLimit`` headers, read as the start goes out) to the app's response start, holds
that start on guarded paths until the first body byte (so a refusal before it can still
become the refusal response), and tracks whether the response started and finished.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import Message, Send

from payi_guard.context import RequestScope
from payi_guard.web.core import with_headers
from payi_guard.web.gate import RATE_HEADERS_KEY, Gate

__all__ = ["GuardedSend", "encode"]


def encode(headers: Sequence[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    """ASGI headers (lower-case names, latin-1 bytes) of ``(name, value)`` text pairs."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


class GuardedSend:
    """Wraps ``send``: adds the guard's headers to the start, tracks the response state.

    With ``hold`` (guarded paths), ``http.response.start`` is kept back until the first
    body byte (or the end of the body, or any other message), then sent together with
    it: a refusal raised before that byte can still become the refusal response instead
    of an empty 200. Only the start is held, never a body chunk.

    Attributes:
        started: ``http.response.start`` reached the server.
        finished: the last body message reached the server.
        held: the ``http.response.start`` held back, if any (read it; :meth:`release`
            or :meth:`discard` it).
    """

    __slots__ = ("errors", "extra", "finished", "held", "hold", "rated", "send", "started")

    def __init__(
        self,
        send: Send,
        extra: list[tuple[bytes, bytes]],
        hold: bool,
        rated: tuple[Gate, RequestScope] | None = None,
    ) -> None:
        self.send = send
        self.extra = extra
        self.hold = hold
        self.started = False
        self.finished = False
        self.held: Message | None = None
        # A server error's messages, kept until the app returns: Starlette's own
        # ServerErrorMiddleware (inside a guard that wraps the app) sends a 500 and then
        # raises the error, which may be a refusal the guard answers instead.
        self.errors: list[Message] | None = None
        # The gate and the request: when the gate (or the FastAPI dependency) asked for
        # RateLimit headers, the start gets them as it is sent (read then, so they count
        # what the request spent).
        self.rated = rated

    async def _with_rate(self, start: Message) -> Message:
        """``start`` with the ``RateLimit`` headers :attr:`rated` asks for, read now."""
        gate, rs = self.rated  # type: ignore[misc]
        fresh = await gate.aresponse_headers(rs)
        added = with_headers(start.get("headers", ()), encode(fresh)) if fresh else None
        if added is None:
            return start
        start = dict(start)
        start["headers"] = added
        return start

    async def send_message(self, message: Message) -> None:
        """The ``send`` the app is given (a bound method: cheaper to call than the object)."""
        kind = message["type"]
        held = self.held
        errors = self.errors
        if errors is not None:
            errors.append(message)
            return
        if kind == "http.response.start":
            extra = self.extra
            if extra:
                # A copy with the extra headers the app's do not name; the app's message
                # and headers list are never changed (it may send them again).
                headers = message.get("headers", ())
                if len(extra) == 1:  # the request id alone: with_headers(), inlined
                    item = extra[0]
                    key = item[0]  # lower case, as encode() and __init__ write them
                    size = len(key)
                    for name, _ in headers:
                        if len(name) == size and name.lower() == key:
                            break  # the app sent its own
                    else:
                        message = dict(message)  # cheaper than {**message, ...}
                        message["headers"] = [*headers, item]
                else:
                    added = with_headers(headers, extra)
                    if added is not None:
                        message = dict(message)
                        message["headers"] = added
            if message["status"] >= 500 and not self.started:
                self.errors = [message]  # the guard's headers in it: sent as it is
                return
            if self.hold and held is None and not self.started:
                self.held = message
                return
        elif kind == "http.response.body":
            if message.get("more_body", False):
                if held is not None and not message.get("body"):
                    return  # carries no byte: keep holding the start
            else:
                self.finished = True
        elif kind == "http.response.pathsend":
            self.finished = True
        if held is not None:  # release() inlined: one coroutine less per message
            self.held = None
            self.started = True
            rated = self.rated
            if rated is not None and RATE_HEADERS_KEY in rated[1].extra:
                held = await self._with_rate(held)
            await self.send(held)
        elif kind == "http.response.start":
            self.started = True
            rated = self.rated
            if rated is not None and RATE_HEADERS_KEY in rated[1].extra:
                message = await self._with_rate(message)
        await self.send(message)

    async def release(self) -> None:
        """Send the held ``http.response.start``, if any."""
        held, self.held = self.held, None
        if held is not None:
            self.started = True
            rated = self.rated
            if rated is not None and RATE_HEADERS_KEY in rated[1].extra:
                held = await self._with_rate(held)
            await self.send(held)

    def discard(self) -> None:
        """Forget the held start (and a held server error): the guard answers itself."""
        self.held = None
        self.errors = None

    async def flush_errors(self) -> None:
        """Send a held server error's messages, as the app sent them."""
        errors, self.errors = self.errors, None
        for message in errors or ():
            kind = message["type"]
            if kind == "http.response.start":
                self.started = True
            elif kind == "http.response.pathsend" or (
                kind == "http.response.body" and not message.get("more_body", False)
            ):
                self.finished = True
            await self.send(message)
