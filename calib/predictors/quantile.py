"""``QuantileGBMPredictor`` — gradient boosting with the quantile (pinball) loss at level q (Friedman 2001,
"Greedy Function Approximation: A Gradient Boosting Machine"; scikit-learn's ``GradientBoostingRegressor``) on the
context features.

The fitted trees are exported as plain JSON arrays and evaluated in numpy: no sklearn object is ever stored.
"""

from __future__ import annotations

import numpy as np

from kvcalib.calib.predictors.base import (
    R_MAX,
    Predictor,
    PredictorError,
    default_feature_names,
    feature_matrix,
    register,
)


@register
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
    def from_params(cls, p: dict) -> QuantileGBMPredictor:
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
            sample_weight=None) -> QuantileGBMPredictor:
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

    def _export(self, model, x: np.ndarray) -> None:
        self.learning_rate = float(model.learning_rate)
        self.init = float(np.asarray(model._raw_predict_init(x[:1].astype(np.float32))).ravel()[0])
        self.trees = []
        for est in model.estimators_[:, 0]:
            t = est.tree_
            self.trees.append({"left": t.children_left.tolist(), "right": t.children_right.tolist(),
                               "feature": t.feature.tolist(), "threshold": t.threshold.tolist(),
                               "value": t.value[:, 0, 0].tolist()})

    def raw_predict(self, x: np.ndarray) -> np.ndarray:
        """Boosted sum of the JSON trees for features ``x`` (n, F) -> (n,)."""
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
