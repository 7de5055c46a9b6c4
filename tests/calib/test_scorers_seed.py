"""Naive references for the seed methods CurDKV, OBCache, LAVa and Lookahead Q-Cache.

Each formula is recomputed element by element in plain Python (floats, loops) from the published math on small
random captures (GQA 3:1, odd lengths) and compared with the vectorised scorer. Lookahead Q-Cache runs on the real
model: its pseudo-token queries are checked, and its scores recomputed from them.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcalib.calib.budget import Budget, allocate
from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers import SCORERS, ScoreContext, get_scorer
from tests.support import assert_feeds_allocator

HKV, GROUP, DIM = 2, 3, 8
INF = float("inf")


def random_capture(n: int, layers: int = 2, seed: int = 0) -> Capture:
    gen = torch.Generator().manual_seed(seed)
    hq = HKV * GROUP
    keys = torch.randn(layers, HKV, n, DIM, generator=gen) * 1.5
    values = torch.randn(layers, HKV, n, DIM, generator=gen) * torch.rand(layers, HKV, n, 1, generator=gen)
    return Capture(
        input_ids=torch.arange(n),
        keys=keys,
        values=values,
        keys_pre=torch.randn(layers, HKV, n, DIM, generator=gen),
        queries=torch.randn(layers, hq, n, DIM, generator=gen) * 1.5,
        last_logits=torch.zeros(16),
    )


# ---------------------------------------------------------------------------------------------- naive helpers
def rows(t: torch.Tensor) -> list[list[float]]:
    return t.double().tolist()


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def window_attention(cap: Capture, layer: int, qh: int, w: int):
    """Per window query t (position N − w + t): logits Z_t (over keys j ≤ pos) and A_t = softmax(Z_t)."""
    n = cap.num_tokens
    ks = rows(cap.keys[layer, qh // GROUP])
    qs = rows(cap.queries[layer, qh, n - w:])
    out = []
    for t, q in enumerate(qs):
        pos = n - w + t
        z = [dot(q, ks[j]) / math.sqrt(DIM) for j in range(pos + 1)]
        m = max(z)
        e = [math.exp(x - m) for x in z]
        s = sum(e)
        out.append((z, [x / s for x in e]))
    return out


def maxpool_prefix(x: list[float], keep_last: int, kernel: int = 7) -> list[float]:
    """Stride-1 max pooling (padding k//2) over the first N − keep_last entries; the tail unchanged."""
    cut = len(x) - keep_last
    r = kernel // 2
    return [max(x[max(0, i - r): min(cut, i + r + 1)]) for i in range(cut)] + x[cut:]


def gqa(per_q: list[list[float]], how: str, group: int = GROUP) -> list[list[float]]:
    out = []
    for h in range(len(per_q) // group):
        grp = per_q[h * group:(h + 1) * group]
        if how == "mean":
            out.append([sum(c) / group for c in zip(*grp)])
        else:
            out.append([max(c) for c in zip(*grp)])
    return out


def protect_last(x: list[float], w: int) -> list[float]:
    return x[: len(x) - w] + [INF] * w


def naive_window_method(cap: Capture, w: int, how: str, per_key) -> list:
    """The SnapKV-style skeleton in plain Python: for every layer and query head, ``per_key(vs, att)`` gives the N
    raw scores from the head's values and its window attention; they are max-pooled over the prefix, reduced over
    each GQA group (``how``) and the last w positions protected."""
    out = []
    for l in range(cap.num_layers):
        per_q = []
        for qh in range(HKV * GROUP):
            vs = rows(cap.values[l, qh // GROUP])
            per_q.append(maxpool_prefix(per_key(vs, window_attention(cap, l, qh, w)), w))
        out.append([protect_last(x, w) for x in gqa(per_q, how)])
    return out


def assert_scores(got: torch.Tensor, want: list, rtol: float = 1e-4):
    want = torch.tensor(want, dtype=torch.float64)
    assert got.shape == want.shape
    got = got.double()
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], rtol=rtol, atol=1e-9)


# ---------------------------------------------------------------------------------------------- OBCache
def naive_obcache(cap: Capture, w: int, saliency: str) -> list:
    def per_key(vs, att):
        os_ = [[sum(a[j] * vs[j][c] for j in range(len(a))) for c in range(DIM)] for _, a in att]
        s = []
        for j in range(cap.num_tokens):
            vn = dot(vs[j], vs[j])
            sv = sk = cross = 0.0
            for (z, a), o in zip(att, os_):
                if j >= len(a):  # causal: key after the query
                    continue
                diff = [vs[j][c] - o[c] for c in range(DIM)]
                sv += a[j] ** 2 * vn
                sk += (a[j] * z[j]) ** 2 * dot(diff, diff)
                cross += a[j] ** 2 * z[j] * (vn - dot(vs[j], o))
            s.append({"value": sv, "key": sk, "joint": sv + sk + 2 * cross}[saliency])
        return s

    return naive_window_method(cap, w, "mean", per_key)


@pytest.mark.parametrize("saliency,n,w", [("value", 37, 8), ("key", 37, 8), ("joint", 37, 8), ("key", 61, 32)])
def test_obcache_matches_naive(saliency, n, w):
    cap = random_capture(n, layers=1 if w == 32 else 2, seed=n)
    got = get_scorer("obcache", saliency=saliency, window=w).score(cap)
    assert_scores(got, naive_obcache(cap, w, saliency))


def test_obcache_default_is_key_saliency_with_window_32():
    s = get_scorer("obcache")
    assert (s.saliency, s.window, s.kernel) == ("key", 32, 7)
    with pytest.raises(KvcalibError, match="saliency"):
        get_scorer("obcache", saliency="nope").score(random_capture(37))


# ---------------------------------------------------------------------------------------------- LAVa
def naive_lava(cap: Capture, w: int) -> list:
    """The LAVa reference (MGDDestiny/Lava ``LavaKVCluster.calcul_attn_score``): the mean over the window of the
    attention, max-pooled, times max_k ‖V[k]‖₁ over the *prefix* ``value_states[..., :-window, :]`` of the head,
    then the max over the GQA group; the window kept."""
    n = cap.num_tokens

    def per_key(vs, att):
        vmax = max(sum(abs(x) for x in v) for v in vs[: n - w])  # the prefix only
        return [vmax * sum(a[j] for _, a in att if j < len(a)) / w for j in range(n)]

    return naive_window_method(cap, w, "max", per_key)


@pytest.mark.parametrize("n,w", [(37, 8), (61, 32)])
def test_lava_score_matches_naive(n, w):
    cap = random_capture(n, seed=100 + n)
    cap.values[:, :, -1] *= 50.0  # the window's largest value rows must not set the value factor
    assert_scores(get_scorer("lava", window=w).score(cap), naive_lava(cap, w))


# ---------------------------------------------------------------------------------------------- CurDKV
def naive_curdkv(cap: Capture, leverage: str, project: bool, seed: int = 0, r: int = 20) -> list:
    g = None
    if project:
        gen = torch.Generator().manual_seed(seed)
        g = rows(torch.randn(DIM, r, generator=gen) / math.sqrt(r))
    n = cap.num_tokens
    out = []
    for l in range(cap.num_layers):
        heads = []
        for h in range(HKV):
            def lev(mat):
                vecs = rows(mat)
                if g is not None:
                    vecs = [[sum(v[c] * g[c][k] for c in range(DIM)) for k in range(r)] for v in vecs]
                sq = [dot(v, v) for v in vecs]
                return [sq[j] / sum(sq[(j // 16) * 16: (j // 16) * 16 + 16]) for j in range(n)]

            lk, lv = lev(cap.keys[l, h]), lev(cap.values[l, h])
            s = {"product": [a * b for a, b in zip(lk, lv)], "key": lk, "value": lv,
                 "mean": [(a + b) / 2 for a, b in zip(lk, lv)]}[leverage]
            tot = sum(s)
            s = [x / tot for x in s]
            heads.append([INF] * 4 + s[4:])
        out.append(heads)
    return out


@pytest.mark.parametrize("leverage,project,n", [("product", False, 37), ("product", True, 61), ("key", False, 61),
                                                ("value", True, 37), ("mean", False, 37)])
def test_curdkv_matches_naive(leverage, project, n):
    cap = random_capture(n, seed=200 + n)
    got = get_scorer("curdkv", leverage=leverage, project=project).score(cap)
    assert_scores(got, naive_curdkv(cap, leverage, project))
    fin = torch.isfinite(got)
    # normalised to sum 1 per head before the first 4 positions are protected
    assert bool((got.masked_fill(~fin, 0).sum(-1) <= 1 + 1e-5).all())


# ---------------------------------------------------------------------------------------------- registry
NEW = ("curdkv", "obcache", "lava", "lookahead")


def test_new_methods_registered_with_published_defaults():
    for name in NEW:
        assert name in SCORERS
    assert get_scorer("curdkv").params() == {"leverage": "product", "project": False, "projection_dim": 20,
                                             "local_window": 16, "protect_first": 4, "seed": 0}
    assert get_scorer("lava").params()["window"] == 32 and get_scorer("lava").params()["gqa"] == "max"
    la = get_scorer("lookahead").params()
    assert (la["n_pseudo"], la["obs_window"], la["draft_window"], la["kernel"]) == (8, 8, 32, 7)


@pytest.mark.parametrize("name", ["curdkv", "obcache", "lava"])
@pytest.mark.parametrize("allocator", ["uniform", "adakv", "lava"])
def test_new_scores_feed_every_allocator(short_capture, name, allocator):
    assert_feeds_allocator(short_capture, name, allocator)


# ---------------------------------------------------------------------------------------------- Lookahead Q-Cache
@pytest.fixture(scope="module")
def laq_case(engine):
    from kvcalib.calib.data.documents import load_essays

    text = load_essays()["aord"][:850]
    prompt = engine.prompt(text, "What does the author advise founders to do?")
    cap = engine.capture(prompt.context_ids)
    scorer = get_scorer("lookahead")
    scores = scorer.score(cap, engine.score_context(Budget(ratio=0.5)))
    return text, prompt, cap, scores


def test_lookahead_needs_the_model():
    with pytest.raises(KvcalibError, match="lookahead needs the model"):
        get_scorer("lookahead").score(random_capture(37), ScoreContext())


def test_lookahead_collects_pseudo_queries(engine, laq_case):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    _, _, cap, _ = laq_case
    info = cap.extras["lookahead"]
    tokens, q = info["tokens"], info["queries"]
    assert 1 <= len(tokens) <= 8
    assert not set(tokens) & engine.eos_ids
    assert tokens[0] == int(cap.last_logits.argmax())  # decoding starts right after the context
    n_layers, hq, n, d = cap.queries.shape
    assert q.shape == (n_layers, hq, len(tokens), d)
    # layer 0's query of a token depends only on the token and its position: recompute it independently
    model = engine.lm.model
    dec = model.get_decoder()
    attn = dec.layers[0].self_attn
    with torch.no_grad():
        ids = torch.tensor([tokens])
        pos = torch.arange(n, n + len(tokens))[None]
        h = dec.layers[0].input_layernorm(dec.embed_tokens(ids))
        q0 = attn.q_proj(h).view(1, len(tokens), hq, d).transpose(1, 2)
        cos, sin = dec.rotary_emb(h, pos)
        q0, _ = apply_rotary_pos_emb(q0, q0, cos, sin)
    torch.testing.assert_close(q[0].float(), q0[0].float(), rtol=1e-4, atol=1e-4)


def test_lookahead_scores_equal_naive_recomputation(laq_case):
    _, _, cap, scores = laq_case
    pq = cap.extras["lookahead"]["queries"].double()
    n_layers, hkv, n, d = cap.keys.shape
    hq, g, w2 = cap.queries.shape[1], cap.group_size, 8
    want = torch.empty(n_layers, hkv, n, dtype=torch.float64)
    for l in range(n_layers):
        per_q = []
        for h in range(hq):
            k = cap.keys[l, h // g].double()
            s = torch.zeros(n, dtype=torch.float64)
            for t in range(w2):  # last w2 prompt queries: causal
                pos = n - w2 + t
                s[: pos + 1] += torch.softmax(k[: pos + 1] @ cap.queries[l, h, pos].double() / math.sqrt(d), 0)
            for t in range(pq.shape[2]):  # pseudo queries: every prompt key
                s += torch.softmax(k @ pq[l, h, t] / math.sqrt(d), 0)
            per_q.append(maxpool_prefix(s.tolist(), w2))
        for kv, x in enumerate(gqa(per_q, "mean", g)):
            want[l, kv] = torch.tensor(protect_last(x, w2))
    assert_scores(scores, want.tolist(), rtol=1e-4)


def test_lookahead_runs_through_the_engine(engine, laq_case):
    text, _, _, _ = laq_case
    res = engine.run(text, "What does the author advise founders to do?", method="lookahead",
                     budget=Budget(ratio=0.5), max_new_tokens=8)
    assert res.method == "lookahead"
    assert abs(res.ratio - 0.5) < 0.01
    assert res.answer.strip()


def decode_pseudo_reference(engine, cap, keep, n_tokens: int, eos: set[int]):
    """The LAQ draft step from the paper, independently: greedy pseudo tokens decoded on the cache compressed by
    ``keep``; the post-RoPE query of every fed token, every layer, taken from the q projection by forward hooks and
    rotated by the model's RoPE at its position (N, N + 1, ...). Returns (tokens, queries (L, Hq, m, d))."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from kvcalib.calib.cache.decode import forward_tokens
    from kvcalib.calib.cache.ragged import RaggedKVCache

    model = engine.lm.model
    dec = model.get_decoder()
    n_layers, hq, n, d = cap.queries.shape
    seen: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]
    hooks = [layer.self_attn.q_proj.register_forward_hook(
        lambda _m, _i, out, l=l: seen[l].append(out.detach().view(1, 1, hq, d).transpose(1, 2)))
        for l, layer in enumerate(dec.layers)]
    cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
    tokens = []
    nxt = int(cap.last_logits.argmax())
    try:
        with torch.no_grad():
            for _ in range(n_tokens):
                if nxt in eos:
                    break
                tokens.append(nxt)
                nxt = int(forward_tokens(model, cache, torch.tensor([[nxt]]))[0].argmax())
    finally:
        for h in hooks:
            h.remove()
    if not tokens:
        return tokens, cap.queries.new_zeros(n_layers, hq, 0, d)
    pos = torch.arange(n, n + len(tokens))[None]
    cos, sin = dec.rotary_emb(cap.queries.new_zeros(1, len(tokens), 1), pos)
    out = []
    for l in range(n_layers):
        q = torch.cat(seen[l], dim=2)  # (1, Hq, m, d) pre-RoPE
        q, _ = apply_rotary_pos_emb(q, q, cos, sin)
        out.append(q[0])
    return tokens, torch.stack(out)


@pytest.mark.parametrize("ratio,allocator", [(0.5, "uniform"), (0.75, "adakv")])
def test_lookahead_draft_is_snapkv_compressed_at_the_budget_by_the_allocator(engine, laq_case, ratio, allocator):
    """Every layer's pseudo queries equal those decoded on SnapKV (w = 32, max-pool 7) compressed at the target
    budget by ``draft_allocator`` — and differ from those of the full cache or of another budget."""
    _, _, cap, _ = laq_case
    b = Budget(ratio=ratio)
    scorer = get_scorer("lookahead", draft_allocator=allocator)
    scorer.score(cap, engine.score_context(b))
    info = cap.extras["lookahead"]
    draft = get_scorer("snapkv", window=32, kernel=7, pooling="max").score(cap)
    keep = allocate(draft, b, allocator)
    tokens, q = decode_pseudo_reference(engine, cap, keep, 8, engine.eos_ids)
    assert info["tokens"] == tokens
    torch.testing.assert_close(info["queries"].float(), q.float(), rtol=2e-4, atol=2e-4)
    _, q_full = decode_pseudo_reference(engine, cap, torch.ones_like(keep), len(tokens), set())
    deep = slice(cap.num_layers // 2, None)
    assert not torch.allclose(q_full[deep], q[deep], atol=1e-3)  # the test can tell a compressed draft


def test_lookahead_stops_at_eos_and_feeds_no_eos(engine, laq_case):
    _, _, cap, _ = laq_case
    scorer = get_scorer("lookahead")
    scorer.score(cap, engine.score_context(Budget(ratio=0.5)))
    tokens = cap.extras["lookahead"]["tokens"]
    k = next((i for i in range(1, len(tokens)) if tokens[i] not in tokens[:i]), None)
    assert k is not None, tokens
    ctx = ScoreContext(lm=engine.lm, budget=Budget(ratio=0.5), eos_ids={tokens[k]})
    scorer.score(cap, ctx)
    info = cap.extras["lookahead"]
    assert info["tokens"] == tokens[:k]  # stopped before the EOS token, which is not fed
    assert info["queries"].shape[2] == k
    ctx0 = ScoreContext(lm=engine.lm, budget=Budget(ratio=0.5), eos_ids={tokens[0]})
    s0 = scorer.score(cap, ctx0)  # EOS first: no pseudo token, only the last w₂ prompt queries
    assert cap.extras["lookahead"]["tokens"] == [] and cap.extras["lookahead"]["queries"].shape[2] == 0
    assert torch.isfinite(s0[..., :-8]).all() and torch.isposinf(s0[..., -8:]).all()


def test_lookahead_w2_zero_is_plain_laq(engine, laq_case):
    """w₂ = 0 (LAQ): the observation set is the pseudo queries alone; all N positions pooled, none protected."""
    _, _, cap, _ = laq_case
    scores = get_scorer("lookahead", obs_window=0).score(cap, engine.score_context(Budget(ratio=0.5)))
    pq = cap.extras["lookahead"]["queries"].double()
    n_layers, hkv, n, d = cap.keys.shape
    hq, g = cap.queries.shape[1], cap.group_size
    assert pq.shape[2] >= 1
    want = torch.empty(n_layers, hkv, n, dtype=torch.float64)
    for l in range(n_layers):
        per_q = []
        for h in range(hq):
            k = cap.keys[l, h // g].double()
            s = sum(torch.softmax(k @ pq[l, h, t] / math.sqrt(d), 0) for t in range(pq.shape[2]))
            per_q.append(maxpool_prefix(s.tolist(), 0))
        for kv, x in enumerate(gqa(per_q, "mean", g)):
            want[l, kv] = torch.tensor(x)
    assert torch.isfinite(scores).all()
    assert_scores(scores, want.tolist(), rtol=1e-4)


def test_laq_is_an_alias_of_lookahead(engine):
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.scorers import available_methods, canonical_method

    assert type(get_scorer("laq", obs_window=0)) is type(get_scorer("lookahead"))
    assert canonical_method("laq") == "lookahead" and "laq" not in available_methods()
    assert "laq" in available_methods(aliases=True)
    CalibrationConfig(method="laq").validate()
    with pytest.raises(KvcalibError, match="expected one of"):
        get_scorer("laqq")


def test_lookahead_calibration_scores_every_ratio(engine, laq_case):
    """The keep mask of every grid ratio is the allocation of scores taken at that ratio (the draft is compressed
    at that budget), not of the scores of the grid's median ratio."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, _noop, _prepare

    text, _, _, _ = laq_case
    cfg = CalibrationConfig(method="lookahead", allocator="uniform", ratios=(0.3, 0.8), n_probes=1)
    cap, _, scores, keep, _, _ = _prepare(engine, text, cfg, _noop)
    scorer = get_scorer("lookahead")
    for i, r in enumerate(cfg.ratios):
        b = Budget(ratio=r)
        want = allocate(scorer.score(cap, engine.score_context(b)), b, "uniform")
        assert torch.equal(keep[i + 1], want), r
    assert not torch.equal(keep[1], allocate(scores, Budget(ratio=0.3), "uniform"))  # median-ratio scores differ
