"""Budget allocation: turn scores (L, Hkv, N) and a budget into a keep mask (L, Hkv, N).

A compression ratio r keeps ⌈(1 − r)·N⌉ positions per (layer, kv head) on average, i.e. a total of
L·Hkv·⌈(1 − r)·N⌉ entries; a budget may also be an absolute token count per head. Allocators decide how that
total is spread:

* ``uniform`` — every (layer, head) keeps the same count (its top-scoring positions);
* ``counts`` — the ragged interface: an explicit (L, Hkv) count per (layer, head), see ``select_topk``.

Allocators are registered in ``ALLOCATORS``; each takes (scores, total) and returns a boolean keep mask whose
per-head sums are the allocation.
"""

from __future__ import annotations

from kvcalib.calib.errors import KvcalibError

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


class BudgetError(KvcalibError):
    pass


@dataclass(frozen=True)
class Budget:
    """Either a compression ratio in [0, 1) or an absolute number of kept tokens per head."""

    ratio: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.ratio is None) == (self.tokens is None):
            raise BudgetError("give exactly one of ratio or tokens")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise BudgetError(f"compression ratio must be in [0, 1), got {self.ratio}")
        if self.tokens is not None and self.tokens < 1:
            raise BudgetError(f"token budget must be >= 1, got {self.tokens}")

    def per_head(self, n: int) -> int:
        """Average number of kept positions per (layer, head) for a context of ``n`` tokens."""
        if self.ratio is not None:
            return max(1, min(n, math.ceil((1.0 - self.ratio) * n - 1e-9)))
        return min(n, self.tokens)


def select_topk(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Keep the top ``counts[l, h]`` positions of every head. scores (L, Hkv, N), counts (L, Hkv) -> bool mask."""
    n = scores.shape[-1]
    counts = counts.clamp(0, n).to(scores.device)
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (L, Hkv, N)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    return ranks < counts.unsqueeze(-1)


def uniform(scores: torch.Tensor, per_head: int, **_) -> torch.Tensor:
    counts = torch.full(scores.shape[:2], per_head, dtype=torch.long)
    return select_topk(scores, counts)


Allocator = Callable[..., torch.Tensor]
ALLOCATORS: dict[str, Allocator] = {"uniform": uniform}


def available_allocators() -> list[str]:
    return sorted(ALLOCATORS)


def allocate(scores: torch.Tensor, budget: Budget, allocator: str = "uniform", **params) -> torch.Tensor:
    """Keep mask (L, Hkv, N) holding L·Hkv·budget.per_head(N) entries in total, spread by ``allocator``."""
    if allocator not in ALLOCATORS:
        raise BudgetError(f"unknown allocator {allocator!r}: expected one of {available_allocators()}")
    return ALLOCATORS[allocator](scores, budget.per_head(scores.shape[-1]), **params)
