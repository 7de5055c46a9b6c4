"""Budget allocation: turn scores (L, Hkv, N) and a budget into a keep mask (L, Hkv, N).

A compression ratio r keeps ⌈(1 − r)·N⌉ positions per (layer, kv head) on average, i.e. a total of
L·Hkv·⌈(1 − r)·N⌉ entries; a budget may also be an absolute token count per head. Allocators decide how that
total is spread:

* ``uniform`` — every (layer, head) keeps the same count (its top-scoring positions);
* ``adakv`` — AdaKV (Feng et al. 2024) head-adaptive: per layer, every head keeps its top ⌊α·B/H⌋ positions
  (the floor, α = 0.2 of the even share), then the layer's remaining budget goes to the global top of all its
  heads' other entries; each layer keeps exactly H·B/H = H·per_head entries;
* ``lava`` — LAVa (Shen et al. 2025) layer- and head-adaptive: layer budgets ∝ the normalised entropy of the
  layer's scores (see ``lava_layer_budgets``), then ``adakv`` selection inside each layer with the same floor;
* ``counts`` — the ragged interface: an explicit (L, Hkv) count per (layer, head), see ``select_topk``.

Protected entries (score +inf) sort first everywhere, so they are kept as long as a head's / layer's allocation
covers them (the ``lava`` layer floors are raised to make sure it does, whenever the total budget allows).

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


def head_floor(per_head: int, alpha: float, n: int) -> int:
    """AdaKV's per-head floor: ⌊α · per_head⌋ positions, at most ``n``."""
    return max(0, min(n, int(math.floor(alpha * per_head + 1e-9))))


