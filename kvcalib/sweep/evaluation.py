"""Trial evaluation: calibrate every corpus document with a parameter set, re-check each r* on held-out probes."""

from __future__ import annotations

import time
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


def calibration_config(spec: SweepSpec, method_params: dict, allocator_params: dict, *, seed: int | None = None,
                       ratios: Sequence[float] | None = None, n_probes: int | None = None) -> CalibrationConfig:
    """The ``CalibrationConfig`` of one document evaluation (grid calibration, or the hold-out check): the same
    config type (and code path) as the API's calibration jobs, allocator parameters included."""
    return CalibrationConfig(method=spec.method, method_params=dict(method_params), allocator=spec.allocator,
                             allocator_params=dict(allocator_params),
                             ratios=tuple(ratios if ratios is not None else spec.ratios), tolerance=spec.tolerance,
                             n_probes=spec.n_probes if n_probes is None else n_probes,
                             probe_tokens=spec.probe_tokens, cue_tokens=spec.cue_tokens,
                             seed=spec.seed if seed is None else seed)


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
