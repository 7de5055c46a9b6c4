"""The sweeper: nothing accepted is lost. It dispatches again

* a ``running`` run whose lease expired — its worker died (SIGKILL, OOM, power) and stopped renewing; the broker's
  visibility timeout (an hour by default) is not waited for;
* a ``queued`` run that nobody holds and whose message the executor no longer has, ``dispatch_grace`` seconds after
  it was last sent — lost in a broker restart, or never sent because the broker failed mid-batch. Executors that
  cannot list their messages (``Dispatcher.outstanding`` returns None) get ``fallback_grace`` instead.

Every API process and every worker sweeps at start-up and then every ``sweep_interval`` seconds (a daemon thread),
so several sweepers may see the same run: each re-dispatch is first *taken* with a conditional UPDATE (the run must
be exactly as the sweeper read it), so one of them sends it. A duplicate message can still happen (a message taken
from the broker in the instant of the scan); it is harmless: the lease lets one execution compute, the other
returns ``busy`` or ``already-done``. A run that keeps killing its worker stops after ``max_attempts`` claims.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass, field

from sqlalchemy import Row, select, update

from kvcalib.service.db import Database
from kvcalib.service.dispatch import Dispatcher
from kvcalib.service.leases import UNFINISHED, LeasePolicy, as_utc, not_live
from kvcalib.service.orm import CalibrationRun, RunStatus, utcnow

log = logging.getLogger("kvcalib.sweeper")


@dataclass
class SweepReport:
    expired: list[int] = field(default_factory=list)  # running runs whose lease expired, sent again
    lost: list[int] = field(default_factory=list)  # queued runs whose message was missing, sent again
    unsent: list[int] = field(default_factory=list)  # taken but refused by the executor (broker down): next sweep

    @property
    def dispatched(self) -> int:
        return len(self.expired) + len(self.lost)


class Sweeper:
    def __init__(self, db: Database, dispatcher: Dispatcher, policy: LeasePolicy):
        self.db, self.dispatcher, self.policy = db, dispatcher, policy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ one pass
    def sweep(self, grace: float | None = None) -> SweepReport:
        """One pass. ``grace`` overrides ``dispatch_grace`` (0 at the start of an in-process executor: it holds
        nothing yet, so every queued run lost its message)."""
        now = utcnow()
        grace = self.policy.dispatch_grace if grace is None else grace
        c = CalibrationRun
        with self.db.session() as s:
            rows = s.execute(select(c.id, c.status, c.task_id, c.lease_owner, c.lease_expires_at, c.dispatched_at,
                                    c.updated_at, c.attempts)
                             .where(c.status.in_(UNFINISHED), not_live(now)).order_by(c.id)).all()
        report = SweepReport()
        expired: list[Row] = []
        queued: list[Row] = []
        for r in rows:
            if r.status == RunStatus.running.value:
                silent = now - as_utc(r.updated_at) > dt.timedelta(seconds=self.policy.lease_seconds)
                if r.lease_expires_at is not None or silent:  # no lease at all: a row from before leases
                    expired.append(r)
            elif now - as_utc(r.dispatched_at or r.updated_at) >= dt.timedelta(seconds=grace):
                queued.append(r)
        if queued:
            queued = self._missing(queued, now, grace)
        for r in expired:
            self._redispatch(r, now, f"dispatched again: the lease of {r.lease_owner or 'its worker'} expired",
                             report.expired, report)
        for r in queued:
            self._redispatch(r, now, "dispatched again: its message was lost", report.lost, report)
        if report.dispatched or report.unsent:
            log.warning("sweep: %d expired lease(s) %s, %d lost message(s) %s dispatched again, %d unsent",
                        len(report.expired), report.expired, len(report.lost), report.lost, len(report.unsent))
        return report

    def _missing(self, queued: list[Row], now: dt.datetime, grace: float) -> list[Row]:
        """The queued runs whose task id the executor does not hold."""
        outstanding = getattr(self.dispatcher, "outstanding", None)
        try:
            held = outstanding() if outstanding is not None else None
        except Exception as exc:  # noqa: BLE001 - broker down: nothing can be sent now anyway
            log.warning("sweep: cannot list the executor's messages (%s); queued runs wait", exc)
            return []
        if held is None:
            wait = dt.timedelta(seconds=max(grace, self.policy.fallback_grace))
            return [r for r in queued if now - as_utc(r.dispatched_at or r.updated_at) >= wait]
        return [r for r in queued if r.task_id is None or r.task_id not in held]

    def _redispatch(self, r: Row, now: dt.datetime, reason: str, into: list[int], report: SweepReport) -> None:
        c = CalibrationRun
        with self.db.session() as s:  # take it: only if nobody changed the run since it was read
            taken = s.execute(update(c).where(
                c.id == r.id, c.status == r.status, c.attempts == r.attempts, not_live(now),
                c.dispatched_at.is_not_distinct_from(r.dispatched_at),
                c.lease_owner.is_not_distinct_from(r.lease_owner))
                .values(status=RunStatus.queued.value, lease_owner=None, lease_expires_at=None, dispatched_at=now,
                        updated_at=now, message=reason[:500])
                .execution_options(synchronize_session=False)).rowcount == 1
        if not taken:
            return
        try:
            task_id = self.dispatcher.submit(r.id)
        except Exception as exc:  # noqa: BLE001 - broker down: the run stays queued, sent at a later sweep
            log.warning("sweep: run %s could not be sent (%s: %s)", r.id, type(exc).__name__, exc)
            report.unsent.append(r.id)
            return
        into.append(r.id)
        if task_id:
            with self.db.session() as s:
                s.execute(update(c).where(c.id == r.id, c.dispatched_at == now, c.status == RunStatus.queued.value)
                          .values(task_id=task_id).execution_options(synchronize_session=False))

    # ------------------------------------------------------------------------------------------------ the thread
    def start(self, first_grace: float | None = None) -> None:
        """Sweep now (with ``first_grace``) and then every ``sweep_interval`` seconds, in a daemon thread."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(first_grace,), name="kvcalib-sweeper",
                                        daemon=True)
        self._thread.start()

    def _loop(self, first_grace: float | None) -> None:
        grace = first_grace
        while True:
            try:
                self.sweep(grace)
            except Exception:  # noqa: BLE001 - database down: sweep again later
                log.warning("sweep failed", exc_info=True)
            grace = None
            if self._stop.wait(self.policy.sweep_interval):
                return

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
