"""The Celery application: ``celery -A kvcalib.worker.app worker`` (or ``kvcalib worker``).

Reliability settings (see docs/service.md, "Job lifecycle"): late acknowledgement (a message is acked only after
the task returned), prefetch 1 (a worker never sits on jobs it is not running), reject on worker loss, and the
broker's visibility timeout (``KVCALIB_BROKER_VISIBILITY_TIMEOUT``) after which the message of a worker that died
(SIGKILL, OOM, power) is delivered again. Tasks are idempotent (``calib.store.jobs.execute_run``), so a second
delivery never writes a profile twice.
"""

from __future__ import annotations

from celery import Celery

from kvcalib.settings import Settings, get_settings

TASK_CALIBRATE = "kvcalib.calibrate_run"


def make_celery(settings: Settings | None = None) -> Celery:
    s = settings or get_settings()
    app = Celery("kvcalib", broker=s.broker_url or "memory://", backend=s.backend_url,
                 include=["kvcalib.worker.tasks", "kvcalib.worker.sweep_tasks"])
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_acks_on_failure_or_timeout=True,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_expires=24 * 3600,
        task_default_queue=s.queue,
        task_routes={TASK_CALIBRATE: {"queue": s.calibration_queue}},
        # Redis: a dead worker's unacked message becomes visible again after the visibility timeout; every
        # worker sweeps for such messages at start and every `unacked_restore_interval` seconds.
        broker_transport_options={"visibility_timeout": s.broker_visibility_timeout,
                                  "unacked_restore_interval": max(1, min(10, s.broker_visibility_timeout // 4)),
                                  "unacked_restore_throttle": 1},
        result_backend_transport_options={"visibility_timeout": s.broker_visibility_timeout},
        broker_connection_timeout=s.broker_timeout,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    app.conf.kvcalib_settings = s
    return app


app = make_celery()
