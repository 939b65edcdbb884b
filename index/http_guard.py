"""The search service's protective layers: JSON errors, security headers, API keys, rate limits.

Plain ASGI middlewares (no per-request ``BaseHTTPMiddleware`` task), stacked by
:func:`clipforge.index.server.create_app` outermost first as::

    SecurityHeaders -> [CORS] -> RateLimit -> ApiKey -> CatchAll -> FastAPI routes

so that every answer, a 401, a 429 or a 500 included, carries the security headers (and the CORS
header where enabled), a client is rate limited before its key is checked (guessing keys costs
requests too), and an exception escaping a route becomes a JSON 500 instead of uvicorn's plain
text one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

API_KEY_ENV = "CLIPFORGE_API_KEY"
"""Environment variable holding the API key when no ``--api-key-file`` is given."""

PUBLIC_PATHS = ("/health", "/", "/docs", "/openapi.json")
"""Paths answered without an API key: they hold no collection data (the page and its assets,
the status line, the API description)."""
PUBLIC_PREFIXES = ("/static/",)

PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
"""Content-Security-Policy of every response but the API docs: the page runs only its own
script file and stylesheet, loads images from this origin (and ``blob:`` URLs of images it
fetched itself with the API key, or of the file being uploaded), talks only to this origin, and
may not be framed."""

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


class ApiError(Exception):
    """A request the service refuses: HTTP ``status`` with a readable ``detail`` (and headers)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def error_body(detail: str) -> bytes:
    """``{"detail": ...}`` as bytes. ASCII escapes: a detail quoting client text that holds a
    lone surrogate must still encode (it would make a UTF-8 encoder raise)."""
    return json.dumps({"detail": detail}, ensure_ascii=True).encode("ascii")


