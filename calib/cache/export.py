"""Serialise a compressed KV cache to safetensors and load it back (``POST /calibrate`` mode ``compress``).

File layout (format ``kvcalib-compressed-kv/1``), for every layer ``l`` of the model:

* ``layer.{l}.keys``, ``layer.{l}.values`` — ``(H_kv, W_l, d)`` post-RoPE keys and values; head ``h`` holds its
  ``n_{l,h}`` kept entries left-aligned in original order, the remaining ``W_l − n_{l,h}`` slots are zero padding
  (``W_l = max_h n_{l,h}``, the ragged layout of ``calib.cache``);
* ``layer.{l}.positions`` — ``(H_kv, W_l)`` int32 original position of every slot, ``-1`` for padding;

plus ``input_ids`` ``(N,)`` (the context tokens that were prefilled) and string metadata: model, model revision,
dtype, context tokens, next position, ratio, method, allocator, document hash, …

Keys are stored *after* RoPE at their original positions, so a consumer appends new tokens at position
``next_position`` (= N), not at the number of kept entries. ``CompressedKV.to_ragged_cache()`` rebuilds kvcalib's
``RaggedKVCache`` (exact per-head budgets); ``kvcalib.client.to_dynamic_cache`` builds a transformers
``DynamicCache``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcalib.calib.cache.ragged import LayerKV, RaggedKVCache
from kvcalib.calib.errors import KvcalibError

FORMAT = "kvcalib-compressed-kv/1"
MEDIA_TYPE = "application/vnd.kvcalib.safetensors"


class ExportFormatError(KvcalibError):
    pass


@dataclass
class CompressedLayer:
    keys: torch.Tensor  # (Hkv, W, d)
    values: torch.Tensor  # (Hkv, W, d)
    positions: torch.Tensor  # (Hkv, W) int, -1 = padding

    @property
    def valid(self) -> torch.Tensor:
        return self.positions >= 0

    @property
    def counts(self) -> list[int]:
        return self.valid.sum(-1).tolist()


@dataclass
class CompressedKV:
    layers: list[CompressedLayer]
    input_ids: torch.Tensor  # (N,)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def context_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def next_position(self) -> int:
        return int(self.metadata.get("next_position", self.context_tokens))

    @property
    def head_budgets(self) -> list[list[int]]:
        """(L, Hkv) kept positions per head."""
        return [layer.counts for layer in self.layers]

    @property
    def layer_budgets(self) -> list[int]:
        return [sum(c) for c in self.head_budgets]

    @property
    def ratio(self) -> float:
        kept = sum(self.layer_budgets)
        total = len(self.layers) * self.layers[0].keys.shape[0] * self.context_tokens
        return 1.0 - kept / total if total else 0.0

    def kept_positions(self, layer: int, head: int) -> list[int]:
        p = self.layers[layer].positions[head]
        return p[p >= 0].tolist()

    def to_ragged_cache(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> RaggedKVCache:
        """kvcalib's ragged cache (batch 1), ready for ``Engine.answer`` / ``generate.greedy_decode``."""
        out = []
        for layer in self.layers:
            k = layer.keys.to(device=device, dtype=dtype or layer.keys.dtype).unsqueeze(0)
            v = layer.values.to(device=device, dtype=dtype or layer.values.dtype).unsqueeze(0)
            pos = layer.positions.to(device=device, dtype=torch.long).unsqueeze(0)
            valid = pos >= 0
            out.append(LayerKV(k, v, None if bool(valid.all()) else valid, pos))
        return RaggedKVCache(layers=out, next_position=self.next_position)


def cache_to_safetensors(cache: RaggedKVCache, input_ids: torch.Tensor, metadata: dict | None = None) -> bytes:
    """Bytes of a safetensors file holding batch row 0 of ``cache`` (see the module doc for the layout)."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {"input_ids": input_ids.detach().to("cpu", torch.long).contiguous()}
    for l, layer in enumerate(cache.layers):
        k, v = layer.keys[0], layer.values[0]  # (Hkv, W, d)
        if layer.positions is not None:
            pos = layer.positions[0].to(torch.int32)
        else:
            pos = torch.arange(k.shape[1], dtype=torch.int32).expand(k.shape[0], -1)
        if layer.valid is not None:
            pos = torch.where(layer.valid[0], pos, torch.full_like(pos, -1))
        tensors[f"layer.{l}.keys"] = k.detach().cpu().contiguous()
        tensors[f"layer.{l}.values"] = v.detach().cpu().contiguous()
        tensors[f"layer.{l}.positions"] = pos.detach().cpu().contiguous()
    meta = {"format": FORMAT, "num_layers": str(len(cache.layers)), "next_position": str(cache.next_position),
            "context_tokens": str(int(input_ids.shape[0])), "dtype": str(cache.layers[0].keys.dtype)}
    meta.update({str(k): str(v) for k, v in (metadata or {}).items() if v is not None})
    return save(tensors, metadata=meta)


def load_compressed(data: bytes | str | Path) -> CompressedKV:
    """Load a compressed cache from safetensors bytes (an HTTP response body) or a file path."""
    from safetensors import safe_open
    from safetensors.torch import load

    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            tensors = load(bytes(data))
            meta = _metadata_of_bytes(bytes(data))
        else:
            with safe_open(str(data), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types
        raise ExportFormatError(f"not a safetensors file: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise ExportFormatError(f"unsupported format {meta.get('format')!r}: expected {FORMAT!r}")
    n_layers = int(meta["num_layers"])
    layers = [CompressedLayer(tensors[f"layer.{l}.keys"], tensors[f"layer.{l}.values"],
                              tensors[f"layer.{l}.positions"]) for l in range(n_layers)]
    return CompressedKV(layers=layers, input_ids=tensors["input_ids"], metadata=dict(meta))


def _metadata_of_bytes(data: bytes) -> dict[str, str]:
    import json
    import struct

    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}
