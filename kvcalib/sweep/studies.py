"""Study management: create or resume the study of a ``SweepSpec``, load it, list studies, reap stale trials."""

from __future__ import annotations

import hashlib
import logging
import time
import warnings

from kvcalib.sweep.errors import SweepError
from kvcalib.sweep.space import default_params, search_space
from kvcalib.sweep.spec import DIRECTIONS, SweepSpec, corpus_hash
from kvcalib.sweep.storage import make_storage

log = logging.getLogger("kvcalib.sweep")

SPEC_ATTR = "kvcalib_spec"  # study system attribute: the SweepSpec as a dict (with the documents)


def _spec_of_storage(storage, study_id: int) -> SweepSpec:
    d = storage.get_study_system_attrs(study_id).get(SPEC_ATTR)
    if d is None:
        raise SweepError("study was not created by `kvcalib sweep` (no stored sweep spec)")
    return SweepSpec.from_dict(d)


def spec_of(study) -> SweepSpec:
    return _spec_of_storage(study._storage, study._study_id)


def make_sampler(spec: SweepSpec, token: str | None = None):
    """NSGA-II; seeded per task token so concurrent workers never draw the same first generation."""
    import optuna

    seed = None
    if token is not None:
        seed = int(hashlib.sha256(f"{spec.seed}:{token}".encode()).hexdigest()[:8], 16)
    return optuna.samplers.NSGAIISampler(population_size=spec.population_size, seed=seed)


def load_study(name: str, storage=None, token: str | None = None):
    import optuna

    storage = storage or make_storage()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise SweepError(f"no study named {name!r} (see `kvcalib sweep list`)") from None
    spec = spec_of(study)
    if token is not None:
        study.sampler = make_sampler(spec, token)
    return study


def _differences(stored: SweepSpec, given: dict) -> list[str]:
    """The options a caller set explicitly (``given``) that disagree with a stored spec."""
    diff = []
    for k, v in given.items():
        if v is None:
            continue
        if k == "documents":
            if corpus_hash(v) != stored.corpus_hash:
                diff.append("corpus")
            continue
        sv = getattr(stored, k, None)
        if k == "ratios":
            v, sv = tuple(sorted(float(x) for x in v)), tuple(sv)
        elif k == "questions":
            v, sv = tuple(int(x) for x in v), tuple(sv)
        if sv != v:
            diff.append(f"{k} ({v!r} given, {sv!r} stored)")
    return diff


def open_study(spec: SweepSpec | None, name: str, storage=None, given: dict | None = None):
    """Load study ``name`` (resume) or create it from ``spec``. Returns ``(study, spec, created)``.

    On resume, the stored spec wins; ``given`` (options the caller set explicitly) must agree with it on the
    fields that define the experiment, else ``SweepError`` (pick another suffix / study name)."""
    import optuna

    storage = storage or make_storage()
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        study = None
    if study is not None and SPEC_ATTR not in storage.get_study_system_attrs(study._study_id):
        if spec is None or study.trials:
            raise SweepError(f"study {name!r} was not created by `kvcalib sweep` (no stored sweep spec)")
        _init_study(study, spec, storage)  # an empty study (an interrupted creation): adopt it
        return study, spec, True
    if study is not None:
        stored = spec_of(study)
        diff = _differences(stored, given or {})
        if diff:
            raise SweepError(f"study {name!r} exists with a different setup: {', '.join(diff)}; resume it without "
                             "those options, or start a new study with another --suffix/--study")
        return study, stored, False
    if spec is None:
        raise SweepError(f"no study named {name!r} to resume")
    search_space(spec.method, spec.allocator)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=list(DIRECTIONS),
                                    sampler=make_sampler(spec))
    except optuna.exceptions.DuplicatedStudyError:  # created concurrently by another driver
        time.sleep(1.0)
        return open_study(spec, name, storage, given)
    _init_study(study, spec, storage)
    return study, spec, True


def _init_study(study, spec: SweepSpec, storage) -> None:
    space = search_space(spec.method, spec.allocator)
    storage.set_study_system_attr(study._study_id, SPEC_ATTR, spec.to_dict())
    study.set_metric_names(list(spec.objective_names))
    for k, v in spec.summary().items():
        study.set_user_attr(k, v)
    study.set_user_attr("search_space", {k: repr(v) for k, v in space.items()})
    defaults = default_params(spec.method, spec.allocator)
    if defaults:  # the published defaults are trial 0: the baseline on the Pareto plot
        study.enqueue_trial(defaults, user_attrs={"baseline": True})


def list_studies(storage=None) -> list[dict]:
    import optuna

    storage = storage or make_storage()
    out = []
    for s in optuna.get_all_study_summaries(storage, include_best_trial=False):
        out.append({"study": s.study_name, "study_id": s._study_id, "n_trials": s.n_trials,
                    "method": s.user_attrs.get("method"), "allocator": s.user_attrs.get("allocator"),
                    "model": s.user_attrs.get("model"),
                    "objective": s.user_attrs.get("objective", "reconstruction"),
                    "fidelity": s.user_attrs.get("fidelity"),
                    "created": s.datetime_start.isoformat() if s.datetime_start else None})
    return out


def reap_stale(study) -> None:
    """Fail the study's RUNNING trials whose heartbeat is older than the grace period; the retry callback enqueues
    a WAITING copy of each (same parameters), picked up by the next ``study.ask()``."""
    from optuna.storages import fail_stale_trials

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            fail_stale_trials(study)
        except Exception:  # noqa: BLE001 - best effort (a concurrent reaper, a DB hiccup)
            log.debug("fail_stale_trials failed", exc_info=True)
