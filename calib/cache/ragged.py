"""A KV cache whose every (layer, kv head) may hold a different number of positions.

Layout (the design choice, documented in the README under "Ragged cache"):

* Per layer ``l`` the cache holds ``K_l, V_l`` of shape ``(B, H_kv, L_l, d)`` where
  ``L_l = max_h n_{l,h} + t`` (``n_{l,h}`` kept prefill positions of head ``h``, ``t`` tokens appended since).
  Head ``h`` stores its kept entries left-aligned in original order; the ``L_l - n_{l,h} - t`` slots between
  its kept prefix and the appended tokens are padding, masked out by ``valid_l`` of shape ``(B, H_kv, L_l)``.
* Padding is therefore bounded per layer by ``sum_h (max_h n_{l,h} - n_{l,h})`` entries: the imbalance between
  the heads of one layer, never more. Layers are independent tensors, so layer budgets free memory exactly.
* ``nbytes`` reports the K/V storage actually held (kept + padding); ``kept_bytes`` and ``padding_bytes`` split
  it; the boolean validity masks (1 byte a slot) are reported apart as ``mask_bytes``.
* Appended tokens (question, generated) go to the end of every head of every layer. Attention is order-free once
  RoPE is applied, so the original ``position_ids`` are passed to the model and nothing is re-fed.

A batch dimension ``B`` lets one prefill be evaluated under several keep masks at once (calibration curves): every
batch row shares the same full keys but has its own validity mask (``RaggedKVCache.masked``).

Packed probes (calibration): setting ``segments`` (a (q,) tensor of segment ids) before a forward of ``q`` tokens
makes those tokens attend to every valid cached slot plus, causally, only to the new tokens of their own segment
(block-diagonal; the caller gives each segment positions ``next_position..``, see ``segment_offsets``). Such a
forward reads the cache without extending it (``calib.attention.packed_attention``). ``snapshot`` / ``restore``
put a cache back as it was (e.g. after feeding probes one at a time through ``append``).

On CUDA the packed per-head layout of ``kvcalib.kernels.ragged`` (offsets, no padding) serves decode attention.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def segment_offsets(segments: torch.Tensor) -> torch.Tensor:
    """Index of every token within its segment, for contiguous segment ids (q,): [0,0,1,1,1] -> [0,1,0,1,2]."""
    q = segments.numel()
    idx = torch.arange(q, device=segments.device)
    start = torch.ones(q, dtype=torch.bool, device=segments.device)
    if q > 1:
        start[1:] = segments[1:] != segments[:-1]
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    return idx - first


@dataclass
class LayerKV:
    keys: torch.Tensor  # (B, Hkv, L, d) post-RoPE
    values: torch.Tensor  # (B, Hkv, L, d)
    valid: torch.Tensor | None  # (B, Hkv, L) bool, None = every slot valid
    positions: torch.Tensor | None = None  # (B, Hkv, L) original position of each slot (-1 = padding)


@dataclass
class RaggedKVCache:
    layers: list[LayerKV]
    next_position: int  # the position id the next appended token gets
    record_queries: int = 0  # keep the last `record_queries` query vectors per layer (MorphKV, lookahead)
    recent_queries: list[torch.Tensor | None] = field(default_factory=list)  # per layer (B, Hq, R, d)
    segments: torch.Tensor | None = None  # (q,) segment id of each token of the next forward (packed probes)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_full(cls, keys: torch.Tensor, values: torch.Tensor, batch: int = 1) -> RaggedKVCache:
        """A cache holding every position. ``keys``/``values``: (L, Hkv, N, d)."""
        n_layers, hkv, n, _ = keys.shape
        pos = torch.arange(n, device=keys.device).expand(batch, hkv, n)
        layers = [
            LayerKV(keys[l].unsqueeze(0).expand(batch, -1, -1, -1), values[l].unsqueeze(0).expand(batch, -1, -1, -1),
                    None, pos)
            for l in range(n_layers)
        ]
        return cls(layers=layers, next_position=n)

    @classmethod
    def from_mask(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> RaggedKVCache:
        """Physically compress: keep ``keep`` (L, Hkv, N) or (B, L, Hkv, N) positions of (L, Hkv, N, d) tensors."""
        if keep.dim() == 3:
            keep = keep.unsqueeze(0)
        b, n_layers, hkv, n = keep.shape
        if keys.shape[:3] != (n_layers, hkv, n):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match keys {tuple(keys.shape)}")
        layers = []
        for l in range(n_layers):
            m = keep[:, l]  # (B, Hkv, N)
            counts = m.sum(-1)  # (B, Hkv)
            width = int(counts.max().item())
            # kept positions first, in original order (stable sort of ~mask)
            order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices[..., :width]  # (B, Hkv, W)
            valid = torch.arange(width, device=keys.device) < counts.unsqueeze(-1)  # (B, Hkv, W)
            idx = order.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1])  # (B, Hkv, W, d)
            k = torch.gather(keys[l].unsqueeze(0).expand(b, -1, -1, -1), 2, idx)
            v = torch.gather(values[l].unsqueeze(0).expand(b, -1, -1, -1), 2, idx)
            pos = torch.where(valid, order, torch.full_like(order, -1))
            all_valid = bool(valid.all())
            if not all_valid:  # zero the padding so it can never leak even if a mask were dropped
                k = k * valid.unsqueeze(-1)
                v = v * valid.unsqueeze(-1)
            layers.append(LayerKV(k.contiguous(), v.contiguous(), None if all_valid else valid, pos))
        return cls(layers=layers, next_position=n)

    @classmethod
    def masked(cls, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> RaggedKVCache:
        """A B-row cache over shared full ``keys``/``values`` (L, Hkv, N, d): row b sees only the positions of
        ``keep[b]`` ((B, L, Hkv, N) bool, or (L, Hkv, N) for one row). No K/V is copied (expanded views); attention
        results equal those of ``from_mask`` on the same masks (masked slots get zero weight)."""
        if keep.dim() == 3:
            keep = keep.unsqueeze(0)
        b, n_layers, hkv, n = keep.shape
        if keys.shape[:3] != (n_layers, hkv, n) or values.shape[:3] != (n_layers, hkv, n):
            raise ValueError(f"keep mask {tuple(keep.shape)} does not match keys {tuple(keys.shape)}")
        keep = keep.to(device=keys.device, dtype=torch.bool)
        pos = torch.arange(n, device=keys.device).expand(b, hkv, n)
        layers = []
        for l in range(n_layers):
            m = keep[:, l]  # (B, Hkv, N)
            valid = None if bool(m.all()) else m
            layers.append(LayerKV(keys[l].unsqueeze(0).expand(b, -1, -1, -1),
                                  values[l].unsqueeze(0).expand(b, -1, -1, -1), valid,
                                  pos if valid is None else torch.where(m, pos, torch.full_like(pos, -1))))
        return cls(layers=layers, next_position=n)

    def snapshot(self) -> tuple:
        """The cache's current state (layers are replaced, never mutated, by ``append``: this is cheap)."""
        return (list(self.layers), self.next_position, list(self.recent_queries), self.segments)

    def restore(self, state: tuple) -> None:
        """Put back a ``snapshot`` (e.g. drop the probe tokens appended by a calibration forward)."""
        layers, self.next_position, recent, self.segments = state
        self.layers = list(layers)
        self.recent_queries = list(recent)

    # ------------------------------------------------------------------ inspection
    @property
    def batch_size(self) -> int:
        return self.layers[0].keys.shape[0]

    def kept_counts(self) -> torch.Tensor:
        """(B, L, Hkv) number of valid entries per layer and head."""
        out = []
        for layer in self.layers:
            b, h, n, _ = layer.keys.shape
            out.append(layer.valid.sum(-1) if layer.valid is not None else torch.full((b, h), n))
        return torch.stack(out, 1)

    def _elem(self) -> int:
        return self.layers[0].keys.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage held (kept entries + padding), counting expanded views once per batch row."""
        return sum(2 * layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2] * layer.keys.shape[3]
                   for layer in self.layers) * self._elem()

    @property
    def kept_bytes(self) -> int:
        d = self.layers[0].keys.shape[-1]
        return int(self.kept_counts().sum().item()) * 2 * d * self._elem()

    @property
    def padding_bytes(self) -> int:
        return self.nbytes - self.kept_bytes

    @property
    def mask_bytes(self) -> int:
        return sum(layer.valid.numel() for layer in self.layers if layer.valid is not None)

    def report(self) -> dict:
        counts = self.kept_counts()[0]
        return {
            "kept_per_layer": counts.sum(-1).tolist(),
            "kept_per_head": counts.tolist(),
            "bytes_held": self.nbytes // self.batch_size,
            "kept_bytes": self.kept_bytes // self.batch_size,
            "padding_bytes": self.padding_bytes // self.batch_size,
            "mask_bytes": self.mask_bytes // self.batch_size,
        }

    # ------------------------------------------------------------------ growth
    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append ``q`` new tokens (B, Hkv, q, d) to every head of a layer; returns (K, V, valid) to attend to."""
        layer = self.layers[layer_idx]
        b = max(layer.keys.shape[0], k.shape[0])
        if k.shape[0] != b:
            k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        keys = torch.cat([layer.keys.expand(b, -1, -1, -1), k], dim=2)
        values = torch.cat([layer.values.expand(b, -1, -1, -1), v], dim=2)
        q_len = k.shape[2]
        valid = layer.valid
        if valid is not None:
            valid = torch.cat([valid, valid.new_ones(valid.shape[0], valid.shape[1], q_len)], dim=-1)
        new_pos = torch.arange(self.next_position, self.next_position + q_len, device=k.device)
        positions = None
        if layer.positions is not None:
            positions = torch.cat([layer.positions.expand(b, -1, -1),
                                   new_pos.expand(b, layer.positions.shape[1], q_len)], dim=-1)
        self.layers[layer_idx] = LayerKV(keys, values, valid, positions)
        if layer_idx == len(self.layers) - 1:
            self.next_position += q_len
        return keys, values, valid

    def remember_queries(self, layer_idx: int, q: torch.Tensor) -> None:
        """Keep the last ``record_queries`` post-RoPE queries (B, Hq, q, d) of a layer."""
        if not self.record_queries:
            return
        while len(self.recent_queries) < len(self.layers):
            self.recent_queries.append(None)
        prev = self.recent_queries[layer_idx]
        cur = q if prev is None else torch.cat([prev, q], dim=2)
        self.recent_queries[layer_idx] = cur[:, :, -self.record_queries:]

    def keep_slots(self, layer_idx: int, slots: torch.Tensor) -> None:
        """Shrink a layer to the given slot indices (B, Hkv, S) per head (used by decode-time eviction)."""
        layer = self.layers[layer_idx]
        d = layer.keys.shape[-1]
        idx = slots.unsqueeze(-1).expand(-1, -1, -1, d)
        keys = torch.gather(layer.keys, 2, idx)
        values = torch.gather(layer.values, 2, idx)
        valid = None if layer.valid is None else torch.gather(layer.valid, 2, slots)
        if valid is not None and bool(valid.all()):
            valid = None
        positions = None if layer.positions is None else torch.gather(layer.positions, 2, slots)
        self.layers[layer_idx] = LayerKV(keys.contiguous(), values.contiguous(), valid, positions)
