"""Compactor — Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with
Approximate Leverage Scores".

Leverage part: K̄ = pre-RoPE keys centred over positions (N × d) per head, X = K̄Φ with a Gaussian sketch
Φ ∈ R^{d×k}, entries N(0, 1/k), k = 48; ℓ_i = x_iᵀ (XᵀX + ρI)⁻¹ x_i (Cholesky with jitter escalation).
Attention part: non-causal softmax(Q Kᵀ) inside chunks of 256 positions (no 1/√d, as in both reference codes),
column sums per chunk, mean over the GQA group, times ‖v_j‖, avg-pooled with k = 3.
Blend: s = z(attn) + λ·z(ℓ), z-scores over all heads and positions of a layer; λ = 0.3 (paper; insensitive in
0.15–0.4). The first 8 and last 4 positions are protected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer, gqa_reduce, pool1d, protect, zscore


def gaussian_sketch(d: int, k: int, seed: int, device=None) -> torch.Tensor:
    """Φ ∈ R^{d×k} with i.i.d. N(0, 1/k) entries, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d, k, generator=gen) / k**0.5).to(device)


@dataclass
class Compactor(Scorer):
    name: ClassVar[str] = "compactor"
    sketch_dim: int = 48
    rho: float = 1e-6
    chunk: int = 256
    blend: float = 0.3
    value_weighted: bool = True
    pool_kernel: int = 3
    protect_first: int = 8
    protect_last: int = 4
    seed: int = 0

    def leverage(self, cap: Capture) -> torch.Tensor:
        x = cap.keys_pre.float()  # (L, Hkv, N, d)
        x = x - x.mean(dim=2, keepdim=True)
        phi = gaussian_sketch(cap.head_dim, self.sketch_dim, self.seed, x.device)  # (d, k)
        return kernels.leverage_scores(x, phi, self.rho)  # (L, Hkv, N)

    def attention(self, cap: Capture) -> torch.Tensor:
        if cap.queries.shape[2] != cap.num_tokens:
            raise ValueError("Compactor needs the queries of every position (capture without query_tail)")
        a = kernels.chunked_colsum(cap.queries, cap.keys, chunk=self.chunk, scale=1.0)  # (L, Hq, N)
        a = gqa_reduce(a, cap.group_size, "mean")  # (L, Hkv, N)
        if self.value_weighted:
            a = a * cap.values.float().norm(dim=-1)
        return pool1d(a, self.pool_kernel, "avg")

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        s = zscore(self.attention(cap), (1, 2)) + self.blend * zscore(self.leverage(cap), (1, 2))  # (L, Hkv, N)
        return protect(s, first=self.protect_first, last=self.protect_last)
