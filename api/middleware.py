"""Pure ASGI middleware (no ``BaseHTTPMiddleware`` overhead on the hot ``GET /budget`` path), outermost first:

1. ``MetricsMiddleware`` — request count and latency per (method, route template, status), labels bounded;
2. ``AccessMiddleware`` — bearer tokens checked from the headers alone, **before any byte of the body is read**:
   write methods need ``KVCALIB_API_TOKEN``, reads of stored data ``KVCALIB_API_READ_TOKEN`` (or the write token);
3. ``BodyLimitMiddleware`` — 413 for a declared ``Content-Length`` over the limit, and for a body whose bytes, counted
   as they stream (chunked uploads declare no length), pass it: the app never sees more than the limit.
"""

from __future__ import annotations

import secrets
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from kvcalib.api.errors import ErrorResponse

# Paths anyone may read: liveness/readiness, metrics, the OpenAPI schema and its documentation pages.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                        "/redoc"})
OPEN_PREFIXES = ("/static-offline-docs/",)
READ_METHODS = frozenset({"GET", "HEAD"})
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope.get("headers", []):
        if k == name:
            return v
    return None


class AccessMiddleware:
    """Bearer tokens: ``write_token`` for every method but GET/HEAD, ``read_token`` (or ``write_token``) for reads of
    stored data; ``OPEN_PATHS`` stay open. A refused request is answered 401 without reading its body."""

    def __init__(self, app: ASGIApp, write_token: str | None, read_token: str | None):
        self.app = app
        self.write = write_token.encode() if write_token is not None else None
        self.read = read_token.encode() if read_token is not None else None

    def _required(self, scope: Scope) -> list[bytes] | None:
        """The tokens that grant this request, or None when it is open."""
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        if scope.get("method", "GET") in READ_METHODS:
            return None if self.read is None else [t for t in (self.read, self.write) if t is not None]
        return None if self.write is None else [self.write]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            tokens = self._required(scope)
            if tokens is not None and not self._granted(scope, tokens):
                kind = "read" if scope.get("method") in READ_METHODS else "write"
                resp = ErrorResponse({"detail": f"a valid bearer token is required for this endpoint ({kind} "
                                                "access)"}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def _granted(scope: Scope, tokens: list[bytes]) -> bool:
        value = _header(scope, b"authorization") or b""
        scheme, _, given = value.partition(b" ")
        if scheme.lower() != b"bearer" or not given.strip():
            return False
        given = given.strip()
        ok = False
        for t in tokens:  # compare against every token: the time taken does not tell which one matched
            ok |= secrets.compare_digest(given, t)
        return ok


class BodyLimitMiddleware:
    """413 as soon as a body is known to pass ``max_bytes``: at once for a declared length, else when the streamed
    bytes pass it (the app's read of the body then fails, and its response is replaced by the 413)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, what: str) -> ErrorResponse:
        return ErrorResponse({"detail": f"request body {what} over the limit of {self.max_bytes} bytes "
                                        "(KVCALIB_MAX_REQUEST_BYTES)"}, status_code=413,
                             headers={"Connection": "close"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                n = -1
            if n > self.max_bytes:
                await self._too_large(f"of {n} bytes is")(scope, receive, send)
                return
        state = {"received": 0, "over": False, "started": False}

        async def limited_receive() -> Message:
            if state["over"]:  # never hand the app more than the limit, whatever it does with the error
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes:
                    state["over"] = True
                    from fastapi import HTTPException

                    raise HTTPException(413, "request body over the limit")
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                return  # the 413 below answers instead
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await self._too_large(f"passed {self.max_bytes} bytes: it is")(scope, receive, send)


class MetricsMiddleware:
    """Counts and times every HTTP request by (method, route template, status). Labels are bounded: the method is
    one of ``KNOWN_METHODS`` or ``OTHER``, the route the matched template or ``unmatched`` — never the raw path."""

    def __init__(self, app: ASGIApp, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.observe_request(method if method in KNOWN_METHODS else "OTHER", template, status["code"],
                                         time.perf_counter() - t0)
