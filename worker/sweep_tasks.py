"""Celery task of the sweep stage: ONE Optuna trial per task (ask → calibrate the study's corpus → tell).

The task carries only the study name and a token: the corpus and the calibration settings are stored with the study
(``kvcalib.sweep.spec.SweepSpec``), the parameters are asked from the study by the task itself (so the sampler sees
every trial finished so far), and the storage is the worker's ``KVCALIB_DATABASE_URL`` — the same database the driver
(``kvcalib sweep run``) and the dashboard use. The task itself is ``kvcalib.sweep.trial.run_trial``.

Reliability: late acknowledgement and reject-on-worker-lost like the calibration task; while it runs the trial sends
heartbeats (``KVCALIB_SWEEP_HEARTBEAT``/``KVCALIB_SWEEP_GRACE``, fields of the worker's settings), so when the worker
dies the trial becomes stale and is retried (see ``kvcalib.sweep.storage``); the token makes a redelivered message a
no-op once its trial finished.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import signals

from kvcalib.worker.app import app

TASK_SWEEP_TRIAL = "kvcalib.sweep_trial"


def _settings():
    return app.conf.kvcalib_settings


def _load_engine(name: str):
    from kvcalib.service.runtime import get_engine

    return get_engine(name, _settings().worker_device)


@signals.worker_process_init.connect
def _forget_storages(**_):
    from kvcalib.sweep.storage import reset_storages

    reset_storages()  # never share a connection pool across fork


@app.task(bind=True, name=TASK_SWEEP_TRIAL, acks_late=True, reject_on_worker_lost=True, max_retries=None)
def sweep_trial(self, study_name: str, token: str) -> dict:
    from kvcalib.sweep.storage import make_storage
    from kvcalib.sweep.trial import run_trial

    s = _settings()
    storage = make_storage(s.db_url, settings=s)
    return run_trial(study_name, token, storage=storage, load_engine=_load_engine)


def run_with_broker(study_name: str, n_trials: int, *, settings=None, storage=None, queue: str | None = None,
                    timeout: float | None = None, poll: float = 1.0, max_failures: int | None = None,
                    on_trial: Callable[[dict], None] | None = None) -> tuple[int, int, int]:
    """Send ``n_trials`` trial tasks to the Celery workers and follow them in the study (the ground truth):
    a task whose trial completed counts; one whose trial failed (an error, or a stale heartbeat: its worker died)
    or that errored before asking is replaced by a new task (at most ``max_failures`` times) — a replacement
    picks up the WAITING retry of a stale trial. Returns (completed, failed, still pending)."""
    from optuna.trial import TrialState

    from kvcalib.settings import get_settings
    from kvcalib.sweep.errors import SweepError
    from kvcalib.sweep.storage import make_storage
    from kvcalib.sweep.studies import load_study, reap_stale
    from kvcalib.sweep.trial import TOKEN_ATTR, trial_summary
    from kvcalib.worker.app import make_celery

    s = settings or get_settings()
    if not s.broker_url:
        raise SweepError("no broker configured (KVCALIB_BROKER_URL): run the sweep --in-process")
    storage = storage or make_storage(s.db_url, settings=s)
    study = load_study(study_name, storage)
    app = make_celery(s)
    queue = queue or s.queue
    max_failures = n_trials if max_failures is None else max_failures
    pending: dict[str, Any] = {}

    def submit():
        token = f"task-{uuid.uuid4().hex}"
        try:
            res = app.send_task(TASK_SWEEP_TRIAL, args=[study_name, token], queue=queue, retry=True,
                                retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5})
        except Exception as exc:  # noqa: BLE001
            raise SweepError(f"cannot reach the broker: {type(exc).__name__}: {exc}") from exc
        pending[token] = res

    done = failed = 0
    for _ in range(n_trials):
        submit()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while pending:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(poll)
            reap_stale(study)
            by_token = {}
            for t in study.get_trials(deepcopy=False):
                tok = t.system_attrs.get(TOKEN_ATTR)
                if tok in pending and t.state != TrialState.WAITING:
                    by_token[tok] = t
            for token, res in list(pending.items()):
                t = by_token.get(token)
                if t is not None and t.state == TrialState.COMPLETE:
                    ok = True
                elif t is not None and t.state == TrialState.FAIL:
                    ok = False
                elif t is None and _task_failed(res):
                    ok = False
                else:
                    continue
                del pending[token]
                out = trial_summary(t, token) if t is not None else {"status": "failed", "token": token,
                                                                     "error": _task_error(res)}
                if t is not None and not ok:
                    out["error"] = t.user_attrs.get("error", "worker lost (stale heartbeat)")
                if ok:
                    done += 1
                else:
                    failed += 1
                    if failed <= max_failures and done + len(pending) < n_trials:
                        submit()
                if on_trial:
                    on_trial(out)
    finally:
        app.close()
    return done, failed, len(pending)


def _task_failed(res) -> bool:
    try:
        return res.state in ("FAILURE", "REVOKED")
    except Exception:  # noqa: BLE001 - no result backend reachable: rely on the study
        return False


def _task_error(res) -> str:
    try:
        return f"task failed: {res.result!r}"[:500]
    except Exception:  # noqa: BLE001
        return "task failed"
