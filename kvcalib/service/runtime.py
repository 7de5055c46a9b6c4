"""Per-process model access for the service: a cheap ``ModelInfo`` (tokenizer, revision, context length — what the
API needs to validate a document without loading weights) and the full ``Engine``, loaded once per process."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from kvcalib.calib.lm.registry import ModelNotFoundError, available_models


@dataclass
class ModelInfo:
    name: str
    revision: str
    max_positions: int
    tokenizer: object

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


def _cache_dir():
    from kvcalib.settings import get_settings

    return get_settings().cache_dir


_LOCK = threading.Lock()
_INFO: dict[str, ModelInfo] = {}


def check_model_name(name: str) -> str:
    """Service requests may only name registry models (never a filesystem path)."""
    if name not in available_models():
        raise ModelNotFoundError(f"unknown model {name!r}: expected one of {available_models()}")
    return name


def model_info(name: str) -> ModelInfo:
    check_model_name(name)
    with _LOCK:
        info = _INFO.get(name)
        if info is not None:
            return info
        from transformers import AutoTokenizer

        from kvcalib.calib.lm.registry import _revision, resolve_model_dir

        canonical, folder = resolve_model_dir(name, _cache_dir())
        cfg = json.loads((folder / "config.json").read_text())
        info = ModelInfo(name=canonical, revision=_revision(folder),
                         max_positions=int(cfg.get("max_position_embeddings") or 4096),
                         tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
        _INFO[name] = info
        return info


_ENGINES: dict[tuple[str, str], object] = {}


def get_engine(name: str, device: str = "cpu"):
    """The process-wide ``Engine`` of a registry model (weights loaded on first use only)."""
    from kvcalib.calib.pipeline import Engine

    check_model_name(name)
    key = (name, device)
    with _LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = _ENGINES[key] = Engine.load(name, device=device, cache_dir=_cache_dir())
        return eng
