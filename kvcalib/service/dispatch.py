"""The job dispatcher seam: how the service hands a calibration run to an executor.

Implementations: ``kvcalib.service.jobs.InProcessDispatcher`` (embedded thread pool) and
``kvcalib.worker.dispatch.CeleryDispatcher`` (Celery broker), so this package never imports the API or the worker.
The sweeper dispatches again, through the same seam, the runs whose lease expired or whose message the executor no
longer holds.
"""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    kind: str  # "in-process" | "celery"

    def check(self) -> None:
        """Raise ``UnavailableError`` when jobs cannot be accepted (broker down, executor shut down)."""
        ...

    def submit(self, run_id: int) -> str | None:
        """Queue the run; returns the executor's task id (None when it has none)."""
        ...

    def outstanding(self) -> set[str] | None:
        """Task ids of the messages the executor still holds (queued, reserved or being executed), or None when it
        cannot tell. Optional: the sweeper (``kvcalib.service.sweeper``) treats a dispatcher without it as None."""
        ...

    def close(self, wait: bool = False) -> None: ...
