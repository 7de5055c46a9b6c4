"""The adaptive allocators: AdaKV (head-adaptive with a floor) and LAVa (entropy-proportional layer budgets)."""

from __future__ import annotations

import math

import pytest
import torch

from kvcalib.calib.budget import (
    ALLOCATORS,
    Budget,
    BudgetError,
    adakv,
    adakv_masks,
    allocate,
    apportion,
    context_floor,
    lava,
    lava_layer_budgets,
    layer_topk,
    normalised_entropy,
)
from kvcalib.calib.cache.ragged import RaggedKVCache

L, H, N = 5, 3, 53


def peaked_scores(seed: int = 0) -> torch.Tensor:
    """Positive scores whose layers differ in how peaked they are (so their entropies differ)."""
    gen = torch.Generator().manual_seed(seed)
    temps = torch.tensor([0.3, 1.0, 2.0, 0.6, 1.5])[:, None, None]
    return torch.softmax(torch.randn(L, H, N, generator=gen) * 3 / temps, dim=-1)


def naive_adakv_layer(s: list[list[float]], budget: int, floor: int) -> set[tuple[int, int]]:
    kept = set()
    for h, row in enumerate(s):
        kept |= {(h, j) for j in sorted(range(len(row)), key=lambda j: -row[j])[:floor]}
    rest = sorted(((s[h][j], h, j) for h in range(len(s)) for j in range(len(s[h])) if (h, j) not in kept),
                  key=lambda x: -x[0])
    kept |= {(h, j) for _, h, j in rest[: budget - len(kept)]}
    return kept


def naive_entropy(values: list[float]) -> float:
    vals = [v for v in values if math.isfinite(v)]
    lo = min(vals)
    if lo < 0:
        vals = [v - lo for v in vals]
    tot = sum(vals)
    return -sum(v / tot * math.log(v / tot) for v in vals if v > 0) / math.log(len(vals))


def test_registry():
    assert {"uniform", "adakv", "lava"} <= set(ALLOCATORS)
    with pytest.raises(BudgetError, match="adakv"):
        allocate(peaked_scores(), Budget(ratio=0.5), "nope")


@pytest.mark.parametrize("per_head", [1, 7, 20, 40, N])
def test_adakv_matches_naive_and_totals(per_head):
    s = peaked_scores(1)
    keep = adakv(s, per_head)
    floor = int(0.2 * per_head)
    assert int(keep.sum()) == L * H * per_head
    for l in range(L):
        assert int(keep[l].sum()) == H * per_head  # AdaKV keeps each layer's budget
        assert int(keep[l].sum(-1).min()) >= floor
        got = {(h, j) for h, j in keep[l].nonzero().tolist()}
        assert got == naive_adakv_layer(s[l].tolist(), H * per_head, floor)


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.5])
def test_adakv_masks_equal_one_call_per_budget(alpha):
    s = peaked_scores(2)
    s[:, :, :3] = math.inf  # protected entries
    s[:, 1, 10:20] = s[:, 1, 10:11]  # ties inside a head and across heads
    s[:, 2, 10:20] = s[:, 1, 10:11]
    per = [0, 1, 5, 17, 40, N]
    masks = adakv_masks(s, per, alpha=alpha)
    assert masks.shape == (len(per), L, H, N)
    for i, p in enumerate(per):  # the vectorised pass equals AdaKV's selection run layer by layer
        by_layer = torch.stack([layer_topk(s[l], H * p, context_floor(H * p, int(torch.isposinf(s[l]).sum()), H,
                                                                      alpha, N)) for l in range(L)])
        assert torch.equal(masks[i], by_layer), p
        assert torch.equal(adakv(s, p, alpha=alpha), by_layer), p


def test_adakv_floor_binds_for_a_starved_head():
    s = torch.rand(1, H, N)
    s[0, 0] *= 1e-6  # head 0 loses every global comparison
    keep = adakv(s, 20, alpha=0.2)
    assert int(keep[0, 0].sum()) == 4  # exactly its floor ⌊0.2·20⌋
    assert bool(keep[0, 0][s[0, 0].topk(4).indices].all())
    assert int(keep.sum()) == H * 20


@pytest.mark.parametrize("allocator", ["adakv", "lava"])
def test_protected_entries_kept(allocator):
    s = peaked_scores(2)
    s[:, :, -6:] = float("inf")  # a 6-token window per head
    s[:, 1, :2] = float("inf")  # and sinks on one head
    keep = allocate(s, Budget(ratio=0.75), allocator)  # 14 per head on average
    assert int(keep.sum()) == L * H * Budget(ratio=0.75).per_head(N)
    assert bool(keep[torch.isposinf(s)].all())


