"""KeyDiff — Park et al. 2025, "KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments".

Per (layer, kv head): the anchor is the mean of the L2-normalised keys, a = (1/N) Σ_j k_j/‖k_j‖, and the score of
position i is its negative cosine similarity to the anchor, s_i = −cos(k_i, a): keys that differ most from the
average key direction are kept. Keys are post-RoPE (the cached ones), in float32. Query-agnostic and
parameter-free; no position is protected. As kvpress' ``KeyDiffPress``, the whole context is scored at once (the
paper evicts block by block while prefilling, kvpress' ``BlockPress`` wrapper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer


@dataclass
class KeyDiff(Scorer):
    name: ClassVar[str] = "keydiff"
    reads_queries: ClassVar[bool] = False

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        kn = F.normalize(cap.keys.float(), dim=-1)  # (L, Hkv, N, d) k_j / ‖k_j‖
        anchor = F.normalize(kn.mean(dim=2, keepdim=True), dim=-1)  # (L, Hkv, 1, d) a / ‖a‖
        return -(kn @ anchor.transpose(-1, -2))[..., 0]  # (L, Hkv, N) −cos(k_i, a)
