"""One trial: ask the study for parameters → calibrate the corpus (``evaluate_truth_params`` for a truth study,
``evaluate_params`` for a reconstruction one) → tell the objectives.

Idempotent per task token; sends the trial's heartbeats while it runs (a dead worker's trial goes stale and is
retried with the same parameters, see ``storage.make_storage``)."""

from __future__ import annotations

import logging
import math
import os
import uuid
import warnings
from collections.abc import Callable
from typing import Any

from kvcalib.sweep.evaluation import TrialMetrics, TruthMetrics, evaluate_params, evaluate_truth_params
from kvcalib.sweep.space import search_space, split_params
from kvcalib.sweep.storage import make_storage
from kvcalib.sweep.studies import load_study, reap_stale, spec_of

log = logging.getLogger("kvcalib.sweep")

TOKEN_ATTR = "kvcalib_token"  # trial system attribute: the token of the task that ran it


def _trial_of_token(study, token: str):
    from optuna.trial import TrialState

    found = [t for t in study.get_trials(deepcopy=False)
             if t.state != TrialState.WAITING and t.system_attrs.get(TOKEN_ATTR) == token]
    return found[-1] if found else None


def _default_engine(model: str):
    from kvcalib.service.runtime import get_engine

    return get_engine(model)


def trial_summary(t, token: str, duplicate: bool = False) -> dict:
    """What a trial task reports for a finished trial of the study (``t``: an Optuna ``FrozenTrial``)."""
    return {"status": "complete" if t.state.name == "COMPLETE" else t.state.name.lower(), "trial": t.number,
            "token": token, "values": t.values, "params": t.params, "duplicate": duplicate}


_summary = trial_summary  # the name callers used before the split


def _fail_dead_delivery(study, storage, prior) -> None:
    """A trial left RUNNING under this token: the previous delivery died; fail it so that the retry callback
    re-enqueues it (same parameters)."""
    import optuna
    from optuna.trial import TrialState

    try:
        if storage.set_trial_state_values(prior._trial_id, state=TrialState.FAIL):
            cb = storage.get_heartbeat_stale_trial_callback()
            if cb is not None:
                cb(study, storage.get_trial(prior._trial_id))
    except optuna.exceptions.UpdateFinishedTrialError:
        pass


def _evaluation(spec) -> Callable[..., TrialMetrics | TruthMetrics]:
    """The evaluation of the study's objective (looked up here at call time: tests replace these names)."""
    return evaluate_truth_params if spec.objective == "truth" else evaluate_params


def run_trial(study_name: str, token: str | None = None, *, storage=None,
              load_engine: Callable[[str], Any] | None = None,
              evaluate: Callable[..., TrialMetrics | TruthMetrics] | None = None) -> dict:
    """ask → calibrate the corpus → tell, for one trial of ``study_name``. Idempotent per ``token``: a task
    delivered twice (worker lost after telling) reports the first delivery's trial instead of adding one; a trial
    left RUNNING by a dead delivery of the same token is failed (and re-enqueued by the retry callback) first."""
    from optuna.storages._heartbeat import get_heartbeat_thread
    from optuna.trial import TrialState

    storage = storage or make_storage()
    token = token or f"local-{uuid.uuid4().hex}"
    study = load_study(study_name, storage, token=token)
    spec = spec_of(study)
    reap_stale(study)
    prior = _trial_of_token(study, token)
    if prior is not None:
        if prior.state.is_finished():
            return trial_summary(prior, token, duplicate=True)
        _fail_dead_delivery(study, storage, prior)
    with warnings.catch_warnings():  # "Heartbeat of storage is supposed to be used with Study.optimize": we send
        warnings.simplefilter("ignore")  # the heartbeats ourselves, below
        trial = study.ask()
    storage.set_trial_system_attr(trial._trial_id, TOKEN_ATTR, token)
    space = search_space(spec.method, spec.allocator)
    params = {name: dist.suggest(trial, name) for name, dist in space.items()}
    mp, ap = split_params(params)
    trial.set_user_attr("worker", f"{os.uname().nodename}:{os.getpid()}")
    hb = get_heartbeat_thread(trial._trial_id, storage)
    hb.start()
    try:
        engine = (load_engine or _default_engine)(spec.model)
        metrics = (evaluate or _evaluation(spec))(engine, spec, mp, ap)
    except BaseException as exc:
        hb.join()
        err = f"{type(exc).__name__}: {exc}"[:2000]
        try:
            trial.set_user_attr("error", err)
            study.tell(trial, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001
            log.exception("could not mark trial %s failed", trial.number)
        if not isinstance(exc, Exception):
            raise
        log.warning("trial %s of %s failed: %s", trial.number, study_name, err)
        return {"status": "failed", "trial": trial.number, "token": token, "error": err, "params": params}
    hb.join()
    for k, v in metrics.user_attrs().items():
        trial.set_user_attr(k, v)
    values = metrics.values()
    if not all(math.isfinite(v) for v in values):
        study.tell(trial, state=TrialState.FAIL)
        return {"status": "failed", "trial": trial.number, "token": token, "error": "non-finite objective",
                "params": params}
    study.tell(trial, values)
    return {"status": "complete", "trial": trial.number, "token": token, "values": values, "params": params,
            "objective": spec.objective, "violation_rate": metrics.violation_rate,
            "seconds": round(metrics.seconds, 3)}
