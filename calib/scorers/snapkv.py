"""SnapKV — Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation".

Score of prefix position i: s_i = Σ_{t ∈ window} A[t, i], A = softmax(Q_win Kᵀ / √d) with a causal mask inside
the window, smoothed by 1-D pooling (max k=7 in the reference LongBench configs, or avg k=5), reduced over the
query heads that share a kv head; the w window positions are always kept (their score is +inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer, gqa_reduce, pool_prefix, protect


@dataclass
class SnapKV(Scorer):
    name: ClassVar[str] = "snapkv"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        w = min(self.window, cap.num_tokens)
        a = kernels.window_attention_stats(cap.window_queries(w), cap.keys, stats=("attn",))["attn"]  # (L, Hq, N)
        s = gqa_reduce(pool_prefix(a, w, self.kernel, self.pooling), cap.group_size, self.gqa)  # (L, Hkv, N)
        return protect(s, last=w)