def test_normalised_entropy_matches_naive_and_handles_protection_and_negatives():
    s = peaked_scores(3)
    for l in range(L):
        assert normalised_entropy(s[l]) == pytest.approx(naive_entropy(s[l].flatten().tolist()), rel=1e-9)
    x = torch.randn(H, N)  # negative scores are shifted by −min
    assert normalised_entropy(x) == pytest.approx(naive_entropy(x.flatten().tolist()), rel=1e-9)
    y = s[0].clone()
    y[:, -4:] = float("inf")  # protected entries are left out of the distribution
    assert normalised_entropy(y) == pytest.approx(naive_entropy(s[0, :, :-4].flatten().tolist()), rel=1e-9)
    assert normalised_entropy(torch.ones(H, N)) == pytest.approx(1.0)
    assert normalised_entropy(torch.zeros(H, N)) == 1.0  # degenerate: treated as uniform


@pytest.mark.parametrize("per_head", [10, 26])
def test_lava_layer_budgets_are_entropy_proportional(per_head):
    s = peaked_scores(4)
    total = L * H * per_head
    budgets = lava_layer_budgets(s, per_head)
    ent = [naive_entropy(s[l].flatten().tolist()) for l in range(L)]
    want = [e / sum(ent) * total for e in ent]
    assert int(budgets.sum()) == total
    assert max(abs(b - w) for b, w in zip(budgets.tolist(), want)) < 1.0
    assert len(set(budgets.tolist())) > 1  # genuinely non-uniform


def test_lava_keep_mask_follows_layer_budgets_with_floor():
    s = peaked_scores(5)
    per_head = 12
    keep = lava(s, per_head)
    budgets = lava_layer_budgets(s, per_head)
    assert keep.sum((1, 2)).tolist() == budgets.tolist()
    assert int(keep.sum()) == L * H * per_head
    assert int(keep.sum(-1).min()) >= int(0.2 * per_head)
    for l in range(L):
        got = {(h, j) for h, j in keep[l].nonzero().tolist()}
        assert got == naive_adakv_layer(s[l].tolist(), int(budgets[l]), int(0.2 * per_head))


def test_lava_budgets_respect_floors_and_caps():
    s = torch.rand(3, H, 10)
    s[0] = torch.zeros(H, 10)
    s[0, 0, 0] = 1.0  # entropy 0: only its floor
    b = lava_layer_budgets(s, per_head=6)
    assert int(b.sum()) == 3 * H * 6
    assert int(b[0]) == H * 1  # ⌊0.2·6⌋ per head
    s[1, :, :-2] = float("inf")  # 8 protected per head, on top of the context budget
    b = lava_layer_budgets(s, per_head=6)
    assert int(b.sum()) == 3 * H * 6
    assert int(b[1]) >= 24 and int(b.max()) <= H * 10
    keep = lava(s, 6)
    assert bool(keep[torch.isposinf(s)].all())


