"""OBCache — Gu et al. 2025, "Optimal Brain Cache": Optimal Brain Damage saliency for KV-cache eviction.

Over the observation window (the last w context queries, causal inside the window, SnapKV-style):
Z_tj = q_t·k_j/√d, A = softmax(Z), o_t = Σ_j A_tj v_j, and per key j

* value saliency  S_V(j)  = Σ_t A_tj² ‖v_j‖²
* key saliency    S_K(j)  = Σ_t (A_tj Z_tj)² ‖v_j − o_t‖²
* joint saliency  S_VK(j) = S_V + S_K + 2 Σ_t A_tj² Z_tj (‖v_j‖² − v_jᵀ o_t)

computed per query head by ``kernels.window_attention_stats``, max-pooled (k = 7) over the prefix, averaged over
the GQA group as in SnapKV; the w window positions are kept. Default w = 32 and ``saliency="key"``: the score
behind the paper's headline query-agnostic result (RULER-4k Llama-3.1-8B with AdaKV, 43.0 → 55.0). The scores are
a drop-in saliency for every allocator (``uniform``, ``adakv``, ``lava``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers.base import ScoreContext, Scorer, pool_reduce_protect

SALIENCIES = ("value", "key", "joint")


@dataclass
class OBCache(Scorer):
    name: ClassVar[str] = "obcache"
    saliency: str = "key"
    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    layerwise: ClassVar[bool] = True

    def query_tail(self) -> int | None:
        return self.window

    def per_query_head(self, cap: Capture) -> torch.Tensor:
        """(L, Hq, N) unpooled saliency of every query head."""
        if self.saliency not in SALIENCIES:
            raise KvcalibError(f"unknown OBCache saliency {self.saliency!r}: expected one of {list(SALIENCIES)}")
        w = min(self.window, cap.num_tokens)
        need = {"value": ("attn_sq",), "key": ("obc_key",), "joint": ("attn_sq", "obc_key", "obc_cross")}
        st = kernels.window_attention_stats(cap.window_queries(w), cap.keys, cap.values,
                                            stats=need[self.saliency])
        vn = (cap.values.float() ** 2).sum(-1).repeat_interleave(cap.group_size, dim=1)  # (L, Hq, N) ‖v_j‖²
        if self.saliency == "value":
            return st["attn_sq"] * vn
        if self.saliency == "key":
            return st["obc_key"]
        return st["attn_sq"] * vn + st["obc_key"] + 2 * st["obc_cross"]

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        w = min(self.window, cap.num_tokens)
        return pool_reduce_protect(self.per_query_head(cap), cap.group_size, w, self.kernel, self.pooling,
                                   self.gqa)  # (L, Hkv, N)
