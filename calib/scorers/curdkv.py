"""CurDKV — Sengupta, Chaudhary, Chakraborty, NeurIPS 2025, "Value-Guided KV Compression for LLMs via
Approximated CUR Decomposition".

Approximate leverage of keys and values, per (layer, kv head): optionally project with a seeded Gaussian matrix
G ∈ R^{d×r} (entries N(0, 1/r), r = 20), K̃ = KG, Ṽ = VG; ℓK_j = ‖K̃_j‖², ℓV_j = ‖Ṽ_j‖² (post-RoPE keys, as
cached). Local approximation: each is divided by its sum over non-overlapping windows of 16 positions (the last,
possibly shorter window is normalised over its own positions). Score = ℓK·ℓV (``leverage="product"``, default),
or ℓK (``"key"``), ℓV (``"value"``), (ℓK + ℓV)/2 (``"mean"``); normalised to sum 1 per head; the first 4 positions
are protected. The projection is off by default, as in the kvpress reference (``use_random_leverage=False``).
AdaCurDKV = these scores with the ``adakv`` allocator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers.base import ScoreContext, Scorer, protect

LEVERAGES = ("product", "key", "value", "mean")


def local_normalise(x: torch.Tensor, window: int) -> torch.Tensor:
    """Divide x (..., N) by its sum over non-overlapping windows of ``window`` positions (last one may be short)."""
    if window <= 1:
        return x / x.clamp_min(1e-30)
    n = x.shape[-1]
    pad = (window - n % window) % window
    blocks = F.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, window)
    blocks = blocks / blocks.sum(-1, keepdim=True).clamp_min(1e-30)
    return blocks.reshape(*x.shape[:-1], -1)[..., :n]


@dataclass
class CurDKV(Scorer):
    name: ClassVar[str] = "curdkv"
    reads_queries: ClassVar[bool] = False
    leverage: str = "product"
    project: bool = False
    projection_dim: int = 20
    local_window: int = 16
    protect_first: int = 4
    seed: int = 0

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        if self.leverage not in LEVERAGES:
            raise KvcalibError(f"unknown CurDKV leverage {self.leverage!r}: expected one of {list(LEVERAGES)}")
        k, v = cap.keys.float(), cap.values.float()  # (L, Hkv, N, d)
        if self.project:
            gen = torch.Generator().manual_seed(self.seed)
            g = (torch.randn(cap.head_dim, self.projection_dim, generator=gen) / self.projection_dim**0.5).to(k.device)
            k, v = k @ g, v @ g
        lk = local_normalise((k * k).sum(-1), self.local_window)  # (L, Hkv, N)
        lv = local_normalise((v * v).sum(-1), self.local_window)
        s = {"product": lambda: lk * lv, "key": lambda: lk, "value": lambda: lv,
             "mean": lambda: (lk + lv) / 2}[self.leverage]()
        s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
        return protect(s, first=min(self.protect_first, cap.num_tokens))
