"""The sweep's error type (a ``KvcalibError``: the CLI prints its message and exits with status 2)."""

from __future__ import annotations

from kvcalib.calib.errors import KvcalibError


class SweepError(KvcalibError):
    pass
