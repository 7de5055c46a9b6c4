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
task picks it up. Each task carries a token, so a redelivered task message never adds a second trial.

Best parameters are *promoted* (``promote``) to a small JSON file in the service's data directory
(``promoted_defaults.json``), read by ``promoted_params(method, model)``; see docs/sweeps.md.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvcalib.calib.calibration.curve import DEFAULT_RATIOS
from kvcalib.calib.errors import KvcalibError

log = logging.getLogger("kvcalib.sweep")

STUDY_PREFIX = "kvcalib"
SPEC_ATTR = "kvcalib_spec"  # study system attribute: the SweepSpec as a dict (with the documents)
TOKEN_ATTR = "kvcalib_token"  # trial system attribute: the token of the task that ran it
OBJECTIVE_NAMES = ("r_star_mean", "fidelity_loss")
DIRECTIONS = ("maximize", "minimize")
PROMOTED_FILE = "promoted_defaults.json"
HOLDOUT_SEED_OFFSET = 7919


class SweepError(KvcalibError):
    pass


# ---------------------------------------------------------------------------------------------------- search spaces
@dataclass(frozen=True)
class Int:
    low: int
    high: int
    step: int = 1
    log: bool = False

    def suggest(self, trial, name: str):
        return trial.suggest_int(name, self.low, self.high, step=self.step, log=self.log)

    def contains(self, v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and self.low <= v <= self.high and \
            (v - self.low) % self.step == 0


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial, name: str):
        return trial.suggest_float(name, self.low, self.high, log=self.log)

    def contains(self, v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and self.low <= v <= self.high


@dataclass(frozen=True)
class Choice:
    choices: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.choices))

    def contains(self, v) -> bool:
        return any(v == c and type(v) is type(c) for c in self.choices)


_WINDOW = Int(8, 64, step=8)
_KERNEL = Choice((1, 3, 5, 7, 9))
_POOLING = Choice(("max", "avg"))

# ONE table: method name -> {hyperparameter (a field of the method's Scorer dataclass): distribution}.
# Methods absent from the table (no tunable hyperparameters: keynorm; random's seed is not one) cannot be swept.
SEARCH_SPACES: dict[str, dict[str, Int | Float | Choice]] = {
    "compactor": {"blend": Float(0.0, 1.0), "sketch_dim": Choice((16, 32, 48, 64)), "chunk": Choice((64, 128, 256))},
    "snapkv": {"window": _WINDOW, "kernel": _KERNEL, "pooling": _POOLING},
    "lava": {"window": _WINDOW, "kernel": _KERNEL, "pooling": _POOLING},
    "obcache": {"saliency": Choice(("value", "key", "joint")), "window": _WINDOW, "kernel": _KERNEL},
    "curdkv": {"leverage": Choice(("product", "key", "value", "mean")), "local_window": Choice((8, 16, 32, 64)),
               "protect_first": Choice((0, 4, 8))},
    "lookahead": {"n_pseudo": Choice((2, 4, 8)), "obs_window": Choice((0, 8, 16)), "kernel": _KERNEL},
    "streaming": {"sinks": Choice((0, 1, 2, 4, 8, 16))},
}
# Allocator hyperparameters (keyword arguments of ``calib.budget.ALLOCATORS[name]``), swept beside the method's.
ALLOCATOR_SPACES: dict[str, dict[str, Int | Float | Choice]] = {
    "uniform": {},
    "adakv": {"alpha": Float(0.0, 0.6)},
    "lava": {"alpha": Float(0.0, 0.6)},
}
ALLOCATOR_PREFIX = "alloc_"  # allocator parameters are named e.g. ``alloc_alpha`` in the study


def sweepable_methods() -> list[str]:
    from kvcalib.calib.scorers import SCORERS

    return sorted(m for m in SCORERS if m in SEARCH_SPACES)


def search_space(method: str, allocator: str = "uniform") -> dict[str, Int | Float | Choice]:
    """The study's distributions: the method's hyperparameters, then ``alloc_<name>`` for the allocator's."""
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.scorers import SCORERS, available_methods

    if method not in SCORERS:
        raise SweepError(f"unknown method {method!r}: expected one of {available_methods()}")
    if method not in SEARCH_SPACES:
        raise SweepError(f"method {method!r} has no search space (no tunable hyperparameters); sweepable methods: "
                         f"{sweepable_methods()}")
    if allocator not in available_allocators():
        raise SweepError(f"unknown allocator {allocator!r}: expected one of {available_allocators()}")
    fields_ = set(SCORERS[method].param_names())
    bad = set(SEARCH_SPACES[method]) - fields_
    if bad:
        raise SweepError(f"search space of {method!r} names unknown hyperparameters {sorted(bad)}")
    space = dict(SEARCH_SPACES[method])
    for k, dist in ALLOCATOR_SPACES.get(allocator, {}).items():
        space[ALLOCATOR_PREFIX + k] = dist
    return space


