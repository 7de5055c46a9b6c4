"""``ConstantPredictor`` — one global ratio for every context (the base of the ``global`` conformal baseline)."""

from __future__ import annotations

import numpy as np

from kvcalib.calib.predictors.base import Predictor, register


@register
class ConstantPredictor(Predictor):
    kind = "constant"

    def __init__(self, ratio: float = 0.0):
        super().__init__()
        self.ratio = float(ratio)

    def params(self) -> dict:
        return {"ratio": self.ratio}

    @classmethod
    def from_params(cls, p: dict) -> ConstantPredictor:
        return cls(float(p["ratio"]))

    def predict(self, features: list[dict]) -> np.ndarray:
        return np.full(len(features), self.ratio)
