"""TOVA — Oren, Hassid, Yarden, Adi, Schwartz 2024, "Transformers are Multi-State RNNs" (Token Omission Via
Attention).

Score of position i: the attention the *last* context token pays to it, averaged over every query head of the
layer, s_i = (1/Hq) Σ_h softmax(q_{N−1,h} Kᵀ/√d)[i] (post-RoPE query and keys, as cached). The score is the same
for every kv head of a layer (TOVA evicts per layer); the last position is protected (+inf), as in kvpress'
``TOVAPress`` — the TOVA code does not force it, but its own attention is usually the largest.

TOVA evicts one token per step while generating; here the policy is applied once to the prefill cache with the
last context query, as kvpress does. It is query-agnostic and parameter-free, and works with every allocator
(with ``adakv`` / ``lava`` every head of a layer carries the same scores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer, protect


@dataclass
class TOVA(Scorer):
    name: ClassVar[str] = "tova"
    layerwise: ClassVar[bool] = True

    def query_tail(self) -> int | None:
        return 1

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        n_layers, hkv, n, d = cap.keys.shape
        q = cap.queries[:, :, -1].float().view(n_layers, hkv, cap.group_size, d)  # (L, Hkv, g, d) last query
        z = q @ cap.keys.float().transpose(-1, -2) * d**-0.5  # (L, Hkv, g, N), no repeat of the keys
        a = torch.softmax(z, dim=-1).mean((1, 2))  # (L, N) mean over the layer's Hq query heads
        return protect(a[:, None].expand(-1, hkv, -1), last=1)  # (L, Hkv, N)
