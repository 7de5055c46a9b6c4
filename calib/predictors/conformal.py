"""``ConformalPredictor`` — split-conformal lower bound around any base predictor (Vovk et al. 2005, "Algorithmic
Learning in a Random World"; Lei et al. 2018, "Distribution-Free Predictive Inference for Regression").

On a calibration split, s_i = base(x_i) − r*_i; q̂ = the ⌈(n+1)(1−α)⌉-th smallest s_i; r̂(x) = clip(base(x) − q̂, 0,
r_max). For a new context exchangeable with the calibration ones, P(r̂ > r*) = P(s > q̂) ≤ α (clipping only lowers
r̂, and r* ≥ 0). With a constant base it is the best *global* ratio at violation α (``global`` in
``fit_predictors``).
"""

from __future__ import annotations

import math

import numpy as np

from kvcalib.calib.predictors.base import KINDS, R_MAX, Predictor, PredictorError, register
from kvcalib.calib.predictors.constant import ConstantPredictor


def conformal_quantile(scores, alpha: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest score (+inf when that exceeds n: too few calibration points for α)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n = len(s)
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-12)
    return math.inf if k > n or n == 0 else float(s[max(k, 1) - 1])


@register
class ConformalPredictor(Predictor):
    kind = "conformal"

    def __init__(self, base: Predictor | None = None, alpha: float = 0.1, offset: float = math.inf,
                 r_max: float = R_MAX, n_cal: int = 0):
        super().__init__()
        self.base = base if base is not None else ConstantPredictor(0.0)
        self.alpha, self.offset, self.r_max, self.n_cal = float(alpha), float(offset), float(r_max), int(n_cal)
        self.legacy_created: str | None = None

    def params(self) -> dict:
        base = {"kind": self.base.kind, "params": self.base.params()}
        if self.legacy_created:  # files written by earlier versions hashed the base's fitting time too
            base["created"] = self.legacy_created
        # no timestamp among the parameters otherwise: refitting the same labels gives the same content hash
        return {"base": base,
                "alpha": self.alpha, "offset": None if math.isinf(self.offset) else self.offset,
                "r_max": self.r_max, "n_cal": self.n_cal}

    @classmethod
    def from_params(cls, p: dict) -> ConformalPredictor:
        b = p["base"]
        if b.get("kind") not in KINDS or b["kind"] == "conformal":
            raise ValueError(f"invalid base kind {b.get('kind')!r}")
        base = KINDS[b["kind"]].from_params(b["params"])
        base.created = str(b.get("created", base.created))
        off = p["offset"]
        m = cls(base, float(p["alpha"]), math.inf if off is None else float(off), float(p["r_max"]), int(p["n_cal"]))
        m.legacy_created = str(b["created"]) if "created" in b else None
        return m

    def calibrate(self, features: list[dict], y, alpha: float | None = None) -> ConformalPredictor:
        """Set the offset from a calibration split (exchangeable with future contexts)."""
        if alpha is not None:
            self.alpha = float(alpha)
        if not 0.0 < self.alpha < 1.0:
            raise PredictorError(f"alpha must lie in (0, 1), got {self.alpha}")
        y = np.asarray(y, dtype=float)
        s = self.base.predict(features) - y if len(y) else np.array([])
        self.offset = conformal_quantile(s, self.alpha)
        self.n_cal = int(len(y))
        return self

    def predict(self, features: list[dict]) -> np.ndarray:
        if math.isinf(self.offset):
            return np.zeros(len(features))
        return np.clip(self.base.predict(features) - self.offset, 0.0, self.r_max)
