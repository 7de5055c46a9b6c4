"""Window attention statistics (SnapKV, H2O-style, OBCache scores) without materialising the (w × N) matrix.

Two kernels, both GQA-aware (query head h reads kv head h // (Hq / Hkv)):

1. ``_window_rowstats_kernel`` — one pass over the keys with an online softmax per window query: row max m_t and
   normaliser l_t (and o_t = Σ_j A_tj v_j when OBCache statistics are requested). The key axis is split over
   programs (flash-decoding style) and the partial (m, l, o) are merged in torch (tensors of size w·d per head).
   Rows are the window queries of all heads of one kv group stacked (row r -> head r // WP, query r % WP), so K is
   read once per kv head.
2. ``_window_colstats_kernel`` — one program per block of keys: it recomputes Z for every query head of the group and
   every window query, forms A = exp(Z − m) / l with the causal mask (query t sits at position N − w + t) and reduces
   over the window: Σ A, Σ A², Σ (A·Z)² ‖v_j − o_t‖² and Σ A² Z (‖v_j‖² − v_jᵀ o_t).

Reference: ``kvcalib.kernels.naive.window_attention_stats``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvcalib.kernels._common import dot_precision, interpreter_safe, pow2, target_programs
from kvcalib.kernels.naive import STATS

LOG2E = math.log2(math.e)


@triton.jit
def _window_rowstats_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, o_ptr,
    sqb, sqh, sqt, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    HKV, G, N, W, D, keys_per_split, scale_log2,
    WP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    WITH_O: tl.constexpr, QK_DOT: tl.constexpr, PV_DOT: tl.constexpr,
):
    """Partial online-softmax statistics of BLOCK_M window rows over one split of the key axis.

    Grid (B·Hkv, row blocks, splits). Writes m (log2 domain), l: (B, Hq, W, S) and o (unnormalised): (B, Hq, W, S, D).
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hl = rows // WP  # head inside the group
    t = rows % WP  # window query
    row_ok = (hl < G) & (t < W)
    h = kvh * G + hl  # query head, (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    pos = N - W + t  # absolute position of each window query
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, N)
    for j0 in range(start, end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        z = tl.dot(q, kt, input_precision=QK_DOT) * scale_log2  # (BLOCK_M, BLOCK_N)
        z = tl.where(col_ok[None, :] & (cols[None, :] <= pos[:, None]), z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(z - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if WITH_O:
            vb = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                         mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PV_DOT)
        m_i = m_new

    row = ((b * HKV + kvh) * G + hl) * W + t  # flat (b, h, t) index
    tl.store(m_ptr + row * n_splits + pid_s, m_i, mask=row_ok)
    tl.store(l_ptr + row * n_splits + pid_s, l_i, mask=row_ok)
    if WITH_O:
        tl.store(o_ptr + (row[:, None] * n_splits + pid_s) * D + offs_d[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _window_colstats_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, o_ptr, out_ptr,
    sqb, sqh, sqt, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    HKV, G, N, W, D, scale, scale_log2,
    SLOT_ATTN: tl.constexpr, SLOT_ATTN_SQ: tl.constexpr, SLOT_OBC_KEY: tl.constexpr, SLOT_OBC_CROSS: tl.constexpr,
    WITH_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QK_DOT: tl.constexpr, PV_DOT: tl.constexpr,
):
    """Column reductions over the window for BLOCK_N keys and every query head of one kv group.

    Grid (B·Hkv, key blocks). m (log2 domain), l: (B, Hq, W); o: (B, Hq, W, D) normalised; out: (n_stats, B, Hq, N)
    with statistic s at slot SLOT_s (−1: not requested); WITH_V: an OBCache statistic is requested.
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_rows = tl.num_programs(0) * G  # B·Hq
    b = (pid_bh // HKV).to(tl.int64)
    kvh = (pid_bh % HKV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kt = tl.load(k_ptr + b * skb + kvh * skh + cols[None, :] * skn + offs_d[:, None] * skd,
                 mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
    if WITH_V:
        vt = tl.load(v_ptr + b * svb + kvh * svh + cols[None, :] * svn + offs_d[:, None] * svd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        vf = vt.to(tl.float32)
        vn = tl.sum(vf * vf, 0)  # ‖v_j‖², (BLOCK_N,)

    for hl in range(0, G):
        h = kvh * G + hl
        s_attn = tl.zeros([BLOCK_N], dtype=tl.float32)
        s_attn_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
        s_key = tl.zeros([BLOCK_N], dtype=tl.float32)
        s_cross = tl.zeros([BLOCK_N], dtype=tl.float32)
        for t0 in range(0, W, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < W
            q = tl.load(q_ptr + b * sqb + h * sqh + t[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_D)
            row = (b * HKV * G + h) * W + t  # flat (b, h, t) index
            m = tl.load(m_ptr + row, mask=t_ok, other=0.0)
            l = tl.load(l_ptr + row, mask=t_ok, other=1.0)
            z = tl.dot(q, kt, input_precision=QK_DOT)  # (BLOCK_T, BLOCK_N) raw q·k
            valid = t_ok[:, None] & col_ok[None, :] & (cols[None, :] <= (N - W + t)[:, None])
            a = tl.exp2(tl.where(valid, z * scale_log2 - m[:, None], float("-inf"))) / l[:, None]  # A_tj
            if SLOT_ATTN >= 0:
                s_attn += tl.sum(a, 0)
            if SLOT_ATTN_SQ >= 0:
                s_attn_sq += tl.sum(a * a, 0)
            if WITH_V:
                zs = z * scale  # Z_tj
                o = tl.load(o_ptr + row[:, None] * D + offs_d[None, :],
                            mask=t_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_T, BLOCK_D) o_t
                vo = tl.dot(o.to(vt.dtype), vt, input_precision=PV_DOT)  # (BLOCK_T, BLOCK_N) v_jᵀ o_t
                if SLOT_OBC_KEY >= 0:
                    on = tl.sum(o * o, 1)  # ‖o_t‖²
                    az = a * zs
                    s_key += tl.sum(az * az * (vn[None, :] - 2.0 * vo + on[:, None]), 0)
                if SLOT_OBC_CROSS >= 0:
                    s_cross += tl.sum(a * a * zs * (vn[None, :] - vo), 0)
        out_row = out_ptr + (b * HKV * G + h) * N + cols
        if SLOT_ATTN >= 0:
            tl.store(out_row + SLOT_ATTN * n_rows * N, s_attn, mask=col_ok)
        if SLOT_ATTN_SQ >= 0:
            tl.store(out_row + SLOT_ATTN_SQ * n_rows * N, s_attn_sq, mask=col_ok)
        if SLOT_OBC_KEY >= 0:
            tl.store(out_row + SLOT_OBC_KEY * n_rows * N, s_key, mask=col_ok)
        if SLOT_OBC_CROSS >= 0:
            tl.store(out_row + SLOT_OBC_CROSS * n_rows * N, s_cross, mask=col_ok)


def window_attention_stats(
    q: torch.Tensor,  # (B, Hq, w, d) post-RoPE queries of the last w context positions
    k: torch.Tensor,  # (B, Hkv, N, d) post-RoPE keys
    v: torch.Tensor | None = None,  # (B, Hkv, N, d) values (needed for obc_* stats)
    scale: float | None = None,
    stats: tuple[str, ...] = ("attn",),
    *,
    num_splits: int | None = None,
) -> dict[str, torch.Tensor]:
    """Triton version of ``naive.window_attention_stats`` (same arguments, same (B, Hq, N) fp32 outputs).

    ``num_splits`` fixes how many programs share the key axis in the row-statistics pass (default: fill the GPU).
    """
    bsz, hq, w, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else scale
    wanted = [s for s in STATS if s in stats]
    with_o = "obc_key" in wanted or "obc_cross" in wanted
    if with_o and v is None:
        raise ValueError("obc_* statistics need the values")
    q, k = interpreter_safe(q), interpreter_safe(k)
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dtype), k.to(dtype)
    v = k if v is None else interpreter_safe(v)  # v is never read when no obc statistic is requested
    f32 = dict(device=q.device, dtype=torch.float32)

    # pass 1: per-row max / normaliser (/ output) over splits of the key axis
    wp = pow2(w, lo=1)
    block_m = min(128, pow2(g * wp))
    row_blocks = triton.cdiv(g * wp, block_m)
    block_n = 64
    block_d = pow2(d)
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(target_programs(q.device), bsz * hkv * row_blocks),
                                triton.cdiv(n, 4 * block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(n, num_splits), block_n) * block_n
    num_splits = triton.cdiv(n, keys_per_split)
    m_part = torch.empty(bsz, hq, w, num_splits, **f32)
    l_part = torch.empty(bsz, hq, w, num_splits, **f32)
    o_part = torch.empty(bsz, hq, w, num_splits, d, **f32) if with_o else m_part
    _window_rowstats_kernel[(bsz * hkv, row_blocks, num_splits)](
        q, k, v, m_part, l_part, o_part,
        *q.stride(), *k.stride(), *v.stride(),
        hkv, g, n, w, d, keys_per_split, scale * LOG2E,
        WP=wp, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, WITH_O=with_o,
        QK_DOT=dot_precision(dtype), PV_DOT=dot_precision(v.dtype), num_warps=8,
    )
    m = m_part.amax(-1)  # (B, Hq, w), log2 domain
    weight = torch.exp2(m_part - m[..., None])  # (B, Hq, w, S); empty splits (m = -inf) weigh 0
    l = (l_part * weight).sum(-1)  # (B, Hq, w)
    o = (o_part * weight[..., None]).sum(-2) / l[..., None] if with_o else m  # (B, Hq, w, d)

    # pass 2: column reductions over the window
    slots = {s: (wanted.index(s) if s in wanted else -1) for s in STATS}
    out = torch.empty(len(wanted), bsz, hq, n, **f32)
    block_t, block_n, warps = (min(32, pow2(w)), 64, 4) if with_o else (min(64, pow2(w)), 128, 8)
    _window_colstats_kernel[(bsz * hkv, triton.cdiv(n, block_n))](
        q, k, v, m, l, o, out,
        *q.stride(), *k.stride(), *v.stride(),
        hkv, g, n, w, d, scale, scale * LOG2E,
        SLOT_ATTN=slots["attn"], SLOT_ATTN_SQ=slots["attn_sq"],
        SLOT_OBC_KEY=slots["obc_key"], SLOT_OBC_CROSS=slots["obc_cross"], WITH_V=with_o,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d,
        QK_DOT=dot_precision(dtype), PV_DOT=dot_precision(v.dtype), num_warps=warps,
    )
    return {s: out[i] for i, s in enumerate(wanted)}
