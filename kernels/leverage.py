"""Approximate leverage scores ℓ_i = s_iᵀ (SᵀS + ρ·I)⁻¹ s_i with the sketch S = xΦ (Compactor).

The sketch S (N × k per head) is never written to memory:

1. ``_sketch_gram_kernel`` — S tile = x tile · Φ and the partial Gram SᵀS over a split of the positions;
   partial Grams are summed in torch.
2. torch — the k × k regularisation with jitter escalation and the Cholesky factor G = L Lᵀ (shared with the
   reference, ``naive.regularised_cholesky``); W = L⁻ᵀ by a triangular solve.
3. ``_sketch_quadform_kernel`` — recomputes S tile = x tile · Φ and returns ℓ_i = ‖s_i W‖² = s_iᵀ G⁻¹ s_i
   (or s_iᵀ G⁺ s_i with the pseudo-inverse when every Cholesky failed, as the reference does).

Reference: ``kvcalib.kernels.naive.leverage_scores``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcalib.kernels._common import FP32_DOT, pow2, target_programs
from kvcalib.kernels.naive import regularised_cholesky


@triton.jit
def _sketch_gram_kernel(
    x_ptr, phi_ptr, gram_ptr,
    sxb, sxh, sxn, sxd,
    H, N, D, K, rows_per_split,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):
    """Grid (B·H, splits). gram: (B·H, splits, BLOCK_K, BLOCK_K) partial SᵀS (zero beyond K)."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    phi = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :],
                  mask=d_ok[:, None] & (offs_k[None, :] < K), other=0.0)  # (BLOCK_D, BLOCK_K)
    x_base = x_ptr + b * sxb + h * sxh
    gram = tl.zeros([BLOCK_K, BLOCK_K], dtype=tl.float32)
    start = pid_s * rows_per_split
    end = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        x = tl.load(x_base + rows[:, None] * sxn + offs_d[None, :] * sxd,
                    mask=(rows[:, None] < end) & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.dot(x, phi, input_precision=F32_DOT)  # (BLOCK_N, BLOCK_K)
        gram += tl.dot(tl.trans(s), s, input_precision=F32_DOT)
    out = gram_ptr + (pid_bh * tl.num_programs(1) + pid_s) * BLOCK_K * BLOCK_K
    tl.store(out + offs_k[:, None] * BLOCK_K + offs_k[None, :], gram)


@triton.jit
def _sketch_quadform_kernel(
    x_ptr, phi_ptr, mat_ptr, out_ptr,
    sxb, sxh, sxn, sxd,
    H, N, D, K,
    SQUARE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Grid (B·H, row blocks). mat: (B·H, K, K). out (B·H, N): ‖s_i M‖² if SQUARE else (s_i M)·s_i."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    offs_d = tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, BLOCK_K)
    d_ok = offs_d < D
    k_ok = offs_k < K
    phi = tl.load(phi_ptr + offs_d[:, None] * K + offs_k[None, :],
                  mask=d_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_D, BLOCK_K)
    mat = tl.load(mat_ptr + pid_bh.to(tl.int64) * K * K + offs_k[:, None] * K + offs_k[None, :],
                  mask=k_ok[:, None] & k_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_K)
    x = tl.load(x_ptr + b * sxb + h * sxh + rows[:, None] * sxn + offs_d[None, :] * sxd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
    s = tl.dot(x, phi, input_precision=F32_DOT)  # (BLOCK_N, BLOCK_K)
    u = tl.dot(s, mat, input_precision=F32_DOT)  # (BLOCK_N, BLOCK_K)
    if SQUARE:
        lev = tl.sum(u * u, 1)
    else:
        lev = tl.sum(u * s, 1)
    tl.store(out_ptr + pid_bh.to(tl.int64) * N + rows, lev, mask=row_ok)


def leverage_scores(
    x: torch.Tensor,  # (B, H, N, d) keys (already centred, if wanted)
    sketch: torch.Tensor,  # (d, k) Gaussian sketch Φ
    rho: float = 1e-6,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton version of ``naive.leverage_scores`` (same regularisation). Returns (B, H, N) fp32.

    ``num_splits`` fixes how many programs share the positions of a head in the Gram pass (default: fill the GPU).
    """
    bsz, h, n, d = x.shape
    kdim = sketch.shape[1]
    phi = sketch.to(device=x.device, dtype=torch.float32).contiguous()  # (d, k)
    block_d, block_k = pow2(d), pow2(kdim)
    block_n = 32  # Gram pass; the quadratic-form pass uses 64 rows per program
    if num_splits is None:
        num_splits = max(1, min(triton.cdiv(target_programs(x.device), bsz * h), triton.cdiv(n, 4 * block_n)))
    rows_per_split = triton.cdiv(triton.cdiv(n, num_splits), block_n) * block_n
    num_splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(bsz * h, num_splits, block_k, block_k, device=x.device, dtype=torch.float32)
    _sketch_gram_kernel[(bsz * h, num_splits)](
        x, phi, partial, *x.stride(), h, n, d, kdim, rows_per_split,
        BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_K=block_k, F32_DOT=FP32_DOT, num_warps=8,
    )
    gram = partial.sum(1)[:, :kdim, :kdim].reshape(bsz, h, kdim, kdim)  # (B, H, k, k)
    chol = regularised_cholesky(gram, rho)
    if chol is None:  # pseudo-inverse as the last resort, like the reference
        mat, square = torch.linalg.pinv(gram), False  # (B, H, k, k)
    else:
        eye = torch.eye(kdim, device=x.device, dtype=torch.float32)
        mat, square = torch.linalg.solve_triangular(chol, eye, upper=False).mT, True  # W = L⁻ᵀ, (B, H, k, k)
    out = torch.empty(bsz, h, n, device=x.device, dtype=torch.float32)
    _sketch_quadform_kernel[(bsz * h, triton.cdiv(n, 64))](
        x, phi, mat.contiguous(), out, *x.stride(), h, n, d, kdim,
        SQUARE=square, BLOCK_N=64, BLOCK_D=block_d, BLOCK_K=block_k, F32_DOT=FP32_DOT, num_warps=4,
    )
    return out
