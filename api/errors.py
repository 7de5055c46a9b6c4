"""Error responses: every failure is JSON ``{"detail": …}`` with the status of its exception type — 4xx for the
caller's input, 429/503 (with ``Retry-After``) for load and dependencies — and none is produced by a crash of the
error path itself.

The error body is encoded NaN-safe and ASCII-only (``ErrorResponse``): a validation error echoes the caller's input,
which may hold NaN / ±Infinity (JSON has no such numbers: Starlette's encoder raises on them) or lone surrogates
(UTF-8 cannot encode them); echoed inputs are also cut to a few hundred characters.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvcalib.calib.errors import KvcalibError
from kvcalib.service.errors import UnavailableError

log = logging.getLogger("kvcalib.api")

ECHO_CHARS = 200  # longest echoed string in an error body
ECHO_ITEMS = 20  # most items of an echoed list or object


class ErrorResponse(JSONResponse):
    """JSON that always encodes: non-finite floats as the strings "NaN"/"Infinity"/"-Infinity", non-ASCII as
    ``\\u`` escapes (lone surrogates included)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(safe_json(content, limit=False), ensure_ascii=True, allow_nan=False,
                          separators=(",", ":")).encode("ascii")


def safe_json(obj: Any, limit: bool = True, depth: int = 0) -> Any:
    """``obj`` as plain JSON values; with ``limit``, long strings and containers are cut (echoed inputs)."""
    if depth > 20:
        return "…"
    if isinstance(obj, bool) or obj is None:
        return obj
    if isinstance(obj, int):
        return obj if abs(obj) < 2**63 or not limit else f"<integer of {obj.bit_length()} bits>"
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity"))
    if isinstance(obj, str):
        return obj if not limit or len(obj) <= ECHO_CHARS else obj[:ECHO_CHARS] + f"… ({len(obj)} characters)"
    if isinstance(obj, dict):
        items = list(obj.items())
        items = items[:ECHO_ITEMS] if limit else items
        return {str(k): safe_json(v, limit, depth + 1) for k, v in items}
    if isinstance(obj, (list, tuple)):
        seq = list(obj[:ECHO_ITEMS]) if limit else list(obj)
        return [safe_json(v, limit, depth + 1) for v in seq]
    if isinstance(obj, bytes):
        return safe_json(obj.decode("utf-8", "replace"), limit, depth + 1)
    return safe_json(str(obj), True, depth + 1)


def _error(detail: Any, status: int, retry_after: int | None = None, headers: dict[str, str] | None = None
           ) -> ErrorResponse:
    h = dict(headers or {})
    if retry_after is not None:
        h["Retry-After"] = str(retry_after)
    return ErrorResponse({"detail": detail}, status_code=status, headers=h or None)


BODY_PARSE_ERROR = "There was an error parsing the body"


def install_error_handlers(app: FastAPI) -> None:
    from sqlalchemy.exc import DataError, DBAPIError, OperationalError

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError):
        errors = [{k: safe_json(v) for k, v in e.items() if k != "url"} for e in exc.errors()[:ECHO_ITEMS]]
        return _error(errors, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        cause = exc.__cause__
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR and cause is not None:
            # FastAPI's JSON parsing failed beyond a JSONDecodeError: documented as 422 (invalid input)
            if isinstance(cause, UnicodeError):
                return _error("the request body is not valid UTF-8 JSON", 422)
            if isinstance(cause, (ValueError, RecursionError)):
                return _error(f"invalid JSON body ({type(cause).__name__}: {str(cause)[:ECHO_CHARS]})", 422)
        return _error(exc.detail, exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(KvcalibError)
    async def input_error(_request: Request, exc: KvcalibError):
        return _error(str(exc), getattr(exc, "status_code", 422))

    @app.exception_handler(UnavailableError)
    async def unavailable(_request: Request, exc: UnavailableError):
        return _error(str(exc), exc.status_code, retry_after=exc.retry_after)

    @app.exception_handler(DataError)
    async def data_error(_request: Request, exc: DataError):
        # a value the database refuses (out of range, invalid characters) slipped past validation: still input
        log.warning("database refused a value: %s", exc.orig)
        return _error(f"a value was refused by the database: {str(exc.orig)[:ECHO_CHARS]}", 422)

    @app.exception_handler(OperationalError)
    async def db_down(_request: Request, exc: OperationalError):
        log.warning("database error: %s", exc)
        return _error("the database is unavailable, retry later", 503, retry_after=5)

    @app.exception_handler(DBAPIError)
    async def db_error(_request: Request, exc: DBAPIError):
        if exc.connection_invalidated:
            return _error("the database is unavailable, retry later", 503, retry_after=5)
        log.exception("database error", exc_info=exc)
        return _error("internal database error", 500)
