"""Ragged KV caches: per-head compaction into a packed layout, and single-token decode attention over it.

Packed layout: the kept entries of head h are rows offsets[h]:offsets[h+1] of a (T, d) tensor (keys and values
alike), in position order; offsets is (H + 1,) int64.

* ``_compact_kernel`` — copies every kept (head, position) row of keys and values to its packed row; the packed
  row index is the running count of kept entries (one torch cumsum over the (H, N) mask).
* ``_decode_partial_kernel`` — flash-decoding: the key range of each kv head is split over programs; a program
  holds the query rows of every query head of the group (GQA) and keeps an online softmax (max, normaliser,
  unnormalised output). Serves the packed layout (``PACKED``: key range from ``offsets``) and the padded layout
  (keys 0..L-1 of a (B, Hkv, L, d) tensor with a bool attention mask).
* ``_decode_combine_kernel`` — merges the partial results of the splits of every query row.

References: ``kvcalib.kernels.naive.ragged_compact``, ``ragged_decode`` and ``ragged_decode_padded``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvcalib.kernels._common import dot_precision, interpreter_safe, pow2, target_programs
from kvcalib.kernels.naive import packed_offsets

LOG2E = math.log2(math.e)
BLOCK_N = 64


@triton.jit
def _compact_kernel(
    k_ptr, v_ptr, keep_ptr, dest_ptr, k_out_ptr, v_out_ptr,
    skh, skn, skd, svh, svn, svd, sph, spn,
    N, D,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (H, position blocks). keep: (H, N) uint8; dest: (H·N,) int64 packed row of each kept entry."""
    h = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pos_ok = pos < N
    kept = tl.load(keep_ptr + h * sph + pos * spn, mask=pos_ok, other=0) != 0
    dest = tl.load(dest_ptr + h * N + pos, mask=kept, other=0)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)
    both = kept[:, None] & (offs_d[None, :] < D)
    kv = tl.load(k_ptr + h * skh + pos[:, None] * skn + offs_d[None, :] * skd, mask=both)  # (BLOCK_N, BLOCK_D)
    tl.store(k_out_ptr + dest[:, None] * D + offs_d[None, :], kv, mask=both)
    vv = tl.load(v_ptr + h * svh + pos[:, None] * svn + offs_d[None, :] * svd, mask=both)  # (BLOCK_N, BLOCK_D)
    tl.store(v_out_ptr + dest[:, None] * D + offs_d[None, :], vv, mask=both)


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, off_ptr, mask_ptr, m_ptr, l_ptr, acc_ptr,
    sqb, sqh, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    smb, smh, smn,
    HKV, G, L, D, scale_log2,
    PACKED: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    QK_DOT: tl.constexpr, PV_DOT: tl.constexpr,
):
    """Grid (B·Hkv, splits). Partial m (log2 domain), l: (B, Hq, S); acc: (B, Hq, S, D) unnormalised.

    PACKED: keys offsets[kvh]:offsets[kvh+1] of (T, d) tensors (B = 1, no mask). Otherwise keys 0..L-1 of
    (B, Hkv, L, d) tensors, attended where mask[b, h, j] != 0.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = (pid // HKV).to(tl.int64)
    kvh = (pid % HKV).to(tl.int64)
    if PACKED:
        lo = tl.load(off_ptr + kvh)
        hi = tl.load(off_ptr + kvh + 1)
    else:
        lo = 0
        hi = L
    per_split = tl.cdiv(tl.cdiv(hi - lo, n_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, hi)

    g = tl.arange(0, BLOCK_G)
    g_ok = g < G
    h = kvh * G + g  # query heads of the group, (BLOCK_G,)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(q_ptr + b * sqb + h[:, None] * sqh + offs_d[None, :] * sqd,
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_G, BLOCK_D)
    k_base = k_ptr + b * skb + kvh * skh
    v_base = v_ptr + b * svb + kvh * svh
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for j0 in range(start, end, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < end
        kt = tl.load(k_base + cols[None, :] * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        z = tl.dot(q, kt, input_precision=QK_DOT) * scale_log2  # (BLOCK_G, BLOCK_N)
        valid = g_ok[:, None] & col_ok[None, :]
        if not PACKED:
            attend = tl.load(mask_ptr + b * smb + h[:, None] * smh + cols[None, :] * smn, mask=valid, other=0)
            valid = valid & (attend != 0)
        z = tl.where(valid, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(z - m_safe[:, None])  # (BLOCK_G, BLOCK_N)
        alpha = tl.exp2(m_i - m_safe)
        vb = tl.load(v_base + cols[:, None] * svn + offs_d[None, :] * svd,
                     mask=col_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=PV_DOT)
        m_i = m_new

    row = (b * HKV * G + h) * n_splits + split  # flat (b, h, split) index
    tl.store(m_ptr + row, m_i, mask=g_ok)
    tl.store(l_ptr + row, l_i, mask=g_ok)
    tl.store(acc_ptr + row[:, None] * D + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr,
    S, D,
    EMPTY_ZERO: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (rows,). Merges the S partials of each row into out (rows, D). A row with no attended key gets zeros
    if EMPTY_ZERO, else NaN (what a softmax over nothing gives)."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < S
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m = tl.load(m_ptr + r * S + s, mask=s_ok, other=float("-inf"))
    l = tl.load(l_ptr + r * S + s, mask=s_ok, other=0.0)
    m_max = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max))  # (BLOCK_S,)
    total = tl.sum(l * weight, 0)
    acc = tl.load(acc_ptr + (r * S + s[:, None]) * D + offs_d[None, :],
                  mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_S, BLOCK_D)
    o = tl.sum(acc * weight[:, None], 0)  # (BLOCK_D,)
    if EMPTY_ZERO:
        o = tl.where(total > 0, o / total, 0.0)
    else:
        o = o / total
    tl.store(out_ptr + r * D + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_ok)


def ragged_compact(
    keys: torch.Tensor,  # (H, N, d)
    values: torch.Tensor,  # (H, N, d)
    keep: torch.Tensor,  # (H, N) bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton version of ``naive.ragged_compact``: (T, d), (T, d), offsets (H + 1,) int64."""
    h, n, d = keys.shape
    offsets = packed_offsets(keep, keys.device)
    total = int(offsets[-1])
    dest = keep.reshape(-1).cumsum(0) - 1  # (H·N,) packed row of each kept entry
    k_out = torch.empty(total, d, device=keys.device, dtype=keys.dtype)
    v_out = torch.empty(total, d, device=values.device, dtype=values.dtype)
    if total:
        keep8 = keep.view(torch.uint8)  # (H, N)
        _compact_kernel[(h, triton.cdiv(n, 32))](
            keys, values, keep8, dest, k_out, v_out,
            *keys.stride(), *values.stride(), *keep8.stride(), n, d,
            BLOCK_N=32, BLOCK_D=pow2(d), num_warps=4,
        )
    return k_out, v_out, offsets


