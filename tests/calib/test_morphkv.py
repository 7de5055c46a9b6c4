"""MorphKV: constant-size cache while generating."""

from __future__ import annotations

import math

import pytest
import torch

from kvcalib.calib.budget import Budget, allocate
from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.cache.morphkv import MorphKV
from kvcalib.calib.cache.policies import DECODE_POLICIES, get_policy
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.errors import KvcalibError


def test_registered_and_validated():
    assert DECODE_POLICIES["morphkv"] is MorphKV
    p = get_policy("morphkv", budget=48, recent=8)
    assert (p.budget, p.recent, p.fuse, p.interval) == (48, 8, "sum", 1)
    assert (MorphKV().budget, MorphKV().recent) == (2000, 32)
    with pytest.raises(KvcalibError):
        MorphKV(budget=8, recent=8)
    with pytest.raises(KvcalibError):
        MorphKV(fuse="mean")


def naive_keep(keys, valid, pos, q, budget, recent, fuse):
    """Kept original positions of one head: keys (S, d), valid (S,), pos (S,), q (G, R, d) of its query group."""
    entries = [(int(pos[i]), keys[i].tolist()) for i in range(len(pos)) if valid[i]]
    if len(entries) <= budget + 1:
        return sorted(p for p, _ in entries)
    entries.sort()
    recent_set = entries[-(recent + 1):]
    distant = entries[: -(recent + 1)]
    d = keys.shape[-1]
    fused = [0.0] * len(distant)
    for r in range(q.shape[1]):
        logits = [sum(sum(a * b for a, b in zip(q[g, r].tolist(), k)) for g in range(q.shape[0])) / math.sqrt(d)
                  for _, k in distant]
        m = max(logits)
        e = [math.exp(x - m) for x in logits]
        row = [x / sum(e) for x in e]
        fused = [f + a for f, a in zip(fused, row)] if fuse == "sum" else [max(f, a) for f, a in zip(fused, row)]
    top = sorted(range(len(distant)), key=lambda i: -fused[i])[: budget - recent]
    return sorted([distant[i][0] for i in top] + [p for p, _ in recent_set])


@pytest.mark.parametrize("fuse", ["sum", "max"])
def test_eviction_matches_naive_on_a_ragged_cache(fuse):
    gen = torch.Generator().manual_seed(3)
    hkv, g, n, d, budget, recent = 2, 3, 30, 8, 12, 4
    keys, values = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n, d, generator=gen)
    scores = torch.rand(1, hkv, n, generator=gen)
    scores[0, 1] *= 1e-3  # head 1 keeps few prefill entries: ragged
    cache = RaggedKVCache.from_mask(keys, values, allocate(scores, Budget(tokens=10), "adakv"))
    for _ in range(6):  # six generated tokens
        cache.append(0, torch.randn(1, hkv, 1, d, generator=gen), torch.randn(1, hkv, 1, d, generator=gen))
    cache.record_queries = recent
    cache.remember_queries(0, torch.randn(1, hkv * g, recent, d, generator=gen))
    layer = cache.layers[0]
    before = (layer.keys.clone(), layer.valid.clone(), layer.positions.clone())
    q = cache.recent_queries[0][0]
    policy = MorphKV(budget=budget, recent=recent, fuse=fuse)
    assert policy.evict_layer(cache, 0)
    after = cache.layers[0]
    valid = after.valid if after.valid is not None else torch.ones(after.positions.shape, dtype=torch.bool)
    for h in range(hkv):
        want = naive_keep(before[0][0, h], before[1][0, h], before[2][0, h], q[h * g:(h + 1) * g], budget, recent,
                          fuse)
        got = after.positions[0, h][valid[0, h]].tolist()
        assert got == want
        assert len(got) <= budget + 1
        for p, k in zip(got, after.keys[0, h][valid[0, h]]):  # the keys moved with their positions
            torch.testing.assert_close(k, before[0][0, h][before[2][0, h].tolist().index(p)])


