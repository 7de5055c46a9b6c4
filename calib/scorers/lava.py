"""LAVa — Shen et al., Findings of EMNLP 2025, "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget
Allocation" (the score; the allocator is ``budget.lava``).

s_{l,h}[i] = (max_k ‖V_{l,h}[k]‖₁ / w) · Σ_{t ∈ window} A_{l,h}[t, i], A = softmax(Q_win Kᵀ/√d) causal inside the
window; the value factor is taken per kv head over all N positions and applied to each query head of its group;
max-pooled with k = 7 over the prefix, GQA: max over the group; the w = 32 window positions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer, gqa_reduce, pool_prefix, protect


@dataclass
class LAVa(Scorer):
    name: ClassVar[str] = "lava"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "max"

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        w = min(self.window, cap.num_tokens)
        a = kernels.window_attention_stats(cap.window_queries(w), cap.keys, stats=("attn",))["attn"]  # (L, Hq, N)
        vmax = cap.values.float().abs().sum(-1).amax(-1)  # (L, Hkv) max_k ‖V[k]‖₁
        s = a * (vmax / w).repeat_interleave(cap.group_size, dim=1)[..., None]
        s = pool_prefix(s, w, self.kernel, self.pooling)
        return protect(gqa_reduce(s, cap.group_size, self.gqa), last=w)  # (L, Hkv, N)
