"""Structural types of what calibration consumes: the engine (``calib.pipeline.Engine``) and a predictor of r*
(``calib.predictors.Predictor``, or the service's duck-typed fallback)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

    from kvcalib.calib.budget import Budget
    from kvcalib.calib.capture import Capture
    from kvcalib.calib.data.documents import Prompt
    from kvcalib.calib.lm.protocols import LanguageModel, Tokenizer
    from kvcalib.calib.scorers import ScoreContext, Scorer


class CalibrationEngine(Protocol):
    """The engine seams ``calibrate`` / ``featurize`` / ``predict`` use: prompt layout, prefill, scoring."""

    @property
    def lm(self) -> LanguageModel: ...

    @property
    def tokenizer(self) -> Tokenizer: ...

    def prompt(self, context: str, question: str) -> Prompt: ...

    def capture(self, context_ids: torch.Tensor, compute_nll: bool = False, nll_stride: int = 1) -> Capture: ...

    def scorer(self, method: str | Scorer, **params: Any) -> Scorer: ...

    def score_context(self, budget: Budget | None = None) -> ScoreContext: ...


class RatioPredictor(Protocol):
    """Recommends a compression ratio per context from its features (``calib.predictors.Predictor``)."""

    @property
    def version(self) -> str: ...

    def training_config(self) -> dict: ...

    def predict(self, features: list[dict]) -> np.ndarray: ...
