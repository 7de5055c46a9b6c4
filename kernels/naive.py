"""Plain torch references of every kernel. Readable, exact, used on CPU and as the ground truth in tests."""

from __future__ import annotations

import torch

STATS = ("attn", "attn_sq", "obc_key", "obc_cross")


def window_attention_stats(
    q: torch.Tensor,  # (B, Hq, w, d) post-RoPE queries of the last w context positions
    k: torch.Tensor,  # (B, Hkv, N, d) post-RoPE keys
    v: torch.Tensor | None = None,  # (B, Hkv, N, d) values (needed for obc_* stats)
    scale: float | None = None,
    stats: tuple[str, ...] = ("attn",),
) -> dict[str, torch.Tensor]:
    """Reductions over window queries of A = softmax(Z), Z = q kᵀ·scale, causal inside the window.

    Query t sits at position N - w + t and sees keys j <= N - w + t. Returns per query head, each (B, Hq, N):
      attn      Σ_t A_tj
      attn_sq   Σ_t A_tj²
      obc_key   Σ_t (A_tj Z_tj)² ‖v_j − o_t‖²        (o_t = Σ_j A_tj v_j)
      obc_cross Σ_t A_tj² Z_tj (‖v_j‖² − v_jᵀ o_t)
    """
    bsz, hq, w, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=1).float()  # (B, Hq, N, d)
    z = torch.einsum("bhtd,bhnd->bhtn", q.float(), kk) * scale  # (B, Hq, w, N)
    pos_q = torch.arange(n - w, n, device=q.device)
    causal = torch.arange(n, device=q.device)[None, :] <= pos_q[:, None]  # (w, N)
    a = torch.softmax(z.masked_fill(~causal, float("-inf")), dim=-1)  # (B, Hq, w, N)
    out: dict[str, torch.Tensor] = {}
    if "attn" in stats:
        out["attn"] = a.sum(2)
    if "attn_sq" in stats:
        out["attn_sq"] = (a * a).sum(2)
    if "obc_key" in stats or "obc_cross" in stats:
        if v is None:
            raise ValueError("obc_* statistics need the values")
        vv = v.repeat_interleave(g, dim=1).float()  # (B, Hq, N, d)
        o = a @ vv  # (B, Hq, w, d)
        z0 = z.masked_fill(~causal, 0.0)
        vn = (vv * vv).sum(-1)  # (B, Hq, N)
        vo = torch.einsum("bhnd,bhtd->bhtn", vv, o)  # (B, Hq, w, N)
        if "obc_key" in stats:
            on = (o * o).sum(-1)  # (B, Hq, w)
            dist = vn[:, :, None, :] - 2 * vo + on[..., None]  # ‖v_j − o_t‖²
            out["obc_key"] = ((a * z0) ** 2 * dist).sum(2)
        if "obc_cross" in stats:
            out["obc_cross"] = (a * a * z0 * (vn[:, :, None, :] - vo)).sum(2)
    return out


