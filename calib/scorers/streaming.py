"""Streaming scoring (issue 16): score inside the prefill, layer by layer, so a layer's full queries never outlive
that layer.

The reference path captures the post-RoPE queries of every position of every layer (O(L·Hq·N·d), fp32) and scores
afterwards. Here a ``LayerObserver`` (``calib.capture``) sees each layer's (q, k, v, k_pre) while the forward runs:

* ``layerwise`` scorers (SnapKV, LAVa, OBCache, TOVA: a layer's scores depend on that layer's tensors alone;
  Compactor: its chunked attention does) are run by ``LayerwiseScoring`` on a one-layer ``Capture`` of the layer
  (``Scorer.layer_statistics``: the method's own code) and finished after the forward (``Scorer.from_statistics``:
  Compactor's leverage and z-scores over the kept pre-RoPE keys), so the streaming scores are the reference scores
  by construction (tests/calib/test_streaming.py checks it);
* the other scorers read at most a tail of queries after the prefill (``Scorer.query_tail``: Lookahead's draft
  window and w₂ prompt queries, none for the key/value-only methods), and only that tail is kept.

``capture_and_score`` returns the capture (keys, values, the kept queries, NLL) and the (L, Hkv, N) scores.
``extra_query_positions`` keeps further queries for later consumers (the calibration's attention features).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvcalib.calib.capture import Capture, prefill
from kvcalib.calib.lm.registry import LoadedModel
from kvcalib.calib.scorers.base import ScoreContext, Scorer


@dataclass
class LayerwiseScoring:
    """A ``LayerObserver`` that runs a ``layerwise`` scorer on each layer as the forward produces it."""

    scorer: Scorer
    ctx: ScoreContext | None = None
    stats: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> its statistics, e.g. (Hkv, N)
    seconds: float = 0.0  # time spent scoring inside the forward

    def __post_init__(self) -> None:
        if not self.scorer.layerwise:
            raise ValueError(f"{self.scorer.name} is not layerwise: score it from the capture instead")

    def observe(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_pre: torch.Tensor) -> None:
        # q (Hq, N, d), k / v / k_pre (Hkv, N, d)
        t0 = time.perf_counter()
        layer = Capture(input_ids=torch.zeros(0, dtype=torch.long), keys=k[None], values=v[None],
                        keys_pre=k_pre[None], queries=q[None], last_logits=q.new_zeros(0))
        self.stats[layer_idx] = self.scorer.layer_statistics(layer, self.ctx)[0]
        self.seconds += time.perf_counter() - t0

    def result(self, cap: Capture) -> torch.Tensor:
        """(L, Hkv, N) scores of every layer, finished from the statistics and the streaming capture ``cap``."""
        missing = [i for i in range(cap.num_layers) if i not in self.stats]
        if missing:
            raise RuntimeError(f"the forward scored no layer {missing[:4]}: the model's layers were replaced")
        t0 = time.perf_counter()
        out = self.scorer.from_statistics(cap, torch.stack([self.stats[i] for i in range(cap.num_layers)]),
                                          self.ctx)
        self.seconds += time.perf_counter() - t0
        return out


def kept_queries(n: int, tail: int | None, extra: torch.Tensor | None = None) -> torch.Tensor | None:
    """Sorted absolute positions of the queries a streaming capture keeps: the last ``tail`` and ``extra``
    (None: every position)."""
    if tail is None:
        return None
    pos = torch.arange(max(0, n - tail), n)
    if extra is not None:
        pos = torch.cat([pos, extra.long().flatten().clamp(0, max(0, n - 1))])
    return torch.unique(pos)


@dataclass
class StreamedScores:
    capture: Capture
    scores: torch.Tensor  # (L, Hkv, N)
    prefill_seconds: float  # the forward (and NLL) without the scoring done inside it
    score_seconds: float  # scoring inside the forward + after it


@torch.no_grad()
def capture_and_score(lm: LoadedModel, input_ids: torch.Tensor, scorer: Scorer, ctx: ScoreContext | None = None,
                      *, compute_nll: bool = False, nll_stride: int = 1,
                      extra_query_positions: torch.Tensor | None = None) -> StreamedScores:
    """One prefill of ``input_ids`` (N,) that scores with ``scorer`` as it goes; keeps only the queries needed later
    (``scorer.query_tail()`` and ``extra_query_positions``) and no pre-RoPE key unless the scorer's finish reads
    them."""
    n = int(input_ids.numel())
    if scorer.layerwise:
        obs = LayerwiseScoring(scorer, ctx)
        cap = prefill(lm, input_ids, compute_nll=compute_nll, nll_stride=nll_stride, observers=[obs],
                      query_positions=kept_queries(n, 0, extra_query_positions),
                      keep_keys_pre=scorer.stream_keeps_keys_pre)
        inside = obs.seconds
        scores = obs.result(cap)
        return StreamedScores(cap, scores, cap.prefill_seconds - inside, obs.seconds)
    tail = scorer.query_tail()
    cap = prefill(lm, input_ids, compute_nll=compute_nll, nll_stride=nll_stride,
                  query_positions=kept_queries(n, tail, extra_query_positions))
    t0 = time.perf_counter()
    scores = scorer.score(cap, ctx)
    return StreamedScores(cap, scores, cap.prefill_seconds, time.perf_counter() - t0)