@pytest.fixture(scope="module")
def short_prompt(engine):
    from kvcalib.calib.data.documents import load_essays

    prompt = engine.prompt(load_essays()["aord"][:700], "Continue the essay.")
    return prompt, engine.capture(prompt.context_ids)


def test_large_budget_reproduces_unpoliced_generation(engine, short_prompt):
    prompt, cap = short_prompt
    full = greedy_decode(engine.lm.model, RaggedKVCache.from_full(cap.keys, cap.values), prompt.question_ids, 16,
                         ignore_eos=True)
    policy = MorphKV(budget=2000, recent=32)
    policed = greedy_decode(engine.lm.model, RaggedKVCache.from_full(cap.keys, cap.values), prompt.question_ids, 16,
                            policy=policy, ignore_eos=True)
    assert policed.token_ids == full.token_ids and len(full.token_ids) == 16
    assert policy.report()["evictions"] == 0


def test_interval_bounds_the_overshoot(engine, short_prompt):
    prompt, cap = short_prompt
    policy = MorphKV(budget=48, recent=8, interval=4)
    cache = RaggedKVCache.from_full(cap.keys, cap.values)
    greedy_decode(engine.lm.model, cache, prompt.question_ids, 13, policy=policy, ignore_eos=True)
    rep = policy.report()
    sizes = dict(zip(rep["steps"], rep["max_entries_per_head"]))
    assert rep["evictions"] == 3  # after steps 3, 7, 11 of 0..11
    assert sizes[0] == cap.num_tokens + prompt.question_ids.numel() + 1  # nothing evicted yet
    assert all(sizes[s] == 49 for s in (3, 7, 11))
    assert max(v for s, v in sizes.items() if s >= 3) <= 48 + 1 + 4 - 1  # grows by < interval in between


@pytest.mark.slow
def test_cache_stays_constant_over_512_tokens(engine, short_prompt):
    prompt, cap = short_prompt
    budget, recent = 48, 8
    policy = MorphKV(budget=budget, recent=recent)
    cache = RaggedKVCache.from_full(cap.keys, cap.values)
    gen = greedy_decode(engine.lm.model, cache, prompt.question_ids, 512, policy=policy, ignore_eos=True)
    assert len(gen.token_ids) == 512
    rep = policy.report()
    assert rep["steps"][0] == -1 and rep["steps"][1:] == list(range(511))
    assert max(rep["max_entries_per_head"][1:]) == budget + 1  # every step: at most C + 1 entries per head
    assert rep["evictions"] == 511
    assert int(cache.kept_counts().max()) == budget + 1
    per_entry = 2 * cap.head_dim * cap.keys.element_size() * cap.num_layers * cap.keys.shape[1]
    assert set(rep["bytes"][1:]) == {(budget + 1) * per_entry}  # constant memory
    assert rep["bytes"][0] == cap.num_tokens * per_entry


def test_seed_gives_the_first_eviction_r_queries(engine, short_prompt):
    """The reference seeds the observation window with the last prompt queries: with a question shorter than R,
    the first eviction still sees R queries — the context's last ones, then the question's."""
    prompt, cap = short_prompt
    recent = 32
    q_len = prompt.question_ids.numel()
    assert q_len < recent
    policy = MorphKV(budget=64, recent=recent)
    cache = RaggedKVCache.from_full(cap.keys, cap.values)
    policy.seed(cache, cap.queries)
    policy.begin(cache)
    seeded = [cache.recent_queries[l].clone() for l in range(cap.num_layers)]
    for l in range(cap.num_layers):  # exactly the last R context queries
        torch.testing.assert_close(seeded[l][0], cap.queries[l, :, -recent:])
    greedy_decode(engine.lm.model, cache, prompt.question_ids, 1, policy=policy, ignore_eos=True)
    for l in range(cap.num_layers):
        q = cache.recent_queries[l]
        assert q.shape[2] == recent
        # the oldest R − (question) queries are still the context's last ones (the one generated token is not fed)
        keep = recent - q_len
        torch.testing.assert_close(q[0, :, :keep], cap.queries[l, :, -keep:])
