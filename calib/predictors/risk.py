"""Conformal risk control of the answer loss (Angelopoulos, Bates, Fisch, Lei, Schuster — "Conformal Risk
Control", ICLR 2024), and the predictors fitted on task truth.

A context i has a monotone loss curve ℓ_i(r) ∈ [0, 1] over the grid ratios (the share of its full-cache answers
lost at r, per-question monotone, ``calib.calibration.truth``); ℓ_i(0) = 0. A base predictor proposes b(x) from
label-free features; the recommendation is

    r̂_λ(x) = ⌊clip(b(x) − λ, 0, r_max)⌋_grid        (the largest grid ratio ≤ it; 0 below the first one)

so that its loss is *measured*, never interpolated. L_i(λ) = ℓ_i(r̂_λ(x_i)) is non-increasing in λ and bounded by
B = 1. On n calibration contexts, with R̂_n(λ) = mean_i L_i(λ),

    λ̂ = inf { λ ∈ Λ : n/(n+1) · R̂_n(λ) + B/(n+1) ≤ ε }

over a fixed grid Λ of margins, whose largest element gives r̂ = 0 (loss 0) for every context. For a new context
exchangeable with the calibration ones, **E[ℓ(r̂_λ̂(x))] ≤ ε** — a population-level guarantee on the expected
answer loss (Compactor's criterion is population-level too). With n < B/ε − 1 no λ qualifies and the predictor
never compresses (r̂ = 0).

The other guarantee — a per-context bound P(r̂ > r*_task) ≤ α — is the split-conformal ``ConformalPredictor``
fitted on r*_task (``fit_truth_predictors``).
"""

from __future__ import annotations

import math

import numpy as np

from kvcalib.calib.defaults import TOLERANCE
from kvcalib.calib.predictors.base import (
    KINDS,
    R_MAX,
    Predictor,
    PredictorError,
    default_feature_names,
    feature_matrix,
    register,
)
from kvcalib.calib.predictors.conformal import ConformalPredictor
from kvcalib.calib.predictors.constant import ConstantPredictor
from kvcalib.calib.predictors.quantile import QuantileGBMPredictor

LAMBDA_STEP = 0.005


def snap_to_grid(values, grid) -> np.ndarray:
    """The largest grid ratio ≤ each value (0 where a value lies below the whole grid)."""
    g = np.sort(np.asarray(grid, dtype=float))
    v = np.asarray(values, dtype=float)
    idx = np.searchsorted(g, v + 1e-9, side="right") - 1
    return np.where(idx >= 0, g[np.clip(idx, 0, len(g) - 1)], 0.0)


def loss_at(grid, losses, ratios) -> np.ndarray:
    """ℓ_i(r_i) for contexts i with monotone ``losses`` (n, R) over ``grid`` at grid ratios ``ratios`` (n,) (or 0)."""
    g = np.asarray(grid, dtype=float)
    ls = np.asarray(losses, dtype=float)
    r = np.asarray(ratios, dtype=float)
    idx = np.searchsorted(g, r + 1e-9, side="right") - 1
    out = ls[np.arange(len(r)), np.clip(idx, 0, len(g) - 1)]
    return np.where(idx >= 0, out, 0.0)


def lambda_grid(r_max: float = R_MAX, step: float = LAMBDA_STEP) -> np.ndarray:
    """Λ: margins from −r_max (everything at r_max) to r_max (everything at 0), ascending."""
    n = int(round(2 * r_max / step))
    return np.round(np.linspace(-r_max, r_max, n + 1), 10)


def crc_lambda(base, grid, losses, epsilon: float, bound: float = 1.0, r_max: float = R_MAX,
               lambdas=None) -> float:
    """λ̂ of conformal risk control (inf over ``lambdas`` of the margins meeting the bound); +inf when none does."""
    base = np.asarray(base, dtype=float)
    n = len(base)
    lambdas = lambda_grid(r_max) if lambdas is None else np.asarray(lambdas, dtype=float)
    if n == 0:
        return math.inf
    for lam in lambdas:  # ascending; the risk is non-increasing in λ, so the first hit is the infimum
        r = snap_to_grid(np.clip(base - lam, 0.0, r_max), grid)
        risk = float(loss_at(grid, losses, r).mean())
        if n / (n + 1) * risk + bound / (n + 1) <= epsilon + 1e-12:
            return float(lam)
    return math.inf


