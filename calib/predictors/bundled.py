"""Predictors shipped with the package: ``shipped/<model>/`` holds, per bundled model, the predictor folder written
by ``save_predictors`` (``manifest.json`` + one JSON file per predictor, versioned by content hash; no pickle),
fitted on task truth (``risk.fit_truth_predictors``) from the labels beside it (``labels.jsonl``: the repository
copy of the data, so ``kvcalib fit`` reproduces the predictors; see README "Calibration").

A model may ship predictors for more than one engine configuration: ``shipped/<model>/`` holds the one fitted for the
package defaults (method, allocator), and ``shipped/<model>/<method>-<allocator>/`` any other (e.g. SmolLM2's
``kvzip-global``); every look-up below takes the request's method and allocator and reads the folder fitted for
them.

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


def config_folder_name(method: str, allocator: str) -> str:
    """The sub-folder of ``shipped/<model>/`` holding the predictors of a non-default (method, allocator)."""
    return f"{method}-{allocator}"


def shipped_folders(model: str) -> list[Path]:
    """Every shipped predictor folder of ``model``: the default configuration's first, then the others by name."""
    root = SHIPPED / str(model)
    if not (root / "manifest.json").is_file():
        return []
    return [root] + sorted(p for p in root.iterdir() if p.is_dir() and (p / "manifest.json").is_file())


def _trained_for(folder: Path) -> dict:
    """The training config (method, allocator, …) of a folder's default predictor."""
    return _load(str(folder), None).training_config()


def _fits(trained: dict, method: str | None, allocator: str | None) -> bool:
    return all(want is None or key not in trained or trained[key] == want
               for key, want in (("method", method), ("allocator", allocator)))


def shipped_folder(model: str, method: str | None = None, allocator: str | None = None) -> Path | None:
    """The folder shipped for ``model`` whose predictors were fitted for ``method`` / ``allocator`` (each checked
    when given; neither: the default configuration's), else None."""
    folders = shipped_folders(str(model))
    if method is None and allocator is None:
        return folders[0] if folders else None
    for folder in folders:
        if _fits(_trained_for(folder), method, allocator):
            return folder
    return None


def _folder_or_raise(model: str, method: str | None, allocator: str | None) -> Path:
    folder = shipped_folder(model, method, allocator)
    if folder is None:
        if not shipped_folders(model):
            raise PredictorError(f"no predictor ships for model {model!r}: shipped for {shipped_models()}")
        raise PredictorError(f"no predictor ships for model {model!r} with method {method!r} and allocator "
                             f"{allocator!r}")
    return folder


@functools.lru_cache(maxsize=32)
def _load(folder: str, name: str | None) -> Predictor:
    return load_predictor(Path(folder), name)


def folder_predictor(folder: Path, name: str | None = None) -> Predictor:
    """One predictor of a shipped ``folder`` (one of ``shipped_folders``; default: its manifest's default). Cached."""
    return _load(str(folder), name)


@functools.lru_cache(maxsize=32)
def _manifest(folder: str) -> dict:
    return load_manifest(Path(folder))


def folder_manifest(folder: Path) -> dict:
    """The manifest of a shipped ``folder`` (package data: read once, cached; treat it as read-only)."""
    return _manifest(str(folder))


def clear_cache() -> None:
    """Forget every predictor and manifest read (for tests that swap ``SHIPPED`` for folders of their own)."""
    _load.cache_clear()
    _manifest.cache_clear()


def shipped_predictor(model: str, name: str | None = None, method: str | None = None,
                      allocator: str | None = None) -> Predictor:
    """One shipped predictor of ``model`` (default: the manifest's default) from the folder fitted for ``method`` /
    ``allocator`` (neither: the default configuration's). Cached: treat it as read-only."""
    return _load(str(_folder_or_raise(str(model), method, allocator)), name)


def default_predictor(model: str, method: str | None = None, allocator: str | None = None) -> Predictor | None:
    """The shipped default predictor of ``model`` fitted for ``method`` / ``allocator`` (each checked when given),
    else None."""
    folder = shipped_folder(str(model), method, allocator)
    return None if folder is None else _load(str(folder), None)


def shipped_manifest(model: str, method: str | None = None, allocator: str | None = None) -> dict:
    return folder_manifest(_folder_or_raise(str(model), method, allocator))


def full_controller(model: str, config) -> Predictor | None:
    """The risk controller over r* shipped for ``model`` (``full_<fidelity>``, ``risk.fit_full_predictors``) that
    applies to a calibration with ``config`` (its fidelity, τ, method and allocator:
    ``calibrate.check_controller``), else None."""
    from kvcalib.calib.predictors.risk import controller_mismatch

    folder = shipped_folder(str(model), config.method, config.allocator)
    if folder is None:
        return None
    name = f"full_{config.fidelity}"
    if name not in folder_manifest(folder).get("predictors", {}):
        return None
    pred = _load(str(folder), name)
    why = controller_mismatch(pred, fidelity=config.fidelity, tolerance=config.tolerance, method=config.method,
                              allocator=config.allocator)
    return None if why else pred
