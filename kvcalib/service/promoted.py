"""Promoted defaults: the sweep-chosen parameters of (model, method) that the service uses when a request gives
none. The sweep writes ``<data_dir>/promoted_defaults.json`` (``kvcalib sweep promote``); the service only reads
it, so this module lives on the service side and the sweep package builds on it (never the other way round)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from kvcalib.calib.errors import KvcalibError

log = logging.getLogger("kvcalib.service")

PROMOTED_FILE = "promoted_defaults.json"


class PromotedDefaultsError(KvcalibError):
    """The promoted-defaults file exists but cannot be read as an object of entries."""


def promoted_path(data_dir: str | Path | None = None) -> Path:
    if data_dir is None:
        from kvcalib.settings import get_settings

        data_dir = get_settings().data_dir
    return Path(data_dir) / PROMOTED_FILE


def _read_promoted(path: Path) -> dict:
    if not path.is_file():
        return {"version": 1, "entries": {}}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise PromotedDefaultsError(f"cannot read promoted defaults {str(path)!r}: {exc}") from exc
    if not isinstance(d, dict) or not isinstance(d.setdefault("entries", {}), dict):
        raise PromotedDefaultsError(f"promoted defaults {str(path)!r} are not an object of entries")
    return d


def _key(model: str, method: str) -> str:
    return f"{model}/{method}"


def promoted_entry(method: str, model: str | None = None, data_dir: str | Path | None = None) -> dict | None:
    """The promotion record of (model, method) — model defaults to the service's default model — or None."""
    if model is None:
        from kvcalib.settings import get_settings

        model = get_settings().default_model
    e = _read_promoted(promoted_path(data_dir))["entries"].get(_key(model, method))
    return e if isinstance(e, dict) else None


def promoted_params(method: str, model: str | None = None, data_dir: str | Path | None = None) -> dict:
    """The promoted hyperparameters of ``method`` for ``model`` ({} when nothing was promoted): what the service
    passes as ``method_params`` when a request gives none. Parameters the method no longer has are dropped."""
    from kvcalib.calib.scorers import SCORERS

    e = promoted_entry(method, model, data_dir)
    if not e or method not in SCORERS:
        return {}
    names = set(SCORERS[method].param_names())
    return {k: v for k, v in (e.get("method_params") or {}).items() if k in names}


def promoted_allocator_params(method: str, allocator: str, model: str | None = None,
                              data_dir: str | Path | None = None) -> dict:
    """The promoted allocator parameters of (model, method) when they were swept for ``allocator`` ({} otherwise):
    what the service passes as ``allocator_params`` when a request gives none. Unknown parameters are dropped."""
    import inspect

    from kvcalib.calib.budget import ALLOCATORS

    e = promoted_entry(method, model, data_dir)
    if not e or e.get("allocator") != allocator or allocator not in ALLOCATORS:
        return {}
    params = list(inspect.signature(ALLOCATORS[allocator]).parameters.values())[2:]  # after (scores, per_head)
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return {k: v for k, v in (e.get("allocator_params") or {}).items() if k in names}


def with_promoted_params(options: dict, model: str, method: str, allocator: str,
                         data_dir: str | Path | None = None) -> dict:
    """``options`` (a request's ``CalibrationConfig`` overrides) with the promoted ``method_params`` of (model,
    method) — and its ``allocator_params`` when they were swept for ``allocator`` — filled in where the request
    gives none. An unreadable promotion file is logged and ignored: requests never fail because of it."""
    out = dict(options)
    try:
        if "method_params" not in out:
            mp = promoted_params(method, model, data_dir)
            if mp:
                out["method_params"] = mp
        if "allocator_params" not in out:
            ap = promoted_allocator_params(method, allocator, model, data_dir)
            if ap:
                out["allocator_params"] = ap
    except PromotedDefaultsError as exc:
        log.warning("promoted defaults ignored: %s", exc)
        return dict(options)
    return out
