"""Job execution, shared by the Celery task and the embedded (in-process) executor.

``execute_run(db, run_id, load_engine, max_attempts, leases=...)`` is the whole job, idempotent by construction:

1. a run that already has its profile is "already done" — a redelivered message writes nothing; a failed run stays
   failed (resubmission or ``retry`` queue it again);
2. the run is claimed under a lease (``kvcalib.service.leases``: status ``running``, ``attempts`` + 1, one
   conditional UPDATE); a live lease of another execution makes this one return ``busy`` without computing. While it
   calibrates, a heartbeat renews the lease and progress is written to the row. The risk controller over r* that fits
   the run (``predictions.controller_for``: registered, else shipped) sets the ratio the profile serves;
3. the curve points, the profile — with its layout for servers (``kvcalib.service.layout.profile_layout``: the
   context ids' hash, the model shape in the run's dtype, the kept positions at the served ratio) — and the
   ``succeeded`` status
   are written in ONE transaction guarded by the unique constraints (profile per run, curve point per (run,
   ratio)); a concurrent duplicate loses the race silently.

A crash between 2 and 3 leaves a ``running`` row whose lease stops being renewed; once it expired the sweeper
(``kvcalib.service.sweeper``) dispatches the run again, as it does a queued run whose message was lost. Input
errors (``KvcalibError``) fail the run at once; other errors ask for a retry until ``max_attempts`` attempts were made
(``attempts`` counts claims: the first attempt is 1, ``JOB_MAX_RETRIES=r`` allows ``r + 1``).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvcalib.calib.errors import KvcalibError
from kvcalib.service import repository as repo
from kvcalib.service.db import Database
from kvcalib.service.leases import Heartbeat, LeaseLost, LeasePolicy, claim, is_live, new_owner, release
from kvcalib.service.orm import RunStatus, utcnow

if TYPE_CHECKING:
    from kvcalib.service.runtime import EngineLoader

log = logging.getLogger("kvcalib.jobs")


@dataclass
class Outcome:
    status: str  # succeeded | already-done | failed | retry | missing | busy (live lease elsewhere) | lost (lease)
    run_id: int
    profile_id: int | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"status": self.status, "run_id": self.run_id, "profile_id": self.profile_id, "error": self.error}


def token_budget_of(ratio: float, context_tokens: int) -> int:
    """Average kept positions per (layer, head) at compression ratio ``ratio`` (``Budget.per_head``)."""
    from kvcalib.calib.budget import Budget

    return Budget(ratio=min(max(float(ratio), 0.0), 0.999999)).per_head(int(context_tokens))


class _Progress:
    """Throttled progress writer (at most one UPDATE per ``interval`` seconds, errors never abort the job); raises
    ``LeaseLost`` as soon as the heartbeat found the lease taken over."""

    def __init__(self, db: Database, run_id: int, heartbeat: Heartbeat, interval: float = 0.5):
        self.db, self.run_id, self.heartbeat, self.interval = db, run_id, heartbeat, interval
        self.last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        self.heartbeat.check()
        now = time.monotonic()
        if now - self.last < self.interval and fraction < 1.0:
            return
        self.last = now
        try:
            with self.db.session() as s:
                repo.set_run(s, run_id=self.run_id, progress=max(0.0, min(0.99, float(fraction))),
                             message=(message or "calibrating")[:500])
        except Exception:  # noqa: BLE001 - progress is best effort
            log.warning("progress update of run %s failed", self.run_id, exc_info=True)


def execute_run(db: Database, run_id: int, load_engine: EngineLoader, max_attempts: int = 4,
                task_id: str | None = None, leases: LeasePolicy | None = None) -> Outcome:
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.service.layout import profile_layout
    from kvcalib.service.predictions import controller_for
    from kvcalib.service.runtime import dtype_aware, load_at

    policy = leases or LeasePolicy()
    owner = new_owner()
    # ---- 1. already done? claim
    with db.session() as s:
        run = repo.get_run(s, run_id=run_id)
        if run is None:
            return Outcome("missing", run_id, error="no such run")
        prof = repo.profile_for_run(s, run_id=run_id)
        if prof is not None:
            if run.status != RunStatus.succeeded.value:
                release(s, run_id=run_id, owner=None, status=RunStatus.succeeded.value, progress=1.0,
                        message="done", finished_at=run.finished_at or utcnow())
            return Outcome("already-done", run_id, profile_id=prof.id)
        if run.status == RunStatus.failed.value:
            return Outcome("failed", run_id, error=run.error or "failed")
        if is_live(run):
            log.info("run %s is held by %s: this delivery does nothing", run_id, run.lease_owner)
            return Outcome("busy", run_id, error=f"held by {run.lease_owner}")
        if run.attempts >= max_attempts:
            release(s, run_id=run_id, owner=None, status=RunStatus.failed.value, finished_at=utcnow(),
                    message="failed", error=(run.error or "") + f"\ngave up after {run.attempts} attempts")
            return Outcome("failed", run_id, error=f"gave up after {run.attempts} attempts")
        attempt = run.attempts + 1
        if not claim(s, run_id=run_id, owner=owner, lease_seconds=policy.lease_seconds, attempt=attempt,
                     task_id=task_id):
            return Outcome("busy", run_id, error="claimed by another execution")
        text, model_name, revision = run.document.text, run.model.name, run.model.revision
        params, dtype, device = dict(run.params), run.dtype, run.device

    # ---- 2. calibrate (then the layout for servers: context ids' hash, model shape, kept positions at r*)
    try:
        with Heartbeat(db, run_id, owner, policy) as heartbeat:
            config = CalibrationConfig.from_dict(params, stored=True)
            engine = load_at(dtype_aware(load_engine), model_name, dtype, device)  # a missing device: failed
            heartbeat.check()
            got = engine.lm.spec.revision
            if got != revision:
                raise KvcalibError(f"model {model_name!r} is at revision {got} in this worker but the run "
                                   f"was submitted for revision {revision}")
            choice = controller_for(db, model_name, config)  # risk control of the served ratio, when one fits
            result = calibrate(engine, text, config, progress=_Progress(db, run_id, heartbeat),
                               controller=choice.predictor if choice is not None else None)
            heartbeat.check()
            layout = profile_layout(engine, text, config, model=model_name, result=result)
    except LeaseLost as exc:
        return Outcome("lost", run_id, error=str(exc))
    except KvcalibError as exc:
        return _fail(db, run_id, owner, f"{type(exc).__name__}: {exc}", str(exc))
    except (ValueError, TypeError, ZeroDivisionError, IndexError) as exc:
        if params.get("method_params"):  # caller-chosen hyperparameters broke the method: retrying cannot help
            return _fail(db, run_id, owner, f"calibration failed with the given method_params: "
                                            f"{type(exc).__name__}: {exc}", str(exc))
        return _transient(db, run_id, owner, exc, attempt, max_attempts)
    except Exception as exc:  # noqa: BLE001 - transient (OOM, CUDA, DB hiccup…): retry
        return _transient(db, run_id, owner, exc, attempt, max_attempts)

    # ---- 3. store exactly once (even if the lease was lost meanwhile: the result is the same)
    with db.session() as s:
        run = repo.get_run(s, run_id=run_id)
        profile, written = repo.save_result(s, run=run, result=result,
                                            token_budget=token_budget_of(result.ratio, result.context_tokens),
                                            server=layout)
        if run.document.token_count is None:
            run.document.token_count = int(result.context_tokens)
        release(s, run_id=run_id, owner=None, status=RunStatus.succeeded.value, progress=1.0, error=None,
                message="done" if written else "done (by another delivery)", finished_at=utcnow())
        profile_id = profile.id
    return Outcome("succeeded" if written else "already-done", run_id, profile_id=profile_id)


def _transient(db: Database, run_id: int, owner: str, exc: BaseException, attempt: int,
               max_attempts: int) -> Outcome:
    err = f"{type(exc).__name__}: {exc}"
    log.warning("run %s attempt %s/%s failed: %s", run_id, attempt, max_attempts, err)
    if attempt >= max_attempts:
        return _fail(db, run_id, owner, err + "\n" + "".join(traceback.format_exception(exc, limit=5)), err)
    with db.session() as s:
        held = release(s, run_id=run_id, owner=owner, status=RunStatus.queued.value, error=err,
                       message=f"retrying after attempt {attempt}/{max_attempts}", dispatched_at=utcnow())
    return Outcome("retry" if held else "lost", run_id, error=err)


def _fail(db: Database, run_id: int, owner: str, error: str, short: str) -> Outcome:
    with db.session() as s:
        held = release(s, run_id=run_id, owner=owner, status=RunStatus.failed.value, error=error[:10_000],
                       message="failed", finished_at=utcnow())
    return Outcome("failed" if held else "lost", run_id, error=short)


def backoff_seconds(attempt: int, base: float) -> float:
    return min(300.0, base * (2 ** max(0, attempt - 1)))


# ---------------------------------------------------------------------------------------------------- dispatchers
def task_id(run_id: int) -> str:
    """The in-process executor's task id of a run."""
    return f"inproc-{run_id}"


