"""The users page's protection: the access token, its session cookie, security headers."""

from __future__ import annotations

import hashlib
import hmac

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payi_guard.engine import Guard

__all__ = ["SESSION_COOKIE", "SecurityHeaders", "TokenAuth"]

SESSION_COOKIE = "payi_guard_users"
"""The name of the page's session cookie."""

_SESSION_CONTEXT = b"payi_guard users session v1"
_SECURITY_HEADERS = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


class SecurityHeaders:
    """Adds no-store, nosniff, no-referrer and frame denial to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one ASGI connection, adding the headers to an HTTP response start."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=message.setdefault("headers", []))
                for name, value in _SECURITY_HEADERS:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_secured)


class TokenAuth:
    """The access token and the session cookie derived from it.

    Comparisons are constant-time and done on digests, so neither the content nor the
    length of the token leaks through timing. A session cookie is
    ``v1.<expiry>.<HMAC-SHA256 keyed with the token>``: it is valid in every process
    that knows the token, stops working when the token changes, and expires by itself.
    """

    def __init__(self, token: str, guard: Guard, ttl: float) -> None:
        secret = token.encode("utf-8")
        self._digest = hashlib.sha256(secret).digest()
        self._key = hmac.new(secret, _SESSION_CONTEXT, hashlib.sha256).digest()
        self._guard = guard
        self.ttl = ttl

    def token_ok(self, candidate: str) -> bool:
        """Whether ``candidate`` is the access token (constant time)."""
        given = hashlib.sha256(candidate.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(given, self._digest)

    def bearer_ok(self, request: Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>``."""
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(value) and self.token_ok(value.strip())

    def _mac(self, expires: str) -> bytes:
        return hmac.new(self._key, f"v1.{expires}".encode(), hashlib.sha256).hexdigest().encode()

    def new_session(self) -> str:
        """A new session cookie value, valid for ``ttl`` seconds."""
        expires = str(int(self._guard.clock.now() + self.ttl))
        return f"v1.{expires}.{self._mac(expires).decode()}"

    def session_ok(self, request: Request) -> bool:
        """Whether the request carries a valid, unexpired session cookie."""
        parts = request.cookies.get(SESSION_COOKIE, "").split(".")
        if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 12:
            return False
        given = parts[2].encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._mac(parts[1])):
            return False
        return int(parts[1]) > self._guard.clock.now()
