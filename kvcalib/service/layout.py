"""Budgets for servers (issue 17, item 4): what a budget was measured on — the exact context token ids (by their
hash, ``calib.integrations.servers.token_ids_hash``) and their prompt format — the model's shape in the dtype it ran
in, and the kept positions (``encode_kept_positions``; one range list per layer with the ``per_layer`` allocator).

Computed where a model is loaded — the job, after a calibration (``profile_layout``), and a prediction
(``predict_with_layout``, from a text or from token ids) — and stored with the profile, so ``GET /budget`` answers
them from one row without a model."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvcalib.service.views import ModelShapeView, PromptFormatView, PromptKind

if TYPE_CHECKING:
    import torch

    from kvcalib.calib.calibration.calibrate import CalibrationConfig, CalibrationResult
    from kvcalib.calib.pipeline import Engine
    from kvcalib.service.predictions import RatioPredictor


PER_LAYER = "per_layer"  # the allocator whose heads of a layer keep the same positions: encoded per layer


@dataclass(frozen=True)
class ServerLayout:
    """A budget's facts for servers (a ``repository.ServerFields``)."""

    ids_hash: str
    dtype: str
    model_shape: dict[str, Any]
    prompt_format: dict[str, Any]
    kept_positions: dict[str, Any] | None

    @property
    def shape_view(self) -> ModelShapeView | None:
        return ModelShapeView.of(self.model_shape)

    @property
    def format_view(self) -> PromptFormatView | None:
        return PromptFormatView.of(self.prompt_format)


@dataclass(frozen=True)
class PredictedBudget:
    """A prediction and its layout (``predict_with_layout``)."""

    ratio: float
    token_budget: int
    context_tokens: int
    layer_budgets: list[int]
    head_budgets: list[list[int]]
    features: dict[str, Any]
    predictor_version: str
    layout: ServerLayout


def encode_keep(keep: torch.Tensor, allocator: str) -> dict[str, Any]:
    """``encode_kept_positions`` of a (L, Hkv, N) keep mask: per layer with ``per_layer``, else per head."""
    from kvcalib.calib.integrations.servers import encode_kept_positions

    return encode_kept_positions(keep, layers_only=allocator == PER_LAYER)


def _layout(engine: Engine, model: str, kind: PromptKind, ids: torch.Tensor, doc_start: int,
            keep: torch.Tensor | None, allocator: str) -> ServerLayout:
    from kvcalib.calib.integrations.servers import model_shape, token_ids_hash

    shape = model_shape(engine.lm.model).to_dict()
    h = token_ids_hash(model, ids)
    fmt = PromptFormatView(kind=kind, model=model, context_tokens=int(ids.numel()), doc_start=int(doc_start),
                           ids_hash=h)
    return ServerLayout(ids_hash=h, dtype=shape["dtype"], model_shape=shape, prompt_format=fmt.to_dict(),
                        kept_positions=encode_keep(keep, allocator) if keep is not None else None)


def profile_layout(engine: Engine, text: str, config: CalibrationConfig, *, model: str,
                   result: CalibrationResult) -> ServerLayout:
    """The layout of a calibration's profile: the hash of its context ids (kvcalib's chat-template prompt of the
    text) and the kept positions at the served ratio — the calibration's own keep mask (``CalibrationResult.keep``,
    the mask its head budgets count: no model work). A result that was not computed in this process has no mask:
    its positions are left out."""
    if result.keep is not None and result.context_ids is not None:
        return _layout(engine, model, "chat_template", result.context_ids, result.doc_start, result.keep,
                       config.allocator)
    from kvcalib.calib.calibration.calibrate import context_ids

    ids, doc_start = context_ids(engine, text)
    return _layout(engine, model, "chat_template", ids, doc_start, None, config.allocator)


def predict_with_layout(engine: Engine, config: CalibrationConfig, predictor: RatioPredictor, *, model: str,
                        text: str | None = None, token_ids: Sequence[int] | None = None) -> PredictedBudget:
    """``calibrate.predict`` with its layout: the predictor's ratio from the features of one prefill of the text
    (kvcalib's chat-template prompt) or of exactly ``token_ids`` (``TokenIdsEngine``: a server's own prefill; the
    text features read the ids' decoded text), the budgets at that ratio and the keep mask that realises them."""
    from kvcalib.calib.budget import Budget, allocate
    from kvcalib.calib.calibration.calibrate import context_ids, featurize
    from kvcalib.calib.integrations.servers import TokenIdsEngine

    if (text is None) == (token_ids is None):
        raise ValueError("give exactly one of text or token_ids")
    kind: PromptKind = "chat_template"
    if token_ids is not None:
        engine = TokenIdsEngine(engine, token_ids)
        text, kind = engine.document_text(), "token_ids"
    feats, cap, scores = featurize(engine, text, config)
    r = float(predictor.predict([feats])[0])
    r = min(max(r if math.isfinite(r) else 0.0, 0.0), max(config.ratios), 0.999)
    keep = allocate(scores, Budget(ratio=r), config.allocator, **config.allocator_params)  # (L, Hkv, N)
    per_head = keep.sum(-1)
    _, doc_start = context_ids(engine, text)
    n = int(cap.num_tokens)
    return PredictedBudget(ratio=r, token_budget=Budget(ratio=r).per_head(n), context_tokens=n,
                           layer_budgets=[int(x) for x in per_head.sum(-1)],
                           head_budgets=[[int(x) for x in row] for row in per_head], features=feats,
                           predictor_version=predictor.version,
                           layout=_layout(engine, model, kind, cap.input_ids, doc_start, keep, config.allocator))