class InProcessDispatcher:
    """The embedded executor: a thread pool in the API process runs ``execute_run`` (retries with backoff).
    Its "messages" are the runs waiting or running in this process (``outstanding``), which the sweeper reads."""

    kind = "in-process"

    def __init__(self, db: Database, load_engine: EngineLoader, workers: int = 1, max_attempts: int = 4,
                 backoff: float = 2.0, leases: LeasePolicy | None = None):
        self.db, self.load_engine = db, load_engine
        self.max_attempts, self.backoff = max_attempts, backoff
        self.leases = leases or LeasePolicy()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kvcalib-job")
        self._pending: set[int] = set()
        self._lock = threading.Lock()
        self._closed = False

    def check(self) -> None:
        if self._closed:
            from kvcalib.service.errors import UnavailableError

            raise UnavailableError("the in-process executor is shut down")

    def submit(self, run_id: int) -> str | None:
        self.check()
        with self._lock:
            if run_id in self._pending:  # already waiting in this process: do not queue it twice
                return task_id(run_id)
            self._pending.add(run_id)
        self.pool.submit(self._run, run_id)
        return task_id(run_id)

    def outstanding(self) -> set[str]:
        """Task ids of the runs this process still holds (waiting, running or between retries)."""
        with self._lock:
            return {task_id(r) for r in self._pending}

    def _run(self, run_id: int) -> None:
        try:
            for attempt in range(1, self.max_attempts + 2):
                if self._closed:
                    return
                try:
                    out = execute_run(self.db, run_id, self.load_engine, self.max_attempts, task_id(run_id),
                                      leases=self.leases)
                except Exception:  # noqa: BLE001 - DB down: wait and try again
                    log.exception("in-process run %s crashed", run_id)
                    out = Outcome("retry", run_id)
                if out.status != "retry":
                    return
                time.sleep(backoff_seconds(attempt, self.backoff))
        finally:
            with self._lock:
                self._pending.discard(run_id)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def close(self, wait: bool = False) -> None:
        self._closed = True
        self.pool.shutdown(wait=wait, cancel_futures=True)
