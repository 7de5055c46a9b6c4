"""Persistence of predictors, JSON only: one ``{name}.json`` per predictor plus ``manifest.json`` (versions,
metrics, split) in a folder; loading validates every file (``predictor_from_json``) and never unpickles."""

from __future__ import annotations

import json
import re
from pathlib import Path

from kvcalib.calib.predictors.base import (
    FORMAT_VERSION,
    MANIFEST_FORMAT,
    Predictor,
    PredictorError,
    _now,
    predictor_from_json,
)


def save_predictors(folder: str | Path, predictors: dict[str, Predictor], extra: dict | None = None) -> Path:
    """Write ``{name}.json`` per predictor and ``manifest.json`` (versions, metrics, split) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for name, p in predictors.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise PredictorError(f"invalid predictor name {name!r}")
        path = folder / f"{name}.json"
        path.write_text(json.dumps(p.to_json(), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        entries[name] = {"file": path.name, "kind": p.kind, "version": p.version, "metrics": p.metrics}
    manifest = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "created": _now(),
                "default": "conformal" if "conformal" in predictors else next(iter(predictors), None),
                "predictors": entries}
    manifest.update(extra or {})
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return folder


def keep_unchanged_versions(folder: str | Path, predictors: dict[str, Predictor]) -> list[str]:
    """Refitting into an existing predictor ``folder``: a predictor whose parameters (content hash) equal those of
    the one saved there under the same name takes over its ``created`` stamp, so its version — what profiles and
    stored predictions name — survives a re-ship that changed something else. Returns the names kept."""
    folder = Path(folder)
    if not (folder / "manifest.json").is_file():
        return []
    old = load_predictors(folder)
    kept = []
    for name, p in predictors.items():
        if name in old and old[name].content_hash() == p.content_hash():  # the hash covers the kind
            p.created = old[name].created
            kept.append(name)
    return kept


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PredictorError(f"{path} is not valid JSON: {exc}") from None


def load_manifest(folder: str | Path) -> dict:
    folder = Path(folder)
    path = folder / "manifest.json"
    if not path.is_file():
        raise PredictorError(f"{folder} holds no manifest.json (not a predictor folder written by `kvcalib fit`)")
    m = _read_json(path)
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise PredictorError(f"{path} is not a kvcalib predictor manifest")
    return m


def load_predictors(path: str | Path) -> dict[str, Predictor]:
    """Every predictor of a folder (by manifest) or the single predictor of a file ({stem: predictor})."""
    path = Path(path)
    if path.is_dir():
        m = load_manifest(path)
        out = {}
        for name, e in (m.get("predictors") or {}).items():
            f = path / str(e.get("file", ""))
            if f.parent != path or not f.is_file():
                raise PredictorError(f"manifest entry {name!r} points to a missing file")
            out[name] = predictor_from_json(_read_json(f))
        return out
    if path.is_file():
        return {path.stem: predictor_from_json(_read_json(path))}
    raise PredictorError(f"predictor path {str(path)!r} does not exist")


def load_predictor(path: str | Path, name: str | None = None) -> Predictor:
    """One predictor: a file, or ``name`` (default: the manifest's default, ``conformal``) from a folder."""
    path = Path(path)
    preds = load_predictors(path)
    if path.is_dir():
        name = name or load_manifest(path).get("default")
        if name not in preds:
            raise PredictorError(f"no predictor {name!r} in {path}: expected one of {sorted(preds)}")
        return preds[name]
    return next(iter(preds.values()))
