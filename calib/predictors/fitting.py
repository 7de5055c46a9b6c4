"""``fit_predictors``: every predictor of r* from labelled train and calibration splits (``kvcalib fit``)."""

from __future__ import annotations

import numpy as np

from kvcalib.calib.defaults import TOLERANCE
from kvcalib.calib.predictors.base import Predictor, PredictorError, default_feature_names
from kvcalib.calib.predictors.conformal import ConformalPredictor
from kvcalib.calib.predictors.constant import ConstantPredictor
from kvcalib.calib.predictors.evaluation import violation_metrics
from kvcalib.calib.predictors.parametric import ParametricPredictor
from kvcalib.calib.predictors.quantile import QuantileGBMPredictor


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
    tau = float(cfg.get("tolerance", TOLERANCE))
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