@register
class RiskControlPredictor(Predictor):
    """r̂(x) = ⌊clip(base(x) − λ̂, 0, r_max)⌋_grid with λ̂ from conformal risk control at level ε."""

    kind = "risk"

    def __init__(self, base: Predictor | None = None, epsilon: float = 0.05, lam: float = math.inf,
                 grid=(), r_max: float = R_MAX, n_cal: int = 0):
        super().__init__()
        self.base = base if base is not None else ConstantPredictor(0.0)
        self.epsilon, self.lam, self.r_max, self.n_cal = float(epsilon), float(lam), float(r_max), int(n_cal)
        self.grid = [float(g) for g in grid]

    def params(self) -> dict:
        # no timestamp among the parameters: refitting the same labels gives the same content hash
        return {"base": {"kind": self.base.kind, "params": self.base.params()},
                "epsilon": self.epsilon, "lambda": None if math.isinf(self.lam) else self.lam, "grid": self.grid,
                "r_max": self.r_max, "n_cal": self.n_cal}

    @classmethod
    def from_params(cls, p: dict) -> RiskControlPredictor:
        b = p["base"]
        if b.get("kind") not in KINDS or b["kind"] in ("conformal", "risk"):
            raise ValueError(f"invalid base kind {b.get('kind')!r}")
        base = KINDS[b["kind"]].from_params(b["params"])
        base.created = str(b.get("created", base.created))
        lam = p["lambda"]
        grid = [float(g) for g in p["grid"]]
        if not grid or any(not 0.0 < g < 1.0 for g in grid):
            raise ValueError("grid must hold ratios in (0, 1)")
        return cls(base, float(p["epsilon"]), math.inf if lam is None else float(lam), grid, float(p["r_max"]),
                   int(p["n_cal"]))

    def calibrate(self, features: list[dict], grid, losses, epsilon: float | None = None) -> RiskControlPredictor:
        """λ̂ from calibration contexts: ``losses`` (n, R) monotone loss curves over ``grid``."""
        if epsilon is not None:
            self.epsilon = float(epsilon)
        if not 0.0 < self.epsilon < 1.0:
            raise PredictorError(f"epsilon must lie in (0, 1), got {self.epsilon}")
        self.grid = sorted(float(g) for g in grid)
        losses = np.asarray(losses, dtype=float).reshape(len(features), len(self.grid))
        self.lam = crc_lambda(self.base.predict(features), self.grid, losses, self.epsilon, r_max=self.r_max)
        self.n_cal = len(features)
        return self

    def predict(self, features: list[dict]) -> np.ndarray:
        if math.isinf(self.lam) or not self.grid:
            return np.zeros(len(features))
        return snap_to_grid(np.clip(self.base.predict(features) - self.lam, 0.0, self.r_max), self.grid)


