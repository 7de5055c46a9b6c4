"""Column sums of non-causal attention inside fixed chunks (Compactor's attention term).

For key j in chunk c: Σ_{i in c} softmax_j(q_i · k_c · scale). Two kernels, one program per (batch, query head,
chunk, block of 64 rows or keys); the last chunk may be shorter than ``chunk``:

1. ``_chunk_rowstats_kernel`` — online row max / normaliser of each query over its chunk's keys (log2 domain).
2. ``_chunk_colsum_kernel`` — recomputes the scores of a key block against every query of the chunk and sums
   A = exp(Z − m) / l over the queries.

Query head h reads kv head h // (Hq / Hkv). Reference: ``kvcalib.kernels.naive.chunked_colsum``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kvcalib.kernels._common import dot_precision, interpreter_safe, pow2

LOG2E = math.log2(math.e)


@triton.jit
def _chunk_block(HQ, N, CHUNK, BLOCK: tl.constexpr):
    """Where a program of grid (B·Hq, chunks, blocks per chunk) works: batch b and query head h (int64), its chunk
    [c0, c1) (the last one may be shorter) and its block of BLOCK positions in the chunk with their mask."""
    pid_bh = tl.program_id(0)
    c0 = tl.program_id(1) * CHUNK
    c1 = tl.minimum(c0 + CHUNK, N)
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    idx = c0 + tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    return b, h, c0, c1, idx, idx < c1


@triton.jit
def _load_rows(base, idx, ok, s_idx, s_d, D, BLOCK_D: tl.constexpr):
    """(len(idx), BLOCK_D) tile of rows ``idx`` of the (·, D) matrix at ``base``; zeros where ``ok`` is false."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + idx[:, None] * s_idx + offs_d[None, :] * s_d,
                   mask=ok[:, None] & (offs_d < D)[None, :], other=0.0)


@triton.jit
def _load_rows_t(base, idx, ok, s_idx, s_d, D, BLOCK_D: tl.constexpr):
    """The same rows transposed: a (BLOCK_D, len(idx)) tile."""
    offs_d = tl.arange(0, BLOCK_D)
    return tl.load(base + idx[None, :] * s_idx + offs_d[:, None] * s_d,
                   mask=ok[None, :] & (offs_d < D)[:, None], other=0.0)


@triton.jit
def _chunk_rowstats_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    HQ, G, N, D, CHUNK, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QK_DOT: tl.constexpr,
):
    """Grid (B·Hq, chunks, row blocks per chunk). m (log2 domain), l: (B, Hq, N)."""
    b, h, c0, c1, rows, row_ok = _chunk_block(HQ, N, CHUNK, BLOCK_M)
    q = _load_rows(q_ptr + b * sqb + h * sqh, rows, row_ok, sqn, sqd, D, BLOCK_D)  # (BLOCK_M, BLOCK_D)
    k_base = k_ptr + b * skb + (h // G) * skh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(c0, c1, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < c1
        kt = _load_rows_t(k_base, cols, col_ok, skn, skd, D, BLOCK_D)  # (BLOCK_D, BLOCK_N)
        z = tl.dot(q, kt, input_precision=QK_DOT) * scale_log2  # (BLOCK_M, BLOCK_N)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        m_i = m_new
    out = (b * HQ + h) * N + rows
    tl.store(m_ptr + out, m_i, mask=row_ok)
    tl.store(l_ptr + out, l_i, mask=row_ok)


@triton.jit
def _chunk_colsum_kernel(
    q_ptr, k_ptr, m_ptr, l_ptr, out_ptr,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    HQ, G, N, D, CHUNK, scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QK_DOT: tl.constexpr,
):
    """Grid (B·Hq, chunks, key blocks per chunk). out: (B, Hq, N) fp32."""
    b, h, c0, c1, cols, col_ok = _chunk_block(HQ, N, CHUNK, BLOCK_N)
    kt = _load_rows_t(k_ptr + b * skb + (h // G) * skh, cols, col_ok, skn, skd, D, BLOCK_D)  # (BLOCK_D, BLOCK_N)
    q_base = q_ptr + b * sqb + h * sqh
    row_base = (b * HQ + h) * N
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i0 in range(c0, c1, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < c1
        q = _load_rows(q_base, rows, row_ok, sqn, sqd, D, BLOCK_D)  # (BLOCK_M, BLOCK_D)
        m = tl.load(m_ptr + row_base + rows, mask=row_ok, other=0.0)
        l = tl.load(l_ptr + row_base + rows, mask=row_ok, other=1.0)
        z = tl.dot(q, kt, input_precision=QK_DOT) * scale_log2  # (BLOCK_M, BLOCK_N)
        a = tl.exp2(tl.where(row_ok[:, None] & col_ok[None, :], z - m[:, None], float("-inf"))) / l[:, None]
        acc += tl.sum(a, 0)
    tl.store(out_ptr + row_base + cols, acc, mask=col_ok)


def chunked_colsum(
    q: torch.Tensor,  # (B, Hq, N, d)
    k: torch.Tensor,  # (B, Hkv, N, d)
    chunk: int = 256,
    scale: float = 1.0,
) -> torch.Tensor:
    """Triton version of ``naive.chunked_colsum``. Returns (B, Hq, N) fp32."""
    bsz, hq, n, d = q.shape
    g = hq // k.shape[1]
    q, k = interpreter_safe(q), interpreter_safe(k)
    dtype = torch.promote_types(q.dtype, k.dtype)
    q, k = q.to(dtype), k.to(dtype)
    chunk = max(1, min(int(chunk), n))
    block = min(64, pow2(chunk))
    block_d = pow2(d)
    n_chunks = triton.cdiv(n, chunk)
    f32 = dict(device=q.device, dtype=torch.float32)
    m = torch.empty(bsz, hq, n, **f32)
    l = torch.empty(bsz, hq, n, **f32)
    out = torch.empty(bsz, hq, n, **f32)
    grid = (bsz * hq, n_chunks, triton.cdiv(chunk, block))
    common = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, QK_DOT=dot_precision(dtype), num_warps=4)
    _chunk_rowstats_kernel[grid](q, k, m, l, *q.stride(), *k.stride(), hq, g, n, d, chunk, scale * LOG2E, **common)
    _chunk_colsum_kernel[grid](q, k, m, l, out, *q.stride(), *k.stride(), hq, g, n, d, chunk, scale * LOG2E,
                               **common)
    return out
