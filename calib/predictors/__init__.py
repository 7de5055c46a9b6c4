"""Predictors of the largest safe ratio r* from a context's features, with a bounded violation rate.

* ``ParametricPredictor`` — Compactor's calibration curve (the baseline). In the paper the curve is written in the
  *retention* ρ (kept fraction): f(ρ) = (e^{b(ρ−1)} − e^{−b}) / (1 − e^{−b}) = expm1(bρ) / expm1(b), f(0) = 0,
  f(1) = 1, with b = α·NLL(context) + β. Our ratios are *compressions* r = 1 − ρ, so the fidelity at ratio r is
  f(1 − r), and the recommended ratio is r̂ = 1 − ρ*(b) with ρ*(b) = log1p(τ·expm1(b)) / b the smallest retention
  whose predicted fidelity reaches τ. (α, β) minimise Σ w·(f − y)² over every (context, grid ratio) point, with
  w = ``over_weight`` (default 4) where f > y — predicting more fidelity than measured is what over-compresses.
* ``QuantileGBMPredictor`` — scikit-learn gradient boosting with the quantile (pinball) loss at level q on the
  features; exported as plain JSON trees and evaluated in numpy (no sklearn object is ever stored).
* ``ConformalPredictor`` — split-conformal lower bound around any base predictor: on a calibration split,
  s_i = base(x_i) − r*_i; q̂ = the ⌈(n+1)(1−α)⌉-th smallest s_i; r̂(x) = clip(base(x) − q̂, 0, r_max). For a new
  context exchangeable with the calibration ones, P(r̂ > r*) = P(s > q̂) ≤ α (clipping only lowers r̂, and r* ≥ 0).
  With a constant base it is the best *global* ratio at violation α (``global`` in ``fit_predictors``).

Persistence is JSON only (``save_predictors`` / ``load_predictor``): every predictor file holds its kind, fitted
parameters, training metrics and a version ``{kind}-{sha256(params)[:12]}-{UTC timestamp}``; loading re-hashes the
parameters and refuses a file whose hash does not match, so nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import ClassVar

import numpy as np

from kvcalib.calib.errors import KvcalibError

FORMAT = "kvcalib.predictor"
MANIFEST_FORMAT = "kvcalib.predictors"
FORMAT_VERSION = 1
R_MAX = 0.95
_PER_LAYER = re.compile(r"_l\d+$")


class PredictorError(KvcalibError):
    pass


def _canon(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def feature_matrix(features: list[dict], names: list[str], fill: dict[str, float] | None = None) -> np.ndarray:
    """(n, len(names)) float64; missing or non-finite values take ``fill[name]`` (else NaN)."""
    fill = fill or {}
    x = np.full((len(features), len(names)), np.nan)
    for i, f in enumerate(features):
        for j, k in enumerate(names):
            v = f.get(k) if isinstance(f, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                x[i, j] = float(v)
            elif k in fill:
                x[i, j] = fill[k]
    return x


def default_feature_names(features: list[dict], per_layer: bool = False) -> list[str]:
    """Numeric features present in every record (per-layer ``*_l{i}`` ones only with ``per_layer``)."""
    if not features:
        return []
    common = set(features[0])
    for f in features[1:]:
        common &= set(f)
    return sorted(k for k in common if per_layer or not _PER_LAYER.search(k))


# ---------------------------------------------------------------------------------------------------- base
class Predictor:
    kind: ClassVar[str] = "base"

    def __init__(self):
        self.created = _now()
        self.metrics: dict = {}
        self.training: dict = {}  # config of the labels, split sizes, ...

    # -- to implement
    def params(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_params(cls, params: dict) -> "Predictor":
        raise NotImplementedError

    def predict(self, features: list[dict]) -> np.ndarray:
        raise NotImplementedError

    # -- shared
    def content_hash(self) -> str:
        return hashlib.sha256(_canon({"kind": self.kind, "params": self.params()}).encode()).hexdigest()

    @property
    def version(self) -> str:
        return f"{self.kind}-{self.content_hash()[:12]}-{self.created}"

    def training_config(self) -> dict:
        return dict(self.training.get("config") or {})

    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": self.kind, "version": self.version,
                "created": self.created, "content_hash": self.content_hash(), "params": self.params(),
                "metrics": self.metrics, "training": self.training}

    def predict_one(self, features: dict) -> float:
        return float(self.predict([features])[0])


def predictor_from_json(d: dict) -> Predictor:
    """Rebuild a predictor from its JSON object (validated: format, kind, parameter hash)."""
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PredictorError("not a kvcalib predictor file (missing format 'kvcalib.predictor')")
    if d.get("format_version") != FORMAT_VERSION:
        raise PredictorError(f"unsupported predictor format version {d.get('format_version')!r}")
    kind = d.get("kind")
    if kind not in KINDS:
        raise PredictorError(f"unknown predictor kind {kind!r}: expected one of {sorted(KINDS)}")
    params = d.get("params")
    if not isinstance(params, dict):
        raise PredictorError("predictor file has no parameters")
    try:
        pred = KINDS[kind].from_params(params)
    except (KeyError, TypeError, ValueError) as exc:
        raise PredictorError(f"invalid {kind} predictor parameters: {exc}") from None
    if pred.content_hash() != d.get("content_hash"):
        raise PredictorError("predictor parameters do not match their content hash (file modified or corrupt)")
    pred.created = str(d.get("created", pred.created))
    pred.metrics = d.get("metrics") or {}
    pred.training = d.get("training") or {}
    return pred


# ---------------------------------------------------------------------------------------------------- parametric
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


class ParametricPredictor(Predictor):
    kind = "parametric"
    B_RANGE = (-60.0, 60.0)

    def __init__(self, alpha: float = 0.0, beta: float = 0.0, tau: float = 0.95, r_max: float = R_MAX,
                 nll_feature: str = "context_nll", over_weight: float = 4.0):
        super().__init__()
        self.alpha, self.beta, self.tau, self.r_max = float(alpha), float(beta), float(tau), float(r_max)
        self.nll_feature, self.over_weight = nll_feature, float(over_weight)

    def params(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "tau": self.tau, "r_max": self.r_max,
                "nll_feature": self.nll_feature, "over_weight": self.over_weight}

    @classmethod
    def from_params(cls, p: dict) -> "ParametricPredictor":
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

    def fit(self, nll, ratios, fidelity, tau: float | None = None) -> "ParametricPredictor":
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


# ---------------------------------------------------------------------------------------------------- GBM
class QuantileGBMPredictor(Predictor):
    """Gradient boosting (quantile loss at ``quantile``) exported as JSON trees; predicts in numpy."""

    kind = "gbm_quantile"

    def __init__(self, quantile: float = 0.1, feature_names: list[str] | None = None, r_max: float = R_MAX,
                 hyper: dict | None = None):
        super().__init__()
        self.quantile = float(quantile)
        self.feature_names = list(feature_names or [])
        self.r_max = float(r_max)
        self.hyper = dict(hyper or {})
        self.fill: dict[str, float] = {}
        self.init = 0.0
        self.learning_rate = 0.1
        self.trees: list[dict] = []

    def params(self) -> dict:
        return {"quantile": self.quantile, "feature_names": self.feature_names, "r_max": self.r_max,
                "hyper": self.hyper, "fill": self.fill, "init": self.init, "learning_rate": self.learning_rate,
                "trees": self.trees}

    @classmethod
    def from_params(cls, p: dict) -> "QuantileGBMPredictor":
        m = cls(float(p["quantile"]), [str(x) for x in p["feature_names"]], float(p["r_max"]), dict(p["hyper"]))
        m.fill = {str(k): float(v) for k, v in p["fill"].items()}
        m.init, m.learning_rate = float(p["init"]), float(p["learning_rate"])
        trees = []
        for t in p["trees"]:
            tree = {"left": [int(x) for x in t["left"]], "right": [int(x) for x in t["right"]],
                    "feature": [int(x) for x in t["feature"]], "threshold": [float(x) for x in t["threshold"]],
                    "value": [float(x) for x in t["value"]]}
            n = len(tree["left"])
            if any(len(tree[k]) != n for k in tree) or n == 0:
                raise ValueError("inconsistent tree arrays")
            if any(not (-1 <= c < n) for c in tree["left"] + tree["right"]):
                raise ValueError("tree child index out of range")
            if any(f >= len(m.feature_names) for f in tree["feature"]):
                raise ValueError("tree feature index out of range")
            trees.append(tree)
        m.trees = trees
        return m

    def fit(self, features: list[dict], y, seed: int = 0, feature_names: list[str] | None = None,
            sample_weight=None) -> "QuantileGBMPredictor":
        from sklearn.ensemble import GradientBoostingRegressor

        y = np.asarray(y, dtype=float)
        if len(features) != len(y) or len(y) < 2:
            raise PredictorError("need at least two labelled contexts to fit the learned predictor")
        self.feature_names = list(feature_names or self.feature_names or default_feature_names(features))
        if not self.feature_names:
            raise PredictorError("no common numeric features to learn from")
        raw = feature_matrix(features, self.feature_names)
        med = [np.median(c[~np.isnan(c)]) if (~np.isnan(c)).any() else 0.0 for c in raw.T]
        self.fill = {k: float(v) for k, v in zip(self.feature_names, med)}
        x = feature_matrix(features, self.feature_names, self.fill)
        hyper = {"n_estimators": 150, "learning_rate": 0.05, "max_depth": 2,
                 "min_samples_leaf": max(3, len(y) // 20), "subsample": 0.8}
        hyper.update(self.hyper)
        self.hyper = hyper
        model = GradientBoostingRegressor(loss="quantile", alpha=self.quantile, random_state=seed, **hyper)
        model.fit(x, y, sample_weight=sample_weight)
        self._export(model, x)
        self.sklearn_model = model  # transient (never saved): lets tests compare the JSON trees with sklearn
        return self

    def _export(self, model, x) -> None:
        self.learning_rate = float(model.learning_rate)
        self.init = float(np.asarray(model._raw_predict_init(x[:1].astype(np.float32))).ravel()[0])
        self.trees = []
        for est in model.estimators_[:, 0]:
            t = est.tree_
            self.trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(),
                               "feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                               "value": t.value[:, 0, 0].tolist()})

    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float32).astype(np.float64)  # sklearn's trees compare float32 features
        out = np.full(x.shape[0], self.init)
        for t in self.trees:
            left, right = np.asarray(t["left"]), np.asarray(t["right"])
            feat, thr, val = np.asarray(t["feature"]), np.asarray(t["threshold"]), np.asarray(t["value"])
            node = np.zeros(x.shape[0], dtype=int)
            for _ in range(len(left)):
                leaf = left[node] == -1
                if leaf.all():
                    break
                f = np.where(leaf, 0, feat[node])
                go_left = x[np.arange(x.shape[0]), f] <= thr[node]
                node = np.where(leaf, node, np.where(go_left, left[node], right[node]))
            out += self.learning_rate * val[node]
        return out

    def predict(self, features: list[dict]) -> np.ndarray:
        x = feature_matrix(features, self.feature_names, self.fill)
        return np.clip(self.raw_predict(x), 0.0, self.r_max)


# ---------------------------------------------------------------------------------------------------- constant
class ConstantPredictor(Predictor):
    kind = "constant"

    def __init__(self, ratio: float = 0.0):
        super().__init__()
        self.ratio = float(ratio)

    def params(self) -> dict:
        return {"ratio": self.ratio}

    @classmethod
    def from_params(cls, p: dict) -> "ConstantPredictor":
        return cls(float(p["ratio"]))

    def predict(self, features: list[dict]) -> np.ndarray:
        return np.full(len(features), self.ratio)


# ---------------------------------------------------------------------------------------------------- conformal
def conformal_quantile(scores, alpha: float) -> float:
    """The ⌈(n+1)(1−α)⌉-th smallest score (+inf when that exceeds n: too few calibration points for α)."""
    s = np.sort(np.asarray(scores, dtype=float))
    n = len(s)
    k = math.ceil((n + 1) * (1.0 - alpha) - 1e-12)
    return math.inf if k > n or n == 0 else float(s[max(k, 1) - 1])


class ConformalPredictor(Predictor):
    kind = "conformal"

    def __init__(self, base: Predictor | None = None, alpha: float = 0.1, offset: float = math.inf,
                 r_max: float = R_MAX, n_cal: int = 0):
        super().__init__()
        self.base = base if base is not None else ConstantPredictor(0.0)
        self.alpha, self.offset, self.r_max, self.n_cal = float(alpha), float(offset), float(r_max), int(n_cal)

    def params(self) -> dict:
        return {"base": {"kind": self.base.kind, "params": self.base.params(), "created": self.base.created},
                "alpha": self.alpha, "offset": None if math.isinf(self.offset) else self.offset,
                "r_max": self.r_max, "n_cal": self.n_cal}

    @classmethod
    def from_params(cls, p: dict) -> "ConformalPredictor":
        b = p["base"]
        if b.get("kind") not in KINDS or b["kind"] == "conformal":
            raise ValueError(f"invalid base kind {b.get('kind')!r}")
        base = KINDS[b["kind"]].from_params(b["params"])
        base.created = str(b.get("created", base.created))
        off = p["offset"]
        return cls(base, float(p["alpha"]), math.inf if off is None else float(off), float(p["r_max"]),
                   int(p["n_cal"]))

    def calibrate(self, features: list[dict], y, alpha: float | None = None) -> "ConformalPredictor":
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


KINDS: dict[str, type[Predictor]] = {c.kind: c for c in (ParametricPredictor, QuantileGBMPredictor,
                                                          ConstantPredictor, ConformalPredictor)}


# ---------------------------------------------------------------------------------------------------- metrics
def violation_metrics(pred, r_star) -> dict:
    """Violation rate P(r̂ > r*), mean KV reduction (mean r̂), mean |r̂ − r*| and the mean reduction kept safe."""
    p, y = np.asarray(pred, dtype=float), np.asarray(r_star, dtype=float)
    if len(y) == 0:
        return {"n": 0}
    viol = p > y + 1e-9
    return {"n": int(len(y)), "violation_rate": float(viol.mean()), "mean_ratio": float(p.mean()),
            "mean_abs_error": float(np.abs(p - y).mean()), "mean_oracle_ratio": float(y.mean()),
            "mean_safe_ratio": float(np.where(viol, 0.0, p).mean())}


def best_global_ratio(r_star, max_violation: float) -> float:
    """The largest single ratio g with violation rate mean(g > r*) ≤ ``max_violation`` on these contexts."""
    y = np.sort(np.asarray(r_star, dtype=float))
    n = len(y)
    if n == 0:
        return 0.0
    allowed = int(math.floor(max_violation * n + 1e-9))  # contexts that may have r* < g
    if allowed >= n:
        return float(y[-1])
    return float(y[allowed])  # g = y[allowed]: exactly `allowed` contexts have r* < g (ties count as safe)


# ---------------------------------------------------------------------------------------------------- fitting
def fit_predictors(train: list[dict], cal: list[dict], alpha: float = 0.1, seed: int = 0,
                   per_layer_features: bool = False) -> dict[str, Predictor]:
    """Fit every predictor from calibration-result dicts (``CalibrationResult.to_dict()``).

    Returns ``parametric`` (Compactor curve, fitted on train), ``parametric_conformal`` (its conformal bound on
    cal), ``gbm`` (quantile-α boosting on train), ``conformal`` (the conformal bound of ``gbm`` on cal — the
    recommended predictor), ``conformal_median`` (the conformal bound of a median-boosting base) and ``global``
    (a single conformal ratio from train + cal: the baseline)."""
    if not train or not cal:
        raise PredictorError(f"need labelled contexts in both train ({len(train)}) and calibration ({len(cal)})")
    if not 0.0 < alpha < 1.0:
        raise PredictorError(f"alpha must lie in (0, 1), got {alpha}")
    cfg = train[0].get("config", {})
    tau = float(cfg.get("tolerance", 0.95))
    r_max = max(max(r["ratios"]) for r in train + cal)
    feats_tr, y_tr = [r["features"] for r in train], np.array([r["r_star"] for r in train])
    feats_cal, y_cal = [r["features"] for r in cal], np.array([r["r_star"] for r in cal])
    training = {"config": cfg, "n_train": len(train), "n_cal": len(cal), "alpha": alpha, "seed": seed}

    par = ParametricPredictor(tau=tau, r_max=r_max).fit([f["context_nll"] for f in feats_tr],
                                                       [r["ratios"] for r in train], [r["fidelity"] for r in train])
    names = default_feature_names(feats_tr + feats_cal, per_layer=per_layer_features)
    gbm = QuantileGBMPredictor(quantile=alpha, r_max=r_max).fit(feats_tr, y_tr, seed=seed, feature_names=names)
    median = QuantileGBMPredictor(quantile=0.5, r_max=r_max).fit(feats_tr, y_tr, seed=seed, feature_names=names)
    out: dict[str, Predictor] = {
        "parametric": par,
        "parametric_conformal": ConformalPredictor(par, alpha, r_max=r_max).calibrate(feats_cal, y_cal),
        "gbm": gbm,
        "conformal": ConformalPredictor(gbm, alpha, r_max=r_max).calibrate(feats_cal, y_cal),
        "conformal_median": ConformalPredictor(median, alpha, r_max=r_max).calibrate(feats_cal, y_cal),
        "global": ConformalPredictor(ConstantPredictor(0.0), alpha, r_max=r_max).calibrate(
            feats_tr + feats_cal, np.concatenate([y_tr, y_cal])),
    }
    for name, p in out.items():
        p.training = dict(training, name=name)
        p.metrics["train"] = violation_metrics(p.predict(feats_tr), y_tr)
        p.metrics["cal"] = violation_metrics(p.predict(feats_cal), y_cal)
    return out


# ---------------------------------------------------------------------------------------------------- persistence
def save_predictors(folder: str | Path, predictors: dict[str, Predictor], extra: dict | None = None) -> Path:
    """Write ``{name}.json`` per predictor and ``manifest.json`` (versions, metrics, split) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, p in predictors.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PredictorError(f"invalid predictor name {name!r}")
        path = folder / f"{name}.json"
        path.write_text(json.dumps(p.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        entries[name] = {"file": path.name, "kind": p.kind, "version": p.version, "metrics": p.metrics}
    manifest = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "created": _now(),
                "default": "conformal" if "conformal" in predictors else next(iter(predictors), None),
                "predictors": entries}
    manifest.update(extra or {})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return folder


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PredictorError(f"{path} is not valid JSON: {exc}") from None


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise PredictorError(f"{folder} holds no manifest.json (not a predictor folder written by `kvcalib fit`)")
    m = _read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise PredictorError(f"{path} is not a kvcalib predictor manifest")
    return m


def load_predictors(path: str | Path) -> dict[str, Predictor]:
    """Every predictor of a folder (by manifest) or the single predictor of a file ({stem: predictor})."""
    path = Path(path)
    if path.is_dir():
        m = load_manifest(path)
        out = {}
        for name, e in (m.get("predictors") or {}).items():
            f = path / str(e.get("file", ""))
            if f.parent != path or not f.is_file():
                raise PredictorError(f"manifest entry {name!r} points to a missing file")
            out[name] = predictor_from_json(_read_json(f))
        return out
    if path.is_file():
        return {path.stem: predictor_from_json(_read_json(path))}
    raise PredictorError(f"predictor path {str(path)!r} does not exist")


def load_predictor(path: str | Path, name: str | None = None) -> Predictor:
    """One predictor: a file, or ``name`` (default: the manifest's default, ``conformal``) from a folder."""
    path = Path(path)
    preds = load_predictors(path)
    if path.is_dir():
        name = name or load_manifest(path).get("default")
        if name not in preds:
            raise PredictorError(f"no predictor {name!r} in {path}: expected one of {sorted(preds)}")
        return preds[name]
    return next(iter(preds.values()))
