"""What an inference server needs beside a ratio (issue 17, item 4, engine side): the model's shape and a compact
encoding of the kept positions of every (layer, kv head).

``encode_kept_positions(keep)`` turns a (L, Hkv, N) keep mask into per-(layer, head) run-length ranges
``[[start, end), ...]`` — compact because kept positions cluster (sinks, the window, key spans) — and
``decode_kept_positions`` inverts it exactly. With the ``per_layer`` allocator (``calib.budget``) every head of a
layer holds the same ranges, and ``layers_only=True`` sends one list per layer (what a paged engine evicts by).

``token_ids_hash(model_name, ids)`` names the exact token ids a budget was measured on (what a server prefills):
SHA-256 over the model name's UTF-8 bytes, one NUL byte, then the ids as int32 little-endian. ``TokenIdsEngine``
runs the engine's pipeline (``calibrate.featurize`` / ``predict``) on exactly such ids instead of kvcalib's prompt
layout of a text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvcalib.calib.data.documents import Prompt
from kvcalib.calib.pipeline import Engine

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
    dtype = next(model.parameters()).dtype
    return shape_from_config(model.config.to_dict(), _DTYPES.get(dtype, str(dtype)))


def shape_from_config(config: Mapping[str, Any], dtype: str) -> ModelShape:
    """The ``ModelShape`` of a model from its ``config.json`` (a mapping) and the dtype it is loaded in: what a
    service answers without loading the weights."""
    hq = int(config["num_attention_heads"])
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // hq
    return ModelShape(layers=int(config["num_hidden_layers"]), kv_heads=int(config.get("num_key_value_heads") or hq),
                      query_heads=hq, head_dim=int(head_dim), dtype=str(dtype),
                      model_type=str(config.get("model_type") or ""))


MAX_TOKEN_ID = 2**31 - 1  # ids are hashed as int32


def token_ids_hash(model_name: str, ids: Iterable[int] | torch.Tensor) -> str:
    """SHA-256 (hex) naming the exact token ids a budget is measured on: over ``model_name`` (UTF-8), one NUL byte,
    then every id as a little-endian int32. A server computes it over the ids it prefills (``GET /budget?ids_hash=``).
    Ids must lie in [0, 2^31 - 1]."""
    values = ids.flatten().tolist() if isinstance(ids, torch.Tensor) else list(ids)
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOKEN_ID:
            raise ValueError(f"token id {i} is {v!r}: ids must be integers in [0, 2^31 - 1]")
    h = hashlib.sha256(model_name.encode("utf-8"))
    h.update(b"\x00")
    h.update(struct.pack(f"<{len(values)}i", *values))
    return h.hexdigest()


class TokenIdsEngine(Engine):
    """An ``Engine`` whose prompt of every non-empty document is ``context_ids``: ``calibrate.featurize`` /
    ``predict`` / ``calibrate`` then prefill exactly those ids (a server's own prefill, e.g. its chat template)
    instead of kvcalib's layout of the text. ``prompt("", q)`` stays kvcalib's layout, so ``calibrate.context_ids``
    still finds where the document starts when the ids begin with kvcalib's chat header (else at 0). Pass the text
    of the ids (``document_text``) as the document: the text features read it."""

    def __init__(self, engine: Engine, context_ids: Iterable[int] | torch.Tensor):
        super().__init__(engine.lm)
        self.context_ids = torch.as_tensor(list(context_ids) if not isinstance(context_ids, torch.Tensor)
                                           else context_ids, dtype=torch.long).flatten()
        if self.context_ids.numel() == 0:
            raise ValueError("no token ids")

    def prompt(self, context: str, question: str) -> Prompt:
        base = super().prompt("", question)
        if not context:
            return base
        return Prompt(context_ids=self.context_ids.clone(), question_ids=base.question_ids)

    def document_start(self) -> int:
        """Where the document starts in the ids: after kvcalib's chat header when they begin with it, else 0."""
        head = super().prompt("", "").context_ids
        n = int(head.numel())
        return n if torch.equal(self.context_ids[:n], head) else 0  # as calibrate.context_ids

    def document_text(self) -> str:
        """The text of the ids after ``document_start`` (for the text features)."""
        return self.tokenizer.decode(self.context_ids[self.document_start():])


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
