"""Compactor — Chari & Van Durme 2025, "Compactor: Calibrated Query-Agnostic KV Cache Compression with
Approximate Leverage Scores".

Leverage part: K̄ = pre-RoPE keys centred over positions (N × d) per head, X = K̄Φ with a Gaussian sketch
Φ ∈ R^{d×k}, entries N(0, 1/k), k = 48; ℓ_i = x_iᵀ (XᵀX + ρI)⁻¹ x_i (Cholesky with jitter escalation, per
layer).
Attention part: non-causal softmax(Q Kᵀ) inside chunks of 256 positions (no 1/√d, as in both reference codes),
column sums per chunk, mean over the GQA group, times ‖v_j‖, avg-pooled with k = 3.
Blend: s = z(attn) + λ·z(ℓ), z-scores over all heads and positions of a layer; λ = 0.3 (paper; insensitive in
0.15–0.4). The first 8 and last 4 positions are protected.

Protected positions are cut off *before* everything else (``exclude_protected=True``, as both reference codes —
the authors' press and kvpress' ``CompactorPress`` — slice ``[8:-4]`` first): the centring of the keys, the chunk
boundaries (the first chunk starts at position 8), the pooling and both z-scores see only the N − 12 middle
positions, so sink outliers do not inflate the spread of the attention z-score. ``exclude_protected=False`` keeps
the former behaviour (everything over all N positions, protected positions overwritten afterwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import PROTECTED, ScoreContext, Scorer, gqa_reduce, pool1d, protect, zscore


def gaussian_sketch(d: int, k: int, seed: int, device=None) -> torch.Tensor:
    """Φ ∈ R^{d×k} with i.i.d. N(0, 1/k) entries, reproducible from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(d, k, generator=gen) / k**0.5).to(device)


@dataclass
class Compactor(Scorer):
    name: ClassVar[str] = "compactor"
    # streaming: the chunked attention (every query) and the leverage (its pre-RoPE keys, regularised per layer)
    # of each layer inside the prefill; only the z-scores and the blend run after it, so no pre-RoPE key is kept
    layerwise: ClassVar[bool] = True
    stream_keeps_keys_pre: ClassVar[bool] = False
    sketch_dim: int = 48
    rho: float = 1e-6
    chunk: int = 256
    blend: float = 0.3
    value_weighted: bool = True
    pool_kernel: int = 3
    protect_first: int = 8
    protect_last: int = 4
    seed: int = 0
    exclude_protected: bool = True

    def span(self, n: int) -> tuple[int, int]:
        """(first, last) protected counts clipped to a context of ``n`` positions (as kvpress clips them)."""
        first = min(self.protect_first, n)
        return first, min(self.protect_last, max(0, n - first))

    def leverage(self, cap: Capture) -> torch.Tensor:
        """(L, Hkv, N) approximate leverage of the centred pre-RoPE keys over all N positions."""
        return self._leverage(cap.keys_pre)

    def _leverage(self, keys_pre: torch.Tensor | None) -> torch.Tensor:
        """(L, Hkv, M) leverage of ``keys_pre`` (L, Hkv, M, d), one layer at a time: each layer's keys are centred
        and sketched alone, and its Cholesky jitter escalates for that layer only (a layer's scores never depend
        on another's), so the transients are one layer's and the streaming path computes it inside the prefill."""
        if keys_pre is None:
            raise ValueError("Compactor needs the pre-RoPE keys (a capture taken with keep_keys_pre=True)")
        phi = gaussian_sketch(keys_pre.shape[-1], self.sketch_dim, self.seed, keys_pre.device)  # (d, k)
        out = []
        for layer in keys_pre:  # (Hkv, M, d)
            x = layer.float()
            x = x - x.mean(dim=1, keepdim=True)
            out.append(kernels.leverage_scores(x[None], phi, self.rho)[0])  # (Hkv, M)
        return torch.stack(out) if out else keys_pre.new_zeros(keys_pre.shape[:3], dtype=torch.float32)

    def attention(self, cap: Capture) -> torch.Tensor:
        """(L, Hkv, N) chunked non-causal attention column sums (· ‖v‖, avg-pooled) over all N positions."""
        if cap.queries.shape[2] != cap.num_tokens:
            raise ValueError("Compactor needs the queries of every position (capture without query_tail)")
        return self._attention(cap.queries, cap.keys, cap.values, cap.group_size)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int) -> torch.Tensor:
        a = kernels.chunked_colsum(q, k, chunk=self.chunk, scale=1.0)  # (L, Hq, M)
        a = gqa_reduce(a, group, "mean")  # (L, Hkv, M)
        if self.value_weighted:
            a = a * v.float().norm(dim=-1)
        return pool1d(a, self.pool_kernel, "avg")

    def layer_statistics(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        """(L, 2, Hkv, N or M): the attention part [:, 0] and the leverage [:, 1], over all N positions, or the M
        unprotected ones when ``exclude_protected`` (empty when none is left). Both are per layer."""
        n = cap.num_tokens
        if not self.exclude_protected:
            return torch.stack([self.attention(cap), self.leverage(cap)], dim=1)
        first, last = self.span(n)
        if cap.queries.shape[2] != n:
            raise ValueError("Compactor needs the queries of every position (capture without query_tail)")
        if n - first - last <= 0:
            return cap.keys.new_zeros((cap.keys.shape[0], 2, cap.keys.shape[1], 0), dtype=torch.float32)
        mid = slice(first, n - last)  # the M = N − first − last unprotected positions
        a = self._attention(cap.queries[:, :, mid], cap.keys[:, :, mid], cap.values[:, :, mid], cap.group_size)
        kp = cap.keys_pre[:, :, mid] if cap.keys_pre is not None else None
        return torch.stack([a, self._leverage(kp)], dim=1)  # (L, 2, Hkv, M)

    def from_statistics(self, cap: Capture, stats: torch.Tensor, ctx: ScoreContext | None = None) -> torch.Tensor:
        n = cap.num_tokens
        first, last = self.span(n)
        a, lev = stats[:, 0], stats[:, 1]  # (L, Hkv, N or M) each
        if not self.exclude_protected:
            s = zscore(a, (1, 2)) + self.blend * zscore(lev, (1, 2))  # (L, Hkv, N)
            return protect(s, first=first, last=last)
        if n - first - last <= 0:
            return torch.full(cap.keys.shape[:3], PROTECTED, device=cap.keys.device)
        s = zscore(a, (1, 2)) + self.blend * zscore(lev, (1, 2))  # (L, Hkv, M)
        return F.pad(s, (first, last), value=PROTECTED)  # (L, Hkv, N)

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        return self.from_statistics(cap, self.layer_statistics(cap, ctx), ctx)
