"""Hyperparameter sweeps of a scoring method (and its allocator) with Optuna, stored in the service's database.

A *study* exists per (model, method, allocator) — and per fidelity for a truth study, see below; its name is
``kvcalib:<model>:<method>:<allocator>[:truth-<fidelity>][:<suffix>]`` — and holds everything a trial needs: the
sweep's ``SweepSpec`` (the calibration corpus, the ratio grid, τ, the probe settings, the objective, the question
settings) is stored as a study system attribute when the study is created, so resuming (``kvcalib sweep run`` again
with the same name) continues the SAME study on the same corpus, whichever process or worker runs the trials.

One trial (``run_trial``) = ask → calibrate every corpus document with the sampled parameters → tell. What is
measured is the study's *objective* (``SweepSpec.objective``):

* ``"truth"`` (new studies): every corpus document becomes a task-truth document once (``calib.data.questions``:
  needles, a key–value block, document questions inserted; seeded per document), is calibrated with the spec's
  fidelity (probes kept off the inserted items), and its full-cache answers are checked at the recommended ratio
  (``calib.calibration.truth.evaluate_truth``, same keep masks). Objective 0, **maximised**: the mean recommended
  ratio r*; objective 1, **minimised**: the mean *realised answer loss* (share of the full-cache answers lost at
  exactly r*). The violation rate (share of documents with r* > r*_task) and the mean r*_task are recorded beside
  them. A truth study exists per (model, method, allocator, fidelity): ``…:<allocator>:truth-<fidelity>[:<suffix>]``.
* ``"reconstruction"`` (studies stored before objectives existed resume as this): objective 0 the mean r*(τ),
  objective 1 the mean *held-out fidelity loss* ``max(0, τ − f_ho(r*))`` — each document's r* re-checked with
  ``holdout_probes`` fresh reconstruction probes (a different probe seed) at exactly that ratio. The held-out
  violation rate (share of documents with f_ho(r*) < τ) is recorded beside it. Reconstruction probes turned out not
  to rank contexts by answer survival (docs/sweeps.md), hence the truth objective.

Both objectives are kept (NSGA-II, a Pareto front) rather than folding the second into a constraint: the trade-off
between reduction and safety is what a sweep is for, and a threshold is only applied at promotion time
(``promote(max_loss=…)``: the front's largest mean r* whose loss is within the threshold — by default 5 % of the
answers for a truth study, 0 for a reconstruction one).

Trials run in-process (``run_inprocess``) or as Celery tasks (``worker/sweep_tasks.py``, ``run_with_broker``); in
both cases the trial itself asks the study for its parameters (the sampler sees every finished trial). Running
trials send heartbeats (Optuna's ``RDBStorage(heartbeat_interval, grace_period,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback)``): a trial whose worker died is failed once its
heartbeat is older than the grace period, and a WAITING copy with the same parameters is enqueued; the next trial
task's ``ask()`` runs it.

Best parameters are *promoted* (``promote``) to a small JSON file in the service's data directory
(``promoted_defaults.json``): the service uses them as ``method_params``/``allocator_params`` when a request gives
none (``promoted_params``, ``promoted_allocator_params``); see docs/sweeps.md.

One concept per module, in flow order: ``space`` (search spaces) → ``spec`` (the ``SweepSpec``) → ``corpus`` →
``storage`` (Optuna storage, heartbeats) → ``studies`` (create/resume) → ``captures`` (the prefill cache) →
``evaluation`` (calibrate the corpus) → ``trial`` (one trial) → ``drivers`` (many) → ``promotion`` (results). This
package re-exports their public names (``from kvcalib import sweep as sw; sw.run_sweep(...)``).
"""

from __future__ import annotations

from kvcalib.sweep.captures import CAPTURES, caching_engine
from kvcalib.sweep.corpus import load_corpus
from kvcalib.sweep.drivers import SweepReport, run_inprocess, run_sweep
from kvcalib.sweep.errors import SweepError
from kvcalib.sweep.evaluation import (
    HOLDOUT_SEED_OFFSET,
    TrialMetrics,
    TruthMetrics,
    calibration_config,
    evaluate_params,
    evaluate_truth_params,
    evaluator,
    question_seed,
    truth_document,
    truth_point,
)
from kvcalib.sweep.promotion import (
    PROMOTED_FILE,
    pick_trial,
    promote,
    promoted_allocator_params,
    promoted_entry,
    promoted_params,
    promoted_path,
    trial_rows,
    with_promoted_params,
)
from kvcalib.sweep.space import (
    ALLOCATOR_PREFIX,
    ALLOCATOR_SPACES,
    SEARCH_SPACES,
    Choice,
    Distribution,
    Float,
    Int,
    default_params,
    search_space,
    split_params,
    sweepable_methods,
)
from kvcalib.sweep.spec import (
    DEFAULT_FIDELITY,
    DEFAULT_MAX_LOSS,
    DEFAULT_QUESTIONS,
    DIRECTIONS,
    OBJECTIVE_NAMES,
    OBJECTIVES,
    STUDY_PREFIX,
    TRUTH_OBJECTIVE_NAMES,
    SweepSpec,
    corpus_hash,
    objective_names,
    spec_study_name,
    study_name,
)
from kvcalib.sweep.storage import heartbeat_settings, make_storage, reset_storages, storage_url
from kvcalib.sweep.studies import SPEC_ATTR, list_studies, load_study, make_sampler, open_study, reap_stale, spec_of
from kvcalib.sweep.trial import TOKEN_ATTR, _summary, run_trial, trial_summary

__all__ = [
    "ALLOCATOR_PREFIX", "ALLOCATOR_SPACES", "CAPTURES", "DEFAULT_FIDELITY", "DEFAULT_MAX_LOSS", "DEFAULT_QUESTIONS",
    "DIRECTIONS", "HOLDOUT_SEED_OFFSET", "OBJECTIVES", "OBJECTIVE_NAMES", "PROMOTED_FILE", "SEARCH_SPACES",
    "SPEC_ATTR", "STUDY_PREFIX", "TOKEN_ATTR", "TRUTH_OBJECTIVE_NAMES", "Choice", "Distribution", "Float", "Int",
    "SweepError", "SweepReport", "SweepSpec", "TrialMetrics", "TruthMetrics", "_summary", "caching_engine",
    "calibration_config", "corpus_hash", "default_params", "evaluate_params", "evaluate_truth_params", "evaluator",
    "heartbeat_settings", "list_studies", "load_corpus", "load_study", "make_sampler", "make_storage",
    "objective_names", "open_study", "pick_trial", "promote", "promoted_allocator_params", "promoted_entry",
    "promoted_params", "promoted_path", "question_seed", "reap_stale", "reset_storages", "run_inprocess",
    "run_sweep", "run_trial", "search_space", "spec_of", "spec_study_name", "split_params", "storage_url",
    "study_name", "sweepable_methods", "trial_rows", "trial_summary", "truth_document", "truth_point",
    "with_promoted_params",
]
