"""Per-context features for predicting r*, all computed from the same prefill (no probes, no extra forward).

Groups (names are stable: predictors store the names they were trained on):

* size — ``n_tokens``, ``log_n_tokens``;
* likelihood — ``context_nll`` (mean token NLL of the context, ``Capture.context_nll``) and the spread of the token
  NLLs: ``nll_std``, ``nll_q10/q50/q90``, ``frac_nll_lt_0_1`` / ``frac_nll_lt_1`` (share of nearly-free tokens:
  repetitive, predictable text compresses better);
* text redundancy — ``zlib_ratio`` (compressed / raw bytes), ``unique_token_frac``, ``repeat_4gram_frac`` (share of
  token 4-grams already seen earlier in the context);
* score shape (the method's own scores, protected +inf entries excluded, z-scored per head and turned into a
  distribution p = softmax(z)) — normalised entropy and the mass of the top 10 % / 30 % positions, per layer
  (``score_entropy_l{i}``, ``score_top10_l{i}``) and summarised over layers (``score_entropy_mean/std/min``,
  ``score_top10_mean/std/max``, ``score_top30_mean``); ``score_head_agreement`` (mean Jaccard overlap of the kept
  sets of the heads of a layer at ratio 0.5);
* attention (recomputed from the captured post-RoPE queries of the last 32 context positions) — attention-sink mass
  on the first 4 positions ``attn_sink_mass``, local mass on the last 64 ``attn_local_mass``, normalised entropy
  ``attn_entropy`` (means over layers, heads and queries, plus ``*_std`` over layers);
* retained attention (a cheap proxy of the curve) — for 32 query positions spread over the second half of the
  context and the 32 window queries, the attention mass (causal, mean over layers/heads/queries) that falls on
  the positions kept at each grid ratio: ``mass_kept_r{ratio}``; and ``mass_r90`` / ``mass_r95``, the ratio where
  that retained mass crosses 0.90 / 0.95 (linear interpolation);
* key/value geometry — ``key_norm_cv`` / ``value_norm_cv`` (coefficient of variation of the per-position norms,
  mean over heads), ``key_norm_cv_std`` over layers;
* span coverage (needs the grid's keep masks) — reconstruction probes fail when the span they copy is evicted, so
  the kept fraction c(p) of every document position p over all (layer, head) pairs is averaged over windows of
  ``probe_tokens`` positions: per grid ratio the 5 % quantile of window coverage ``win_cov_q05_r{ratio}`` and the
  share of windows below half coverage ``win_cov_lt50_r{ratio}``, and the ratios where the 5 % quantile crosses
  0.7 / 0.5 (``win_cov_r70`` / ``win_cov_r50``). (The same statistics over the calibration's own probe spans
  carried no signal — correlation with r* ≤ 0.15 — and are not computed; docs/calibration.md §10.)
"""

from __future__ import annotations

import math
import zlib

import torch

from kvcalib.calib.capture import Capture

WINDOW = 32
SINKS = 4
LOCAL = 64
SAMPLED_QUERIES = 32


def _ratio_key(r: float, prefix: str = "mass_kept") -> str:
    return f"{prefix}_r{round(float(r), 4):g}"


