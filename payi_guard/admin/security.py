"""The users page's protection: the access token, its session cookie, CSRF, headers.

The token is only ever taken from a form post or an ``Authorization: Bearer`` header,
never from an address (addresses end up in access logs, proxies and browser history).
Every state-changing form post must come from the page's own site (:func:`from_this_site`),
and signing out also takes a CSRF token bound to the session (:meth:`TokenAuth.csrf_token`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from payi_guard.engine import Guard

__all__ = ["SESSION_COOKIE", "SecurityHeaders", "TokenAuth", "from_this_site"]

SESSION_COOKIE = "payi_guard_users"
"""The name of the page's session cookie."""

_SESSION_CONTEXT = b"payi_guard users session v1"
_CSRF_CONTEXT = b"payi_guard users csrf v1"
_SECURITY_HEADERS = (
    ("cache-control", "no-store"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


def from_this_site(request: Request) -> bool:
    """Whether a form post comes from the page's own site, as far as the browser says.

    A browser marks every request with ``Sec-Fetch-Site``: only ``same-origin`` (and
    ``none``, an address typed by the user) pass. Browsers without it send ``Origin`` on
    every post, which must then name this host (the ``Host`` header, or
    ``X-Forwarded-Host`` behind a proxy: a form on another site can set neither). A
    request with neither header is not from a browser, and cross-site forgery needs one.

    Args:
        request: the incoming request.
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = urlsplit(origin).netloc.lower()
    if not host:
        return False  # "null": a sandboxed frame or a privacy-sensitive redirect
    candidates = [request.headers.get("host", "")]
    candidates += request.headers.get("x-forwarded-host", "").split(",")
    return any(host == candidate.strip().lower() for candidate in candidates if candidate)


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
    ``v2.<expiry>.<random nonce>.<HMAC-SHA256 keyed with the token>``: it is valid in
    every process that knows the token, stops working when the token changes, expires by
    itself, and differs for every sign-in (so does its CSRF token).
    """

    def __init__(self, token: str, guard: Guard, ttl: float) -> None:
        secret = token.encode("utf-8")
        self._digest = hashlib.sha256(secret).digest()
        self._key = hmac.new(secret, _SESSION_CONTEXT, hashlib.sha256).digest()
        self._csrf_key = hmac.new(secret, _CSRF_CONTEXT, hashlib.sha256).digest()
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

    def _mac(self, expires: str, nonce: str) -> bytes:
        message = f"v2.{expires}.{nonce}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest().encode()

    def new_session(self) -> str:
        """A new session cookie value, valid for ``ttl`` seconds."""
        expires = str(int(self._guard.clock.now() + self.ttl))
        nonce = secrets.token_hex(16)
        return f"v2.{expires}.{nonce}.{self._mac(expires, nonce).decode()}"

    def csrf_token(self, request: Request) -> str:
        """The CSRF token of the request's session (``""`` without a valid session).

        It is an HMAC of the session cookie, so it differs per session, is valid in every
        process that knows the access token, and cannot be derived from the page alone.
        """
        if not self.session_ok(request):
            return ""
        cookie = request.cookies.get(SESSION_COOKIE, "").encode("utf-8", "surrogateescape")
        return hmac.new(self._csrf_key, cookie, hashlib.sha256).hexdigest()

    def csrf_ok(self, request: Request, given: str) -> bool:
        """Whether ``given`` is the CSRF token of the request's valid session."""
        expected = self.csrf_token(request)
        supplied = given.encode("utf-8", "surrogateescape")
        return bool(expected) and hmac.compare_digest(supplied, expected.encode())

    def session_ok(self, request: Request) -> bool:
        """Whether the request carries a valid, unexpired session cookie."""
        parts = request.cookies.get(SESSION_COOKIE, "").split(".")
        if (
            len(parts) != 4
            or parts[0] != "v2"
            or not (parts[1].isascii() and parts[1].isdigit())
            or len(parts[1]) > 12
            or len(parts[2]) != 32
        ):
            return False
        given = parts[3].encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, self._mac(parts[1], parts[2])):
            return False
        return int(parts[1]) > self._guard.clock.now()