async def send_error(
    send: Send, status: int, detail: str, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer an ASGI request with a JSON error (used by middlewares, below FastAPI's level)."""
    body = error_body(detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


# ----------------------------------------------------------------------------- catch-all


class CatchAllMiddleware:
    """An exception escaping a route is logged with its traceback and answered with a JSON 500.

    Starlette's own last-resort handler answers plain text (and sits outside every user
    middleware, so its answer would miss the security headers). When the response had already
    started, nothing valid can be sent any more: the error is re-raised and the server closes
    the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:
            log.exception("unhandled error answering %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await send_error(
                send,
                500,
                f"internal error ({type(e).__name__}); the server log has the details",
                [(b"connection", b"close")],
            )


# ----------------------------------------------------------------------------- headers


class SecurityHeadersMiddleware:
    """Adds ``nosniff``, a restrictive Content-Security-Policy and friends to every response.

    A response that sets its own Content-Security-Policy (the API docs page, which needs its
    CDN scripts) keeps it.
    """

    def __init__(self, app: ASGIApp, csp: str = PAGE_CSP) -> None:
        self.app = app
        self.csp = csp.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend(h for h in SECURITY_HEADERS if h[0] not in present)
                if b"content-security-policy" not in present:
                    headers.append((b"content-security-policy", self.csp))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


# ----------------------------------------------------------------------------- API key


def load_api_key(path: str | os.PathLike[str] | None, environ: Any = None) -> str | None:
    """The API key from ``path`` (its stripped content), else ``$CLIPFORGE_API_KEY``, else None.

    Raises ValueError naming the file for an unreadable, empty or non-ASCII key file (HTTP
    header values are ASCII, so such a key could never be sent).
    """
    env = os.environ if environ is None else environ
    if path is not None:
        p = Path(path)
        try:
            raw = p.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read the API key file {p}: {e.strerror or e}") from None
        where = f"the API key file {p}"
    else:
        value = env.get(API_KEY_ENV)
        if value is None:
            return None
        raw = value.encode("utf-8", "surrogateescape")
        where = f"${API_KEY_ENV}"
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(
            f"{where} is not ASCII text (an HTTP header can only carry ASCII)"
        ) from None
    if not key:
        raise ValueError(f"{where} is empty")
    if any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError(f"{where} holds spaces or control characters inside the key")
    return key


class ApiKeyMiddleware:
    """Every route but the public ones needs ``Authorization: Bearer <key>``; else 401 JSON with
    ``WWW-Authenticate: Bearer``. The comparison takes the same time wherever the keys differ."""

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        given = None
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = token.strip()
                break
        if given is not None and hmac.compare_digest(given, self.key):
            await self.app(scope, receive, send)
            return
        if given is None:
            detail = "this service needs an API key: send the header Authorization: Bearer <key>"
            challenge = b'Bearer realm="clipforge"'
        else:
            detail = "the API key is not valid"
            challenge = b'Bearer realm="clipforge", error="invalid_token"'
        await send_error(send, 401, detail, [(b"www-authenticate", challenge)])


# ----------------------------------------------------------------------------- rate limit


class SlidingWindowLimiter:
    """At most ``limit`` requests per client in any ``window_s`` seconds (a sliding log).

    Exact, unlike a fixed window (which lets 2x through across a boundary) or a token bucket
    (whose burst adds to the rate). Memory: at most ``limit`` timestamps per active client;
    clients idle for a whole window are dropped as new ones arrive. Used from the event loop
    only, so it needs no lock.
    """

    def __init__(
        self, limit: int, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if limit < 1:
            raise ValueError(f"the rate limit must be >= 1 request per window, got {limit}")
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self._log: dict[str, deque[float]] = {}
        self._new_since_prune = 0

    def acquire(self, client: str) -> float | None:
        """Record a request of ``client``: None if allowed, else seconds until one would be."""
        now = self.clock()
        times = self._log.get(client)
        if times is None:
            self._prune(now)
            times = self._log[client] = deque()
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if len(times) >= self.limit:
            return times[0] + self.window_s - now
        times.append(now)
        return None

    def _prune(self, now: float) -> None:
        self._new_since_prune += 1
        if self._new_since_prune < 1024:
            return
        self._new_since_prune = 0
        stale = [c for c, t in self._log.items() if not t or t[-1] <= now - self.window_s]
        for c in stale:
            del self._log[c]


class RateLimitMiddleware:
    """429 with ``Retry-After`` once a client address passes its requests per minute.

    The page and its assets and ``/health`` are not counted (a results page already costs one
    request per image). Clients are told apart by address: behind a reverse proxy that is the
    address uvicorn reports (it takes X-Forwarded-For only from a proxy on this host).
    """

    def __init__(self, app: ASGIApp, per_minute: int) -> None:
        self.app = app
        self.limiter = SlidingWindowLimiter(per_minute, 60.0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        address = str(client[0]) if client else "unknown"
        wait = self.limiter.acquire(address)
        if wait is None:
            await self.app(scope, receive, send)
            return
        retry = max(1, math.ceil(wait))
        await send_error(
            send,
            429,
            f"too many requests from {address}: the limit is {self.limiter.limit} per minute; "
            f"retry in {retry} s",
            [(b"retry-after", str(retry).encode())],
        )


# ----------------------------------------------------------------------------- hosts


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only accepts connections from this
    machine."""
    if host.strip("[]").lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


__all__ = [
    "API_KEY_ENV",
    "PAGE_CSP",
    "PUBLIC_PATHS",
    "ApiError",
    "ApiKeyMiddleware",
    "CatchAllMiddleware",
    "RateLimitMiddleware",
    "SecurityHeadersMiddleware",
    "SlidingWindowLimiter",
    "error_body",
    "is_loopback",
    "load_api_key",
    "send_error",
]


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages quoting client input
    (a 5,000-digit id or key is named by its start and length; an int too long for ``str()``
    never reaches ``repr``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"(an integer of about {int(value.bit_length() * 0.30103)} digits)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(str(value))} characters)"