@register
class LinearPredictor(Predictor):
    """Ridge regression on standardised features (missing ones take the training medians), clipped to
    [0, r_max]: a base for risk control that few training contexts can fit (JSON parameters, numpy inference)."""

    kind = "linear"

    def __init__(self, feature_names: list[str] | None = None, ridge: float = 1.0, r_max: float = R_MAX):
        super().__init__()
        self.feature_names = list(feature_names or [])
        self.ridge, self.r_max = float(ridge), float(r_max)
        self.fill: dict[str, float] = {}
        self.mean: list[float] = []
        self.scale: list[float] = []
        self.coef: list[float] = []
        self.intercept = 0.0

    def params(self) -> dict:
        return {"feature_names": self.feature_names, "ridge": self.ridge, "r_max": self.r_max, "fill": self.fill,
                "mean": self.mean, "scale": self.scale, "coef": self.coef, "intercept": self.intercept}

    @classmethod
    def from_params(cls, p: dict) -> LinearPredictor:
        m = cls([str(x) for x in p["feature_names"]], float(p["ridge"]), float(p["r_max"]))
        m.fill = {str(k): float(v) for k, v in p["fill"].items()}
        m.mean, m.scale = [float(x) for x in p["mean"]], [float(x) for x in p["scale"]]
        m.coef, m.intercept = [float(x) for x in p["coef"]], float(p["intercept"])
        if not len(m.feature_names) == len(m.mean) == len(m.scale) == len(m.coef):
            raise ValueError("inconsistent linear predictor arrays")
        return m

    def fit(self, features: list[dict], y) -> LinearPredictor:
        y = np.asarray(y, dtype=float)
        if len(features) != len(y) or len(y) < 2 or not self.feature_names:
            raise PredictorError("need at least two labelled contexts and one feature for the linear predictor")
        raw = feature_matrix(features, self.feature_names)
        self.fill = {k: float(np.nanmedian(c)) if (~np.isnan(c)).any() else 0.0
                     for k, c in zip(self.feature_names, raw.T)}
        x = feature_matrix(features, self.feature_names, self.fill)
        mu, sd = x.mean(0), x.std(0)
        sd = np.where(sd > 1e-12, sd, 1.0)
        z = (x - mu) / sd
        coef = np.linalg.solve(z.T @ z + self.ridge * np.eye(z.shape[1]), z.T @ (y - y.mean()))
        self.mean, self.scale, self.coef = mu.tolist(), sd.tolist(), coef.tolist()
        self.intercept = float(y.mean())
        return self

    def predict(self, features: list[dict]) -> np.ndarray:
        x = feature_matrix(features, self.feature_names, self.fill)
        z = (x - np.asarray(self.mean)) / np.asarray(self.scale)
        return np.clip(z @ np.asarray(self.coef) + self.intercept, 0.0, self.r_max)


@register
class FeaturePredictor(Predictor):
    """One feature taken as the ratio, clipped to [0, r_max] (a missing one gives 0): the base of risk control
    over a quantity computed elsewhere — e.g. the calibration's own r*(τ) of a fidelity candidate (``mode=full``),
    which needs no training, so every labelled context can calibrate the margin."""

    kind = "feature"

    def __init__(self, name: str = "r_star", r_max: float = R_MAX):
        super().__init__()
        self.name, self.r_max = str(name), float(r_max)

    def params(self) -> dict:
        return {"name": self.name, "r_max": self.r_max}

    @classmethod
    def from_params(cls, p: dict) -> FeaturePredictor:
        return cls(str(p["name"]), float(p["r_max"]))

    def fit(self, features: list[dict], y=None) -> FeaturePredictor:
        return self

    def predict(self, features: list[dict]) -> np.ndarray:
        x = np.array([float(f.get(self.name, 0.0)) for f in features], dtype=float)
        return np.clip(np.nan_to_num(x, nan=0.0), 0.0, self.r_max)


# ---------------------------------------------------------------------------------------------------- fitting
def truth_arrays(records: list[dict]) -> tuple[list[dict], list[float], np.ndarray, np.ndarray]:
    """(features, grid, losses (n, R), r*_task (n,)) of truth records (``calib.calibration.suite``) on one grid."""
    if not records:
        raise PredictorError("no truth records")
    grid = [float(r) for r in records[0]["ratios"]]
    for i, r in enumerate(records):
        if [float(x) for x in r["ratios"]] != grid:
            raise PredictorError(f"truth record {i} uses another ratio grid")
    return ([r["features"] for r in records], grid, np.array([r["loss"] for r in records], dtype=float),
            np.array([r["r_star_task"] for r in records], dtype=float))


def realised(pred, grid, losses, r_star) -> dict:
    """Mean recommended ratio, realised answer loss, violation rate P(r̂ > r*_task) of predictions ``pred``."""
    pred = np.asarray(pred, dtype=float)
    if len(pred) == 0:
        return {"n": 0}
    loss = loss_at(grid, losses, pred)
    return {"n": int(len(pred)), "mean_ratio": float(pred.mean()), "loss": float(loss.mean()),
            "violation_rate": float((pred > np.asarray(r_star) + 1e-9).mean())}


