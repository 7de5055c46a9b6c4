"""Budget allocation: turn scores (L, Hkv, N) and a budget into a keep mask (L, Hkv, N).

A compression ratio r keeps ⌈(1 − r)·N⌉ positions per (layer, kv head) on average, i.e. a total of
L·Hkv·⌈(1 − r)·N⌉ entries; a budget may also be an absolute token count per head. Allocators decide how that
total is spread:

* ``uniform`` — every (layer, head) keeps the same count (its top-scoring positions);
* ``adakv`` — AdaKV (Feng et al. 2024) head-adaptive: per layer, the protected (+inf) entries are kept, every head
  keeps its top ⌊α·C_l/H⌋ *context* (non-protected) positions (the floor, α = 0.2 of the even context share,
  C_l = H·per_head − protected_l: the window is on top of the floor, as in the AdaKV and LAVa reference codes), then
  the rest of the layer's budget goes to the global top of all its heads' other entries; each layer keeps exactly
  H·per_head entries;
* ``lava`` — LAVa (Shen et al. 2025) layer- and head-adaptive: the *context* budget (the total less the protected
  entries) is split across layers ∝ the normalised entropy of the layer's scores and each layer's protected entries
  are added on top (see ``lava_layer_budgets``), then ``adakv`` selection inside each layer with the floor
  ⌊α·C/(L·H)⌋ of the even context share;
* ``per_layer`` — every head of a layer keeps the same positions (the top of the heads' mean score): the layout
  of paged engines, which evict a token across all heads of a layer;
* ``global`` — one ranking over all layers and heads (KVzip's allocation): the top L·Hkv·per_head entries
  wherever they are;
* ``counts`` — the ragged interface: an explicit (L, Hkv) count per (layer, head), see ``select_topk``.

Protected entries (score +inf) sort first everywhere, so they are kept as long as a head's / layer's allocation
covers them; when they alone exceed a layer's budget they compete for it (ties: lower head, then lower position)
and the floor is 0.

Allocators are registered in ``ALLOCATORS``; each takes (scores, total) and returns a boolean keep mask whose
per-head sums are the allocation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvcalib.calib.defaults import ALLOCATOR
from kvcalib.calib.errors import KvcalibError


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
    """AdaKV's per-head floor: ⌊α · per_head⌋ positions, at most ``n`` (``per_head`` = the context share)."""
    return max(0, min(n, int(math.floor(alpha * per_head + 1e-9))))


def context_floor(budget: int, protected: int, heads: int, alpha: float, n: int) -> int:
    """The AdaKV floor of one layer: ⌊α · (budget − protected) / heads⌋ context entries per head (0 when the
    protected entries alone fill the budget). With a w-token window per head and budget H·B this is ⌊α·(B − w)⌋."""
    return head_floor(max(0, budget - protected) / max(heads, 1), alpha, n)


