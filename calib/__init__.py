"""kvcalib's engine: score the cached positions of a context, allocate a budget, compress, answer — and calibrate
how far each context can be compressed. The data flow, one stage per subpackage (public names in flow order):

    documents ─ load_essays ─► build_prompt ─► Prompt(context_ids, question_ids)                      data/
        │ load_model: LoadedModel (model + tokenizer)                                                lm/
        ▼
    prefill ─► Capture: keys/values (L, Hkv, N, d), queries, token NLL                               capture.py
        ▼
    get_scorer(method).score ─► scores (L, Hkv, N), higher = keep    (available_methods())           scorers/
        ▼
    allocate(scores, Budget(ratio | tokens), allocator) ─► keep mask (L, Hkv, N)                     budget.py
        ▼
    RaggedKVCache.from_mask ─► greedy_decode ─► answer                                              cache/
        │
        └► calibrate(engine, text, CalibrationConfig) ─► quality curve, r*(τ), features             calibration/
               ▼
           fit_predictors / load_predictor ─► predict(engine, text, config, predictor) ─► ratio      predictors/

    Engine (pipeline.py) holds a loaded model and runs the whole chain: ``Engine.load().run(context, question)``.

>>> from kvcalib.calib import Budget, Engine, CalibrationConfig, calibrate
>>> eng = Engine.load()                                    # defaults: calib.defaults (model, method, allocator)
>>> eng.run(context, question, budget=Budget(ratio=0.5)).answer
>>> calibrate(eng, context, CalibrationConfig()).r_star    # the largest ratio whose fidelity stays >= τ

Names are imported lazily (PEP 562): ``import kvcalib.calib`` loads no torch, no model and nothing of the service;
the first use of a name imports its stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it, in flow order
_EXPORTS: dict[str, str] = {
    # documents and prompt layout
    "load_essays": "data.documents",
    "build_prompt": "data.documents",
    "Prompt": "data.documents",
    # models
    "load_model": "lm.registry",
    "available_models": "lm.registry",
    "LoadedModel": "lm.registry",
    # prefill capture
    "Capture": "capture",
    "prefill": "capture",
    # scoring
    "get_scorer": "scorers",
    "available_methods": "scorers",
    "Scorer": "scorers",
    "ScoreContext": "scorers",
    # budget allocation
    "Budget": "budget",
    "allocate": "budget",
    "available_allocators": "budget",
    # compressed cache and decoding
    "RaggedKVCache": "cache.ragged",
    "greedy_decode": "cache.decode",
    # calibration
    "CalibrationConfig": "calibration.calibrate",
    "CalibrationResult": "calibration.calibrate",
    "calibrate": "calibration.calibrate",
    "featurize": "calibration.calibrate",
    "predict": "calibration.calibrate",
    "Prediction": "calibration.calibrate",
    # predictors of r*
    "fit_predictors": "predictors",
    "load_predictor": "predictors",
    "Predictor": "predictors",
    # the whole pipeline
    "Engine": "pipeline",
    "RunResult": "pipeline",
    # compression inside the caller's own transformers forward (issue 17)
    "compress": "integrations.hf",
    # errors
    "KvcalibError": "errors",
}
_SUBMODULES = ("defaults",)  # plain modules offered as attributes too (``kvcalib.calib.defaults``)

__all__ = [*_EXPORTS, *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:  # AttributeError also lets ``from kvcalib.calib import budget`` fall back to importing the submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the eager imports
    from kvcalib.calib import defaults
    from kvcalib.calib.budget import Budget, allocate, available_allocators
    from kvcalib.calib.cache.decode import greedy_decode
    from kvcalib.calib.cache.ragged import RaggedKVCache
    from kvcalib.calib.calibration.calibrate import (
        CalibrationConfig,
        CalibrationResult,
        Prediction,
        calibrate,
        featurize,
        predict,
    )
    from kvcalib.calib.capture import Capture, prefill
    from kvcalib.calib.data.documents import Prompt, build_prompt, load_essays
    from kvcalib.calib.errors import KvcalibError
    from kvcalib.calib.integrations.hf import compress
    from kvcalib.calib.lm.registry import LoadedModel, available_models, load_model
    from kvcalib.calib.pipeline import Engine, RunResult
    from kvcalib.calib.predictors import Predictor, fit_predictors, load_predictor
    from kvcalib.calib.scorers import ScoreContext, Scorer, available_methods, get_scorer