def chunked_colsum(
    q: torch.Tensor,  # (B, Hq, N, d)
    k: torch.Tensor,  # (B, Hkv, N, d)
    chunk: int = 256,
    scale: float = 1.0,
) -> torch.Tensor:
    """Non-causal attention inside chunks of ``chunk`` positions; column sums of softmax(q kᵀ·scale) per chunk.

    Returns (B, Hq, N): for key j in chunk c, Σ_{i in chunk c} softmax_j(q_i · k_c). One batch row at a time, the
    whole chunks of a row in one batched matmul (the ragged last chunk apart), GQA by broadcasting the kv heads."""
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    full = (n // chunk) * chunk
    out = torch.empty(bsz, hq, n, device=q.device, dtype=torch.float32)
    for b in range(bsz):
        qb = q[b].float().view(hkv, g, n, d)  # (Hkv, g, N, d)
        kb = k[b].float().unsqueeze(1)  # (Hkv, 1, N, d)
        if full:
            qc = qb[:, :, :full].reshape(hkv, g, full // chunk, chunk, d)  # (Hkv, g, C, c, d)
            kc = kb[:, :, :full].reshape(hkv, 1, full // chunk, chunk, d)  # (Hkv, 1, C, c, d)
            a = torch.softmax((qc @ kc.transpose(-1, -2)) * scale, dim=-1)  # (Hkv, g, C, c, c)
            out[b, :, :full] = a.sum(-2).reshape(hq, full)
        if full < n:  # last, shorter chunk
            a = torch.softmax((qb[:, :, full:] @ kb[:, :, full:].transpose(-1, -2)) * scale, dim=-1)
            out[b, :, full:] = a.sum(-2).reshape(hq, n - full)
    return out


def leverage_scores(
    x: torch.Tensor,  # (B, H, N, d) keys (already centred, if wanted)
    sketch: torch.Tensor,  # (d, k) Gaussian sketch Φ
    rho: float = 1e-6,
) -> torch.Tensor:
    """Approximate leverage ℓ_i = s_iᵀ (SᵀS + ρ·I)⁻¹ s_i with S = xΦ. Returns (B, H, N) in fp32.

    The ridge ρ is relative to the mean diagonal of SᵀS; a failed Cholesky escalates the jitter tenfold."""
    s = x.float() @ sketch.float()  # (B, H, N, k)
    gram = s.transpose(-1, -2) @ s  # (B, H, k, k)
    chol = regularised_cholesky(gram, rho)
    if chol is None:  # pseudo-inverse as the last resort
        ginv = torch.linalg.pinv(gram)
        return torch.einsum("bhnk,bhkl,bhnl->bhn", s, ginv, s)
    y = torch.cholesky_solve(s.transpose(-1, -2), chol)  # (B, H, k, N) = G⁻¹ sᵀ
    return (s * y.transpose(-1, -2)).sum(-1)


def regularised_cholesky(gram: torch.Tensor, rho: float) -> torch.Tensor | None:
    """Lower Cholesky factor of gram + ρ·mean(diag)·I (B, H, k, k), or None when it fails for every jitter.

    The ridge is relative to the mean diagonal of each Gram matrix; a failed factorisation escalates it tenfold,
    at most 8 times."""
    kdim = gram.shape[-1]
    eye = torch.eye(kdim, device=gram.device, dtype=gram.dtype)
    base = gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)[..., None, None]  # (B, H, 1, 1)
    jitter = rho
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(gram + jitter * base * eye)
        if int(info.max()) == 0:
            return chol
        jitter *= 10
    return None


def ragged_compact(
    keys: torch.Tensor,  # (H, N, d)
    values: torch.Tensor,  # (H, N, d)
    keep: torch.Tensor,  # (H, N) bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the kept positions of every head contiguously: (T, d), (T, d), offsets (H + 1,) int64."""
    return keys[keep], values[keep], packed_offsets(keep, keys.device)


def packed_offsets(keep: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Offsets (H + 1,) int64 of the packed layout of ``keep`` (H, N): head h's kept entries are rows
    offsets[h]:offsets[h+1]."""
    offsets = torch.zeros(keep.shape[0] + 1, dtype=torch.int64, device=keep.device if device is None else device)
    offsets[1:] = torch.cumsum(keep.sum(-1), 0)
    return offsets


def ragged_decode(
    q: torch.Tensor,  # (Hq, d) one query per head
    k: torch.Tensor,  # (T, d) packed keys
    v: torch.Tensor,  # (T, d) packed values
    offsets: torch.Tensor,  # (Hkv + 1,)
    scale: float | None = None,
) -> torch.Tensor:
    """Single-token attention of each query head against its kv head's packed entries. Returns (Hq, d)."""
    hq, d = q.shape
    hkv = offsets.numel() - 1
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    out = torch.empty_like(q, dtype=torch.float32)
    for h in range(hq):
        s, e = int(offsets[h // g]), int(offsets[h // g + 1])
        a = torch.softmax((k[s:e].float() @ q[h].float()) * scale, dim=0)
        out[h] = a @ v[s:e].float()
    return out.to(q.dtype)


def ragged_decode_padded(
    q: torch.Tensor,  # (B, Hq, 1, d)
    k: torch.Tensor,  # (B, Hkv, L, d)
    v: torch.Tensor,  # (B, Hkv, L, d)
    mask: torch.Tensor,  # broadcastable to (B, Hq, 1, L) bool, True = attend
    scale: float | None = None,
) -> torch.Tensor:
    """Single-token attention over a padded ragged layer (see calib.cache). Returns (B, Hq, 1, d)."""
    g = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kk = k.repeat_interleave(g, dim=1).float()
    vv = v.repeat_interleave(g, dim=1).float()
    z = (q.float() @ kk.transpose(-1, -2)) * scale  # (B, Hq, 1, L)
    z = z.masked_fill(~mask, float("-inf"))
    return (torch.softmax(z, dim=-1) @ vv).to(q.dtype)