def split_params(params: dict) -> tuple[dict, dict]:
    """(method_params, allocator_params) of a trial's flat parameter dict."""
    mp = {k: v for k, v in params.items() if not k.startswith(ALLOCATOR_PREFIX)}
    ap = {k[len(ALLOCATOR_PREFIX):]: v for k, v in params.items() if k.startswith(ALLOCATOR_PREFIX)}
    return mp, ap


def default_params(method: str, allocator: str) -> dict:
    """The published defaults restricted to the search space (enqueued as a study's first trial, the baseline)."""
    import inspect

    from kvcalib.calib import budget
    from kvcalib.calib.scorers import SCORERS

    space = search_space(method, allocator)
    out = {}
    for f in dataclasses.fields(SCORERS[method]):
        if f.name in space and f.default is not dataclasses.MISSING and space[f.name].contains(f.default):
            out[f.name] = f.default
    sig = inspect.signature(budget.ALLOCATORS[allocator])
    for k in ALLOCATOR_SPACES.get(allocator, {}):
        p = sig.parameters.get(k)
        if p is not None and p.default is not inspect.Parameter.empty and space[ALLOCATOR_PREFIX + k].contains(
                p.default):
            out[ALLOCATOR_PREFIX + k] = p.default
    return out


# ---------------------------------------------------------------------------------------------------- the spec
@dataclass
class SweepSpec:
    """Everything a trial needs besides its parameters; stored with the study."""

    model: str = "smollm2-135m"
    method: str = "compactor"
    allocator: str = "uniform"
    documents: list[str] = field(default_factory=list)
    ratios: tuple[float, ...] = DEFAULT_RATIOS  # calibration's defaults: what the API calibrates with
    tolerance: float = 0.95
    n_probes: int = 4
    probe_tokens: int = 12
    cue_tokens: int = 8
    holdout_probes: int = 2  # fresh probes re-checking each r* (0 = skip: objective 1 is then identically 0)
    seed: int = 0
    population_size: int = 16  # NSGA-II generation size
    max_retry: int = 2  # re-runs of a trial whose worker died (heartbeat stale)
    corpus_source: str = ""

    def __post_init__(self):
        self.ratios = tuple(sorted({float(r) for r in self.ratios}))
        if not self.documents:
            raise SweepError("the sweep corpus holds no documents")
        if not all(isinstance(d, str) and d.strip() for d in self.documents):
            raise SweepError("every corpus document must be a non-empty string")
        if not self.ratios or not all(0.0 < r < 1.0 for r in self.ratios):
            raise SweepError(f"ratios must lie in (0, 1), got {list(self.ratios)}")
        if not 0.0 < self.tolerance <= 1.0:
            raise SweepError(f"tolerance must be in (0, 1], got {self.tolerance}")
        if self.n_probes < 1 or self.holdout_probes < 0 or self.population_size < 2 or self.max_retry < 0:
            raise SweepError("n_probes >= 1, holdout_probes >= 0, population_size >= 2, max_retry >= 0 required")
        search_space(self.method, self.allocator)  # validates method and allocator

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ratios"] = list(self.ratios)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @property
    def corpus_hash(self) -> str:
        return corpus_hash(self.documents)

    def summary(self) -> dict:
        """What the dashboard shows as study user attributes (the documents themselves stay in the system attr)."""
        return {"model": self.model, "method": self.method, "allocator": self.allocator,
                "tolerance": self.tolerance, "ratios": list(self.ratios), "n_documents": len(self.documents),
                "corpus_hash": self.corpus_hash, "corpus_source": self.corpus_source, "n_probes": self.n_probes,
                "holdout_probes": self.holdout_probes, "objectives": list(OBJECTIVE_NAMES)}

    # fields that define the experiment (a resumed study must agree on them)
    IDENTITY = ("model", "method", "allocator", "ratios", "tolerance", "n_probes", "probe_tokens", "cue_tokens",
                "holdout_probes", "seed")


