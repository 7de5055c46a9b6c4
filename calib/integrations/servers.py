"""What an inference server needs beside a ratio (issue 17, item 4, engine side): the model's shape and a compact
encoding of the kept positions of every (layer, kv head).

``encode_kept_positions(keep)`` turns a (L, Hkv, N) keep mask into per-(layer, head) run-length ranges
``[[start, end), ...]`` — compact because kept positions cluster (sinks, the window, key spans) — and
``decode_kept_positions`` inverts it exactly. With the ``per_layer`` allocator (``calib.budget``) every head of a
layer holds the same ranges, and ``layers_only=True`` sends one list per layer (what a paged engine evicts by).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class ModelShape:
    """What a server needs to lay out a budget: layers, kv / query heads, head dim and the cache dtype."""

    layers: int
    kv_heads: int
    query_heads: int
    head_dim: int
    dtype: str
    model_type: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def model_shape(model: torch.nn.Module) -> ModelShape:
    """The ``ModelShape`` of a transformers causal LM (from its config and parameter dtype)."""
    cfg = model.config
    hq = cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    return ModelShape(layers=cfg.num_hidden_layers, kv_heads=getattr(cfg, "num_key_value_heads", None) or hq,
                      query_heads=hq, head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // hq,
                      dtype=_DTYPES.get(dtype, str(dtype)), model_type=str(getattr(cfg, "model_type", "")))


def model_name(model: torch.nn.Module) -> str:
    """The registry name of a model loaded from kvcalib's converted folder (``.../models/<name>``), else the folder
    name of its ``name_or_path``."""
    return Path(str(getattr(model.config, "_name_or_path", "") or "model")).name


def _ranges(row: torch.Tensor) -> list[list[int]]:
    """[[start, end), ...] of the True runs of a (N,) bool row."""
    x = torch.cat([row.new_zeros(1), row.to(torch.int8), row.new_zeros(1).to(torch.int8)]).to(torch.int8)
    d = x[1:] - x[:-1]  # +1 at a run's start, −1 one past its end
    starts = (d == 1).nonzero().flatten().tolist()
    ends = (d == -1).nonzero().flatten().tolist()
    return [[s, e] for s, e in zip(starts, ends)]


def encode_kept_positions(keep: torch.Tensor, layers_only: bool = False) -> dict:
    """keep (L, Hkv, N) bool -> {"n": N, "layers": L, "kv_heads": Hkv, "ranges": [[[[s, e], ...] per head] per
    layer]} (``layers_only``: one range list per layer; refused unless every head of a layer keeps the same
    positions, as the ``per_layer`` allocator gives)."""
    keep = keep.to(torch.bool).cpu()
    n_layers, hkv, n = keep.shape
    if layers_only:
        if not bool((keep == keep[:, :1]).all()):
            raise ValueError("layers_only: the heads of a layer keep different positions (use allocator per_layer)")
        ranges = [_ranges(keep[l, 0]) for l in range(n_layers)]
    else:
        ranges = [[_ranges(keep[l, h]) for h in range(hkv)] for l in range(n_layers)]
    return {"n": n, "layers": n_layers, "kv_heads": hkv, "per_layer": layers_only, "ranges": ranges}


def decode_kept_positions(encoded: dict) -> torch.Tensor:
    """The (L, Hkv, N) bool keep mask of an ``encode_kept_positions`` result."""
    n, n_layers, hkv = int(encoded["n"]), int(encoded["layers"]), int(encoded["kv_heads"])
    keep = torch.zeros(n_layers, hkv, n, dtype=torch.bool)
    for l, layer in enumerate(encoded["ranges"]):
        heads = [layer] * hkv if encoded.get("per_layer") else layer
        for h, runs in enumerate(heads):
            for s, e in runs:
                keep[l, h, s:e] = True
    return keep
