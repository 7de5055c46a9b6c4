"""What kvcalib's attention path handles, checked at load: architectures it would run silently wrong are refused.

kvcalib replaces a model's attention with its own function (``calib.lm.attention``): plain scaled-dot-product
attention over every cached position, with grouped-query heads. It is exact for decoders whose attention is just
that — the Llama, Mistral (without a sliding window), Qwen2/2.5 and Qwen3 families — and wrong for others:

* a *sliding window* (Mistral with ``sliding_window``, Gemma2/3, Qwen2 with ``use_sliding_window``): each query must
  only see the last W keys, kvcalib's path sees them all;
* *attention logit softcapping* (Gemma2): ``tanh`` capping of the logits, which SDPA does not apply;
* *fused q/k/v projections* (Phi3 ``qkv_proj``): the capture hooks read the pre-RoPE keys from ``k_proj``.

``check_config`` runs on the ``config.json`` alone (before any weight is read); ``check_modules`` on the built model.
Both raise ``UnsupportedModelError`` (a ``KvcalibError``: CLI exit 2, HTTP 4xx) naming the model and the reason.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcalib.calib.errors import KvcalibError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")  # model_type values whose attention kvcalib reproduces

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}
DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class UnsupportedModelError(KvcalibError):
    """Raised for a model whose attention kvcalib's path would not reproduce (refused, never run wrong)."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or the torch names, or a ``torch.dtype``) → the torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise KvcalibError(f"unsupported dtype {dtype}: expected one of fp32, bf16, fp16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise KvcalibError(f"unknown dtype {dtype!r}: expected one of fp32, bf16, fp16")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def check_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and refuse one this machine does not have (a clear error, not a CUDA traceback later)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise KvcalibError(f"unknown device {device!r}: expected cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise KvcalibError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise KvcalibError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise KvcalibError(f"unsupported device {device!r}: expected cpu, cuda or cuda:N")
    return dev


def _sliding_window(cfg: Any) -> int | None:
    layer_types = getattr(cfg, "layer_types", None)
    if layer_types:  # transformers 5 spells the per-layer attention kind out; it is what the model runs
        if any(t != "full_attention" for t in layer_types):
            return getattr(cfg, "sliding_window", None) or -1
        return None
    window = getattr(cfg, "sliding_window", None)
    if window is None or getattr(cfg, "use_sliding_window", True) is False:
        return None
    return int(window)


def check_config(cfg: Any, name: str) -> None:
    """Refuse, from its config alone, attention features kvcalib's path would compute wrong."""
    mtype = getattr(cfg, "model_type", None)
    window = _sliding_window(cfg)
    if window is not None:
        raise UnsupportedModelError(
            f"model {name!r} ({mtype}) uses sliding-window attention (window {window}); kvcalib's attention path "
            "attends to every cached position and would differ from the model — not supported (for a Mistral "
            "checkpoint whose window exceeds your contexts, set \"sliding_window\": null in its config.json)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None) is not None:
            raise UnsupportedModelError(
                f"model {name!r} ({mtype}) uses logit softcapping ({key}={getattr(cfg, key)}), which kvcalib's "
                "attention path does not apply — not supported")


def check_modules(model: torch.nn.Module, name: str) -> None:
    """Refuse a model whose attention modules lack the separate projections the capture hooks read."""
    try:
        layers = model.get_decoder().layers
    except AttributeError as e:
        raise UnsupportedModelError(f"model {name!r} has no decoder layer stack kvcalib can hook") from e
    attn = getattr(layers[0], "self_attn", None) if len(layers) else None
    if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj")):
        fused = [n for n in ("qkv_proj", "query_key_value", "c_attn", "Wqkv") if attn is not None and hasattr(attn, n)]
        what = f"fused q/k/v projection ({fused[0]})" if fused else "no separate q/k/v projections"
        raise UnsupportedModelError(
            f"model {name!r} has a {what}; kvcalib's capture reads pre-RoPE keys from k_proj — not supported")


def check_architecture(cfg: Any, name: str) -> None:
    """All checks, before any weight is read: the config, then the module layout of a weightless (``meta``)
    skeleton built from the config, then the family allow-list."""
    from transformers import AutoModelForCausalLM

    check_config(cfg, name)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"model {name!r}: transformers cannot build a causal LM from its config ({e})") \
            from e
    check_modules(skeleton, name)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"model {name!r} has architecture {mtype!r}; kvcalib's attention path is checked for "
            f"{', '.join(SUPPORTED_TYPES)} only")
