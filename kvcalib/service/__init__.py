"""The kvcalib service layer: profile store, jobs, budgets and compression behind one ``Service``.

Public names are importable from here (``from kvcalib.service import Service, DocumentInput``); they are loaded on
first use, so ``import kvcalib.service.db`` (migrations, ``kvcalib db``) does not import torch or the model stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Service": "facade",
    "DocumentInput": "inputs", "CalibrationParams": "inputs", "validate_text": "inputs", "decode_utf8": "inputs",
    "parse_jsonl": "inputs",
    "Dispatcher": "dispatch",
    "ServiceInputError": "errors", "NotFoundError": "errors", "TooLargeError": "errors", "ConflictError": "errors",
    "UnavailableError": "errors",
    "FallbackPredictor": "predictions", "RatioPredictor": "predictions",
    "EngineLoader": "runtime", "ModelInfo": "runtime",
    "JobView": "views", "ProfileSummary": "views", "BatchView": "views", "BatchItemView": "views",
    "ProfileView": "views", "CurvePointView": "views", "BudgetView": "views", "CompressedCache": "views",
    "CompressionInfo": "views", "Readiness": "views", "PredictionView": "views", "PredictorInfo": "views",
    "PredictorListing": "views",
}

__all__ = [
    "BatchItemView", "BatchView", "BudgetView", "CalibrationParams", "CompressedCache", "CompressionInfo",
    "ConflictError", "CurvePointView", "Dispatcher", "DocumentInput", "EngineLoader", "FallbackPredictor",
    "JobView", "ModelInfo", "NotFoundError", "PredictionView", "PredictorInfo", "PredictorListing",
    "ProfileSummary", "ProfileView", "RatioPredictor", "Readiness",
    "Service", "ServiceInputError", "TooLargeError", "UnavailableError", "decode_utf8", "parse_jsonl",
    "validate_text",
]

if TYPE_CHECKING:
    from kvcalib.service.dispatch import Dispatcher
    from kvcalib.service.errors import ConflictError, NotFoundError, ServiceInputError, TooLargeError, UnavailableError
    from kvcalib.service.facade import Service
    from kvcalib.service.inputs import CalibrationParams, DocumentInput, decode_utf8, parse_jsonl, validate_text
    from kvcalib.service.predictions import FallbackPredictor, RatioPredictor
    from kvcalib.service.runtime import EngineLoader, ModelInfo
    from kvcalib.service.views import (
        BatchItemView,
        BatchView,
        BudgetView,
        CompressedCache,
        CompressionInfo,
        CurvePointView,
        JobView,
        PredictionView,
        PredictorInfo,
        PredictorListing,
        ProfileSummary,
        ProfileView,
        Readiness,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
