"""Results and promotion: the Pareto front's rows, the trial to promote, and the promoted defaults file read by the
service (``<data_dir>/promoted_defaults.json``, one entry per (model, method)). Objective 0 is the mean r* (up) and
objective 1 a loss (down) in both kinds of study: the answer loss of a truth study, the held-out fidelity loss of a
reconstruction one."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
from pathlib import Path

from kvcalib.service.promoted import (  # noqa: F401  (re-exported for kvcalib.sweep)
    PROMOTED_FILE,
    PromotedDefaultsError,
    _key,
    _read_promoted,
    promoted_allocator_params,
    promoted_entry,
    promoted_params,
    promoted_path,
    with_promoted_params,
)
from kvcalib.sweep.errors import SweepError
from kvcalib.sweep.space import split_params
from kvcalib.sweep.spec import DEFAULT_MAX_LOSS
from kvcalib.sweep.storage import make_storage
from kvcalib.sweep.studies import load_study, spec_of

log = logging.getLogger("kvcalib.sweep")

_PROMOTE_LOCK = threading.Lock()


def trial_rows(study, pareto_only: bool = True) -> list[dict]:
    """Rows of the completed trials (the Pareto front by default), by descending mean r*. Each row holds the loss
    as ``loss`` and under its objective's name (``answer_loss`` or ``fidelity_loss``)."""
    from optuna.trial import TrialState

    spec = spec_of(study)
    loss_name = spec.objective_names[1]
    trials = study.best_trials if pareto_only else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials} if not pareto_only else None
    rows = []
    for t in trials:
        row = {"trial": t.number, "r_star_mean": t.values[0], "loss": t.values[1], loss_name: t.values[1],
               "violation_rate": t.user_attrs.get("violation_rate"), "params": dict(t.params),
               "baseline": bool(t.user_attrs.get("baseline", False)),
               "pareto": True if front is None else t.number in front}
        if spec.objective == "truth":
            row["r_star_task_mean"] = t.user_attrs.get("r_star_task_mean")
        rows.append(row)
    rows.sort(key=lambda r: (-r["r_star_mean"], r["loss"]))
    return rows


def pick_trial(study, max_loss: float = 0.0, trial: int | None = None):
    """The trial to promote: ``trial`` if given (must be COMPLETE), else the Pareto front's largest mean r* whose
    loss (objective 1) is ≤ ``max_loss`` — or, when none is, the front's smallest loss."""
    from optuna.trial import TrialState

    if trial is not None:
        for t in study.get_trials(deepcopy=False):
            if t.number == trial:
                if t.state != TrialState.COMPLETE:
                    raise SweepError(f"trial {trial} is {t.state.name}, not COMPLETE")
                return t
        raise SweepError(f"study {study.study_name!r} has no trial {trial}")
    front = study.best_trials
    if not front:
        raise SweepError(f"study {study.study_name!r} has no completed trial to promote")
    ok = [t for t in front if t.values[1] <= max_loss + 1e-12]
    if ok:
        return max(ok, key=lambda t: (t.values[0], -t.values[1], -t.number))
    return min(front, key=lambda t: (t.values[1], -t.values[0], t.number))


def promote(study_name: str, *, trial: int | None = None, max_loss: float | None = None, storage=None,
            data_dir: str | Path | None = None) -> dict:
    """Record the chosen trial's parameters as the promoted defaults of (model, method); returns the entry.
    ``max_loss`` (default: 0.05 of the answers for a truth study, 0 for a reconstruction one) is the threshold on
    objective 1 (``pick_trial``)."""
    storage = storage or make_storage()
    study = load_study(study_name, storage)
    spec = spec_of(study)
    max_loss = DEFAULT_MAX_LOSS[spec.objective] if max_loss is None else float(max_loss)
    t = pick_trial(study, max_loss=max_loss, trial=trial)
    mp, ap = split_params(t.params)
    entry = {"model": spec.model, "method": spec.method, "allocator": spec.allocator, "method_params": mp,
             "allocator_params": ap, "study": study_name, "study_id": study._study_id, "trial": t.number,
             "objective": spec.objective, "fidelity": spec.fidelity, "max_loss": max_loss,
             "values": dict(zip(spec.objective_names, t.values)), "tolerance": spec.tolerance,
             "violation_rate": t.user_attrs.get("violation_rate"), "corpus_hash": spec.corpus_hash,
             "promoted_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}
    path = promoted_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _PROMOTE_LOCK:
        d = _read_promoted(path)
        d["entries"][_key(spec.model, spec.method)] = entry
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    study.set_user_attr("promoted", {"trial": t.number, "at": entry["promoted_at"]})
    return entry


