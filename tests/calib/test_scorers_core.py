"""SnapKV, Compactor and the baselines against independent naive implementations of their published math."""

from __future__ import annotations

import math

import pytest
import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.scorers import PROTECTED, get_scorer
from kvcalib.calib.scorers.compactor import gaussian_sketch


def random_capture(n: int, layers: int = 2, hkv: int = 2, group: int = 3, d: int = 8, seed: int = 0) -> Capture:
    g = torch.Generator().manual_seed(seed)
    hq = hkv * group
    return Capture(
        input_ids=torch.arange(n),
        keys=torch.randn(layers, hkv, n, d, generator=g),
        values=torch.randn(layers, hkv, n, d, generator=g),
        keys_pre=torch.randn(layers, hkv, n, d, generator=g),
        queries=torch.randn(layers, hq, n, d, generator=g),
        last_logits=torch.zeros(5),
    )


def naive_pool(row: list[float], k: int, kind: str) -> list[float]:
    """Stride-1 pooling with k//2 zero padding; the average divides by k (padding counted, as torch's default and
    the SnapKV / AdaKV / kvpress references)."""
    n, out = len(row), []
    for i in range(n):
        win = [row[j] for j in range(i - k // 2, i + k // 2 + 1) if 0 <= j < n]
        out.append(max(win) if kind == "max" else sum(win) / k)
    return out


def naive_snapkv(cap: Capture, w: int, k: int, kind: str) -> torch.Tensor:
    L, hkv, n, d = cap.keys.shape
    group = cap.queries.shape[1] // hkv
    out = torch.zeros(L, hkv, n)
    for l in range(L):
        for h in range(hkv):
            acc = torch.zeros(n)
            for qh in range(h * group, (h + 1) * group):
                s = [0.0] * n
                for t in range(w):
                    pos = n - w + t
                    q = cap.queries[l, qh, pos]
                    logits = [float(q @ cap.keys[l, h, j]) / math.sqrt(d) for j in range(pos + 1)]
                    m = max(logits)
                    e = [math.exp(x - m) for x in logits]
                    z = sum(e)
                    for j in range(pos + 1):
                        s[j] += e[j] / z
                acc += torch.tensor(naive_pool(s[: n - w], k, kind) + s[n - w:])
            out[l, h] = acc / group
            out[l, h, n - w:] = PROTECTED
    return out


@pytest.mark.parametrize("n,w,k,kind", [(37, 5, 7, "max"), (61, 8, 5, "avg")])
def test_snapkv_matches_naive(n, w, k, kind):
    cap = random_capture(n, seed=n)
    got = get_scorer("snapkv", window=w, kernel=k, pooling=kind).score(cap)
    torch.testing.assert_close(got, naive_snapkv(cap, w, k, kind), rtol=1e-4, atol=1e-5)


def naive_leverage(x: torch.Tensor, phi: torch.Tensor, rho: float) -> torch.Tensor:
    """ℓ_i = x_iᵀ (XᵀX + ρ·mean(diag)·I)⁻¹ x_i on the sketch X = (K − mean K)Φ, in float64 via an explicit inverse."""
    xc = (x - x.mean(0, keepdim=True)).double() @ phi.double()
    gram = xc.T @ xc
    gram = gram + rho * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=torch.float64)
    inv = torch.linalg.inv(gram)
    return torch.stack([xc[i] @ inv @ xc[i] for i in range(xc.shape[0])]).float()


def naive_chunk_attention(q: torch.Tensor, k: torch.Tensor, chunk: int) -> torch.Tensor:
    n = k.shape[0]
    out = torch.zeros(n)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        for i in range(s, e):
            logits = torch.tensor([float(q[i] @ k[j]) for j in range(s, e)], dtype=torch.float64)
            out[s:e] += torch.softmax(logits, 0).float()
    return out


def naive_compactor(cap: Capture, chunk: int, lam: float, sketch_dim: int, exclude: bool = True) -> torch.Tensor:
    """Compactor as both reference codes compute it: the first 8 and last 4 positions are cut off *first*; the
    centring, the chunks, the ‖v‖-weighted avg-pool and both layer z-scores run on the N − 12 middle positions, the
    protected ones are padded back. ``exclude=False``: the same over all N positions, protected ones overwritten."""
    L, hkv, n, d = cap.keys.shape
    group = cap.queries.shape[1] // hkv
    phi = gaussian_sketch(d, sketch_dim, seed=0)
    a0, b0 = (8, n - 4) if exclude else (0, n)
    m = b0 - a0
    out = torch.full((L, hkv, n), PROTECTED)
    for l in range(L):
        att = torch.zeros(hkv, m)
        lev = torch.zeros(hkv, m)
        for h in range(hkv):
            k, v = cap.keys[l, h, a0:b0], cap.values[l, h, a0:b0]
            a = sum(naive_chunk_attention(cap.queries[l, qh, a0:b0], k, chunk)
                    for qh in range(h * group, (h + 1) * group)) / group
            a = a * v.norm(dim=-1)
            att[h] = torch.tensor(naive_pool(a.tolist(), 3, "avg"))
            lev[h] = naive_leverage(cap.keys_pre[l, h, a0:b0], phi, 1e-6)
        z = lambda x: (x - x.mean()) / x.std()  # noqa: E731  (z-score over all heads and positions of the layer)
        out[l, :, a0:b0] = z(att) + lam * z(lev)
    out[..., :8] = PROTECTED
    out[..., -4:] = PROTECTED
    return out


@pytest.mark.parametrize("n,chunk,lam,exclude", [(45, 16, 0.3, True), (70, 32, 0.5, True), (45, 16, 0.3, False)])
def test_compactor_matches_naive(n, chunk, lam, exclude):
    cap = random_capture(n, d=16, seed=n)
    got = get_scorer("compactor", chunk=chunk, blend=lam, sketch_dim=12, exclude_protected=exclude).score(cap)
    torch.testing.assert_close(got, naive_compactor(cap, chunk, lam, 12, exclude), rtol=1e-3, atol=1e-3)


def test_compactor_sinks_do_not_enter_the_z_scores():
    """A huge outlier at a sink changes nothing of the other positions' scores (the reference slices first)."""
    cap = random_capture(60, d=16, seed=5)
    before = get_scorer("compactor", sketch_dim=12).score(cap)
    cap.values[:, :, 0] *= 1e4
    cap.keys_pre[:, :, 1] += 50.0
    after = get_scorer("compactor", sketch_dim=12).score(cap)
    torch.testing.assert_close(after, before)
    old = get_scorer("compactor", sketch_dim=12, exclude_protected=False)
    assert not torch.allclose(old.score(cap)[..., 8:-4], before[..., 8:-4])  # the former behaviour is affected


def test_leverage_is_robust_to_rank_deficient_keys():
    cap = random_capture(40, d=16)
    cap.keys_pre[..., 8:] = 0.0  # rank-deficient keys: XᵀX is singular without the ridge
    lev = get_scorer("compactor", sketch_dim=12).leverage(cap)
    assert torch.isfinite(lev).all()
    # leverage scores of an (effectively) rank-8 sketch sum to about 8 per head
    torch.testing.assert_close(lev.sum(-1), torch.full(lev.shape[:2], 8.0), rtol=1e-2, atol=1e-2)


def test_baselines():
    cap = random_capture(30)
    s = get_scorer("streaming", sinks=4).score(cap)
    assert torch.isinf(s[..., :4]).all() and (s[..., 5:] > s[..., 4:-1]).all()
    kn = get_scorer("keynorm").score(cap)
    torch.testing.assert_close(kn, -cap.keys.norm(dim=-1))
    r1, r2 = get_scorer("random", seed=3).score(cap), get_scorer("random", seed=3).score(cap)
    assert torch.equal(r1, r2) and not torch.equal(r1, get_scorer("random", seed=4).score(cap))


def test_unknown_method_and_parameter_are_clear_errors():
    from kvcalib.calib.scorers import UnknownMethodError

    with pytest.raises(UnknownMethodError, match="expected one of"):
        get_scorer("nope")
    with pytest.raises(UnknownMethodError, match="window"):
        get_scorer("snapkv", windw=3)


def test_scores_on_real_capture_have_expected_shape(engine, short_capture):
    spec = engine.lm.spec
    for name in ("compactor", "snapkv", "streaming", "keynorm", "random"):
        s = get_scorer(name).score(short_capture)
        assert s.shape == (spec.num_layers, spec.num_kv_heads, short_capture.num_tokens), name
        assert not torch.isnan(s).any(), name
