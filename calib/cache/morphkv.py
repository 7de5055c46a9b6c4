"""MorphKV — Ghadia et al., ICML 2025, "Dialogue Without Limits: Constant-Sized KV Caches for Extended Responses
in LLMs": a generation-time policy that keeps every head's cache at a constant size C + 1.

After each decode step (or every ``interval`` steps), in every layer whose heads hold more than C + 1 valid
entries: the R + 1 most recent entries of a head (largest original positions, ``LayerKV.positions``) are kept;
the other, *distant* entries are ranked by the attention of the last R generated tokens' queries
(``cache.recent_queries``; the policy sets ``cache.record_queries`` ≥ R): logits z = q·kᵀ/√d are summed over the
query heads of a GQA group before the softmax, each query's row is softmaxed over the distant keys only, and the
rows are fused by sum (default) or max; the top C − R distant entries are kept, so the head holds C + 1 entries.
Kept entries stay in their original order (``cache.keep_slots``). Heads that hold ≤ C + 1 entries are untouched.

Published settings: LongBench R = 32, C = 2000 (sum) — the defaults here; LongWriter R = 30, C = 600;
LongGenBench R = 200, C = 4000 (max). ``report()`` gives the cache size (entries per head, bytes) after every step.

Concurrency: every per-step state lives in the cache of the generation (recent queries, kept slots); the instance
holds only its settings and the ``history`` of the generation it serves, so use one instance per generation
(``get_policy`` builds a fresh one); concurrent generations on one model are safe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.errors import KvcalibError

FUSES = ("sum", "max")


@dataclass
class MorphKV:
    budget: int = 2000  # C
    recent: int = 32  # R
    fuse: str = "sum"
    interval: int = 1
    scale: float | None = None  # attention scale, 1/√d unless given
    history: list[dict] = field(default_factory=list, repr=False)

    def __post_init__(self):
        if self.recent < 1:
            raise KvcalibError(f"MorphKV recent window must be >= 1, got {self.recent}")
        if self.budget <= self.recent:
            raise KvcalibError(f"MorphKV budget C={self.budget} must exceed the recent window R={self.recent}")
        if self.fuse not in FUSES:
            raise KvcalibError(f"unknown MorphKV fuse {self.fuse!r}: expected one of {list(FUSES)}")
        if self.interval < 1:
            raise KvcalibError(f"MorphKV interval must be >= 1, got {self.interval}")

    # ------------------------------------------------------------------ DecodePolicy
    def seed(self, cache: RaggedKVCache, queries: torch.Tensor) -> None:
        """Seed the cache's recent queries with the last R prompt queries ``queries`` (L, Hq, Nq, d), e.g. a
        capture's ``queries``, as the reference seeds its observation window with the last prompt queries: without
        it the first eviction only sees the queries of the (possibly shorter than R) question. Call before
        ``greedy_decode``; ``begin`` keeps them."""
        cache.record_queries = max(cache.record_queries, self.recent)
        for l in range(queries.shape[0]):
            cache.remember_queries(l, queries[l, :, -self.recent:].unsqueeze(0))  # (1, Hq, ≤R, d)

    def begin(self, cache: RaggedKVCache) -> None:
        cache.record_queries = max(cache.record_queries, self.recent)
        self.history.clear()
        self._log(cache, -1, evicted=False)

    def after_step(self, cache: RaggedKVCache, step: int) -> None:
        cache.record_queries = max(cache.record_queries, self.recent)
        evicted = False
        if (step + 1) % self.interval == 0:
            for l in range(len(cache.layers)):
                evicted |= self.evict_layer(cache, l)
        self._log(cache, step, evicted)

    # ------------------------------------------------------------------ eviction
    def distant_scores(self, cache: RaggedKVCache, layer_idx: int, distant: torch.Tensor) -> torch.Tensor:
        """Fused attention (B, Hkv, L) of the last R queries over each head's ``distant`` slots (0 elsewhere)."""
        layer = cache.layers[layer_idx]
        b, hkv, width, d = layer.keys.shape
        q = cache.recent_queries[layer_idx][:, :, -self.recent:].float()  # (Bq, Hq, r, d)
        g, r = q.shape[1] // hkv, q.shape[2]
        q = q.expand(b, -1, -1, -1).reshape(b, hkv, g * r, d)
        scale = d**-0.5 if self.scale is None else self.scale
        z = (q @ layer.keys.float().transpose(-1, -2)).view(b, hkv, g, r, width).sum(2) * scale  # group-summed logits
        a = torch.softmax(z.masked_fill(~distant[:, :, None], float("-inf")), dim=-1).nan_to_num_(0.0)
        return a.sum(2) if self.fuse == "sum" else a.amax(2)

    def evict_layer(self, cache: RaggedKVCache, layer_idx: int) -> bool:
        """Shrink every head of a layer holding more than C + 1 entries to C + 1. Returns whether it shrank."""
        layer = cache.layers[layer_idx]
        b, hkv, width, _ = layer.keys.shape
        cap = self.budget + 1
        if width <= cap:
            return False
        dev = layer.keys.device
        valid = layer.valid
        keep = width
        if valid is not None:
            keep = int(valid.sum(-1).max())
            if keep <= cap:
                return False
        if not cache.recent_queries or cache.recent_queries[layer_idx] is None:
            raise KvcalibError("MorphKV needs the recent queries: the cache must record them (policy.begin)")
        pos = layer.positions if layer.positions is not None else torch.arange(width, device=dev).expand(b, hkv, width)
        if valid is not None:
            pos = pos.masked_fill(~valid, -1)
        recent = torch.zeros(b, hkv, width, dtype=torch.bool, device=dev)
        recent.scatter_(-1, pos.topk(min(self.recent + 1, width), dim=-1).indices, True)  # largest positions
        if valid is not None:
            recent &= valid
        distant = ~recent if valid is None else valid & ~recent
        prio = self.distant_scores(cache, layer_idx, distant).masked_fill_(recent, float("inf"))
        if valid is not None:
            prio.masked_fill_(~valid, float("-inf"))
        keep = min(keep, cap)  # heads with fewer entries keep them all (+ padding slots)
        slots = prio.topk(keep, dim=-1).indices.sort(dim=-1).values  # (B, Hkv, keep) original order
        cache.keep_slots(layer_idx, slots)
        return True

    # ------------------------------------------------------------------ reporting
    def _log(self, cache: RaggedKVCache, step: int, evicted: bool) -> None:
        counts = cache.kept_counts()  # (B, L, Hkv)
        self.history.append({"step": step, "max_entries_per_head": int(counts.max()),
                             "mean_entries_per_head": round(float(counts.float().mean()), 2),
                             "bytes": cache.nbytes // cache.batch_size, "evicted": evicted})

    def report(self) -> dict:
        """Cache size over time: per logged step (−1 = before the prompt is fed) entries per head and bytes."""
        return {
            "policy": "morphkv",
            "budget": self.budget,
            "recent": self.recent,
            "fuse": self.fuse,
            "interval": self.interval,
            "steps": [h["step"] for h in self.history],
            "max_entries_per_head": [h["max_entries_per_head"] for h in self.history],
            "mean_entries_per_head": [h["mean_entries_per_head"] for h in self.history],
            "bytes": [h["bytes"] for h in self.history],
            "peak_bytes": max((h["bytes"] for h in self.history), default=0),
            "evictions": sum(h["evicted"] for h in self.history),
        }