def corpus_hash(documents: Sequence[str]) -> str:
    h = hashlib.sha256()
    for doc in documents:
        h.update(hashlib.sha256(doc.encode("utf-8")).digest())
    return h.hexdigest()[:16]


def study_name(model: str, method: str, allocator: str, suffix: str | None = None) -> str:
    parts = [STUDY_PREFIX, model, method, allocator] + ([suffix] if suffix else [])
    return ":".join(parts)


# ---------------------------------------------------------------------------------------------------- corpus
def load_corpus(path: str | Path | None = None, tokenizer=None, min_tokens: int = 256, max_tokens: int = 512,
                max_docs: int | None = 8) -> list[str]:
    """Documents of a calibration corpus, in the format of ``calib.corpus`` (``kvcalib calibrate``'s): a folder of
    ``.txt`` files or a JSONL file of ``{"id": ..., "text": ...}`` objects — or one ``.txt`` file; default: the
    essay corpus. With a ``tokenizer`` every text is cut at line boundaries into ``min_tokens..max_tokens``-token
    documents (``calib.documents.chunk_by_tokens``); without one, texts are taken whole. Chunks are taken
    round-robin over the texts, so a small ``max_docs`` still spans several of them."""
    from kvcalib.calib.data.corpus import read_texts
    from kvcalib.calib.data.documents import chunk_by_tokens, load_essays

    if path is None:
        from kvcalib.calib.data.documents import essays_dir
        from kvcalib.settings import get_settings

        texts = list(load_essays(essays_dir(get_settings().essays)).items())
    else:
        p = Path(path)
        texts = [(p.stem, p.read_text(encoding="utf-8"))] if p.is_file() and p.suffix == ".txt" else read_texts(p)
    if tokenizer is None:
        pieces = [[t] for _, t in texts if t.strip()]
    else:
        pieces = [chunk_by_tokens(tokenizer, t, min_tokens, max_tokens) for _, t in texts]
    docs = []
    for i in range(max((len(x) for x in pieces), default=0)):  # round-robin over the texts
        docs.extend(x[i] for x in pieces if i < len(x))
    if not docs:
        raise SweepError(f"no document of {min_tokens}..{max_tokens} tokens in the corpus (lower --doc-tokens?)")
    return docs[:max_docs] if max_docs else docs


# ---------------------------------------------------------------------------------------------------- storage
def heartbeat_settings() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: KVCALIB_SWEEP_HEARTBEAT (10) and KVCALIB_SWEEP_GRACE (60)."""
    interval = int(os.environ.get("KVCALIB_SWEEP_HEARTBEAT", "10"))
    grace = int(os.environ.get("KVCALIB_SWEEP_GRACE", str(max(60, 3 * interval))))
    if interval < 1 or grace <= interval:
        raise SweepError(f"need KVCALIB_SWEEP_HEARTBEAT >= 1 and KVCALIB_SWEEP_GRACE > it, got {interval}/{grace}")
    return interval, grace


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*RetryFailedTrialCallback.*")


_STORAGES: dict[tuple, Any] = {}
_STORAGE_LOCK = threading.Lock()


def storage_url(url: str | None = None) -> str:
    if url:
        return url
    from kvcalib.settings import get_settings

    return get_settings().db_url


def make_storage(url: str | None = None, heartbeat: bool = True):
    """Optuna's ``RDBStorage`` on the service database (cached per process, URL and heartbeat setting).

    Optuna creates and versions its own tables (``studies``, ``trials``, …, its ``alembic_version``); the project's
    Alembic migrations use ``kvcalib_alembic_version`` and ignore those tables (``migrations/env.py``)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    _quiet_optuna()
    url = storage_url(url)
    hb = heartbeat_settings() if heartbeat else (None, None)
    key = (url, hb, os.getpid())
    with _STORAGE_LOCK:
        st = _STORAGES.get(key)
        if st is not None:
            return st
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            from sqlalchemy.engine import make_url

            db = make_url(url).database
            if db and db != ":memory:":
                Path(db).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 60}
        try:
            if heartbeat:
                st = RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=hb[0], grace_period=hb[1],
                                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=None))
            else:
                st = RDBStorage(url, engine_kwargs=kwargs)
        except Exception as exc:  # unreachable database, bad URL
            raise SweepError(f"cannot open the sweep storage: {type(exc).__name__}: {exc}") from exc
        _STORAGES[key] = st
        return st


def reset_storages() -> None:
    """Forget cached storages (after fork: a child must not share its parent's connection pool)."""
    with _STORAGE_LOCK:
        _STORAGES.clear()


