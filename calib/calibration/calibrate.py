"""Calibration API: per-context quality curves, the largest safe ratio r*(τ), features, and predictions.

>>> cfg = CalibrationConfig(method="compactor", tolerance=0.95)
>>> res = calibrate(engine, text, cfg)                  # one prefill, one scoring, one batched probe forward
>>> res.r_star, res.fidelity, res.layer_budgets
>>> pred = predict(engine, text, cfg, load_predictor("predictors/"))   # one prefill + scores, no probes

The context is laid out as in ``Engine.prompt(text, question)`` (chat header + document) so that what is calibrated
is exactly the cache a later question will be asked against. See docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import torch

from kvcalib.calib import budget as budgets
from kvcalib.calib import defaults
from kvcalib.calib.calibration.curve import Curve, keep_masks, largest_safe_ratio, one_pass_curve
from kvcalib.calib.calibration.features import context_features
from kvcalib.calib.calibration.probes import SEPARATOR, Probe, reconstruction_probes
from kvcalib.calib.calibration.probes import user_probes as make_user_probes
from kvcalib.calib.calibration.protocols import CalibrationEngine, RatioPredictor
from kvcalib.calib.capture import Capture
from kvcalib.calib.data.documents import content_hash
from kvcalib.calib.errors import KvcalibError

Progress = Callable[[float, str], None]
NLL_STRIDE = 8  # context NLL features from every 8th token: 1/8 of the LM-head cost (docs/calibration.md §8)
STREAMING = True  # score inside the prefill when the engine allows it (calib.scorers.streaming.engine_capture_...)


class CalibrationError(KvcalibError):
    pass


# ---------------------------------------------------------------------------------------------------- config
@dataclass
class CalibrationConfig:
    """Everything that determines a calibration label (its ``params_hash`` keys resumable corpora and caches)."""

    method: str = defaults.METHOD
    method_params: dict = field(default_factory=dict)
    allocator: str = defaults.ALLOCATOR  # head-adaptive: larger r* and passkey kept at r* (docs/calibration.md §9–10)
    allocator_params: dict = field(default_factory=dict)  # keyword parameters of the allocator (e.g. AdaKV's alpha)
    ratios: tuple[float, ...] = defaults.RATIOS
    tolerance: float = defaults.TOLERANCE
    n_probes: int = defaults.N_PROBES  # reconstruction probes (spans of the document)
    probe_tokens: int = defaults.PROBE_TOKENS  # scored target tokens per probe
    cue_tokens: int = defaults.CUE_TOKENS  # document tokens fed before the target
    seed: int = 0  # span choice
    fidelity: str = defaults.FIDELITY  # label-free fidelity of the curve (calib.calibration.fidelity.FIDELITIES)

    def __post_init__(self):
        try:
            self.ratios = tuple(sorted(float(r) for r in self.ratios))
        except (TypeError, ValueError):
            raise CalibrationError(f"ratios must be numbers in (0, 1), got {self.ratios!r}") from None
        self.method_params = dict(self.method_params or {})
        self.allocator_params = dict(self.allocator_params or {})

    def validate(self) -> CalibrationConfig:
        from kvcalib.calib.scorers import available_methods, get_scorer

        if self.method not in available_methods(aliases=True):
            raise CalibrationError(f"unknown method {self.method!r}: expected one of {available_methods()}")
        get_scorer(self.method, **self.method_params)  # raises on unknown parameters, with the valid names
        if self.allocator not in budgets.available_allocators():
            raise CalibrationError(
                f"unknown allocator {self.allocator!r}: expected one of {budgets.available_allocators()}")
        _check_allocator_params(self.allocator, self.allocator_params)
        if not self.ratios:
            raise CalibrationError("ratios must hold at least one compression ratio in (0, 1)")
        bad = [r for r in self.ratios if not (0.0 < r < 1.0) or math.isnan(r)]
        if bad:
            raise CalibrationError(f"ratios must lie in (0, 1) (exclusive), got {bad}")
        if len(set(self.ratios)) != len(self.ratios):
            raise CalibrationError(f"ratios must be distinct, got {list(self.ratios)}")
        if not (0.0 < float(self.tolerance) <= 1.0):
            raise CalibrationError(f"tolerance must lie in (0, 1], got {self.tolerance}")
        for name, lo in (("n_probes", 0), ("probe_tokens", 1), ("cue_tokens", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise CalibrationError(f"{name} must be an integer >= {lo}, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise CalibrationError(f"seed must be an integer, got {self.seed!r}")
        from kvcalib.calib.calibration.fidelity import FIDELITIES

        if self.fidelity not in FIDELITIES:
            raise CalibrationError(f"unknown fidelity {self.fidelity!r}: expected one of {list(FIDELITIES)}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratios"] = [float(r) for r in self.ratios]
        d["tolerance"] = float(self.tolerance)
        return d

    @classmethod
    def from_dict(cls, d: dict, stored: bool = False) -> CalibrationConfig:
        """A validated config from a dict. ``stored``: a config written earlier (a run's parameters, a result or
        label record), where a missing ``fidelity`` means the only one that existed then (reconstruction); a new
        request's missing field takes today's default."""
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration config must be an object, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise CalibrationError(f"unknown calibration field(s) {unknown}: expected {names}")
        kw = dict(d)
        if stored:
            kw.setdefault("fidelity", defaults.LEGACY_FIDELITY)
        if "ratios" in kw:
            if isinstance(kw["ratios"], (str, bytes)) or not hasattr(kw["ratios"], "__iter__"):
                raise CalibrationError(f"ratios must be a list of numbers in (0, 1), got {kw['ratios']!r}")
            kw["ratios"] = tuple(kw["ratios"])
        for name in ("method_params", "allocator_params"):
            if name in kw and not isinstance(kw[name] or {}, dict):
                raise CalibrationError(f"{name} must be an object")
        for name in ("tolerance",):
            if name in kw and (isinstance(kw[name], bool) or not isinstance(kw[name], (int, float))):
                raise CalibrationError(f"{name} must be a number, got {kw[name]!r}")
        return cls(**kw).validate()

    def params_hash(self) -> str:
        """sha256 of the canonical JSON of every field (sorted keys, no whitespace): stable across processes.
        Empty ``allocator_params`` and the historical ``fidelity`` ("reconstruction") are left out, so configs keep
        the hash they had before those fields existed."""
        d = self.to_dict()
        if not d["allocator_params"]:
            del d["allocator_params"]
        if d["fidelity"] == defaults.LEGACY_FIDELITY:
            del d["fidelity"]
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _check_allocator_params(allocator: str, params: dict) -> None:
    """``params`` must be keyword parameters of ``budget.ALLOCATORS[allocator]`` with the type of their default."""
    import inspect

    sig = inspect.signature(budgets.ALLOCATORS[allocator])
    known = {k: p.default for k, p in list(sig.parameters.items())[2:]  # after (scores, per_head)
             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is not p.empty}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise CalibrationError(f"unknown parameter(s) {unknown} for allocator {allocator!r}: expected {sorted(known)}")
    for k, v in params.items():
        d = known[k]
        if isinstance(d, float):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        else:
            ok = isinstance(v, type(d)) and (isinstance(d, bool) or not isinstance(v, bool))
        if not ok:
            raise CalibrationError(f"allocator parameter {k!r} of {allocator!r} must be a {type(d).__name__} "
                                   f"(default {d!r}), got {v!r}")


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class CalibrationResult:
    config: CalibrationConfig
    context_tokens: int
    # the grid ratios evaluated, ascending (ratio 0 — the full cache — is the implicit reference): the whole grid, or
    # (the default) every ratio up to the first whose fidelity < τ
    ratios: list[float]
    fidelity: list[float]  # mean probe fidelity per ratio, in [0, 1]
    kl: list[float]  # mean next-token KL(full ‖ r) over the probe targets, per ratio
    r_star: float  # largest safe ratio at config.tolerance (interpolated between grid points)
    monotone: bool
    features: dict[str, float]
    layer_budgets: list[int]  # kept tokens per layer at ``ratio`` (len L)
    head_budgets: list[list[int]]  # kept tokens per (layer, kv head) at ``ratio`` (L × Hkv)
    seconds: float
    r_star_grid: float = 0.0  # the largest grid ratio before the first failing one (no interpolation)
    content_hash: str = ""  # sha256 of the document text
    doc_id: str | None = None
    model: str = ""
    probe_fidelity: list[list[float]] = field(default_factory=list)  # (R, K) per ratio and probe
    timings: dict[str, float] = field(default_factory=dict)
    # The ratio to apply, which the budgets realise: r* itself, or — with a risk controller (``controller``: its
    # version) — the controller's ratio ⌊r* − λ̂⌋_grid, whose expected answer loss is ≤ ε (``calib.predictors.risk``).
    # Records written before this field read as r*.
    ratio: float | None = None
    controller: str | None = None
    # set by ``calibrate`` only, never serialised: keep (L, Hkv, N) bool at ``ratio``, context_ids (N,), doc_start
    keep = None
    context_ids = None
    doc_start = 0

    def __post_init__(self):
        if self.ratio is None:
            self.ratio = self.r_star

    @property
    def params_hash(self) -> str:
        return self.config.params_hash()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["config"] = self.config.to_dict()
        d["params_hash"] = self.params_hash
        return json.loads(json.dumps(d))  # plain JSON types only

    @classmethod
    def from_dict(cls, d: dict) -> CalibrationResult:
        if not isinstance(d, dict):
            raise CalibrationError(f"calibration result must be an object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise CalibrationError(f"calibration result lacks field(s) {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        kw["config"] = CalibrationConfig.from_dict(d["config"], stored=True)
        return cls(**kw)


# ---------------------------------------------------------------------------------------------------- helpers
def _noop(_f: float, _m: str) -> None:
    pass


def context_ids(engine: CalibrationEngine, text: str) -> tuple[torch.Tensor, int]:
    """(ids, doc_start): the cached part of ``engine.prompt(text, …)`` and where the document starts in it."""
    if not isinstance(text, str) or not text.strip():
        raise CalibrationError("the document is empty")
    ids = engine.prompt(text, "").context_ids
    head = engine.prompt("", "").context_ids
    start = int(head.numel()) if torch.equal(ids[:head.numel()], head) else 0
    return ids, start


def _capture_scores(engine: CalibrationEngine, ids: torch.Tensor, config: CalibrationConfig,
                    nll_stride: int) -> tuple[Capture, torch.Tensor, dict[str, float]]:
    """The prefill capture and the method's scores (streamed when the engine allows it). Methods whose scores depend
    on the budget (e.g. lookahead): these scores (the grid's median ratio) serve the features and r*'s budgets; the
    keep mask of every grid ratio comes from its own scoring (``_per_ratio_keep``)."""
    from kvcalib.calib.calibration.features import feature_query_positions
    from kvcalib.calib.calibration.scoring import engine_capture_and_score

    mid = budgets.Budget(ratio=config.ratios[len(config.ratios) // 2])
    out = engine_capture_and_score(engine, ids, engine.scorer(config.method, **config.method_params), mid,
                                   nll_stride, feature_query_positions(int(ids.numel())), streaming=STREAMING)
    return out.capture, out.scores, {"prefill_s": out.prefill_seconds, "score_s": out.score_seconds}


def _per_ratio_keep(engine: CalibrationEngine, cap: Capture, config: CalibrationConfig,
                    keep: torch.Tensor) -> torch.Tensor:
    """``keep`` (R + 1, L, Hkv, N) with row i + 1 rebuilt from scores taken at ``config.ratios[i]`` when the method's
    scores depend on the budget (``Scorer.budget_dependent``, e.g. lookahead: its draft is compressed at the ratio)."""
    scorer = engine.scorer(config.method, **config.method_params)
    if not getattr(scorer, "budget_dependent", False):
        return keep
    keep = keep.clone()
    for i, r in enumerate(config.ratios):
        b = budgets.Budget(ratio=float(r))
        keep[i + 1] = budgets.allocate(scorer.score(cap, engine.score_context(b)), b, config.allocator,
                                       **config.allocator_params)
    return keep


def budgets_at(scores: torch.Tensor, ratio: float, allocator: str,
               **alloc_params) -> tuple[list[int], list[list[int]]]:
    """Kept tokens per layer (L,) and per (layer, kv head) (L × Hkv) when ``scores`` (L, Hkv, N) are compressed at
    ``ratio`` by ``allocator`` (with its keyword parameters ``alloc_params``)."""
    ratio = float(ratio)
    if not 0.0 <= ratio < 1.0:
        raise CalibrationError(f"compression ratio must be in [0, 1), got {ratio}")
    keep = budgets.allocate(scores, budgets.Budget(ratio=ratio), allocator, **alloc_params)
    per_head = keep.sum(-1)  # (L, Hkv)
    return [int(x) for x in per_head.sum(-1)], [[int(x) for x in row] for row in per_head]


def _probes(engine: CalibrationEngine, cap: Capture, doc_start: int, config: CalibrationConfig) -> list[Probe]:
    """The calibration's reconstruction probes (deterministic in ``config.seed``)."""
    if not config.n_probes:
        return []
    tok = engine.tokenizer
    sep = tok(SEPARATOR, add_special_tokens=False).input_ids if SEPARATOR else []
    return reconstruction_probes(cap.input_ids, doc_start, config.n_probes, config.cue_tokens, config.probe_tokens,
                                 config.seed, sep)


def _prepare(engine: CalibrationEngine, text: str, config: CalibrationConfig, progress: Progress):
    config.validate()
    t = {}
    ids, doc_start = context_ids(engine, text)
    progress(0.02, f"prefill of {ids.numel()} tokens")
    full_nll = config.fidelity == "keytoken"  # LongPPL key tokens need every token's NLL
    cap, scores, times = _capture_scores(engine, ids, config, 1 if full_nll else NLL_STRIDE)
    t.update(times)
    progress(0.45, f"scored with {config.method}")
    progress(0.55, "features")
    t0 = time.perf_counter()
    keep = keep_masks(scores, config.ratios, config.allocator, **config.allocator_params)
    keep = _per_ratio_keep(engine, cap, config, keep)
    strided = dataclasses.replace(cap, token_nll=cap.token_nll[::NLL_STRIDE]) if full_nll else cap
    feats = context_features(text, strided, scores, keep[1:], config.ratios,
                             doc_start=doc_start, window=config.probe_tokens)
    t["features_s"] = time.perf_counter() - t0
    return cap, doc_start, scores, keep, feats, t


def _candidate_curve(engine: CalibrationEngine, cap: Capture, doc_start: int, keep: torch.Tensor,
                     config: CalibrationConfig, user_probes, progress: Progress, tau: float | None) -> Curve:
    """The curve of a fidelity candidate other than the reconstruction probes (``calib.calibration.fidelity``);
    the KL beside it is the next-token KL over the candidate's own probe targets (the ``kl`` candidate's: the
    reconstruction probes), so no second set of probes is fed."""
    from kvcalib.calib.calibration.fidelity import fidelity_curves

    if user_probes:
        raise CalibrationError(f"user probes need the reconstruction fidelity, not {config.fidelity!r}")
    if not config.n_probes:
        raise CalibrationError("no probes: set n_probes >= 1")
    progress(0.6, f"{config.fidelity} fidelity at {len(config.ratios)} ratios")
    t0 = time.perf_counter()
    curves = fidelity_curves(engine, cap, doc_start, keep, (config.fidelity,), n_probes=config.n_probes,
                             cue_tokens=config.cue_tokens, probe_tokens=config.probe_tokens, seed=config.seed,
                             kl_of=config.fidelity, tau=tau)
    kl = [-math.log(max(f, 1e-300)) for f in curves["kl_of"]]
    fid = curves[config.fidelity]  # every grid ratio, or those up to the first below τ
    return Curve(ratios=list(config.ratios)[:len(fid)], fidelity=fid, kl=kl, probe_fidelity=[], nll_full=[],
                 nll=[], kept_fraction=[float(x) for x in keep[1:1 + len(fid)].flatten(1).float().mean(1)],
                 seconds=time.perf_counter() - t0)


def check_controller(controller: RatioPredictor, config: CalibrationConfig) -> None:
    """A risk controller over r* applies to a calibration of the fidelity, τ, method and allocator it was fitted
    for (``calib.predictors.risk.controller_mismatch``); anything else is a ``CalibrationError`` saying which field
    differs."""
    from kvcalib.calib.predictors.risk import controller_mismatch

    why = controller_mismatch(controller, fidelity=config.fidelity, tolerance=config.tolerance,
                              method=config.method, allocator=config.allocator)
    if why:
        raise CalibrationError(why)


def apply_controller(controller: RatioPredictor, config: CalibrationConfig, r_star: float) -> float:
    """The ratio a risk controller recommends for a calibration's r* (checked: ``check_controller``), a grid ratio
    or 0 (no compression)."""
    from kvcalib.calib.predictors.risk import r_star_feature

    check_controller(controller, config)
    r = float(controller.predict([{r_star_feature(config.fidelity): float(r_star)}])[0])
    return min(max(r, 0.0), max(config.ratios))


# ---------------------------------------------------------------------------------------------------- API
def featurize(engine: CalibrationEngine, text: str,
              config: CalibrationConfig) -> tuple[dict[str, float], Capture, torch.Tensor]:
    """One prefill + scores + features, no probes (what a prediction costs). Returns (features, capture, scores)."""
    cap, _, scores, _, feats, _ = _prepare(engine, text, config, _noop)
    return feats, cap, scores


def calibrate(engine: CalibrationEngine, text: str, config: CalibrationConfig | None = None,
              progress: Progress | None = None, user_probes: list[tuple[str, str]] | None = None,
              doc_id: str | None = None, controller: RatioPredictor | None = None,
              full_curve: bool = False) -> CalibrationResult:
    """The quality curve of ``text`` over ``config.ratios`` (default ``CalibrationConfig()``) and its largest safe
    ratio r*(τ), from one prefill.

    The curve ends at its first ratio whose fidelity falls below τ: the probe rows are fed in ascending steps and
    the rows above the step holding that ratio are never fed (``curve.row_steps``) — r*(τ) reads the curve only up
    to there, so it is the same as with every row, for fewer probe forwards. ``full_curve``: evaluate every grid
    ratio (what labels for curve-fitting predictors need: ``kvcalib calibrate CORPUS``).

    ``controller``: a risk controller over r* (``calib.predictors.risk.full_controller``: fitted on task truth for
    this fidelity and τ) turns r* into the ratio to apply, ``result.ratio`` — the largest grid ratio ≤ r* − λ̂, with
    expected answer loss ≤ ε over contexts like its calibration set; the budgets and the keep mask are at that
    ratio. Without one, ``result.ratio`` is r* (no guarantee on answers)."""
    config = config if config is not None else CalibrationConfig()
    if controller is not None:
        check_controller(controller, config)  # before the model work
    progress = progress or _noop
    t_start = time.perf_counter()
    cap, doc_start, scores, keep, feats, timings = _prepare(engine, text, config, progress)
    if config.fidelity != "reconstruction":
        curve = _candidate_curve(engine, cap, doc_start, keep, config, user_probes, progress,
                                 None if full_curve else float(config.tolerance))
        timings["probes_s"] = curve.seconds
    else:
        probes = _probes(engine, cap, doc_start, config)
        if user_probes:
            probes += make_user_probes(engine.tokenizer, list(user_probes))
        if not probes:
            raise CalibrationError("no probes: set n_probes >= 1 or pass user_probes")
        progress(0.6, f"probing {len(probes)} probes at {len(config.ratios)} ratios")
        t0 = time.perf_counter()
        curve = one_pass_curve(engine.lm, cap.keys, cap.values, scores, probes, config.ratios, config.allocator,
                               keep=keep, tau=None if full_curve else float(config.tolerance))
        timings["probes_s"] = time.perf_counter() - t0
    progress(0.95, "largest safe ratio")
    r_star, r_grid, monotone = largest_safe_ratio(curve.ratios, curve.fidelity, config.tolerance)
    ratio, version = float(r_star), None
    if controller is not None:
        ratio, version = apply_controller(controller, config, float(r_star)), controller.version
    keep = budgets.allocate(scores, budgets.Budget(ratio=ratio), config.allocator,
                            **config.allocator_params)  # (L, Hkv, N): the kept positions at the ratio to apply
    per_head = keep.sum(-1)  # (L, Hkv)
    layer_b, head_b = [int(x) for x in per_head.sum(-1)], [[int(x) for x in row] for row in per_head]
    progress(1.0, f"r* = {r_star:.3f}" + (f", risk-controlled ratio {ratio:.2f}" if version else ""))
    result = CalibrationResult(
        config=config, context_tokens=cap.num_tokens, ratios=curve.ratios, fidelity=curve.fidelity, kl=curve.kl,
        r_star=float(r_star), monotone=bool(monotone), features=feats, layer_budgets=layer_b, head_budgets=head_b,
        seconds=time.perf_counter() - t_start, r_star_grid=float(r_grid), content_hash=content_hash(text),
        doc_id=doc_id, model=engine.lm.name, probe_fidelity=curve.probe_fidelity,
        timings={k: round(v, 4) for k, v in timings.items()}, ratio=ratio, controller=version)
    # beside the record (not serialised): what a server layout needs without a second prefill
    result.keep, result.context_ids, result.doc_start = keep, cap.input_ids, doc_start
    return result


@dataclass
class Prediction:
    ratio: float  # recommended compression ratio
    token_budget: int  # kept tokens per (layer, head) on average at that ratio
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    features: dict[str, float]
    predictor_version: str
    context_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def predict(engine: CalibrationEngine, text: str, config: CalibrationConfig,
            predictor: RatioPredictor | str | Path | None = None) -> Prediction:
    """Recommend a compression ratio for ``text`` from its features alone (one prefill + scores, no probes).
    ``predictor`` is a loaded predictor or a path to a predictor file / folder (``load_predictor``); None = the
    predictor shipped for the engine's model (``predictors.bundled.default_predictor``: conformal risk control of
    the answer loss, fitted on task truth), an error when none ships for that model, method and allocator."""
    from kvcalib.calib.predictors import load_predictor

    if predictor is None:
        from kvcalib.calib.predictors.bundled import default_predictor, shipped_models

        predictor = default_predictor(engine.lm.name, config.method, config.allocator)
        if predictor is None:
            raise CalibrationError(f"no shipped predictor for model {engine.lm.name!r} with method "
                                   f"{config.method!r} and allocator {config.allocator!r} (shipped for "
                                   f"{shipped_models()}): pass a predictor fitted with `kvcalib fit`")
    if isinstance(predictor, (str, Path)):
        predictor = load_predictor(predictor)
    trained = predictor.training_config()
    if trained:
        for key in ("method", "allocator", "tolerance"):
            if key in trained and trained[key] != getattr(config, key):
                raise CalibrationError(f"predictor {predictor.version} was trained for {key}={trained[key]!r}, "
                                       f"not {getattr(config, key)!r}")
    feats, cap, scores = featurize(engine, text, config)
    r = float(predictor.predict([feats])[0])
    r = min(max(r, 0.0), max(config.ratios), 0.999)
    layer_b, head_b = budgets_at(scores, r, config.allocator, **config.allocator_params)
    return Prediction(ratio=r, token_budget=budgets.Budget(ratio=r).per_head(cap.num_tokens), layer_budgets=layer_b,
                      head_budgets=head_b, features=feats, predictor_version=predictor.version,
                      context_tokens=cap.num_tokens)
