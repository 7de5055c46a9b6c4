"""``ParametricPredictor`` — Compactor's calibration curve (Chari & Van Durme 2025, "Compactor:
Calibrated Query-Agnostic KV Cache Compression with Approximate Leverage Scores"), the baseline predictor of r*.

In the paper the curve is written in the *retention* ρ (kept fraction): f(ρ) = (e^{b(ρ−1)} − e^{−b}) / (1 − e^{−b})
= expm1(bρ) / expm1(b), f(0) = 0, f(1) = 1, with b = α·NLL(context) + β. Our ratios are *compressions* r = 1 − ρ, so
the fidelity at ratio r is f(1 − r), and the recommended ratio is r̂ = 1 − ρ*(b) with ρ*(b) = log1p(τ·expm1(b)) / b
the smallest retention whose predicted fidelity reaches τ. (α, β) minimise Σ w·(f − y)² over every (context, grid
ratio) point, with w = ``over_weight`` (default 4) where f > y — predicting more fidelity than measured is what
over-compresses.
"""

from __future__ import annotations

import numpy as np

from kvcalib.calib.defaults import TOLERANCE
from kvcalib.calib.predictors.base import R_MAX, Predictor, PredictorError, feature_matrix, register


def compactor_curve(retention, b):
    """Compactor's fidelity at retention ρ: (e^{b(ρ−1)} − e^{−b}) / (1 − e^{−b}) = expm1(bρ)/expm1(b) (ρ if b=0)."""
    rho = np.asarray(retention, dtype=float)
    b = np.asarray(b, dtype=float)
    small = np.abs(b) < 1e-8
    bs = np.where(small, 1.0, b)
    out = np.expm1(bs * rho) / np.expm1(bs)
    return np.where(small, rho, out)


def retention_for(b, tau: float):
    """Smallest retention ρ with compactor_curve(ρ, b) ≥ τ: log1p(τ·expm1(b)) / b (τ if b = 0)."""
    b = np.asarray(b, dtype=float)
    small = np.abs(b) < 1e-8
    bs = np.where(small, 1.0, b)
    rho = np.log1p(tau * np.expm1(bs)) / bs
    return np.clip(np.where(small, tau, rho), 0.0, 1.0)


@register
class ParametricPredictor(Predictor):
    kind = "parametric"
    B_RANGE = (-60.0, 60.0)

    def __init__(self, alpha: float = 0.0, beta: float = 0.0, tau: float = TOLERANCE, r_max: float = R_MAX,
                 nll_feature: str = "context_nll", over_weight: float = 4.0):
        super().__init__()
        self.alpha, self.beta, self.tau, self.r_max = float(alpha), float(beta), float(tau), float(r_max)
        self.nll_feature, self.over_weight = nll_feature, float(over_weight)

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "tau": self.tau, "r_max": self.r_max,
                "nll_feature": self.nll_feature, "over_weight": self.over_weight}

    @classmethod
    def from_params(cls, p: dict) -> ParametricPredictor:
        return cls(float(p["alpha"]), float(p["beta"]), float(p["tau"]), float(p["r_max"]), str(p["nll_feature"]),
                   float(p["over_weight"]))

    def b(self, nll) -> np.ndarray:
        return np.clip(self.alpha * np.asarray(nll, dtype=float) + self.beta, *self.B_RANGE)

    def fidelity(self, nll, ratio) -> np.ndarray:
        """Predicted fidelity at compression ``ratio`` (= 1 − retention)."""
        return compactor_curve(1.0 - np.asarray(ratio, dtype=float), self.b(nll))

    def ratio_for_nll(self, nll) -> np.ndarray:
        return np.clip(1.0 - retention_for(self.b(nll), self.tau), 0.0, self.r_max)

    def predict(self, features: list[dict]) -> np.ndarray:
        x = feature_matrix(features, [self.nll_feature])[:, 0]
        if np.isnan(x).any():
            raise PredictorError(f"feature {self.nll_feature!r} missing for the parametric predictor")
        return self.ratio_for_nll(x)

    def loss(self, theta, nll, ratio, y) -> float:
        b = np.clip(theta[0] * nll + theta[1], *self.B_RANGE)
        e = compactor_curve(1.0 - ratio, b) - y
        w = np.where(e > 0, self.over_weight, 1.0)
        return float(np.mean(w * e * e))

    def fit(self, nll, ratios, fidelity, tau: float | None = None) -> ParametricPredictor:
        """``nll`` (n,), ``ratios`` / ``fidelity``: per context, the grid and its measured fidelities."""
        from scipy.optimize import minimize

        if tau is not None:
            self.tau = float(tau)
        xs, rs, ys = [], [], []
        for v, rr, ff in zip(nll, ratios, fidelity):
            for r, f in zip(rr, ff):
                xs.append(float(v))
                rs.append(float(r))
                ys.append(float(f))
        if not xs:
            raise PredictorError("no curve points to fit the parametric predictor")
        nll_a, r_a, y_a = np.array(xs), np.array(rs), np.array(ys)
        mu = float(nll_a.mean())
        best = None
        for b0 in (-8.0, -4.0, -1.0, 0.5, 3.0):
            for a0 in (-2.0, 0.0, 2.0):
                # parametrise b = a·(nll − mu) + c for conditioning, convert back afterwards
                def f(th):
                    return self.loss((th[0], th[1] - th[0] * mu), nll_a, r_a, y_a)

                res = minimize(f, np.array([a0, b0]), method="Nelder-Mead",
                               options={"xatol": 1e-7, "fatol": 1e-12, "maxiter": 4000})
                if best is None or res.fun < best.fun:
                    best = res
        a, c = best.x
        self.alpha, self.beta = float(a), float(c - a * mu)
        self.metrics["train_loss"] = float(best.fun)
        return self
