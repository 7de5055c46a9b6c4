"""Predictors of the largest safe ratio r* from a context's features, with a bounded violation rate.

One file per kind, each registered for JSON loading (``base.register``):

* ``parametric`` — ``ParametricPredictor``, Compactor's calibration curve in the retention ρ = 1 − r (the baseline);
* ``quantile`` — ``QuantileGBMPredictor``, quantile-loss gradient boosting exported as JSON trees (numpy inference);
* ``constant`` — ``ConstantPredictor``, one global ratio;
* ``conformal`` — ``ConformalPredictor``, the split-conformal lower bound of any base: P(r̂ > r*) ≤ α;
* ``risk`` — ``RiskControlPredictor``, conformal risk control of the expected answer loss: E[ℓ(r̂)] ≤ ε
  (fitted on task truth by ``risk.fit_truth_predictors``).

``fitting.fit_predictors`` fits them all from labels, ``evaluation`` measures violation rate and KV reduction
against the best single global ratio, ``io`` saves and loads them (JSON with a content hash; nothing is unpickled).
"""

from __future__ import annotations

from kvcalib.calib.predictors.base import (
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    MANIFEST_FORMAT,
    R_MAX,
    Predictor,
    PredictorError,
    default_feature_names,
    feature_matrix,
    predictor_from_json,
    register,
)
from kvcalib.calib.predictors.conformal import ConformalPredictor, conformal_quantile
from kvcalib.calib.predictors.constant import ConstantPredictor
from kvcalib.calib.predictors.evaluation import (
    best_global_ratio,
    evaluate_predictors,
    plot_evaluation,
    violation_metrics,
)
from kvcalib.calib.predictors.fitting import fit_predictors
from kvcalib.calib.predictors.io import load_manifest, load_predictor, load_predictors, save_predictors
from kvcalib.calib.predictors.parametric import ParametricPredictor, compactor_curve, retention_for
from kvcalib.calib.predictors.quantile import QuantileGBMPredictor
from kvcalib.calib.predictors.risk import RiskControlPredictor, crc_lambda, fit_truth_predictors

__all__ = [
    "FORMAT", "FORMAT_VERSION", "KINDS", "MANIFEST_FORMAT", "R_MAX",
    "ConformalPredictor", "ConstantPredictor", "ParametricPredictor", "Predictor", "PredictorError",
    "QuantileGBMPredictor", "RiskControlPredictor", "crc_lambda", "fit_truth_predictors",
    "best_global_ratio", "compactor_curve", "conformal_quantile", "default_feature_names", "evaluate_predictors",
    "feature_matrix", "fit_predictors", "load_manifest", "load_predictor", "load_predictors", "plot_evaluation",
    "predictor_from_json", "register", "retention_for", "save_predictors", "violation_metrics",
]