def likelihood_features(token_nll: torch.Tensor | None) -> dict[str, float]:
    if token_nll is None or token_nll.numel() == 0:
        return {}
    x = token_nll.detach().double().cpu()
    q = torch.quantile(x, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return {
        "context_nll": float(x.mean()),
        "nll_std": float(x.std()) if x.numel() > 1 else 0.0,
        "nll_q10": float(q[0]), "nll_q50": float(q[1]), "nll_q90": float(q[2]),
        "frac_nll_lt_0_1": float((x < 0.1).double().mean()),
        "frac_nll_lt_1": float((x < 1.0).double().mean()),
    }


def text_features(text: str, input_ids: torch.Tensor) -> dict[str, float]:
    raw = text.encode("utf-8")
    ids = input_ids.tolist()
    seen: set[tuple] = set()
    rep = 0
    grams = 0
    for i in range(len(ids) - 3):
        g = tuple(ids[i:i + 4])
        grams += 1
        if g in seen:
            rep += 1
        seen.add(g)
    return {
        "zlib_ratio": len(zlib.compress(raw, 6)) / max(1, len(raw)),
        "unique_token_frac": len(set(ids)) / max(1, len(ids)),
        "repeat_4gram_frac": rep / max(1, grams),
    }


def score_features(scores: torch.Tensor) -> dict[str, float]:
    """Shape of the method's scores (L, Hkv, N)."""
    s = scores.float()
    finite = torch.isfinite(s)
    n_layers = s.shape[0]
    mu = torch.where(finite, s, torch.zeros_like(s)).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp_min(1)
    dev = torch.where(finite, s - mu, torch.zeros_like(s))
    sd = (dev.pow(2).sum(-1, keepdim=True) / finite.sum(-1, keepdim=True).clamp_min(2)).sqrt().clamp_min(1e-6)
    z = torch.where(finite, dev / sd, torch.full_like(s, -math.inf))
    p = torch.softmax(z, dim=-1)  # (L, H, N), protected entries get 0
    cnt = finite.sum(-1).clamp_min(2).float()
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / torch.log(cnt)  # (L, H)
    ps = torch.sort(p, dim=-1, descending=True).values
    cum = ps.cumsum(-1)
    k10 = (0.1 * cnt).long().clamp_min(1) - 1
    k30 = (0.3 * cnt).long().clamp_min(1) - 1
    top10 = cum.gather(-1, k10.unsqueeze(-1))[..., 0]
    top30 = cum.gather(-1, k30.unsqueeze(-1))[..., 0]
    ent_l, top10_l = ent.mean(1), top10.mean(1)
    out = {
        "score_entropy_mean": float(ent_l.mean()), "score_entropy_std": float(ent_l.std()) if n_layers > 1 else 0.0,
        "score_entropy_min": float(ent_l.min()), "score_top10_mean": float(top10_l.mean()),
        "score_top10_std": float(top10_l.std()) if n_layers > 1 else 0.0, "score_top10_max": float(top10_l.max()),
        "score_top30_mean": float(top30.mean()),
    }
    # agreement of the heads of a layer on what to keep at ratio 0.5
    n = s.shape[-1]
    k = max(1, n // 2)
    top = torch.zeros_like(finite)
    top.scatter_(-1, torch.topk(torch.nan_to_num(s, posinf=1e30), k, dim=-1).indices, True)
    h = s.shape[1]
    if h > 1:
        jac = []
        for a in range(h):
            for b in range(a + 1, h):
                inter = (top[:, a] & top[:, b]).sum(-1).float()
                union = (top[:, a] | top[:, b]).sum(-1).float().clamp_min(1)
                jac.append(inter / union)
        out["score_head_agreement"] = float(torch.stack(jac).mean())
    else:
        out["score_head_agreement"] = 1.0
    for i in range(n_layers):
        out[f"score_entropy_l{i}"] = float(ent_l[i])
        out[f"score_top10_l{i}"] = float(top10_l[i])
    return out


def feature_query_positions(n: int) -> torch.Tensor:
    """(P,) the query positions ``attention_features`` reads (what a streaming capture must keep for it)."""
    return _query_positions(n)


def _query_positions(n: int, seed: int = 0) -> torch.Tensor:
    """Deterministic query positions: 64 spread over the second half of the context plus the last 32."""
    lo = n // 2
    spread = torch.linspace(lo, max(lo, n - WINDOW - 1), SAMPLED_QUERIES).round().long()
    window = torch.arange(max(0, n - WINDOW), n)
    return torch.unique(torch.cat([spread, window]).clamp(0, n - 1))


def attention_features(queries: torch.Tensor, keys: torch.Tensor, keep: torch.Tensor | None = None,
                       ratios=(), query_positions: torch.Tensor | None = None) -> dict[str, float]:
    """queries (L, Hq, Nq, d) post-RoPE of the last Nq positions (or of the sorted ``query_positions`` (Nq,), as a
    streaming capture keeps them), keys (L, Hkv, N, d); keep (R, L, Hkv, N) masks for ``ratios`` (optional:
    retained-mass proxy)."""
    n_layers, hq, nq, d = queries.shape
    hkv, n = keys.shape[1], keys.shape[2]
    g = hq // hkv
    dev = keys.device
    qpos = torch.arange(n - nq, n) if query_positions is None else query_positions.long().cpu()
    pos = _query_positions(n)
    pos = pos[torch.isin(pos, qpos)]
    at = torch.searchsorted(qpos, pos).to(dev)  # index of each sampled position in ``queries``
    pos = pos.to(dev)
    win = pos >= n - WINDOW
    sink, local, ent = [], [], []
    mass = torch.zeros(len(ratios), dtype=torch.float64, device=dev)
    kpos = torch.arange(n, device=dev)
    causal = kpos[None, :] <= pos[:, None]  # (P, N)
    for l in range(n_layers):
        q = queries[l, :, at].float()  # (Hq, P, d)
        k = keys[l].float().repeat_interleave(g, 0)  # (Hq, N, d)
        logits = (q @ k.transpose(-1, -2)) * d ** -0.5
        a = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)  # (Hq, P, N)
        aw = a[:, win]  # window queries: see the whole context
        sink.append(float(aw[..., :SINKS].sum(-1).mean()))
        local.append(float(aw[..., -LOCAL:].sum(-1).mean()))
        e = -(aw * torch.log(aw.clamp_min(1e-30))).sum(-1) / math.log(n)
        ent.append(float(e.mean()))
        if keep is not None and len(ratios):
            kl = keep[:, l].repeat_interleave(g, 1).float()  # (R, Hq, N)
            mass += torch.einsum("hpn,rhn->r", a.double(), kl.double()) / (hq * len(pos) * n_layers)
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    out = {
        "attn_sink_mass": float(t(sink).mean()), "attn_sink_mass_std": float(t(sink).std()) if n_layers > 1 else 0.0,
        "attn_local_mass": float(t(local).mean()),
        "attn_local_mass_std": float(t(local).std()) if n_layers > 1 else 0.0,
        "attn_entropy": float(t(ent).mean()), "attn_entropy_std": float(t(ent).std()) if n_layers > 1 else 0.0,
    }
    if keep is not None and len(ratios):
        pairs = sorted(zip((float(r) for r in ratios), mass.cpu().tolist()))
        for r, m in pairs:
            out[_ratio_key(r)] = float(m)
        for level, name in ((0.90, "mass_r90"), (0.95, "mass_r95")):
            out[name] = _crossing(pairs, level)
    return out


def _crossing(pairs, level: float) -> float:
    prev_r, prev_m = 0.0, 1.0
    for r, m in pairs:
        if m < level:
            if prev_m <= m:
                return prev_r
            return prev_r + (prev_m - level) / (prev_m - m) * (r - prev_r)
        prev_r, prev_m = r, m
    return prev_r


def geometry_features(keys: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    kn = keys.float().norm(dim=-1)  # (L, H, N)
    vn = values.float().norm(dim=-1)
    kcv = (kn.std(-1) / kn.mean(-1).clamp_min(1e-6)).mean(1)  # (L,)
    vcv = (vn.std(-1) / vn.mean(-1).clamp_min(1e-6)).mean(1)
    return {"key_norm_cv": float(kcv.mean()), "key_norm_cv_std": float(kcv.std()) if kcv.numel() > 1 else 0.0,
            "value_norm_cv": float(vcv.mean())}


def coverage_features(keep: torch.Tensor, ratios, doc_start: int = 0, window: int = 6) -> dict[str, float]:
    """Span-coverage features from keep masks ``keep`` (R, L, Hkv, N) for ``ratios``: how much of every window of
    ``window`` document positions (from ``doc_start``) survives, the kept fraction of a position being taken over
    all (layer, head) pairs."""
    out: dict[str, float] = {}
    cov = keep.float().mean(dim=(1, 2)).double().cpu()[:, doc_start:]  # (R, N_doc) kept fraction per position
    if cov.shape[1] == 0:
        return out
    w = max(1, min(int(window), cov.shape[1]))
    win = cov.unfold(1, w, 1).mean(-1)  # (R, N_doc − w + 1)
    q05 = torch.quantile(win, 0.05, dim=1)  # (R,)
    low = (win < 0.5 - 1e-9).double().mean(1)  # strictly below half (float sums of k/(L·H·w))
    for i, r in enumerate(ratios):
        out[_ratio_key(r, "win_cov_q05")] = float(q05[i])
        out[_ratio_key(r, "win_cov_lt50")] = float(low[i])
    pairs = sorted(zip((float(r) for r in ratios), q05.tolist()))
    out["win_cov_r70"] = _crossing(pairs, 0.7)
    out["win_cov_r50"] = _crossing(pairs, 0.5)
    return out


def context_features(text: str, cap: Capture, scores: torch.Tensor, keep: torch.Tensor | None = None,
                     ratios=(), doc_start: int = 0, window: int = 6) -> dict[str, float]:
    """Every feature of a context from its capture, the method's scores and (optionally) the grid's keep masks
    ``keep`` (R, L, Hkv, N) for ``ratios`` (with them: retained attention, and span coverage over windows of
    ``window`` document positions from ``doc_start``)."""
    n = cap.num_tokens
    feats: dict[str, float] = {"n_tokens": float(n), "log_n_tokens": math.log(max(1, n))}
    feats.update(likelihood_features(cap.token_nll))
    feats.update(text_features(text, cap.input_ids))
    feats.update(score_features(scores))
    feats.update(attention_features(cap.queries, cap.keys, keep, ratios, cap.query_positions))
    feats.update(geometry_features(cap.keys, cap.values))
    if keep is not None and len(ratios):
        feats.update(coverage_features(keep, ratios, doc_start, window))
    return {k: (float(v) if math.isfinite(float(v)) else 0.0) for k, v in feats.items()}  # JSON-safe