# ---------------------------------------------------------------------------------------------------- studies
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
        diff = []
        for k, v in (given or {}).items():
            if v is None:
                continue
            if k == "documents":
                if corpus_hash(v) != stored.corpus_hash:
                    diff.append("corpus")
                continue
            sv = getattr(stored, k, None)
            if k == "ratios":
                v, sv = tuple(sorted(float(x) for x in v)), tuple(sv)
            if sv != v:
                diff.append(f"{k} ({v!r} given, {sv!r} stored)")
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
    study.set_metric_names(list(OBJECTIVE_NAMES))
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


# ---------------------------------------------------------------------------------------------------- evaluation
@dataclass
class TrialMetrics:
    r_star: list[float]
    holdout_fidelity: list[float]
    tolerance: float
    monotone: list[bool] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def r_star_mean(self) -> float:
        return float(sum(self.r_star) / len(self.r_star))

    @property
    def fidelity_loss(self) -> float:
        return float(sum(max(0.0, self.tolerance - f) for f in self.holdout_fidelity) / len(self.holdout_fidelity))

    @property
    def violation_rate(self) -> float:
        return float(sum(f < self.tolerance for f in self.holdout_fidelity) / len(self.holdout_fidelity))

    def values(self) -> list[float]:
        return [self.r_star_mean, self.fidelity_loss]

    def user_attrs(self) -> dict:
        return {"violation_rate": self.violation_rate, "r_star": [round(r, 4) for r in self.r_star],
                "holdout_fidelity": [round(f, 4) for f in self.holdout_fidelity],
                "monotone_rate": float(sum(self.monotone) / max(1, len(self.monotone))),
                "context_tokens": self.context_tokens, "seconds": round(self.seconds, 3)}


class _CaptureCache:
    """Per-process LRU of prefill captures keyed by (model, context token ids): a capture does not depend on the
    swept hyperparameters, so every trial after the first skips the prefill of each corpus document."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def size(cap) -> int:
        import torch

        return sum(v.numel() * v.element_size() for v in vars(cap).values() if isinstance(v, torch.Tensor))

    def get(self, key):
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
            return None

    def put(self, key, cap) -> None:
        n = self.size(cap)
        if n > self.max_bytes:
            return
        with self.lock:
            if key in self.items:
                return
            self.items[key] = (cap, n)
            self.bytes += n
            while self.bytes > self.max_bytes and self.items:
                _, (_, m) = self.items.popitem(last=False)
                self.bytes -= m

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0


CAPTURES = _CaptureCache(int(float(os.environ.get("KVCALIB_SWEEP_CAPTURE_CACHE_MB", "1024")) * 2**20))


_CACHING_CLASS = None


def caching_engine(engine):
    """``engine`` with ``capture()`` memoised in ``CAPTURES`` (same weights, same tokenizer, same everything)."""
    global _CACHING_CLASS
    if getattr(engine, "_kvcalib_caching", False):
        return engine
    if _CACHING_CLASS is None:
        from kvcalib.calib.pipeline import Engine

        class CachingEngine(Engine):
            _kvcalib_caching = True

            def __init__(self, inner):
                super().__init__(inner.lm)
                self._inner = inner

            def __getattr__(self, name):  # anything the wrapped engine adds
                return getattr(self._inner, name)

            def capture(self, context_ids, compute_nll: bool = False, **kw):
                ids = context_ids.detach().to("cpu").contiguous()
                base = (getattr(self.lm, "name", ""), getattr(getattr(self.lm, "spec", None), "revision", ""),
                        hashlib.sha256(ids.numpy().tobytes()).hexdigest(), tuple(sorted(kw.items())))
                for flag in ((True,) if compute_nll else (False, True)):
                    cap = CAPTURES.get(base + (flag,))
                    if cap is not None:
                        return cap
                cap = self._inner.capture(context_ids, compute_nll=compute_nll, **kw)
                CAPTURES.put(base + (compute_nll,), cap)
                return cap

        _CACHING_CLASS = CachingEngine
    return _CACHING_CLASS(engine)


@contextlib.contextmanager
def _allocator_with(name: str, params: dict):
    """The allocator name to calibrate with. ``CalibrationConfig`` takes no allocator parameters, so a non-empty
    ``params`` (e.g. the AdaKV/LAVa floor α) is bound under a temporary name in ``calib.budget.ALLOCATORS`` for
    the duration of the block."""
    import functools

    from kvcalib.calib import budget

    if not params:
        yield name
        return
    derived = name + "[" + ",".join(f"{k}={params[k]!r}" for k in sorted(params)) + f"]#{uuid.uuid4().hex[:8]}"
    budget.ALLOCATORS[derived] = functools.partial(budget.ALLOCATORS[name], **params)
    try:
        yield derived
    finally:
        budget.ALLOCATORS.pop(derived, None)


def calibration_config(spec: SweepSpec, method_params: dict, allocator_params: dict, *, allocator: str | None = None,
                       seed: int | None = None, ratios: Sequence[float] | None = None, n_probes: int | None = None):
    """The ``CalibrationConfig`` of one document evaluation (grid calibration, or the hold-out check).
    ``allocator`` overrides the spec's (the temporary bound name of ``_allocator_with``)."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig

    names = {f.name for f in dataclasses.fields(CalibrationConfig)}
    kw: dict[str, Any] = dict(method=spec.method, method_params=dict(method_params),
                              allocator=allocator or spec.allocator,
                              ratios=tuple(ratios if ratios is not None else spec.ratios), tolerance=spec.tolerance,
                              n_probes=spec.n_probes if n_probes is None else n_probes,
                              probe_tokens=spec.probe_tokens, cue_tokens=spec.cue_tokens,
                              seed=spec.seed if seed is None else seed)
    if allocator_params and "allocator_params" in names:  # should calibration grow allocator parameters
        kw["allocator_params"] = dict(allocator_params)
    return CalibrationConfig(**{k: v for k, v in kw.items() if k in names})