def layer_topk(scores: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """AdaKV selection in one layer. scores (H, N) -> bool mask (H, N) with exactly ``budget`` entries: every
    head's top ``floor`` positions, then the top of all remaining entries (ties: lower head, then lower position)."""
    h, n = scores.shape
    budget = max(0, min(budget, h * n))
    floor = min(floor, n, budget // max(h, 1))
    in_floor = select_topk(scores.unsqueeze(0), torch.full((1, h), floor, dtype=torch.long))[0].reshape(-1)
    flat = scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    order = order[torch.argsort((~in_floor[order]).to(torch.int8), stable=True)]  # floor entries first
    keep = torch.zeros(h * n, dtype=torch.bool, device=scores.device)
    keep[order[:budget]] = True
    return keep.view(h, n)


def adakv(scores: torch.Tensor, per_head: int, alpha: float = 0.2, **_) -> torch.Tensor:
    """AdaKV: every layer keeps H·per_head entries, spread over its heads by score with a floor per head."""
    n_layers, h, n = scores.shape
    f = head_floor(per_head, alpha, n)
    return torch.stack([layer_topk(scores[l], h * per_head, f) for l in range(n_layers)])


def adakv_masks(scores: torch.Tensor, per_heads: list[int], alpha: float = 0.2) -> torch.Tensor:
    """``adakv`` at several budgets at once: (R, L, H, N) masks, row i equal to ``adakv(scores, per_heads[i])``.
    The per-head and per-layer sorts are done once and shared by every budget (the calibration grid's fast path)."""
    n_layers, h, n = scores.shape
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (L, H, N)
    head_rank = torch.empty_like(order)
    head_rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    flat_order = torch.argsort(scores.reshape(n_layers, h * n), dim=-1, descending=True, stable=True)  # (L, H·N)
    rank_sorted = head_rank.reshape(n_layers, h * n).gather(1, flat_order)  # head rank, in layer order
    rows = []
    for per_head in per_heads:
        budget = max(0, min(h * int(per_head), h * n))
        floor = min(head_floor(int(per_head), alpha, n), n, budget // max(h, 1))
        in_floor = rank_sorted < floor  # (L, H·N): every head's top ``floor`` entries
        rest = ~in_floor
        take = in_floor | (rest & (rest.cumsum(1) <= budget - h * floor))  # then the layer's best remaining
        keep = torch.zeros_like(take)
        keep.scatter_(1, flat_order, take)
        rows.append(keep.view(n_layers, h, n))
    return torch.stack(rows)


def normalised_entropy(scores: torch.Tensor) -> float:
    """LAVa's layer entropy e = −Σ ŝ log ŝ / log(count), ŝ = s / Σ s over the layer's entries (all heads).

    Only finite scores enter (protected +inf entries are excluded: they are kept regardless). Scores must be
    non-negative to form a distribution: if any is negative, all are shifted by −min (methods whose scores are
    z-scores or negated norms). A degenerate layer (≤ 1 entry, or all mass zero) gets e = 1 (uniform)."""
    x = scores[torch.isfinite(scores)].double()
    count = x.numel()
    if count <= 1:
        return 1.0
    lo = x.min()
    if lo < 0:
        x = x - lo
    total = x.sum()
    if total <= 0:
        return 1.0
    p = x[x > 0] / total
    return float(-(p * p.log()).sum() / math.log(count))


def apportion(weights: torch.Tensor, total: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Integers b (len L) with Σ b = total, lo ≤ b ≤ hi, b ≈ λ·weights clamped to [lo, hi] (water-filling by
    bisection on λ, then largest-remainder rounding). Requires Σ lo ≤ total ≤ Σ hi."""
    w = weights.double().clamp_min(0)
    lo, hi = lo.long(), hi.long()
    if not int(lo.sum()) <= total <= int(hi.sum()):
        raise BudgetError(f"cannot apportion {total} within [{int(lo.sum())}, {int(hi.sum())}]")
    w = torch.ones_like(w) if float(w.max()) <= 0 else w.clamp_min(1e-12 * float(w.max()))

    def fill(lam: float) -> torch.Tensor:
        return torch.minimum(torch.maximum(lam * w, lo.double()), hi.double())

    a, b = 0.0, 1.0
    while float(fill(b).sum()) < total:
        b *= 2.0
    for _ in range(200):
        mid = (a + b) / 2
        if float(fill(mid).sum()) < total:
            a = mid
        else:
            b = mid
    x = fill(b)
    out = torch.minimum(torch.maximum(torch.floor(x + 1e-9).long(), lo), hi)
    frac = x - out.double()
    rest = total - int(out.sum())
    while rest > 0:  # hand out the remaining units by largest remainder
        cand = torch.where(out < hi, frac, torch.full_like(frac, -math.inf))
        i = int(cand.argmax())
        out[i] += 1
        frac[i] -= 1
        rest -= 1
    while rest < 0:  # (only from floating-point slack) take back from the smallest remainders
        cand = torch.where(out > lo, frac, torch.full_like(frac, math.inf))
        i = int(cand.argmin())
        out[i] -= 1
        frac[i] += 1
        rest += 1
    return out


def lava_layer_budgets(scores: torch.Tensor, per_head: int, alpha: float = 0.2) -> torch.Tensor:
    """LAVa layer budgets (L,): B_l = e_l / Σ e · B, B = L·H·per_head, e_l = ``normalised_entropy`` of layer l;
    integers summing to B exactly, each within [floor_l, H·N]. floor_l = Σ_h max(⌊α·per_head⌋, protected_{l,h})
    so that every head's floor and every protected entry fit; if the protected entries alone exceed B, the floors
    fall back to H·⌊α·per_head⌋ and protected entries compete for the layer budget (highest scores first)."""
    n_layers, h, n = scores.shape
    total = n_layers * h * per_head
    f = head_floor(per_head, alpha, n)
    ent = torch.tensor([normalised_entropy(scores[l]) for l in range(n_layers)], dtype=torch.float64)
    prot = torch.isposinf(scores).sum(-1)  # (L, H)
    lo = prot.clamp_min(f).clamp_max(n).sum(-1)  # (L,)
    if int(lo.sum()) > total:
        lo = torch.full((n_layers,), h * f, dtype=torch.long)
    hi = torch.full((n_layers,), h * n, dtype=torch.long)
    return apportion(ent, total, lo, hi)


def lava(scores: torch.Tensor, per_head: int, alpha: float = 0.2, **_) -> torch.Tensor:
    """LAVa: entropy-proportional layer budgets, AdaKV selection (same floor ⌊α·per_head⌋) inside each layer."""
    n_layers, h, n = scores.shape
    budgets = lava_layer_budgets(scores, per_head, alpha)
    f = head_floor(per_head, alpha, n)
    return torch.stack([layer_topk(scores[l], int(budgets[l]), f) for l in range(n_layers)])


Allocator = Callable[..., torch.Tensor]
ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "adakv": adakv, "lava": lava}


def available_allocators() -> list[str]:
    return sorted(ALLOCATORS)


def check_allocator(name: str) -> None:
    if name not in ALLOCATORS:
        raise BudgetError(f"unknown allocator {name!r}: expected one of {available_allocators()}")


def allocate(scores: torch.Tensor, budget: Budget, allocator: str = "uniform", **params) -> torch.Tensor:
    """Keep mask (L, Hkv, N) holding L·Hkv·budget.per_head(N) entries in total, spread by ``allocator``."""
    check_allocator(allocator)
    return ALLOCATORS[allocator](scores, budget.per_head(scores.shape[-1]), **params)
