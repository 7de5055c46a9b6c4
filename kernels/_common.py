"""Helpers shared by the Triton kernels: block shapes, dot precision, grid sizing, interpreter detection."""

from __future__ import annotations

import torch
import triton

FP32_DOT = "tf32x3"  # tl.dot precision of fp32 operands: three TF32 passes, about fp32 accuracy


def pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo) (Triton block shapes are powers of two; ``tl.dot`` wants >= 16)."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for operands of ``dtype`` (the setting only matters for fp32 operands)."""
    return FP32_DOT if dtype == torch.float32 else "tf32"


def target_programs(device: torch.device) -> int:
    """How many programs fill the device: two per SM on CUDA; one under the (serial) CPU interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def interpreter_active() -> bool:
    """Whether Triton runs kernels through its CPU interpreter in this process.

    Triton decides per ``@triton.jit`` decoration, reading ``TRITON_INTERPRET`` when the function is defined; its
    own standard library (``tl.zeros``, ``tl.sum``...) is decorated when ``triton`` is first imported, so the
    variable must be set before that import — setting it later has no effect.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(triton.language.zeros, InterpretedFunction)


def interpreter_safe(t: torch.Tensor) -> torch.Tensor:
    """``t`` in fp32 if it is a bf16 CPU tensor, else unchanged: Triton's interpreter (3.9) multiplies bf16
    ``tl.dot`` operands as raw integers, so the CPU path feeds fp32 to the kernels instead."""
    return t.float() if t.dtype == torch.bfloat16 and not t.is_cuda else t
