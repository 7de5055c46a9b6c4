"""Device dispatch: every public op runs its Triton kernel or its torch reference (``naive.py``).

``impl="auto"`` picks Triton when the tensors are on CUDA and the torch reference otherwise; ``impl="torch"`` and
``impl="triton"`` force one. Triton on CPU tensors runs through Triton's interpreter, which needs
``TRITON_INTERPRET=1`` in the environment before ``triton`` is first imported (tests and the benchmark's
``--interpret-smoke`` do this in a fresh process). The Triton modules are imported on first use, so the torch
references work without Triton installed.
"""

from __future__ import annotations

import importlib

import torch

from kvcalib.kernels import naive

IMPLS = ("auto", "torch", "triton")


def _use_triton(impl: str, x: torch.Tensor) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return False
    if impl == "auto":
        return x.is_cuda
    if not x.is_cuda:
        from kvcalib.kernels._common import interpreter_active

        if not interpreter_active():
            raise RuntimeError("impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                               "in the environment before triton is first imported")
    return True


def _triton(module: str):
    return importlib.import_module(f"kvcalib.kernels.{module}")


def window_attention_stats(
    q: torch.Tensor,  # (B, Hq, w, d)
    k: torch.Tensor,  # (B, Hkv, N, d)
    v: torch.Tensor | None = None,  # (B, Hkv, N, d)
    scale: float | None = None,
    stats: tuple[str, ...] = ("attn",),
    *,
    impl: str = "auto",
) -> dict[str, torch.Tensor]:
    """See ``naive.window_attention_stats``; each statistic is (B, Hq, N) fp32."""
    if _use_triton(impl, q):
        return _triton("window_attn").window_attention_stats(q, k, v, scale, stats)
    return naive.window_attention_stats(q, k, v, scale, stats)


def chunked_colsum(
    q: torch.Tensor,  # (B, Hq, N, d)
    k: torch.Tensor,  # (B, Hkv, N, d)
    chunk: int = 256,
    scale: float = 1.0,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """See ``naive.chunked_colsum``; returns (B, Hq, N) fp32."""
    if _use_triton(impl, q):
        return _triton("chunked_attn").chunked_colsum(q, k, chunk, scale)
    return naive.chunked_colsum(q, k, chunk, scale)


def leverage_scores(
    x: torch.Tensor,  # (B, H, N, d)
    sketch: torch.Tensor,  # (d, k)
    rho: float = 1e-6,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """See ``naive.leverage_scores``; returns (B, H, N) fp32."""
    if _use_triton(impl, x):
        return _triton("leverage").leverage_scores(x, sketch, rho)
    return naive.leverage_scores(x, sketch, rho)


def ragged_compact(
    keys: torch.Tensor,  # (H, N, d)
    values: torch.Tensor,  # (H, N, d)
    keep: torch.Tensor,  # (H, N) bool
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See ``naive.ragged_compact``; returns packed keys (T, d), values (T, d) and offsets (H + 1,)."""
    if _use_triton(impl, keys):
        return _triton("ragged").ragged_compact(keys, values, keep)
    return naive.ragged_compact(keys, values, keep)


def ragged_decode(
    q: torch.Tensor,  # (Hq, d)
    k: torch.Tensor,  # (T, d)
    v: torch.Tensor,  # (T, d)
    offsets: torch.Tensor,  # (Hkv + 1,)
    scale: float | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """See ``naive.ragged_decode``; returns (Hq, d)."""
    if _use_triton(impl, q):
        return _triton("ragged").ragged_decode(q, k, v, offsets, scale)
    return naive.ragged_decode(q, k, v, offsets, scale)


def ragged_decode_padded(
    q: torch.Tensor,  # (B, Hq, 1, d)
    k: torch.Tensor,  # (B, Hkv, L, d)
    v: torch.Tensor,  # (B, Hkv, L, d)
    mask: torch.Tensor,  # broadcastable to (B, Hq, 1, L) bool
    scale: float | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """See ``naive.ragged_decode_padded``; returns (B, Hq, 1, d)."""
    if _use_triton(impl, q):
        return _triton("ragged").ragged_decode_padded(q, k, v, mask, scale)
    return naive.ragged_decode_padded(q, k, v, mask, scale)
