"""Predictors shipped with the package: ``shipped/<model>/`` holds, per bundled model, the predictor folder written
by ``save_predictors`` (``manifest.json`` + one JSON file per predictor, versioned by content hash; no pickle),
fitted on task truth (``risk.fit_truth_predictors``) from the labels beside it (``labels.jsonl``: the repository
copy of the data, so ``kvcalib fit`` reproduces the predictors; see README "Calibration").

``default_predictor(model, method=…, allocator=…)`` is what ``calibrate.predict`` (and through it the service, CLI
and client) uses when no predictor is given: the manifest's default (``risk``: conformal risk control of the answer
loss at ε) — or ``None`` when no predictor ships for that model or the shipped one was fitted for another scoring
method / allocator. ``full_controller(model, config)`` is the risk controller over a calibration's own r*
(``full_<fidelity>``) that ``mode=full`` profiles and ``kvcalib calibrate`` apply.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from kvcalib.calib.predictors.base import Predictor, PredictorError
from kvcalib.calib.predictors.io import load_manifest, load_predictor

SHIPPED = Path(str(resources.files("kvcalib.calib.predictors") / "shipped"))


def shipped_models() -> list[str]:
    """Names of the models a predictor ships for."""
    if not SHIPPED.is_dir():
        return []
    return sorted(p.name for p in SHIPPED.iterdir() if (p / "manifest.json").is_file())


def shipped_folder(model: str) -> Path | None:
    folder = SHIPPED / str(model)
    return folder if (folder / "manifest.json").is_file() else None


@functools.lru_cache(maxsize=16)
def _load(model: str, name: str | None) -> Predictor:
    folder = shipped_folder(model)
    if folder is None:
        raise PredictorError(f"no predictor ships for model {model!r}: shipped for {shipped_models()}")
    return load_predictor(folder, name)


def shipped_predictor(model: str, name: str | None = None) -> Predictor:
    """One shipped predictor of ``model`` (default: the manifest's default). Cached: treat it as read-only."""
    return _load(str(model), name)


def default_predictor(model: str, method: str | None = None, allocator: str | None = None) -> Predictor | None:
    """The shipped default predictor of ``model`` when one ships and was fitted for ``method`` / ``allocator``
    (each checked when given), else None."""
    if shipped_folder(str(model)) is None:
        return None
    pred = shipped_predictor(str(model))
    trained = pred.training_config()
    for key, want in (("method", method), ("allocator", allocator)):
        if want is not None and key in trained and trained[key] != want:
            return None
    return pred


def shipped_manifest(model: str) -> dict:
    folder = shipped_folder(str(model))
    if folder is None:
        raise PredictorError(f"no predictor ships for model {model!r}")
    return load_manifest(folder)


def full_controller(model: str, config) -> Predictor | None:
    """The risk controller over r* shipped for ``model`` (``full_<fidelity>``, ``risk.fit_full_predictors``) that
    applies to a calibration with ``config`` (its fidelity, τ, method and allocator:
    ``calibrate.check_controller``), else None."""
    from kvcalib.calib.predictors.risk import controller_mismatch

    folder = shipped_folder(str(model))
    if folder is None:
        return None
    name = f"full_{config.fidelity}"
    if name not in load_manifest(folder).get("predictors", {}):
        return None
    pred = shipped_predictor(str(model), name)
    why = controller_mismatch(pred, fidelity=config.fidelity, tolerance=config.tolerance, method=config.method,
                              allocator=config.allocator)
    return None if why else pred