def evaluate_params(engine, spec: SweepSpec, method_params: dict, allocator_params: dict,
                    progress: Callable[[float, str], None] | None = None) -> TrialMetrics:
    """Calibrate every corpus document with the given parameters; re-check each r* on held-out probes."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate

    t0 = time.perf_counter()
    eng = caching_engine(engine)
    native = "allocator_params" in {f.name for f in dataclasses.fields(CalibrationConfig)}
    r_star, fid, mono, ntok = [], [], [], []
    n = len(spec.documents)
    with _allocator_with(spec.allocator, {} if native else allocator_params) as alloc:
        cfg = calibration_config(spec, method_params, allocator_params, allocator=alloc)
        for i, doc in enumerate(spec.documents):
            res = calibrate(eng, doc, cfg)
            r = float(res.r_star)
            r_star.append(r)
            mono.append(bool(res.monotone))
            ntok.append(int(res.context_tokens))
            if spec.holdout_probes and r > 0.0:
                ho_cfg = calibration_config(spec, method_params, allocator_params, allocator=alloc, ratios=(r,),
                                            seed=spec.seed + HOLDOUT_SEED_OFFSET, n_probes=spec.holdout_probes)
                fid.append(float(calibrate(eng, doc, ho_cfg).fidelity[0]))
            elif spec.holdout_probes:
                fid.append(1.0)  # r* = 0: nothing compressed, nothing to violate
            else:
                fid.append(spec.tolerance)  # no hold-out check: no measured loss
            if progress is not None:
                progress((i + 1) / n, f"document {i + 1}/{n}")
    return TrialMetrics(r_star=r_star, holdout_fidelity=fid, tolerance=spec.tolerance, monotone=mono,
                        context_tokens=ntok, seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- one trial
def _trial_of_token(study, token: str):
    from optuna.trial import TrialState

    found = [t for t in study.get_trials(deepcopy=False)
             if t.state != TrialState.WAITING and t.system_attrs.get(TOKEN_ATTR) == token]
    return found[-1] if found else None


def run_trial(study_name: str, token: str | None = None, *, storage=None,
              load_engine: Callable[[str], Any] | None = None,
              evaluate: Callable[..., TrialMetrics] | None = None) -> dict:
    """ask → calibrate the corpus → tell, for one trial of ``study_name``. Idempotent per ``token``: a task
    delivered twice (worker lost after telling) reports the first delivery's trial instead of adding one; a trial
    left RUNNING by a dead delivery of the same token is failed (and re-enqueued by the retry callback) first."""
    import optuna
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
            return _summary(prior, token, duplicate=True)
        # RUNNING under this token: the previous delivery died; fail it so the retry callback re-enqueues it
        try:
            if storage.set_trial_state_values(prior._trial_id, state=TrialState.FAIL):
                cb = storage.get_heartbeat_stale_trial_callback()
                if cb is not None:
                    cb(study, storage.get_trial(prior._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
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
        metrics = (evaluate or evaluate_params)(engine, spec, mp, ap)
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
            "violation_rate": metrics.violation_rate, "seconds": round(metrics.seconds, 3)}


def _summary(t, token: str, duplicate: bool = False) -> dict:
    return {"status": "complete" if t.state.name == "COMPLETE" else t.state.name.lower(), "trial": t.number,
            "token": token, "values": t.values, "params": t.params, "duplicate": duplicate}


def _default_engine(model: str):
    from kvcalib.service.runtime import get_engine

    return get_engine(model)


# ---------------------------------------------------------------------------------------------------- drivers
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
    a broker is configured — else in this process). Celery runs go through ``broker_runner`` (default
    ``kvcalib.worker.sweep_tasks.run_with_broker``, imported lazily so that ``calib`` never imports ``worker``
    at module level; callers in the service layer pass it explicitly)."""
    from kvcalib.settings import get_settings

    s = settings or get_settings()
    storage = storage or make_storage(s.db_url)
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


