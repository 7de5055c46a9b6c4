"""Lookahead Q-Cache (LAQ) — Wang et al., EMNLP 2025, "Lookahead Q-Cache: Achieving More Consistent KV Eviction
via Pseudo Query".

1. Compress a copy of the prefill cache with SnapKV (w = 32, max-pool 7) at the target budget (``ctx.budget``,
   spread by ``draft_allocator``).
2. Greedily decode n = 8 pseudo tokens from it right after the context (the first one is the argmax of the
   capture's next-token logits; stop at EOS, which is not fed). The cache records the post-RoPE query of every fed
   pseudo token per layer (``RaggedKVCache.record_queries``; the attention path calls ``remember_queries``).
3. Rescore the full prefill keys with the observation set = the last w₂ prompt queries (causal, as in SnapKV) +
   the pseudo queries, which see all N prompt keys (no mask): s_i = Σ_t softmax(q_t Kᵀ/√d)[i] per query head,
   max-pooled (k = 7) over the prefix, averaged over the GQA group; the last w₂ prompt positions are protected
   (w₂ = 8: LAQ++; w₂ = 0: LAQ).

The engine then compresses the real cache with these scores and decodes the answer from it; the pseudo tokens are
discarded. The scores depend on the budget (``budget_dependent``): calibration scores once per grid ratio. The
pseudo tokens and queries of the last call are left in ``cap.extras["lookahead"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers.base import ScoreContext, Scorer, pool_reduce_protect, window_attention
from kvcalib.calib.scorers.snapkv import SnapKV


@dataclass
class LookaheadQCache(Scorer):
    name: ClassVar[str] = "lookahead"  # alias "laq" (the paper's name)
    budget_dependent: ClassVar[bool] = True  # the draft is compressed at ctx.budget
    n_pseudo: int = 8
    obs_window: int = 8  # w₂: last prompt queries kept in the observation set (LAQ++)
    draft_window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    draft_allocator: str = "uniform"

    def query_tail(self) -> int | None:
        """The draft's SnapKV window and the rescoring's w₂ prompt queries (the pseudo queries come from decoding)."""
        return max(self.draft_window, self.obs_window)

    @torch.no_grad()
    def pseudo_queries(self, cap: Capture, ctx: ScoreContext) -> tuple[list[int], torch.Tensor]:
        """Decode the pseudo tokens on a SnapKV-compressed copy; returns (tokens, queries (L, Hq, m, d)), m ≤ n."""
        from kvcalib.calib.budget import Budget, allocate
        from kvcalib.calib.cache.decode import forward_tokens
        from kvcalib.calib.cache.ragged import RaggedKVCache

        budget = ctx.budget if ctx.budget is not None else Budget(ratio=0.0)
        draft = SnapKV(window=self.draft_window, kernel=self.kernel, pooling="max").score(cap)
        keep = allocate(draft, budget, self.draft_allocator)
        cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
        cache.record_queries = self.n_pseudo
        model = ctx.lm.model
        tokens: list[int] = []
        nxt = int(cap.last_logits.argmax())
        for _ in range(self.n_pseudo):
            if nxt in ctx.eos_ids:
                break
            tokens.append(nxt)
            logits = forward_tokens(model, cache, torch.tensor([[nxt]]))
            nxt = int(logits[0].argmax())
        if not tokens:
            shape = cap.queries.shape
            return tokens, cap.queries.new_zeros(shape[0], shape[1], 0, shape[3])
        q = torch.stack([cache.recent_queries[l][0] for l in range(cap.num_layers)])  # (L, Hq, m, d)
        return tokens, q.to(cap.keys.device)

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        if ctx is None or ctx.lm is None:
            raise KvcalibError(
                "lookahead needs the model to decode pseudo tokens: pass ScoreContext(lm=..., budget=...)")
        tokens, pq = self.pseudo_queries(cap, ctx)
        cap.extras["lookahead"] = {"tokens": tokens, "queries": pq}
        n_layers, hkv, n, d = cap.keys.shape
        w2 = min(self.obs_window, n)
        s = torch.zeros(n_layers, cap.queries.shape[1], n, device=cap.keys.device)  # (L, Hq, N)
        if w2:
            s += window_attention(cap, w2)
        if pq.shape[2]:
            k = cap.keys.float().repeat_interleave(cap.group_size, dim=1)  # (L, Hq, N, d)
            z = torch.einsum("lhtd,lhnd->lhtn", pq.float(), k) * d**-0.5  # no mask: all N prompt keys
            s += torch.softmax(z, dim=-1).sum(2)
        return pool_reduce_protect(s, cap.group_size, w2, self.kernel, self.pooling, self.gqa)  # (L, Hkv, N)