def fit_truth_predictors(train: list[dict], cal: list[dict], epsilon: float = 0.05, alpha: float = 0.1,
                         seed: int = 0, feature_names: list[str] | None = None) -> dict[str, Predictor]:
    """Predictors fitted on task truth, predicting from label-free features: ``risk`` (median boosting of r*_task
    + conformal risk control at ε: the default), ``risk_global`` (a constant + risk control: the best single
    ratio with the guarantee), ``conformal`` (quantile-α boosting + split conformal on r*_task: P(r̂ > r*) ≤ α)
    and ``global`` (a constant + split conformal)."""
    f_tr, grid, l_tr, y_tr = truth_arrays(train)
    f_cal, grid_cal, l_cal, y_cal = truth_arrays(cal)
    if grid_cal != grid:
        raise PredictorError("train and calibration records use different ratio grids")
    r_max = max(grid)
    names = feature_names or default_feature_names(f_tr + f_cal)
    median = QuantileGBMPredictor(quantile=0.5, r_max=r_max).fit(f_tr, y_tr, seed=seed, feature_names=names)
    low = QuantileGBMPredictor(quantile=alpha, r_max=r_max).fit(f_tr, y_tr, seed=seed, feature_names=names)
    out: dict[str, Predictor] = {
        "risk": RiskControlPredictor(median, epsilon, r_max=r_max).calibrate(f_cal, grid, l_cal),
        "risk_global": RiskControlPredictor(ConstantPredictor(0.0), epsilon, r_max=r_max).calibrate(
            f_tr + f_cal, grid, np.concatenate([l_tr, l_cal])),
        "conformal": ConformalPredictor(low, alpha, r_max=r_max).calibrate(f_cal, y_cal),
        "global": ConformalPredictor(ConstantPredictor(0.0), alpha, r_max=r_max).calibrate(
            f_tr + f_cal, np.concatenate([y_tr, y_cal])),
    }
    cfg = train[0].get("config") or {}
    # the answer-loss budget ε answers requests at tolerance τ = 1 − ε (the service matches on it)
    tcfg = {k: cfg[k] for k in ("method", "allocator", "allocator_params") if k in cfg}
    tcfg["tolerance"] = round(1.0 - float(epsilon), 6)
    training = {"config": tcfg,
                "target": "task_truth", "n_train": len(train), "n_cal": len(cal), "epsilon": epsilon,
                "alpha": alpha, "seed": seed, "grid": grid}
    for name, p in out.items():
        p.training = dict(training, name=name)
        p.metrics["train"] = realised(p.predict(f_tr), grid, l_tr, y_tr)
        p.metrics["cal"] = realised(p.predict(f_cal), grid, l_cal, y_cal)
    return out


# ---------------------------------------------------------------------------------------------------- labels
def _group(record: dict) -> str:
    return str(record.get("doc_id") or record.get("id") or record.get("content_hash", "")).split("#")[0]


def split_by_group(records: list[dict], fractions=(0.5, 0.5, 0.0), seed: int = 0):
    """Train / calibration / test parts of ``records`` by source (the id before ``#``), groups in a seeded random
    order, sizes close to ``fractions`` (a zero fraction gets nothing)."""
    import random

    if len(fractions) != 3 or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
        raise PredictorError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(_group(r), []).append(r)
    names = sorted(groups)
    random.Random(seed).shuffle(names)
    bounds = [fractions[0] * len(records), (fractions[0] + fractions[1]) * len(records)]
    parts: tuple[list, list, list] = ([], [], [])
    acc = 0
    for g in names:
        part = 0 if acc < bounds[0] - 1e-9 else (1 if acc < bounds[1] - 1e-9 else 2)
        parts[part].extend(groups[g])
        acc += len(groups[g])
    return parts


def r_star_feature(fidelity: str) -> str:
    """The feature under which a risk controller over r* (``mode=full``) reads a calibration's r* of ``fidelity``:
    a controller calibrated on one fidelity's r* cannot be fed another's by mistake."""
    return f"r_star_{fidelity}"


