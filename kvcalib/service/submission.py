"""Job submission: create (or find) the calibration run of each document, dispatch the new, failed and stale ones,
group them into batches, retry failed jobs and resume unfinished ones after a restart.

A run is keyed by (document, model, parameters hash), so submitting the same request twice returns the same job
(already finished, or still running) and computes nothing twice. The device a request asks for is not part of that
key: it is where the job runs (recorded on the run, read by the executing worker), not what it computes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvcalib.calib.errors import KvcalibError
from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.dispatch import Dispatcher
from kvcalib.service.errors import ConflictError, NotFoundError, ServiceInputError, TooLargeError, UnavailableError
from kvcalib.service.inputs import CalibrationParams, DocumentInput, params_hash
from kvcalib.service.leases import LeasePolicy, as_utc, is_live
from kvcalib.service.orm import CalibrationRun, RunStatus, utcnow
from kvcalib.service.queries import StoreReader
from kvcalib.service.runtime import model_info
from kvcalib.service.sweeper import Sweeper
from kvcalib.service.validation import RequestValidator
from kvcalib.service.views import BatchView, JobView

if TYPE_CHECKING:
    from kvcalib.settings import Settings

log = logging.getLogger("kvcalib.jobs")


class Submitter:
    def __init__(self, db: Database, settings: Settings, dispatcher: Dispatcher | None, validator: RequestValidator,
                 reader: StoreReader):
        self.db, self.settings, self.dispatcher = db, settings, dispatcher
        self.validator, self.reader = validator, reader
        self.sweeper: Sweeper | None = None

    def submit(self, doc: DocumentInput, p: CalibrationParams) -> tuple[JobView, bool]:
        """Create (or find) the run of a document and dispatch it. Returns (job view, finished already)."""
        view = self.submit_many([doc], p)[0]
        return view, view.succeeded

    def submit_many(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> list[JobView]:
        return self.reader.jobs(self._enqueue(docs, p)[0])

    def submit_batch(self, docs: Sequence[DocumentInput], p: CalibrationParams) -> BatchView:
        if not docs:
            raise ServiceInputError("a batch needs at least one document")
        if len(docs) > self.settings.max_batch_documents:
            raise TooLargeError(f"a batch holds at most {self.settings.max_batch_documents} documents, "
                                f"got {len(docs)} (KVCALIB_MAX_BATCH_DOCUMENTS)")
        _, batch_id = self._enqueue(docs, p, batch=True)
        assert batch_id is not None
        return self.reader.batch(batch_id)

    def _executor(self) -> Dispatcher:
        if self.dispatcher is None:
            raise UnavailableError("this process has no job executor")
        return self.dispatcher

    def _enqueue(self, docs: Sequence[DocumentInput], p: CalibrationParams, batch: bool = False
                 ) -> tuple[list[int], int | None]:
        """(run id of every document, batch id when ``batch``): runs written, new/failed/stale ones dispatched."""
        dispatcher = self._executor()
        config = self.validator.config(p)
        info = model_info(p.model)
        params, phash = config.to_dict(), params_hash(config, p.dtype)
        to_dispatch: list[int] = []
        run_ids: list[int] = []
        with self.db.session() as s:
            model_row = repo.get_or_create_model(s, name=info.name, revision=info.revision)
            for i, d in enumerate(docs):
                try:
                    resolved = self.validator.document(s, d, info)
                    self.validator.check_calibratable(resolved.tokens, config)  # too short: 422 now, not in the job
                    row = resolved.row
                except KvcalibError as exc:
                    if len(docs) > 1:
                        raise type(exc)(f"document {i}: {exc}") from exc
                    raise
                run, created = repo.get_or_create_run(s, document=row, model=model_row, params=params,
                                                      params_hash=phash, method=p.method, allocator=p.allocator,
                                                      tolerance=p.tolerance, dtype=p.dtype, device=p.device)
                run_ids.append(run.id)
                if created:
                    to_dispatch.append(run.id)
                elif run.status == RunStatus.failed.value or self._stale(run):
                    repo.requeue_run(s, run=run)
                    run.device = p.device  # the device is not in the parameters hash: this request's device runs it
                    to_dispatch.append(run.id)
            if to_dispatch:  # a down broker answers 503 before anything is committed (the session rolls back);
                dispatcher.check()  # finished documents need no broker: their stored result is answered
            batch_id = None
            if batch:
                batch_id = repo.create_batch(s, run_ids=run_ids, params={
                    "model": p.model, "method": p.method, "allocator": p.allocator, "tolerance": p.tolerance,
                    "options": p.options, "dtype": p.dtype, **({"device": p.device} if p.device else {})}).id
        for run_id in dict.fromkeys(to_dispatch):
            if not self._dispatch(dispatcher, run_id):
                break  # the broker is down: the remaining runs are queued too, and swept later like this one
        return run_ids, batch_id

    def _stale(self, run: CalibrationRun) -> bool:
        """Nobody executes the run: a running run whose lease expired (dead worker), or a queued one untouched for
        longer than the broker's visibility timeout (the sweeper dispatches both again by itself)."""
        if run.status not in (RunStatus.queued.value, RunStatus.running.value) or is_live(run):
            return False
        if run.status == RunStatus.running.value and run.lease_expires_at is not None:
            return True
        return (utcnow() - as_utc(run.updated_at)).total_seconds() > self.settings.broker_visibility_timeout

    def _dispatch(self, dispatcher: Dispatcher, run_id: int) -> bool:
        """Send the run's message; False when the executor refused it (broker down between check and submit):
        the run stays queued and the sweeper sends it once the broker is back — nothing accepted is lost."""
        try:
            task_id = dispatcher.submit(run_id)
        except Exception as exc:  # noqa: BLE001 - broker down between check and submit
            log.warning("run %s could not be queued (%s: %s); the sweeper will send it", run_id,
                        type(exc).__name__, exc)
            with self.db.session() as s:
                repo.set_run(s, run_id=run_id, message="waiting for the job queue (sent again automatically)")
            return False
        with self.db.session() as s:
            repo.set_run(s, run_id=run_id, dispatched_at=utcnow(), **({"task_id": task_id} if task_id else {}))
        return True

    def retry(self, run_id: int) -> JobView:
        dispatcher = self._executor()
        dispatcher.check()
        with self.db.session() as s:
            run = repo.get_run(s, run_id=run_id)
            if run is None:
                raise NotFoundError(f"no job {run_id}")
            if run.status == RunStatus.succeeded.value:
                raise ConflictError(f"job {run_id} already succeeded")
            if run.status != RunStatus.failed.value and not self._stale(run):
                raise ConflictError(f"job {run_id} is {run.status}; only failed (or stale) jobs can be retried")
            if not run.document.text:  # hash-only mode erased it: the job could not read its document
                raise ConflictError(f"the text of job {run_id}'s document is not stored (KVCALIB_STORE_DOCUMENT_TEXT"
                                    "=false): resubmit it with its `text` (POST /calibrate mode=full)")
            repo.requeue_run(s, run=run)
        self._dispatch(dispatcher, run_id)
        return self.reader.job(run_id)

    def resume_unfinished(self) -> int:
        """Start-up sweep: dispatch again the runs a previous process left behind — queued ones whose message is
        gone (all of them for a fresh in-process executor) and running ones whose lease expired (a run still
        leased by a process that died is taken over once its lease expires, by the periodic sweeper)."""
        sweeper = self._sweeper()
        return sweeper.sweep(grace=0.0 if self._executor().kind == "in-process" else None).dispatched

    def _sweeper(self) -> Sweeper:
        if self.sweeper is None:
            self.sweeper = Sweeper(self.db, self._executor(), LeasePolicy.from_settings(self.settings))
        return self.sweeper

    def start_sweeper(self) -> None:
        """Sweep for expired leases and lost messages every ``job_sweep_interval`` seconds (a daemon thread)."""
        self._sweeper().start()

    def stop_sweeper(self) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()
