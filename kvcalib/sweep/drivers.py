"""Drivers: run a number of trials of a study in this process, or (through a broker runner) on Celery workers."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvcalib.sweep.errors import SweepError
from kvcalib.sweep.evaluation import TrialMetrics
from kvcalib.sweep.spec import SweepSpec
from kvcalib.sweep.storage import make_storage
from kvcalib.sweep.studies import load_study, open_study
from kvcalib.sweep.trial import run_trial


@dataclass
class SweepReport:
    study: str
    study_id: int
    created: bool
    requested: int
    completed: int = 0
    failed: int = 0
    pending: int = 0
    n_trials_total: int = 0
    seconds: float = 0.0
    mode: str = "in-process"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def run_inprocess(study_name: str, n_trials: int, *, storage=None, load_engine=None,
                  evaluate: Callable[..., TrialMetrics] | None = None, max_failures: int | None = None,
                  on_trial: Callable[[dict], None] | None = None) -> tuple[int, int]:
    """Run trials in this process until ``n_trials`` completed (or ``max_failures`` failed): (completed, failed)."""
    storage = storage or make_storage()
    max_failures = n_trials if max_failures is None else max_failures
    done = failed = 0
    while done < n_trials and failed <= max_failures:
        out = run_trial(study_name, storage=storage, load_engine=load_engine, evaluate=evaluate)
        if out["status"] == "complete":
            done += 1
        else:
            failed += 1
        if on_trial:
            on_trial(out)
    return done, failed


def run_sweep(name: str, n_trials: int, *, spec: SweepSpec | None = None, given: dict | None = None,
              broker: bool | None = None, settings=None, storage=None, queue: str | None = None,
              timeout: float | None = None, load_engine=None, on_trial=None,
              broker_runner: Callable[..., tuple[int, int, int]] | None = None) -> SweepReport:
    """Create or resume study ``name`` and run ``n_trials`` more trials (via Celery when ``broker`` — default: when
    a broker is configured — else in this process). Celery runs go through ``broker_runner`` (callers pass
    ``kvcalib.worker.sweep_tasks.run_with_broker``: the sweep package never imports ``worker``)."""
    from kvcalib.settings import get_settings

    s = settings or get_settings()
    storage = storage or make_storage(s.db_url, settings=s)
    study, spec, created = open_study(spec, name, storage, given)
    use_broker = bool(s.broker_url) if broker is None else broker
    t0 = time.perf_counter()
    rep = SweepReport(study=name, study_id=study._study_id, created=created, requested=n_trials,
                      mode="celery" if use_broker else "in-process")
    if n_trials > 0:
        if use_broker:
            if broker_runner is None:
                raise SweepError("sweeps through Celery need a broker runner: call "
                                 "kvcalib.worker.sweep_tasks.run_with_broker, or run --in-process")
            rep.completed, rep.failed, rep.pending = broker_runner(name, n_trials, settings=s, storage=storage,
                                                                     queue=queue, timeout=timeout,
                                                                     on_trial=on_trial)
        else:
            rep.completed, rep.failed = run_inprocess(name, n_trials, storage=storage, load_engine=load_engine,
                                                      on_trial=on_trial)
    rep.seconds = round(time.perf_counter() - t0, 2)
    rep.n_trials_total = len(load_study(name, storage).trials)
    return rep