def _decode(q, k, v, offsets, mask, strides, bsz, hkv, g, length, scale, num_splits, out_dtype):
    """Launch the partial kernel over ``num_splits`` splits of the key axis, then the combine kernel.

    q and k share one dtype; ``strides`` are those of q (b, h, d), k and v (b, h, n, d) and the mask (b, h, n),
    0 for absent dims; packed when ``offsets`` is given, else masked. Returns (B·Hq, d) in ``out_dtype``."""
    hq, d = hkv * g, q.shape[-1]
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(target_programs(q.device), bsz * hkv),
                                triton.cdiv(length, 4 * BLOCK_N), 64))
    f32 = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(bsz, hq, num_splits, **f32)
    l = torch.empty(bsz, hq, num_splits, **f32)
    acc = torch.empty(bsz, hq, num_splits, d, **f32)
    packed = offsets is not None
    _decode_partial_kernel[(bsz * hkv, num_splits)](
        q, k, v, offsets if packed else m, m if packed else mask, m, l, acc,
        *strides, hkv, g, length, d, scale * LOG2E,
        PACKED=packed, BLOCK_G=pow2(g), BLOCK_N=BLOCK_N, BLOCK_D=pow2(d),
        QK_DOT=dot_precision(q.dtype), PV_DOT=dot_precision(v.dtype), num_warps=8,
    )
    out = torch.empty(bsz * hq, d, device=q.device, dtype=out_dtype)
    _decode_combine_kernel[(bsz * hq,)](
        m, l, acc, out, num_splits, d,
        EMPTY_ZERO=packed, BLOCK_S=pow2(num_splits, lo=2), BLOCK_D=pow2(d), num_warps=4,
    )
    return out


def ragged_decode(
    q: torch.Tensor,  # (Hq, d) one query per head
    k: torch.Tensor,  # (T, d) packed keys
    v: torch.Tensor,  # (T, d) packed values
    offsets: torch.Tensor,  # (Hkv + 1,)
    scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of ``naive.ragged_decode``. Returns (Hq, d); a head with no entries gets zeros.

    ``num_splits`` fixes how many programs share each head's entries (default: fill the GPU)."""
    hq, d = q.shape
    hkv = offsets.numel() - 1
    scale = d**-0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v = interpreter_safe(q), interpreter_safe(k), interpreter_safe(v)
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dtype), k.to(dtype)
    offsets = offsets.to(device=q.device, dtype=torch.int64)
    strides = (0, *q.stride(), 0, 0, *k.stride(), 0, 0, *v.stride(), 0, 0, 0)
    length = triton.cdiv(k.shape[0], hkv)  # mean entries per head, for the split heuristic
    return _decode(q, k, v, offsets, None, strides, 1, hkv, hq // hkv, length, scale, num_splits, out_dtype)


def ragged_decode_padded(
    q: torch.Tensor,  # (B, Hq, 1, d)
    k: torch.Tensor,  # (B, Hkv, L, d)
    v: torch.Tensor,  # (B, Hkv, L, d)
    mask: torch.Tensor,  # broadcastable to (B, Hq, 1, L) bool, True = attend
    scale: float | None = None,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of ``naive.ragged_decode_padded``. Returns (B, Hq, 1, d); a fully masked row is NaN, as in
    the reference."""
    bsz, hq, _, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out_dtype = q.dtype
    q, k, v = interpreter_safe(q), interpreter_safe(k), interpreter_safe(v)
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dtype), k.to(dtype)
    mask8 = mask.expand(bsz, hq, 1, length).view(torch.uint8)  # (B, Hq, 1, L), broadcast dims keep stride 0
    strides = (q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
               mask8.stride(0), mask8.stride(1), mask8.stride(3))
    out = _decode(q, k, v, None, mask8, strides, bsz, hkv, hq // hkv, length, scale, num_splits, out_dtype)
    return out.view(bsz, hq, 1, d)
