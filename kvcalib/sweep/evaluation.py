"""Trial evaluation: calibrate every corpus document with a parameter set and measure what the recommended ratio
costs — in answers on task-truth documents (``evaluate_truth_params``, the truth objective) or on held-out
reconstruction probes (``evaluate_params``, the reconstruction objective)."""

from __future__ import annotations

import functools
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
from kvcalib.sweep.captures import caching_engine
from kvcalib.sweep.spec import SweepSpec

HOLDOUT_SEED_OFFSET = 7919  # probe seed of the held-out check: spec.seed + this


@dataclass
class TrialMetrics:
    r_star: list[float]  # (D,) r*(τ) per corpus document
    holdout_fidelity: list[float]  # (D,) fidelity at exactly r* on the held-out probes
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


@dataclass
class TruthMetrics:
    """A truth trial's per-document results: the calibration's recommended ratio r* and the share of the
    full-cache answers lost when the document is compressed at exactly r*."""

    r_star: list[float]  # (D,) recommended ratio r*(τ) per corpus document
    answer_loss: list[float]  # (D,) realised answer loss at r* (0 at r* = 0, and when no answer counts)
    r_star_task: list[float]  # (D,) largest measured ratio (grid ∪ {r*}) below the first lost answer
    n_counted: list[int]  # (D,) questions the full cache answers (the denominators of the losses)
    n_questions: list[int] = field(default_factory=list)
    monotone: list[bool] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def r_star_mean(self) -> float:
        return float(sum(self.r_star) / len(self.r_star))

    @property
    def answer_loss_mean(self) -> float:
        return float(sum(self.answer_loss) / len(self.answer_loss))

    @property
    def violation_rate(self) -> float:
        """Share of documents recommended a ratio beyond their task-safe one (r* > r*_task: an answer is lost)."""
        return float(sum(r > t + 1e-9 for r, t in zip(self.r_star, self.r_star_task)) / len(self.r_star))

    @property
    def r_star_task_mean(self) -> float:
        return float(sum(self.r_star_task) / len(self.r_star_task))

    @property
    def uncounted(self) -> int:
        """Documents whose full cache answers none of their questions (loss 0: nothing to lose)."""
        return int(sum(n == 0 for n in self.n_counted))

    def values(self) -> list[float]:
        return [self.r_star_mean, self.answer_loss_mean]

    def user_attrs(self) -> dict:
        return {"violation_rate": self.violation_rate, "r_star_task_mean": round(self.r_star_task_mean, 4),
                "uncounted_documents": self.uncounted, "r_star": [round(r, 4) for r in self.r_star],
                "answer_loss": [round(x, 4) for x in self.answer_loss],
                "r_star_task": [round(r, 4) for r in self.r_star_task], "n_counted": list(self.n_counted),
                "n_questions": list(self.n_questions),
                "monotone_rate": float(sum(self.monotone) / max(1, len(self.monotone))),
                "context_tokens": self.context_tokens, "seconds": round(self.seconds, 3)}


def calibration_config(spec: SweepSpec, method_params: dict, allocator_params: dict, *, seed: int | None = None,
                       ratios: Sequence[float] | None = None, n_probes: int | None = None) -> CalibrationConfig:
    """The ``CalibrationConfig`` of one document evaluation (grid calibration, or the hold-out check): the same
    config type (and code path) as the API's calibration jobs, allocator parameters and fidelity included."""
    return CalibrationConfig(method=spec.method, method_params=dict(method_params), allocator=spec.allocator,
                             allocator_params=dict(allocator_params),
                             ratios=tuple(ratios if ratios is not None else spec.ratios), tolerance=spec.tolerance,
                             n_probes=spec.n_probes if n_probes is None else n_probes,
                             probe_tokens=spec.probe_tokens, cue_tokens=spec.cue_tokens,
                             seed=spec.seed if seed is None else seed, fidelity=spec.fidelity)


