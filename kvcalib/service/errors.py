"""Errors of the service layer. Input errors subclass ``KvcalibError`` (HTTP 4xx, CLI exit 2); each carries the HTTP
status the API maps it to, so routers never decide error codes themselves."""

from __future__ import annotations

from kvcalib.calib.errors import KvcalibError


class ServiceInputError(KvcalibError):
    status_code = 422


class NotFoundError(ServiceInputError):
    status_code = 404


class TooLargeError(ServiceInputError):
    """A document over ``max_document_bytes`` or ``max_document_tokens`` (HTTP 413, Content Too Large)."""

    status_code = 413


class ConflictError(ServiceInputError):
    status_code = 409


class UnavailableError(Exception):
    """A dependency (broker, database) is down: HTTP 503. Not the caller's fault, hence not a KvcalibError."""

    status_code = 503
    retry_after = 5  # seconds, the Retry-After header


class BusyError(UnavailableError):
    """Every synchronous-work slot of this process is taken and the wait queue is full (or waited out): HTTP 429."""

    status_code = 429
    retry_after = 2


class TimeLimitError(UnavailableError):
    """Synchronous work ran past ``KVCALIB_SYNC_TIMEOUT``: HTTP 503 (the computation ends in the background, still
    holding its slot, so abandoned work never exceeds the concurrency cap)."""

    status_code = 503
    retry_after = 10