# ---------------------------------------------------------------------------------------------------- results
def trial_rows(study, pareto_only: bool = True) -> list[dict]:
    """Rows of the completed trials (the Pareto front by default), by descending mean r*."""
    from optuna.trial import TrialState

    trials = study.best_trials if pareto_only else study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = {t.number for t in study.best_trials} if not pareto_only else None
    rows = []
    for t in trials:
        rows.append({"trial": t.number, "r_star_mean": t.values[0], "fidelity_loss": t.values[1],
                     "violation_rate": t.user_attrs.get("violation_rate"), "params": dict(t.params),
                     "baseline": bool(t.user_attrs.get("baseline", False)),
                     "pareto": True if front is None else t.number in front})
    rows.sort(key=lambda r: (-r["r_star_mean"], r["fidelity_loss"]))
    return rows


def pick_trial(study, max_loss: float = 0.0, trial: int | None = None):
    """The trial to promote: ``trial`` if given (must be COMPLETE), else the Pareto front's largest mean r* whose
    fidelity loss is ≤ ``max_loss`` — or, when none is, the front's smallest loss."""
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


def promoted_path(data_dir: str | Path | None = None) -> Path:
    if data_dir is None:
        from kvcalib.settings import get_settings

        data_dir = get_settings().data_dir
    return Path(data_dir) / PROMOTED_FILE


def _read_promoted(path: Path) -> dict:
    if not path.is_file():
        return {"version": 1, "entries": {}}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SweepError(f"cannot read promoted defaults {str(path)!r}: {exc}") from exc
    d.setdefault("entries", {})
    return d


_PROMOTE_LOCK = threading.Lock()


def _key(model: str, method: str) -> str:
    return f"{model}/{method}"


def promote(study_name: str, *, trial: int | None = None, max_loss: float = 0.0, storage=None,
            data_dir: str | Path | None = None) -> dict:
    """Record the chosen trial's parameters as the promoted defaults of (model, method); returns the entry."""
    storage = storage or make_storage()
    study = load_study(study_name, storage)
    spec = spec_of(study)
    t = pick_trial(study, max_loss=max_loss, trial=trial)
    mp, ap = split_params(t.params)
    entry = {"model": spec.model, "method": spec.method, "allocator": spec.allocator, "method_params": mp,
             "allocator_params": ap, "study": study_name, "study_id": study._study_id, "trial": t.number,
             "values": dict(zip(OBJECTIVE_NAMES, t.values)), "tolerance": spec.tolerance,
             "violation_rate": t.user_attrs.get("violation_rate"), "corpus_hash": spec.corpus_hash,
             "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
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



def promoted_entry(method: str, model: str | None = None, data_dir: str | Path | None = None) -> dict | None:
    """The promotion record of (model, method) — model defaults to the service's default model — or None."""
    if model is None:
        from kvcalib.settings import get_settings

        model = get_settings().default_model
    return _read_promoted(promoted_path(data_dir))["entries"].get(_key(model, method))


def promoted_params(method: str, model: str | None = None, data_dir: str | Path | None = None) -> dict:
    """The promoted hyperparameters of ``method`` for ``model`` ({} when nothing was promoted): what the service
    passes as ``method_params`` when a request gives none. Parameters the method no longer has are dropped."""
    from kvcalib.calib.scorers import SCORERS

    e = promoted_entry(method, model, data_dir)
    if not e or method not in SCORERS:
        return {}
    names = set(SCORERS[method].param_names())
    return {k: v for k, v in e.get("method_params", {}).items() if k in names}