def evaluate_params(engine, spec: SweepSpec, method_params: dict, allocator_params: dict,
                    progress: Callable[[float, str], None] | None = None) -> TrialMetrics:
    """Calibrate every corpus document with the given parameters; re-check each r* on held-out probes."""
    t0 = time.perf_counter()
    eng = caching_engine(engine)
    r_star, fid, mono, ntok = [], [], [], []
    n = len(spec.documents)
    cfg = calibration_config(spec, method_params, allocator_params)
    for i, doc in enumerate(spec.documents):
        res = calibrate(eng, doc, cfg)
        r = float(res.r_star)
        r_star.append(r)
        mono.append(bool(res.monotone))
        ntok.append(int(res.context_tokens))
        if spec.holdout_probes and r > 0.0:
            ho_cfg = calibration_config(spec, method_params, allocator_params, ratios=(r,),
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


# ---------------------------------------------------------------------------------------------------- truth
def question_seed(spec: SweepSpec, document: str) -> int:
    """The question seed of a corpus document: ``spec.question_seed`` + crc32 of its text (deterministic, and
    independent of the document's place in the corpus)."""
    return int(spec.question_seed) + zlib.crc32(document.encode("utf-8"))


@functools.lru_cache(maxsize=256)
def _truth_document(document: str, seed: int, questions: tuple[int, int, int, int]):
    from kvcalib.calib.data.questions import QuestionConfig, make_questions

    return make_questions(document, seed, QuestionConfig(*questions))


def truth_document(spec: SweepSpec, document: str):
    """The ``TruthDocument`` of a corpus document (items and questions inserted; made once per process)."""
    return _truth_document(document, question_seed(spec, document), tuple(spec.questions))


_SPANS: dict[tuple, list[tuple[int, int]]] = {}  # (model, text, spans) -> token ranges of the inserted items


def _item_spans(engine, doc) -> list[tuple[int, int]]:
    from kvcalib.calib.calibration.truth import item_token_spans

    key = (getattr(engine.lm, "name", ""), doc.text, tuple(map(tuple, doc.spans)))
    if key not in _SPANS:
        if len(_SPANS) >= 256:
            _SPANS.clear()
        _SPANS[key] = item_token_spans(engine, doc.text, doc.spans)
    return _SPANS[key]


def _keep(engine, cap, scores, cfg: CalibrationConfig):
    """The keep masks of ``cfg.ratios`` (the full row first) exactly as ``calibrate`` builds them: one allocation of
    the scores per ratio, re-scored per ratio for a budget-dependent method."""
    from kvcalib.calib.calibration.calibrate import _per_ratio_keep
    from kvcalib.calib.calibration.curve import keep_masks

    keep = keep_masks(scores, cfg.ratios, cfg.allocator, **cfg.allocator_params)
    return _per_ratio_keep(engine, cap, cfg, keep)


def truth_point(engine, spec: SweepSpec, doc, method_params: dict, allocator_params: dict) -> dict:
    """One truth document under one parameter set, from one prefill (memoised across trials):

    1. the calibration's recommended ratio: the spec's fidelity curve over the grid (``fidelity_curves``, the
       probes kept off the inserted items — the calibration never sees the questions' answers, as in the truth
       suite's records) and its r*(τ) (``largest_safe_ratio``, interpolated as the API's profiles are);
    2. the task truth (``evaluate_truth``) over the grid plus r* itself, with the same keep masks: the realised
       answer loss is the share of counted full-cache answers lost at exactly r* (0 at r* = 0).
    """
    from kvcalib.calib.budget import Budget
    from kvcalib.calib.calibration.calibrate import context_ids
    from kvcalib.calib.calibration.curve import largest_safe_ratio
    from kvcalib.calib.calibration.fidelity import fidelity_curves
    from kvcalib.calib.calibration.truth import TruthConfig, evaluate_truth

    cfg = calibration_config(spec, method_params, allocator_params).validate()
    ids, doc_start = context_ids(engine, doc.text)
    cap = engine.capture(ids, compute_nll=cfg.fidelity == "keytoken")  # keytoken: every token's NLL
    scores = engine.scorer(cfg.method, **cfg.method_params).score(
        cap, engine.score_context(Budget(ratio=cfg.ratios[len(cfg.ratios) // 2])))
    keep = _keep(engine, cap, scores, cfg)
    curve = fidelity_curves(engine, cap, doc_start, keep, (cfg.fidelity,), n_probes=cfg.n_probes,
                            cue_tokens=cfg.cue_tokens, probe_tokens=cfg.probe_tokens, seed=cfg.seed,
                            avoid=_item_spans(engine, doc))[cfg.fidelity]
    r_star, _, monotone = largest_safe_ratio(cfg.ratios, curve, cfg.tolerance)
    r_star = float(r_star)
    grid = tuple(cfg.ratios)
    if r_star > 0.0 and not any(math.isclose(r_star, g, abs_tol=1e-9) for g in grid):
        grid = tuple(sorted(grid + (r_star,)))
        keep = _keep(engine, cap, scores, calibration_config(spec, method_params, allocator_params, ratios=grid))
    truth = evaluate_truth(engine, doc, TruthConfig(method=cfg.method, method_params=cfg.method_params,
                                                    allocator=cfg.allocator, allocator_params=cfg.allocator_params,
                                                    ratios=grid), capture=cap, scores=scores, keep=keep)
    loss = truth.loss_at(r_star) if r_star > 0.0 and truth.n_counted else 0.0
    return {"r_star": r_star, "answer_loss": float(loss), "r_star_task": float(truth.r_star_task),
            "n_counted": int(truth.n_counted), "n_questions": int(truth.n_questions), "monotone": bool(monotone),
            "context_tokens": int(cap.num_tokens), "curve": [float(f) for f in curve], "truth": truth}


def evaluate_truth_params(engine, spec: SweepSpec, method_params: dict, allocator_params: dict,
                          progress: Callable[[float, str], None] | None = None) -> TruthMetrics:
    """Calibrate every corpus document — as a ``TruthDocument`` (``truth_document``) — with the given parameters
    and the spec's fidelity; measure the answers lost at each recommended ratio (``truth_point``)."""
    t0 = time.perf_counter()
    eng = caching_engine(engine)
    points = []
    n = len(spec.documents)
    for i, text in enumerate(spec.documents):
        points.append(truth_point(eng, spec, truth_document(spec, text), method_params, allocator_params))
        if progress is not None:
            progress((i + 1) / n, f"document {i + 1}/{n}")
    return TruthMetrics(r_star=[p["r_star"] for p in points], answer_loss=[p["answer_loss"] for p in points],
                        r_star_task=[p["r_star_task"] for p in points], n_counted=[p["n_counted"] for p in points],
                        n_questions=[p["n_questions"] for p in points], monotone=[p["monotone"] for p in points],
                        context_tokens=[p["context_tokens"] for p in points], seconds=time.perf_counter() - t0)


def evaluator(spec: SweepSpec) -> Callable[..., TrialMetrics | TruthMetrics]:
    """The evaluation of ``spec``'s objective."""
    return evaluate_truth_params if spec.objective == "truth" else evaluate_params
