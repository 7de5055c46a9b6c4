"""Per-process model access for the service: a cheap ``ModelInfo`` (tokenizer, revision, context length — what the
API needs to validate a document without loading weights) and the full ``Engine``, loaded once per process.

One ``Engine`` per (model, device, dtype) serves every thread of the process at once — API requests, embedded jobs,
a ``--pool threads`` worker: model calls keep their state per call (``calib.lm.hooks``), so they need no lock here.
Loading an engine holds its own lock, not the one of ``model_info``: validating a request never waits for weights.

Engine loaders take ``(name, dtype, device)`` (``EngineLoader``); ``dtype_aware`` adapts a loader that takes fewer
(a test's ``lambda name: engine``, a ``lambda name, dtype=None: …``) and ``load_at`` refuses a device this process
does not have (``device_problem``) and an engine whose dtype is not the one asked for."""

from __future__ import annotations

import inspect
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kvcalib.calib.errors import KvcalibError
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

    @property
    def dtype(self) -> str: ...


class LoadedModelSpec(Protocol):
    @property
    def spec(self) -> ModelRevision: ...


class ServiceEngine(Protocol):
    """What the service needs of ``kvcalib.calib.pipeline.Engine`` itself: the revision of its loaded model (jobs
    check it against the run's). The engine is otherwise handed to ``calibrate`` / ``predict`` / ``featurize``."""

    @property
    def lm(self) -> LoadedModelSpec: ...


DTYPES = ("fp32", "bf16", "fp16")


class EngineLoader(Protocol):
    """Registry model name (dtype, device; None: the loader's defaults, ``KVCALIB_WORKER_DTYPE`` and
    ``KVCALIB_WORKER_DEVICE``) → its process-wide engine."""

    def __call__(self, name: str, dtype: str | None = None, device: str | None = None) -> ServiceEngine: ...


def dtype_aware(loader: Callable[..., ServiceEngine]) -> EngineLoader:
    """``loader`` when it takes a dtype and a device; a loader without them (``lambda name: engine``,
    ``lambda name, dtype=None: …``) gets only the arguments it takes and otherwise serves its own engine (``load_at``
    then refuses a dtype it does not have)."""
    try:
        params = inspect.signature(loader).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins
        return loader  # type: ignore[return-value]
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return loader  # type: ignore[return-value]
    takes = {k for k in ("dtype", "device") if k in params}
    if takes == {"dtype", "device"}:
        return loader  # type: ignore[return-value]

    def load(name: str, dtype: str | None = None, device: str | None = None) -> ServiceEngine:
        given = {"dtype": dtype, "device": device}
        return loader(name, **{k: given[k] for k in takes})

    return load


def device_problem(device: str) -> str | None:
    """Why this process cannot run a model on ``device`` (cpu, cuda, cuda:N), or None when it can."""
    if device == "cpu":
        return None
    import torch

    if not device.startswith("cuda"):
        return f"unknown device {device!r}: expected cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        return (f"device {device!r} does not exist on this server: torch finds no CUDA device here "
                f"(CUDA build: {torch.version.cuda or 'none'})")
    n = torch.cuda.device_count()
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= n:
        return (f"device {device!r} does not exist on this server: it has {n} CUDA device(s), "
                f"cuda:0 to cuda:{n - 1}")
    return None


def load_at(loader: EngineLoader, name: str, dtype: str | None, device: str | None = None) -> ServiceEngine:
    """The engine of ``name`` in ``dtype`` on ``device`` (None: the loader's defaults); a device this process does
    not have is an input error (``KvcalibError``), an engine in another dtype is refused."""
    if device is None:
        engine = loader(name, dtype=dtype)
    else:
        problem = device_problem(device)
        if problem is not None:
            raise KvcalibError(problem)
        engine = loader(name, dtype=dtype, device=device)
    got = getattr(getattr(getattr(engine, "lm", None), "spec", None), "dtype", None)
    if dtype is not None and got is not None and got != dtype:
        raise KvcalibError(f"model {name!r} is loaded in {got} in this process, not {dtype}")
    return engine


@dataclass
class ModelInfo:
    name: str
    revision: str
    max_positions: int
    tokenizer: Tokenizer
    config: dict[str, Any] = field(default_factory=dict)  # the model's config.json

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    @property
    def vocab_size(self) -> int:
        """Token ids the model embeds: [0, vocab_size)."""
        n = self.config.get("vocab_size")
        return int(n) if n else len(self.tokenizer)  # type: ignore[arg-type]


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
                         tokenizer=AutoTokenizer.from_pretrained(folder, local_files_only=True), config=cfg)
        _INFO[name] = info
        return info


_CONFIGS: dict[str, dict[str, Any]] = {}


def model_config(name: str) -> dict[str, Any]:
    """The ``config.json`` of a registry model (read once per process; no tokenizer, no weights)."""
    check_model_name(name)
    with _LOCK:
        cfg = _CONFIGS.get(name)
        if cfg is None:
            info = _INFO.get(name)
            if info is not None and info.config:
                cfg = info.config
            else:
                from kvcalib.calib.lm.registry import resolve_model_dir

                _, folder = resolve_model_dir(name, _cache_dir())
                cfg = json.loads((folder / "config.json").read_text())
            _CONFIGS[name] = cfg
        return cfg


_ENGINES: dict[tuple[str, str, str], Engine] = {}


def get_engine(name: str, device: str = "cpu", dtype: str | None = None) -> Engine:
    """The process-wide ``Engine`` of a registry model in ``dtype`` (weights loaded on first use only, one engine
    per (model, device, dtype)); ``dtype`` defaults to the settings' ``KVCALIB_WORKER_DTYPE`` (fp32)."""
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