def layer_topk(scores: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """AdaKV selection in one layer. scores (H, N) -> bool mask (H, N) with exactly ``budget`` entries: the protected
    (+inf) entries, every head's top ``floor`` non-protected positions, then the top of all remaining entries (ties:
    lower head, then lower position). If the protected entries alone exceed ``budget``, the floor is 0 and the
    protected entries compete for the budget in that order."""
    h, n = scores.shape
    budget = max(0, min(budget, h * n))
    prot = torch.isposinf(scores)  # (H, N)
    n_prot = prot.sum(-1)  # (H,)
    if int(n_prot.sum()) >= budget:
        counts = torch.zeros_like(n_prot)  # protected entries compete for the budget
    else:
        floor = max(0, min(floor, (budget - int(n_prot.sum())) // max(h, 1)))
        counts = (n_prot + floor).clamp_max(n)  # protected entries rank first within their head
    in_floor = select_topk(scores.unsqueeze(0), counts.unsqueeze(0))[0].reshape(-1)
    flat = scores.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)
    order = order[torch.argsort((~in_floor[order]).to(torch.int8), stable=True)]  # floor entries first
    keep = torch.zeros(h * n, dtype=torch.bool, device=scores.device)
    keep[order[:budget]] = True
    return keep.view(h, n)


def adakv(scores: torch.Tensor, per_head: int, alpha: float = 0.2, **_) -> torch.Tensor:
    """AdaKV: every layer keeps H·per_head entries, spread over its heads by score with a context floor per head."""
    return adakv_masks(scores, [per_head], alpha)[0]  # one vectorised pass over the layers (== layer_topk per layer)


def adakv_masks(scores: torch.Tensor, per_heads: list[int], alpha: float = 0.2) -> torch.Tensor:
    """``adakv`` at several budgets at once: (R, L, H, N) masks, row i equal to ``adakv(scores, per_heads[i])``.
    The per-head and per-layer sorts are done once and shared by every budget (the calibration grid's fast path)."""
    n_layers, h, n = scores.shape
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)  # (L, H, N)
    head_rank = torch.empty_like(order)
    head_rank.scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    flat_order = torch.argsort(scores.reshape(n_layers, h * n), dim=-1, descending=True, stable=True)  # (L, H·N)
    rank_sorted = head_rank.reshape(n_layers, h * n).gather(1, flat_order)  # head rank, in layer order
    n_prot = torch.isposinf(scores).sum(-1)  # (L, H)
    prot_sorted = n_prot.repeat_interleave(n, dim=1).gather(1, flat_order)  # (L, H·N) protected count of the head
    layer_prot = n_prot.sum(-1)  # (L,)
    rows = []
    for per_head in per_heads:
        budget = max(0, min(h * int(per_head), h * n))
        floors = torch.tensor([0 if int(p) >= budget else
                               min(context_floor(budget, int(p), h, alpha, n), (budget - int(p)) // max(h, 1))
                               for p in layer_prot], dtype=torch.long, device=scores.device)  # (L,)
        in_floor = rank_sorted < (prot_sorted + floors[:, None]).clamp_max(n)  # protected + every head's floor
        in_floor &= (layer_prot < budget)[:, None]  # protected entries alone over budget: they compete
        rest = ~in_floor
        need = budget - in_floor.sum(1, keepdim=True)  # (L, 1)
        take = in_floor | (rest & (rest.cumsum(1) <= need))  # then the layer's best remaining
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


def lava_floor(scores: torch.Tensor, per_head: int, alpha: float = 0.2) -> int:
    """LAVa's per-head floor: ⌊α · C / (L·H)⌋ context entries, C = L·H·per_head − (protected entries), i.e. α of
    the even context share (⌊α·(B − w)⌋ with a w-token window per head)."""
    n_layers, h, n = scores.shape
    context = n_layers * h * per_head - int(torch.isposinf(scores).sum())
    return head_floor(max(0, context) / (n_layers * h), alpha, n)


def lava_layer_budgets(scores: torch.Tensor, per_head: int, alpha: float = 0.2) -> torch.Tensor:
    """LAVa layer budgets (L,): B_l = P_l + C_l, where P_l is the number of protected entries of layer l (the window
    is kept on top, as in the reference) and the context budget C = L·H·per_head − Σ P_l is split across layers by
    C_l = e_l / Σ e · C, e_l = ``normalised_entropy`` of layer l. Integers summing to L·H·per_head exactly; C_l lies
    within [Σ_h min(f, N − p_{l,h}), H·N − P_l] so every head's floor f = ``lava_floor`` fits. If the protected
    entries alone exceed the total, the whole total is split by entropy and they compete (highest scores first)."""
    n_layers, h, n = scores.shape
    total = n_layers * h * per_head
    ent = torch.tensor([normalised_entropy(scores[l]) for l in range(n_layers)], dtype=torch.float64)
    prot = torch.isposinf(scores).sum(-1)  # (L, H)
    p_l = prot.sum(-1)  # (L,)
    context = total - int(p_l.sum())
    if context < 0:
        return apportion(ent, total, torch.zeros(n_layers, dtype=torch.long),
                         torch.full((n_layers,), h * n, dtype=torch.long))
    f = lava_floor(scores, per_head, alpha)
    lo = (prot + f).clamp_max(n).sum(-1) - p_l  # (L,) every head's context floor
    hi = h * n - p_l
    return p_l + apportion(ent, context, lo, hi)


def lava(scores: torch.Tensor, per_head: int, alpha: float = 0.2, **_) -> torch.Tensor:
    """LAVa: entropy-proportional layer context budgets (window on top), AdaKV selection inside each layer with
    the floor ``lava_floor``."""
    n_layers = scores.shape[0]
    budgets = lava_layer_budgets(scores, per_head, alpha)
    f = lava_floor(scores, per_head, alpha)
    return torch.stack([layer_topk(scores[l], int(budgets[l]), f) for l in range(n_layers)])


def per_layer(scores: torch.Tensor, per_head: int, reduce: str = "mean", **_) -> torch.Tensor:
    """Per-layer selection for paged engines (vLLM, SGLang evict a token from every head of a layer at once): the
    heads' scores of a layer are combined (``reduce``: mean | max over heads; protected +inf stays +inf) and every
    head keeps the same top ``per_head`` positions of the combined score (ties: lower position). Each layer keeps
    exactly Hkv·per_head entries, as ``uniform``."""
    n_layers, h, n = scores.shape
    if reduce == "mean":
        combined = scores.mean(1)  # (L, N)
    elif reduce == "max":
        combined = scores.amax(1)
    else:
        raise BudgetError(f"unknown reduce {reduce!r}: expected 'mean' or 'max'")
    counts = torch.full((n_layers, 1), per_head, dtype=torch.long)
    return select_topk(combined.unsqueeze(1), counts).expand(n_layers, h, n).clone()  # (L, Hkv, N)


def global_topk(scores: torch.Tensor, per_head: int, **_) -> torch.Tensor:
    """One ranking over every (layer, head, position): the top L·Hkv·per_head entries are kept wherever they are
    (ties: lower layer, head, position), so layers and heads get what their scores earn — KVzip's default
    (``layerwise=False`` in its reference), for scores comparable across layers (attention probabilities). Protected
    entries rank first; a head may keep nothing."""
    n_layers, h, n = scores.shape
    total = max(0, min(n_layers * h * int(per_head), n_layers * h * n))
    order = torch.argsort(scores.reshape(-1), descending=True, stable=True)
    keep = torch.zeros(n_layers * h * n, dtype=torch.bool, device=scores.device)
    keep[order[:total]] = True
    return keep.view(n_layers, h, n)


Allocator = Callable[..., torch.Tensor]
ALLOCATORS: dict[str, Allocator] = {"uniform": uniform, "adakv": adakv, "lava": lava, "per_layer": per_layer,
                                    "global": global_topk}


def available_allocators() -> list[str]:
    return sorted(ALLOCATORS)


def check_allocator(name: str) -> None:
    if name not in ALLOCATORS:
        raise BudgetError(f"unknown allocator {name!r}: expected one of {available_allocators()}")


def allocate(scores: torch.Tensor, budget: Budget, allocator: str = ALLOCATOR, **params) -> torch.Tensor:
    """Keep mask (L, Hkv, N) holding L·Hkv·budget.per_head(N) entries in total, spread by ``allocator``."""
    check_allocator(allocator)
    return ALLOCATORS[allocator](scores, budget.per_head(scores.shape[-1]), **params)
