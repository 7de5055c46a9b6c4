"""One-pass quality curves: fidelity (and KL) of a context at every compression ratio of a grid, from ONE prefill.

Design (see docs/calibration.md):

1. One prefill captures the full K/V; the method scores the positions once.
2. Every ratio of the grid (plus ratio 0, the full-cache reference) becomes one keep mask; the masks are stacked as
   the batch rows of ``RaggedKVCache.masked`` — every row shares the same full K/V tensors (expanded views, no copy)
   and differs only in its validity mask, so a masked-out slot gets exactly zero attention weight, as if it had been
   physically evicted (``from_mask``).
3. All K probes are packed into ONE appended sequence with a block-diagonal segment mask (``cache.segments``): each
   probe attends to the cache and causally to its own tokens only, and every probe takes the positions N, N+1, ...
   right after the context, exactly as if it were fed alone.
4. One forward of (R + 1) rows × T packed tokens yields every probe's teacher-forced logits at every ratio; the LM
   head is applied only at the positions that predict target tokens, one row at a time. The cache is restored
   (``snapshot``/``restore``) so further probe batches can be run against it.

``physical_curve`` is the slow reference used by the tests: it physically compresses the cache for each ratio and
feeds each probe separately.

``largest_safe_ratio`` turns a curve into r*(τ).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvcalib.calib import budget as budgets
from kvcalib.calib.cache.ragged import RaggedKVCache, segment_offsets
from kvcalib.calib.calibration.probes import PackedProbes, Probe, fidelity_from_nll, pack
from kvcalib.calib.defaults import ALLOCATOR, RATIOS
from kvcalib.calib.lm.protocols import LanguageModel

DEFAULT_RATIOS = RATIOS  # the default grid (calib.defaults.RATIOS), re-exported under its historical name
MONOTONE_TOL = 0.01  # a rise of fidelity by more than this between grid points flags the curve as non-monotone


@dataclass
class Curve:
    ratios: list[float]  # the grid, ascending (ratio 0 = the full reference is implicit: fidelity 1, KL 0)
    fidelity: list[float]  # mean over probes, per ratio
    kl: list[float]  # mean next-token KL(full ‖ r) over every target token, per ratio
    probe_fidelity: list[list[float]]  # (R, K)
    nll_full: list[float]  # (K,) mean target NLL per probe with the full cache
    nll: list[list[float]]  # (R, K)
    kept_fraction: list[float] = field(default_factory=list)  # realised kept fraction per ratio
    seconds: float = 0.0


FIRST_STEP, STEP = 4, 3  # rows of the first forward (the reference + 3 ratios) and of each later one (``row_steps``)


def row_steps(n_rows: int, until: bool, max_rows: int | None = None) -> list[tuple[int, int]]:
    """(start, stop) slices of the keep-mask rows fed per forward: all at once, or — ``until`` the curve falls below
    τ — the reference and the three smallest ratios first, then three ratios at a time in ascending order, so a
    calibration stops after the forward holding its first failing ratio. ``max_rows`` splits every step further
    (bounded memory)."""
    if not until:
        steps = [(0, n_rows)]
    else:
        edges = [0, *range(min(FIRST_STEP, n_rows), n_rows, STEP), n_rows]
        steps = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
    if max_rows:
        steps = [(a, min(a + max_rows, b)) for a0, b in steps for a in range(a0, b, max_rows)]
    return steps


def below(fidelity, tau: float | None) -> bool:
    """True once some ratio's fidelity fell below ``tau`` (r*(τ) is then fixed: ``largest_safe_ratio`` reads the
    curve only up to its first failing ratio)."""
    return tau is not None and any(float(f) < tau for f in fidelity)


def keep_masks(scores: torch.Tensor, ratios, allocator: str = ALLOCATOR, full_row: bool = True,
               **alloc_params) -> torch.Tensor:
    """(R [+1], L, Hkv, N) keep masks: an all-True reference row first (``full_row``), then one per ratio."""
    rows = [torch.ones(scores.shape, dtype=torch.bool, device=scores.device)] if full_row else []
    ranks = None
    if allocator == "uniform" and not alloc_params:  # one sort serves every ratio (same order as select_topk)
        order = torch.argsort(scores, dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order)
        ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    if allocator == "adakv" and set(alloc_params) <= {"alpha"}:  # shared sorts for every ratio (same result)
        per = [budgets.Budget(ratio=float(r)).per_head(scores.shape[-1]) if r > 0 else scores.shape[-1]
               for r in ratios]
        masks = budgets.adakv_masks(scores, per, **alloc_params)
        return torch.cat([torch.stack(rows), masks]) if rows else masks
    for r in ratios:
        if r <= 0:
            rows.append(torch.ones(scores.shape, dtype=torch.bool, device=scores.device))
        elif ranks is not None:
            rows.append(ranks < budgets.Budget(ratio=float(r)).per_head(scores.shape[-1]))
        else:
            rows.append(budgets.allocate(scores, budgets.Budget(ratio=float(r)), allocator, **alloc_params))
    return torch.stack(rows)


@torch.no_grad()
def packed_hidden(lm: LanguageModel, cache: RaggedKVCache, packed: PackedProbes) -> torch.Tensor:
    """Feed the packed probes to every row of ``cache`` (then restore it). Returns the final hidden states at the
    target-predicting positions, (B, M, hidden)."""
    model = lm.model
    device = next(model.parameters()).device
    b = cache.batch_size
    state = cache.snapshot()
    cache.segments = packed.segments.to(device)
    try:
        pos = (cache.next_position + segment_offsets(packed.segments)).to(device)
        ids = packed.ids.to(device).unsqueeze(0).expand(b, -1)
        out = model.get_decoder()(input_ids=ids, position_ids=pos.unsqueeze(0).expand(b, -1), use_cache=False,
                                  kvcalib_state=cache)
        hidden = out.last_hidden_state[:, packed.pred_index.to(device)]
    finally:
        cache.restore(state)
    return hidden


def _rows_stats(head, hidden: torch.Tensor, packed: PackedProbes, ref_logp: torch.Tensor | None):
    """NLL per probe (b, K) and mean KL(ref ‖ row) over targets (b,) for rows' hidden states (b, M, h); the first
    row is the reference when ``ref_logp`` is None. Returns (nll, kl, ref_logp)."""
    b, m = hidden.shape[:2]
    logp = F.log_softmax(head(hidden.reshape(b * m, -1)).float(), dim=-1).view(b, m, -1)  # (b, M, V)
    tgt = packed.targets.to(logp.device)
    tok_nll = -logp.gather(2, tgt.view(1, m, 1).expand(b, m, 1))[..., 0]  # (b, M)
    owner = packed.owner.to(logp.device)
    sums = torch.zeros(b, packed.n_probes, dtype=torch.float64, device=logp.device).index_add_(
        1, owner, tok_nll.double())
    counts = torch.bincount(owner, minlength=packed.n_probes).double()
    nll = (sums / counts).cpu()
    if ref_logp is None:
        ref_logp = logp[0]
    kl = (ref_logp.exp().unsqueeze(0) * (ref_logp.unsqueeze(0) - logp)).sum(-1).clamp_min(0.0)  # (b, M)
    return nll, kl.double().mean(-1).cpu(), ref_logp


@torch.no_grad()
def evaluate_rows(lm: LanguageModel, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, probes: list[Probe],
                  max_rows: int | None = None, logits_budget: int = 2**25,
                  tau: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe NLL (B', K) and KL vs row 0 (B',) for the keep-mask rows of ``keep`` (B, L, Hkv, N); row 0 is the
    reference. Rows are fed ``max_rows`` at a time (all at once by default); the LM head and log-softmax are
    applied to as many rows at once as fit in ``logits_budget`` floats. ``tau``: rows are fed in ascending steps
    (``row_steps``) and evaluation stops after the step where the mean fidelity of a row falls below τ (B' ≤ B
    rows: every row up to the first failing one, which is all r*(τ) reads)."""
    packed = pack(probes)
    head = lm.model.get_output_embeddings()
    n_rows = keep.shape[0]
    vocab = head.weight.shape[0]
    per = max(1, logits_budget // max(1, packed.targets.numel() * vocab))
    nlls, kls = [], []
    ref_logp = None
    for s, e in row_steps(n_rows, tau is not None, max_rows):
        cache = RaggedKVCache.masked(keys, values, keep[s:e])
        hidden = packed_hidden(lm, cache, packed)  # (b, M, h)
        del cache
        for i in range(0, hidden.shape[0], per):
            nll, kl, ref_logp = _rows_stats(head, hidden[i:i + per], packed, ref_logp)
            nlls.append(nll)
            kls.append(kl)
        if tau is not None:
            nll_so_far = torch.cat(nlls)
            if below(fidelity_from_nll(nll_so_far[:1], nll_so_far[1:]).mean(1), tau):
                break
    return torch.cat(nlls), torch.cat(kls)


def _curve_from_rows(ratios, nll: torch.Tensor, kl: torch.Tensor, keep: torch.Tensor, seconds: float) -> Curve:
    """The curve of the evaluated rows (``nll`` (B', K): the reference and the first B' − 1 ratios)."""
    nll_full = nll[0]
    g = fidelity_from_nll(nll_full.unsqueeze(0), nll[1:])  # (R', K)
    kept = keep[1:nll.shape[0]].flatten(1).float().mean(1)
    ratios = list(ratios)[:nll.shape[0] - 1]
    return Curve(ratios=[float(r) for r in ratios], fidelity=[float(x) for x in g.mean(1)],
                 kl=[float(x) for x in kl[1:]], probe_fidelity=g.tolist(), nll_full=nll_full.tolist(),
                 nll=nll[1:].tolist(), kept_fraction=[float(x) for x in kept], seconds=seconds)


def one_pass_curve(lm: LanguageModel, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                   probes: list[Probe], ratios=RATIOS, allocator: str = ALLOCATOR, max_rows: int | None = None,
                   keep: torch.Tensor | None = None, tau: float | None = None, **alloc_params) -> Curve:
    """The fidelity/KL curve over ``ratios`` from captured full ``keys``/``values`` (L, Hkv, N, d) and ``scores``
    (L, Hkv, N), all ratios batched as rows of one masked cache, all probes packed into one sequence.
    ``keep`` (R + 1, L, Hkv, N) may be passed when the masks were already built (``keep_masks``). ``tau``: the
    curve ends at its first ratio with fidelity < τ (``evaluate_rows``): the same r*(τ) for fewer rows."""
    t0 = time.perf_counter()
    ratios = sorted(float(r) for r in ratios)
    if keep is None:
        keep = keep_masks(scores, ratios, allocator, **alloc_params)
    nll, kl = evaluate_rows(lm, keys, values, keep, probes, max_rows=max_rows, tau=tau)
    return _curve_from_rows(ratios, nll, kl, keep, time.perf_counter() - t0)


@torch.no_grad()
def physical_rows(lm: LanguageModel, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                  probes: list[Probe]) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``evaluate_rows``: for every keep-mask row, physically compress (``from_mask``) and feed each
    probe alone through ``append``. Returns probe NLL (B, K) and KL vs row 0 (B,)."""
    from kvcalib.calib.cache.decode import forward_tokens

    nll = torch.zeros(keep.shape[0], len(probes), dtype=torch.float64)
    kl_sum = torch.zeros(keep.shape[0], dtype=torch.float64)
    n_tok = sum(p.num_targets for p in probes)
    ref: list[torch.Tensor] = []
    for row in range(keep.shape[0]):
        cache = RaggedKVCache.from_mask(keys, values, keep[row])
        for k, p in enumerate(probes):
            state = cache.snapshot()
            logits = forward_tokens(lm.model, cache, p.ids.view(1, -1), all_logits=True)[0]  # (T, V)
            cache.restore(state)
            logp = F.log_softmax(logits[p.target_start - 1:-1].float(), dim=-1)
            nll[row, k] = float(-logp.gather(1, p.ids[p.target_start:, None].to(logp.device)).double().mean())
            if row == 0:
                ref.append(logp)
            else:
                kl_sum[row] += float((ref[k].exp() * (ref[k] - logp)).sum(-1).clamp_min(0).double().sum())
    return nll, kl_sum / n_tok


def physical_curve(lm: LanguageModel, keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                   probes: list[Probe], ratios=RATIOS, allocator: str = ALLOCATOR, **alloc_params) -> Curve:
    """Reference implementation: physically compress (``from_mask``) for each ratio and feed each probe alone."""
    t0 = time.perf_counter()
    ratios = sorted(float(r) for r in ratios)
    keep = keep_masks(scores, ratios, allocator, **alloc_params)
    nll, kl = physical_rows(lm, keys, values, keep, probes)
    return _curve_from_rows(ratios, nll, kl, keep, time.perf_counter() - t0)


def is_monotone(fidelity, tol: float = MONOTONE_TOL) -> bool:
    """True when fidelity never rises by more than ``tol`` from one grid ratio to the next (ratio ascending)."""
    f = [1.0] + [float(x) for x in fidelity]
    return all(f[i + 1] <= f[i] + tol for i in range(len(f) - 1))


def largest_safe_ratio(ratios, fidelity, tau: float = 0.95, monotone_tol: float = MONOTONE_TOL):
    """r*(τ) from a curve: ``(r_star, r_star_grid, monotone)``.

    Walking the grid upwards from ratio 0 (fidelity 1), ``r_star_grid`` is the last grid ratio before the first one
    whose fidelity falls below τ (so every ratio up to it is safe — on a monotone curve this is the largest grid
    ratio with fidelity ≥ τ; on a non-monotone one a later recovery above τ is ignored, the conservative reading).
    ``r_star`` refines it by linear interpolation to the τ crossing between that grid point and the next; when
    every grid ratio is safe it is the largest grid ratio (no extrapolation). ``monotone`` flags curves whose
    fidelity rises by more than ``monotone_tol`` somewhere along the grid."""
    pairs = sorted(zip((float(r) for r in ratios), (float(f) for f in fidelity)))
    if not pairs:
        raise ValueError("empty curve")
    monotone = is_monotone([f for _, f in pairs], monotone_tol)
    prev_r, prev_f = 0.0, 1.0
    for r, f in pairs:
        if f < tau:
            if prev_f <= f:  # cannot happen from ratio 0 (f=1 >= tau > f); guard against degenerate input
                return prev_r, prev_r, monotone
            r_star = prev_r + (prev_f - tau) / (prev_f - f) * (r - prev_r)
            return float(min(max(r_star, prev_r), r)), prev_r, monotone
        prev_r, prev_f = r, f
    return prev_r, prev_r, monotone