def controller_mismatch(controller, *, fidelity: str, tolerance: float, method: str, allocator: str) -> str | None:
    """Why a risk controller over r* does not apply to a calibration of ``fidelity`` read at τ = ``tolerance`` with
    ``method`` / ``allocator`` — None when it does. It applies to the fidelity, τ, method and allocator it was fitted
    for (``training_config()``: ``fidelity``, ``fidelity_tau`` — the τ its r* were read at —, ``method``,
    ``allocator``, each checked when recorded); a predictor whose training config names no fidelity is no
    controller (a prefill-only predictor)."""
    trained = controller.training_config() or {}
    if "fidelity" not in trained:
        return (f"predictor {controller.version} is not a risk controller over r* (its training config names no "
                f"fidelity): fit one with `kvcalib fit` on truth labels")
    for key, value in (("fidelity", fidelity), ("method", method), ("allocator", allocator)):
        if key in trained and trained[key] != value:
            return f"controller {controller.version} was fitted for {key}={trained[key]!r}, not {value!r}"
    tau = trained.get("fidelity_tau")
    if tau is not None and abs(float(tau) - float(tolerance)) > 1e-6:
        return f"controller {controller.version} was fitted on r* read at τ = {tau}, not {tolerance}"
    return None


def fit_full_predictors(records: list[dict], epsilon: float = 0.05, tau: float = TOLERANCE) -> dict[str, Predictor]:
    """``full_<fidelity>``: conformal risk control over the calibration's own r*(τ) of a fidelity candidate
    (``mode=full``; records carry ``fidelity_r_star``, see ``calibration.truth_labels``). The base needs no training,
    so every record calibrates λ̂; it reads the feature ``r_star_<fidelity>`` (``risk.r_star_feature``). Apply:
    ``calibrate(..., controller=p)`` (or ``calibrate.apply_controller(p, config, result.r_star)``) for a calibration
    of that fidelity and τ. ``tau``: the tolerance the records' r* were read at (recorded). Empty when the records
    carry no fidelity curves."""
    names = set.intersection(*(set(r.get("fidelity_r_star") or {}) for r in records)) if records else set()
    _, grid, losses, y = truth_arrays(records) if names else (None, None, None, None)
    out: dict[str, Predictor] = {}
    for name in sorted(names):
        feature = r_star_feature(name)
        feats = [{feature: float(r["fidelity_r_star"][name])} for r in records]
        p = RiskControlPredictor(FeaturePredictor(feature, r_max=max(grid)), epsilon, r_max=max(grid))
        p.calibrate(feats, grid, losses)
        cfg = records[0].get("config") or {}
        tcfg = {k: cfg[k] for k in ("method", "allocator", "allocator_params") if k in cfg}
        tcfg.update(fidelity=name, fidelity_tau=float(tau), tolerance=round(1.0 - float(epsilon), 6))
        p.training = {"config": tcfg, "target": "task_truth", "mode": "full", "n_cal": len(records),
                      "epsilon": epsilon, "grid": grid, "name": f"full_{name}"}
        p.metrics["cal"] = realised(p.predict(feats), grid, losses, y)
        out[f"full_{name}"] = p
    return out


def fit_truth_labels(records: list[dict], fractions=(0.5, 0.5, 0.0), seed: int = 0, epsilon: float = 0.05,
                     alpha: float = 0.1) -> tuple[dict[str, Predictor], dict]:
    """Split truth records by source and fit ``fit_truth_predictors``; returns (predictors, split description)."""
    train, cal, test = split_by_group(records, fractions, seed)
    if not train or not cal:
        raise PredictorError(f"too few labelled documents ({len(records)}) for a train/calibration split")
    preds = fit_truth_predictors(train, cal, epsilon=epsilon, alpha=alpha, seed=seed)
    preds.update(fit_full_predictors(train + cal, epsilon=epsilon))
    split = {"seed": seed, "fractions": list(fractions), "train": [r["content_hash"] for r in train],
             "cal": [r["content_hash"] for r in cal], "test": [r["content_hash"] for r in test]}
    if test:
        f_te, grid, l_te, y_te = truth_arrays(test)
        for p in preds.values():
            p.metrics["test"] = realised(p.predict(f_te), grid, l_te, y_te)
    return preds, split
