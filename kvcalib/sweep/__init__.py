"""Hyperparameter sweeps of a scoring method (and its allocator) with Optuna, stored in the service's database.

A *study* exists per (model, method, allocator) — its name is ``kvcalib:<model>:<method>:<allocator>[:<suffix>]``
— and holds everything a trial needs: the sweep's ``SweepSpec`` (the calibration corpus, the ratio grid, τ, the
probe settings) is stored as a study system attribute when the study is created, so resuming (``kvcalib sweep run``
again with the same name) continues the SAME study on the same corpus, whichever process or worker runs the trials.

One trial (``run_trial``) = ask → calibrate every corpus document with the sampled parameters → tell:

* objective 0, **maximised**: the mean r*(τ) over the corpus (the mean KV reduction the calibration grants);
* objective 1, **minimised**: the mean *held-out fidelity loss* ``max(0, τ − f_ho(r*))`` — each document's r* is
  re-checked with ``holdout_probes`` fresh reconstruction probes (a different probe seed) at exactly that ratio,
  so a parameter set whose calibration is over-optimistic (r* too aggressive for the probes it did not see) is
  penalised. The held-out *violation rate* (share of documents with f_ho(r*) < τ) is recorded beside it.

Both objectives are kept (NSGA-II, a Pareto front) rather than folding the second into a constraint: the trade-off
between reduction and safety is what a sweep is for, and a threshold is only applied at promotion time
(``promote(max_loss=…)``: the front's largest mean r* whose loss is within the threshold).

Trials run in-process (``run_inprocess``) or as Celery tasks (``worker/sweep_tasks.py``, ``run_with_broker``); in
both cases the trial itself asks the study for its parameters (the sampler sees every finished trial). Running
trials send heartbeats (Optuna's ``RDBStorage(heartbeat_interval, grace_period,
heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback)``): a trial whose worker died is failed once its
heartbeat is older than the grace period, and a WAITING copy with the same parameters is enqueued; the next trial

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
from kvcalib.sweep.evaluation import HOLDOUT_SEED_OFFSET, TrialMetrics, calibration_config, evaluate_params
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
from kvcalib.sweep.spec import DIRECTIONS, OBJECTIVE_NAMES, STUDY_PREFIX, SweepSpec, corpus_hash, study_name
from kvcalib.sweep.storage import heartbeat_settings, make_storage, reset_storages, storage_url
from kvcalib.sweep.studies import SPEC_ATTR, list_studies, load_study, make_sampler, open_study, reap_stale, spec_of
from kvcalib.sweep.trial import TOKEN_ATTR, _summary, run_trial, trial_summary

__all__ = [
    "ALLOCATOR_PREFIX", "ALLOCATOR_SPACES", "CAPTURES", "DIRECTIONS", "HOLDOUT_SEED_OFFSET", "OBJECTIVE_NAMES",
    "PROMOTED_FILE", "SEARCH_SPACES", "SPEC_ATTR", "STUDY_PREFIX", "TOKEN_ATTR", "Choice", "Distribution", "Float",
    "Int", "SweepError", "SweepReport", "SweepSpec", "TrialMetrics", "_summary", "caching_engine",
    "calibration_config", "corpus_hash", "default_params", "evaluate_params", "heartbeat_settings", "list_studies",
    "load_corpus", "load_study", "make_sampler", "make_storage", "open_study", "pick_trial", "promote",
    "promoted_allocator_params", "promoted_entry", "promoted_params", "promoted_path", "reap_stale", "reset_storages",
    "run_inprocess", "run_sweep", "run_trial", "search_space", "spec_of", "split_params", "storage_url",
    "study_name", "sweepable_methods", "trial_rows", "trial_summary", "with_promoted_params",
]