# ---------------------------------------------------------------------------------------------- window on top
# The reference codes (AdaKV's adaptive SnapKV, MGDDestiny/Lava) handle the budget B per head as w window
# positions kept on top of a *prefix* (context) budget B − w: AdaKV's floor is ⌊α·(B − w)⌋ context entries per head
# and LAVa splits only the prefix budget (B − w)·L·H across layers by normalised entropy.
def windowed_scores(n_layers: int, h: int, n: int, w: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    powers = torch.linspace(0.5, 8.0, n_layers)[:, None, None]  # layers differ in how peaked they are
    s = torch.rand(n_layers, h, n, generator=gen) ** powers + 0.01
    s[:, 0] *= 1e-3  # head 0 loses every global comparison
    s[..., -w:] = float("inf")  # the observation window
    return s


def reference_adakv_layer(prefix: list[list[float]], budget_per_head: int, w: int, alpha: float) -> set:
    """AdaKV reference for one layer: base = B − w context entries per head on average, floor ⌊α·base⌋ of each
    head's best prefix positions, the rest of H·base by global score; the last w positions on top."""
    h, n_prefix = len(prefix), len(prefix[0])
    base = budget_per_head - w
    floor = int(base * alpha)
    kept = set()
    for hh, row in enumerate(prefix):
        kept |= {(hh, j) for j in sorted(range(n_prefix), key=lambda j: (-row[j], j))[:floor]}
    rest = sorted((-prefix[hh][j], hh, j) for hh in range(h) for j in range(n_prefix) if (hh, j) not in kept)
    kept |= {(hh, j) for _, hh, j in rest[: h * base - len(kept)]}
    return kept | {(hh, n_prefix + t) for hh in range(h) for t in range(w)}


def test_adakv_floor_counts_context_entries_with_the_window_on_top():
    n_layers, h, n, w, per_head, alpha = 2, 4, 200, 32, 64, 0.2
    s = windowed_scores(n_layers, h, n, w, seed=7)
    keep = adakv(s, per_head, alpha=alpha)
    floor = int((per_head - w) * alpha)  # 6 context entries, not ⌊0.2·64⌋ = 12 satisfied by the window
    for l in range(n_layers):
        context = keep[l, :, :-w].sum(-1)
        assert int(context.min()) >= floor
        assert int(context[0]) == floor  # the starved head keeps exactly its floor of context entries
        got = {(hh, j) for hh, j in keep[l].nonzero().tolist()}
        assert got == reference_adakv_layer(s[l, :, :-w].tolist(), per_head, w, alpha)
    masks = adakv_masks(s, [per_head, 40, 20], alpha=alpha)  # the fast path agrees
    for i, p in enumerate([per_head, 40, 20]):
        assert torch.equal(masks[i], adakv(s, p, alpha=alpha)), p


def test_lava_splits_only_the_prefix_budget_and_adds_the_window():
    n_layers, h, n, w, per_head, alpha = 3, 4, 300, 32, 64, 0.2
    s = windowed_scores(n_layers, h, n, w, seed=8)
    budgets = lava_layer_budgets(s, per_head, alpha=alpha)
    ent = [naive_entropy(s[l, :, :-w].flatten().tolist()) for l in range(n_layers)]
    prefix_total = n_layers * h * (per_head - w)
    want = [e / sum(ent) * prefix_total for e in ent]
    got = [int(b) - h * w for b in budgets]  # the window, h·w entries per layer, on top
    assert sum(got) == prefix_total
    assert max(abs(g - x) for g, x in zip(got, want)) < 1.0
    keep = lava(s, per_head, alpha=alpha)
    floor = int((per_head - w) * alpha)
    assert int(keep[..., :-w].sum(-1).min()) >= floor  # every head keeps its floor of context entries
    assert bool(keep[..., -w:].all())
    for l in range(n_layers):  # inside a layer: AdaKV's selection of the layer's prefix budget
        got_l = {(hh, j) for hh, j in keep[l].nonzero().tolist()}
        prefix = s[l, :, :-w].tolist()
        kept = set()
        for hh, row in enumerate(prefix):
            kept |= {(hh, j) for j in sorted(range(n - w), key=lambda j: (-row[j], j))[:floor]}
        rest = sorted((-prefix[hh][j], hh, j) for hh in range(h) for j in range(n - w) if (hh, j) not in kept)
        kept |= {(hh, j) for _, hh, j in rest[: got[l] - len(kept)]}
        assert got_l == kept | {(hh, n - w + t) for hh in range(h) for t in range(w)}


def test_lava_split_of_the_issue_example():
    """Entropies 0.46 / 0.98, H = 4, B = 64, w = 32: prefix budgets 82 / 174 (the reference split of 256)."""
    out = apportion(torch.tensor([0.46, 0.98], dtype=torch.float64), 2 * 4 * (64 - 32), torch.zeros(2),
                    torch.full((2,), 4 * 300))
    assert out.tolist() == [82, 174]


def test_apportion_exact_and_bounded():
    out = apportion(torch.tensor([1.0, 100.0, 1.0, 0.0]), 40, torch.tensor([2, 2, 2, 2]),
                    torch.tensor([30, 20, 30, 30]))
    assert int(out.sum()) == 40 and out.tolist()[1] == 20
    assert all(2 <= v for v in out.tolist()) and out[0] == out[2]
    with pytest.raises(BudgetError):
        apportion(torch.ones(2), 100, torch.tensor([0, 0]), torch.tensor([10, 10]))


@pytest.mark.parametrize("allocator", ["adakv", "lava"])
def test_ragged_mask_flows_into_cache(allocator):
    d = 4
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(L, H, N, d, generator=gen)
    values = torch.randn(L, H, N, d, generator=gen)
    keep = allocate(peaked_scores(6), Budget(ratio=0.6), allocator)
    cache = RaggedKVCache.from_mask(keys, values, keep)
    counts = keep.sum(-1)  # (L, H)
    assert torch.equal(cache.kept_counts()[0], counts)
    elem = 2 * d * keys.element_size()
    assert cache.kept_bytes == int(counts.sum()) * elem
    # documented padding: per layer Σ_h (max_h n_{l,h} − n_{l,h}) slots
    padding = int((counts.max(-1, keepdim=True).values - counts).sum())
    assert cache.padding_bytes == padding * elem
    assert cache.nbytes == (int(counts.sum()) + padding) * elem
    for l in range(L):  # kept entries are the right ones, in order
        for h in range(H):
            n = int(counts[l, h])
            torch.testing.assert_close(cache.layers[l].keys[0, h, :n], keys[l, h][keep[l, h]])
