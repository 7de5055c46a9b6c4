"""The library's user-facing errors: bad input that deserves a clear message (CLI exit 2, HTTP 4xx)."""


class KvcalibError(ValueError):
    """Base class of every error caused by the caller's input."""
