"""Baselines: StreamingLLM (sinks + recent), key-norm, random.

* StreamingLLM — Xiao et al., ICLR 2024: keep ``sinks`` initial tokens and the most recent ones
  (score = position index, sinks protected).
* Key-norm — Devoto et al., EMNLP 2024: keep keys with the *smallest* L2 norm, score = −‖k_i‖.
* Random — uniform scores from a seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers.base import ScoreContext, Scorer, protect


@dataclass
class StreamingLLM(Scorer):
    name: ClassVar[str] = "streaming"
    reads_queries: ClassVar[bool] = False
    sinks: int = 4

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        n_layers, hkv, n, _ = cap.keys.shape
        pos = torch.arange(n, dtype=torch.float32, device=cap.keys.device)
        return protect(pos.expand(n_layers, hkv, n), first=self.sinks)


@dataclass
class KeyNorm(Scorer):
    name: ClassVar[str] = "keynorm"
    reads_queries: ClassVar[bool] = False

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        return -cap.keys.float().norm(dim=-1)  # (L, Hkv, N)


@dataclass
class Random(Scorer):
    name: ClassVar[str] = "random"
    reads_queries: ClassVar[bool] = False
    seed: int = 0

    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(cap.keys.shape[:3], generator=gen).to(cap.keys.device)
