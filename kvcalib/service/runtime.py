"""Per-process model access for the service: a cheap ``ModelInfo`` (tokenizer, revision, context length — what the
API needs to validate a document without loading weights) and the full ``Engine``, loaded once per process.

One ``Engine`` (one model) serves every thread of the process at once — API requests, embedded jobs, a
``--pool threads`` worker: model calls keep their state per call (``calib.lm.hooks``), so they need no lock here.
Loading an engine holds its own lock, not the one of ``model_info``: validating a request never waits for weights."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvcalib.calib.lm.registry import ModelNotFoundError, available_models

if TYPE_CHECKING:
    from kvcalib.calib.pipeline import Engine


class Encoding(Protocol):
    @property
    def input_ids(self) -> Sequence[int]: ...


class Tokenizer(Protocol):
    """What the service needs of a Hugging Face tokenizer: token counts of a document."""

    def __call__(self, text: str, *, add_special_tokens: bool = ...) -> Encoding: ...


class ModelRevision(Protocol):
    @property
    def revision(self) -> str: ...


class LoadedModelSpec(Protocol):
    @property
    def spec(self) -> ModelRevision: ...


class ServiceEngine(Protocol):
    """What the service needs of ``kvcalib.calib.pipeline.Engine`` itself: the revision of its loaded model (jobs
    check it against the run's). The engine is otherwise handed to ``calibrate`` / ``predict`` / ``featurize``."""

    @property
    def lm(self) -> LoadedModelSpec: ...


EngineLoader = Callable[[str], ServiceEngine]  # registry model name → its process-wide engine


@dataclass
class ModelInfo:
    name: str
    revision: str
    max_positions: int
    tokenizer: Tokenizer

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


def _cache_dir():
    from kvcalib.settings import get_settings

    return get_settings().cache_dir


_LOCK = threading.Lock()  # model infos
_ENGINE_LOCK = threading.Lock()  # engines
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
        info = ModelInfo(name=canonical, revision=_revision(folder, _cache_dir()),
                         max_positions=int(cfg.get("max_position_embeddings") or 4096),
                         tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True))
        _INFO[name] = info
        return info


_ENGINES: dict[tuple[str, str, str], Engine] = {}


def get_engine(name: str, device: str = "cpu", dtype: str | None = None) -> Engine:
    """The process-wide ``Engine`` of a registry model (weights loaded on first use only); ``dtype`` defaults to
    the settings' ``KVCALIB_WORKER_DTYPE`` (fp32)."""
    from kvcalib.calib.pipeline import Engine
    from kvcalib.settings import get_settings

    check_model_name(name)
    dtype = dtype or get_settings().worker_dtype
    key = (name, device, dtype)
    with _ENGINE_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            eng = _ENGINES[key] = Engine.load(name, device=device, dtype=dtype, cache_dir=_cache_dir())
        return eng
