"""Celery tasks: thin wrappers over ``kvcalib.service.jobs.execute_run``.

Per worker process the database engine and the model are created once: the model is preloaded when the process
starts (``worker_process_init``, sent by the prefork children and by the solo pool) and otherwise loaded lazily on
the first task (threads pool). Every worker also runs the sweeper (``kvcalib.service.sweeper``) in a thread of its
main process, from ``worker_ready`` to ``worker_shutdown``: runs whose lease expired or whose message was lost are
sent again.
"""

from __future__ import annotations

import logging
import threading

from celery import signals
from sqlalchemy.exc import DBAPIError

from kvcalib.service.jobs import backoff_seconds, execute_run
from kvcalib.service.leases import LeasePolicy
from kvcalib.worker.app import TASK_CALIBRATE, app

log = logging.getLogger("kvcalib.worker")

_lock = threading.Lock()
_db = None
_sweeper = None


def settings():
    return app.conf.kvcalib_settings


def database():
    """The worker's Database, checked to be at the Alembic head (upgraded first for SQLite / auto-migrate)."""
    global _db
    with _lock:
        if _db is None:
            from kvcalib.service.db import prepare

            s = settings()
            _db = prepare(s.db_url, s.migrate_on_start)
        return _db


def load_engine(name: str, dtype: str | None = None, device: str | None = None):
    """The worker's engine of a model in ``dtype`` (None: ``KVCALIB_WORKER_DTYPE``) on ``device`` (None:
    ``KVCALIB_WORKER_DEVICE``; a run's requested device), one per (model, device, dtype)."""
    from kvcalib.service.runtime import get_engine

    return get_engine(name, device or settings().worker_device, dtype)


@signals.worker_init.connect
def _check_on_start(**_):
    s = settings()
    if not s.broker_url:
        raise SystemExit("kvcalib worker: KVCALIB_BROKER_URL is not set (without a broker, `kvcalib serve` runs "
                         "jobs in-process and needs no worker)")
    database()  # refuse to start on a schema that is not at head (SchemaError explains the fix)


def _preload():
    if settings().torch_threads:
        import torch

        torch.set_num_threads(settings().torch_threads)
    try:
        database()
        load_engine(settings().default_model)
    except Exception:  # noqa: BLE001 - the first task reports the problem on its job row
        log.exception("preloading the model failed")


@signals.worker_ready.connect
def _start_sweeper(**_):
    global _sweeper
    from kvcalib.service.sweeper import Sweeper
    from kvcalib.worker.dispatch import CeleryDispatcher

    s = settings()
    _sweeper = Sweeper(database(), CeleryDispatcher(s, app=app), LeasePolicy.from_settings(s))
    _sweeper.start()


@signals.worker_shutdown.connect
def _stop_sweeper(**_):
    if _sweeper is not None:
        _sweeper.stop()


@signals.worker_process_init.connect
def _preload_child(**_):
    global _db
    _db = None  # never share a pool across fork
    _preload()


@app.task(bind=True, name=TASK_CALIBRATE, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def calibrate_run(self, run_id: int) -> dict:
    s = settings()
    retries = self.request.retries
    try:
        out = execute_run(database(), int(run_id), load_engine, max_attempts=s.job_max_retries + 1,
                          task_id=self.request.id, leases=LeasePolicy.from_settings(s))
    except DBAPIError as exc:  # database unreachable: try again later, the run row is untouched or re-claimable
        if retries >= s.job_max_retries + 2:
            raise
        raise self.retry(exc=exc, countdown=backoff_seconds(retries + 1, s.job_retry_backoff)) from exc
    if out.status == "retry":
        raise self.retry(countdown=backoff_seconds(retries + 1, s.job_retry_backoff),
                         max_retries=s.job_max_retries + 2)
    return out.to_dict()
