"""Run leases: at most one live execution of a calibration run, and a way to tell a dead executor from a slow one.

A worker that executes a run first *claims* it — one conditional UPDATE that succeeds only while nobody holds a
live lease — and then renews the lease from a heartbeat thread every third of its length while it computes. So:

* a second delivery of the message (a broker visibility timeout shorter than the job, a duplicate dispatch) finds a
  live lease and returns at once, without computing (``busy``);
* a SIGKILLed worker stops renewing: its lease expires after ``lease_seconds`` and the sweeper
  (``kvcalib.service.sweeper``) dispatches the run again, whatever the broker's visibility timeout;
* a stalled worker that lost its lease to another finds out at its next renewal and abandons the run.

Times are the executors' clocks (UTC): keep hosts NTP-synchronised, with skew far below ``lease_seconds``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_, update
from sqlalchemy.orm import Session

from kvcalib.service.db import Database
from kvcalib.service.orm import CalibrationRun, RunStatus, utcnow

if TYPE_CHECKING:
    from kvcalib.settings import Settings

log = logging.getLogger("kvcalib.jobs")

UNFINISHED = (RunStatus.queued.value, RunStatus.running.value)


@dataclass(frozen=True)
class LeasePolicy:
    """Timing of leases and sweeps (``KVCALIB_JOB_LEASE_SECONDS``, ``_JOB_DISPATCH_GRACE``, ``_JOB_SWEEP_INTERVAL``).

    ``fallback_grace`` is how long a queued run waits before it is sent again when the executor cannot list the
    messages it holds (a broker other than Redis): the broker's visibility timeout."""

    lease_seconds: float = 60.0
    dispatch_grace: float = 60.0
    sweep_interval: float = 15.0
    fallback_grace: float = 3600.0

    def __post_init__(self) -> None:
        if self.lease_seconds <= 0 or self.sweep_interval <= 0 or self.dispatch_grace < 0:
            raise ValueError(f"invalid lease policy {self}")

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3.0

    @classmethod
    def from_settings(cls, s: Settings) -> LeasePolicy:
        return cls(lease_seconds=s.job_lease_seconds, dispatch_grace=s.job_dispatch_grace,
                   sweep_interval=s.job_sweep_interval, fallback_grace=float(s.broker_visibility_timeout))


def new_owner() -> str:
    """A lease owner unique to one execution: host, process and a random part (never reused by a redelivery)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def not_live(now: dt.datetime):
    """SQL condition: nobody holds the lease at ``now``."""
    return or_(CalibrationRun.lease_expires_at.is_(None), CalibrationRun.lease_expires_at < now)


def claim(s: Session, *, run_id: int, owner: str, lease_seconds: float, attempt: int,
          task_id: str | None) -> bool:
    """Take the lease of an unfinished run that nobody holds (or whose lease expired) as its attempt number
    ``attempt`` (``attempts`` must still be ``attempt - 1``). One conditional UPDATE: of two concurrent claims
    exactly one matches the row; the loser leaves the run to the winner."""
    now = utcnow()
    values = dict(status=RunStatus.running.value, attempts=attempt, lease_owner=owner,
                  lease_expires_at=now + dt.timedelta(seconds=lease_seconds), started_at=now, updated_at=now,
                  progress=0.0, message="loading model")
    if task_id:
        values["task_id"] = task_id
    res = s.execute(update(CalibrationRun)
                    .where(CalibrationRun.id == run_id, CalibrationRun.status.in_(UNFINISHED), not_live(now),
                           CalibrationRun.attempts == attempt - 1)
                    .values(**values).execution_options(synchronize_session=False))
    return res.rowcount == 1


def renew(s: Session, *, run_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend the lease; False when ``owner`` no longer holds it (expired and taken over, or the run finished)."""
    now = utcnow()
    res = s.execute(update(CalibrationRun)
                    .where(CalibrationRun.id == run_id, CalibrationRun.lease_owner == owner,
                           CalibrationRun.status == RunStatus.running.value)
                    .values(lease_expires_at=now + dt.timedelta(seconds=lease_seconds), updated_at=now)
                    .execution_options(synchronize_session=False))
    return res.rowcount == 1


def release(s: Session, *, run_id: int, owner: str | None, **values) -> bool:
    """Set ``values`` on the run and drop the lease — only while ``owner`` holds it (``None``: unconditionally).
    False when the lease was lost: the run belongs to another execution now and is left alone."""
    values.setdefault("updated_at", utcnow())
    cond = [CalibrationRun.id == run_id]
    if owner is not None:
        cond.append(CalibrationRun.lease_owner == owner)
    res = s.execute(update(CalibrationRun).where(and_(*cond))
                    .values(lease_owner=None, lease_expires_at=None, **values)
                    .execution_options(synchronize_session=False))
    return res.rowcount == 1


def is_live(run: CalibrationRun, now: dt.datetime | None = None) -> bool:
    """Whether a run's lease is held right now."""
    exp = as_utc(run.lease_expires_at)
    return exp is not None and exp > (now or utcnow())


def as_utc(t: dt.datetime | None) -> dt.datetime | None:
    """SQLite hands timestamps back naive (they are stored in UTC)."""
    if t is not None and t.tzinfo is None:
        return t.replace(tzinfo=dt.UTC)
    return t


class LeaseLost(RuntimeError):
    """The lease of the run being computed was taken over: this execution abandons it."""


class Heartbeat:
    """Renews a lease from a daemon thread while the job computes (``with Heartbeat(...) as hb``); ``hb.check()``
    raises ``LeaseLost`` once a renewal found the lease taken over. Database errors are retried at the next beat:
    the lease expires (and the run is re-dispatched) only if renewals keep failing for ``lease_seconds``."""

    def __init__(self, db: Database, run_id: int, owner: str, policy: LeasePolicy):
        self.db, self.run_id, self.owner, self.policy = db, run_id, owner, policy
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"kvcalib-lease-{run_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _beat(self) -> None:
        while not self._stop.wait(self.policy.heartbeat_seconds):
            try:
                with self.db.session() as s:
                    held = renew(s, run_id=self.run_id, owner=self.owner, lease_seconds=self.policy.lease_seconds)
            except Exception:  # noqa: BLE001 - database hiccup: try again at the next beat
                log.warning("lease renewal of run %s failed", self.run_id, exc_info=True)
                continue
            if not held:
                log.warning("run %s: lease of %s was taken over; abandoning this execution", self.run_id,
                            self.owner)
                self.lost.set()
                return

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"the lease of run {self.run_id} was taken over by another execution")
