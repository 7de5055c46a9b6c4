"""Scorer interface and the helpers the seed methods share (pooling, GQA reduction, protection, z-scores, the
SnapKV-style observation-window skeleton)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from kvcalib import kernels
from kvcalib.calib.capture import Capture
from kvcalib.calib.lm.protocols import LanguageModel

if TYPE_CHECKING:
    from kvcalib.calib.budget import Budget

PROTECTED = float("inf")  # score of positions a method always keeps


@dataclass
class ScoreContext:
    """What a method may need beyond the capture: the model (methods that decode, e.g. Lookahead Q-Cache) and the
    target budget (methods whose scores depend on it)."""

    lm: LanguageModel | None = None  # e.g. kvcalib.calib.lm.registry.LoadedModel
    budget: Budget | None = None
    eos_ids: set[int] = field(default_factory=set)


@dataclass
class Scorer:
    """A scoring method: ``score(capture, ctx) -> (L, Hkv, N)`` scores, higher = keep, protected = +inf.

    Subclasses are dataclasses whose fields are the method's hyperparameters with their published defaults."""

    name: ClassVar[str] = "base"
    budget_dependent: ClassVar[bool] = False  # True when the scores depend on ScoreContext.budget (score per ratio)
    reads_queries: ClassVar[bool] = True  # False: ``score`` never reads ``cap.queries``
    # True: the query-reading part of the scores is per layer, so the streaming path (``calib.scorers.streaming``)
    # takes it inside the prefill (``layer_statistics``) and finishes after it (``from_statistics``)
    layerwise: ClassVar[bool] = False
    stream_keeps_keys_pre: ClassVar[bool] = False  # ``from_statistics`` reads the pre-RoPE keys

    def query_tail(self) -> int | None:
        """How many trailing context queries ``score`` reads after the prefill (None: every query; 0: none)."""
        return None if self.reads_queries else 0

    def layer_statistics(self, layer: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        """(1, ...) what a ``layerwise`` method takes of one layer's capture during the prefill; by default the
        layer's scores (a method whose scores of layer l depend on layer l alone)."""
        return self.score(layer, ctx)

    def from_statistics(self, cap: Capture, stats: torch.Tensor, ctx: ScoreContext | None = None) -> torch.Tensor:
        """(L, Hkv, N) scores from the stacked ``layer_statistics`` (L, ...) and the streaming capture."""
        return stats

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        raise NotImplementedError

    def params(self) -> dict:
        return asdict(self)

    @classmethod
    def param_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


@dataclass
class WindowScorer(Scorer):
    """SnapKV-style skeleton: per-query-head scores from the observation window (the last w = min(``window``, N)
    context queries), pooled over the prefix (``kernel``, ``pooling``), reduced over each GQA group (``gqa``); the
    w window positions are kept. Subclasses give ``per_query_head``."""

    window: int = 32
    kernel: int = 7
    pooling: str = "max"
    gqa: str = "mean"
    layerwise: ClassVar[bool] = True

    def query_tail(self) -> int | None:
        return self.window

    def per_query_head(self, cap: Capture, w: int) -> torch.Tensor:
        """(L, Hq, N) unpooled scores of every query head for the window of the last ``w`` queries."""
        raise NotImplementedError

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        w = min(self.window, cap.num_tokens)
        return pool_reduce_protect(self.per_query_head(cap, w), cap.group_size, w, self.kernel, self.pooling,
                                   self.gqa)


def window_attention(cap: Capture, w: int) -> torch.Tensor:
    """(L, Hq, N) Σ_t A_tj over the last ``w`` context queries, A = softmax(q kᵀ/√d) causal inside the window."""
    return kernels.window_attention_stats(cap.window_queries(w), cap.keys, stats=("attn",))["attn"]


def pool_reduce_protect(s: torch.Tensor, group: int, w: int, kernel: int, pooling: str, gqa: str) -> torch.Tensor:
    """The end of the SnapKV-style scorers: per-query-head scores s (L, Hq, N) pooled over all but the last ``w``
    positions, combined over the ``group`` query heads of each kv head, the last ``w`` positions protected.
    Returns (L, Hkv, N)."""
    return protect(gqa_reduce(pool_prefix(s, w, kernel, pooling), group, gqa), last=w)


def pool1d(x: torch.Tensor, kernel: int, kind: str = "max") -> torch.Tensor:
    """Stride-1 pooling along the last axis with padding kernel//2, keeping the length. x: (..., N).
    Average pooling counts the zero padding (``count_include_pad=True``, torch's default, as in the SnapKV, AdaKV,
    LAVa and kvpress references): the k//2 edge positions of each side are divided by k."""
    if kernel <= 1:
        return x
    shape = x.shape
    flat = x.reshape(-1, 1, shape[-1])
    if kind == "max":
        out = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    elif kind == "avg":
        out = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    else:
        raise ValueError(f"unknown pooling {kind!r}: expected 'max' or 'avg'")
    return out[..., : shape[-1]].reshape(shape)


def pool_prefix(x: torch.Tensor, keep_last: int, kernel: int, kind: str = "max") -> torch.Tensor:
    """Pool x (..., N) over its first N − ``keep_last`` positions only (as the SnapKV reference pools
    ``attn[..., :-window]``); the last ``keep_last`` entries are returned unchanged (they are protected anyway)."""
    n = x.shape[-1]
    cut = n - keep_last
    if cut <= 0:
        return x
    return torch.cat([pool1d(x[..., :cut], kernel, kind), x[..., cut:]], dim=-1)


def gqa_reduce(x: torch.Tensor, group: int, how: str = "mean") -> torch.Tensor:
    """(..., Hq, N) -> (..., Hkv, N) combining the ``group`` query heads that share one kv head."""
    if group == 1:
        return x
    g = x.reshape(*x.shape[:-2], x.shape[-2] // group, group, x.shape[-1])
    if how == "mean":
        return g.mean(-2)
    if how == "sum":
        return g.sum(-2)
    if how == "max":
        return g.amax(-2)
    raise ValueError(f"unknown GQA reduction {how!r}: expected 'mean', 'sum' or 'max'")


def zscore(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    mu = x.mean(dim=dims, keepdim=True)
    sd = x.std(dim=dims, keepdim=True).clamp_min(1e-12)
    return (x - mu) / sd


def protect(scores: torch.Tensor, first: int = 0, last: int = 0) -> torch.Tensor:
    """Mark the first/last positions as always kept. scores: (..., N)."""
    scores = scores.clone()
    if first:
        scores[..., :first] = PROTECTED
    if last:
        scores[..., -last:] = PROTECTED
    return scores
