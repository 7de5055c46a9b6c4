"""SnapKV — Li et al., NeurIPS 2024, "SnapKV: LLM Knows What You are Looking for Before Generation".

Score of prefix position i: s_i = Σ_{t ∈ window} A[t, i], A = softmax(Q_win Kᵀ / √d) with a causal mask inside
the window, smoothed by 1-D pooling (max k=7 in the reference LongBench configs, or avg k=5), reduced over the
query heads that share a kv head; the w window positions are always kept (their score is +inf).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import WindowScorer, window_attention


@dataclass
class SnapKV(WindowScorer):
    name: ClassVar[str] = "snapkv"

    def per_query_head(self, cap: Capture, w: int) -> torch.Tensor:
        return window_attention(cap, w)  # (L, Hq, N)
