"""LAVa — Shen et al., Findings of EMNLP 2025, "LAVa: Layer-wise KV Cache Eviction with Dynamic Budget
Allocation" (the score; the allocator is ``budget.lava``).

s_{l,h}[i] = (max_k ‖V_{l,h}[k]‖₁ / w) · Σ_{t ∈ window} A_{l,h}[t, i], A = softmax(Q_win Kᵀ/√d) causal inside the
window; the value factor is taken per kv head over the prefix (the first N − w positions, as the reference's
``value_states[..., :-window, :]``; all N when the context is no longer than the window) and applied to each query
head of its group;
max-pooled with k = 7 over the prefix, GQA: max over the group; the w = 32 window positions are kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import WindowScorer, window_attention


@dataclass
class LAVa(WindowScorer):
    name: ClassVar[str] = "lava"
    gqa: str = "max"

    def per_query_head(self, cap: Capture, w: int) -> torch.Tensor:
        n = cap.num_tokens
        prefix = cap.values[:, :, : n - w] if n > w else cap.values  # (L, Hkv, N − w, d)
        vmax = prefix.float().abs().sum(-1).amax(-1)  # (L, Hkv) max over the prefix of ‖V[k]‖₁
        return window_attention(cap, w) * (vmax / w).repeat_interleave(cap.group_size, dim=1)[..., None]
