"""Scoring and cache hot paths. Each op has a Triton kernel for CUDA tensors and a plain torch reference with the
same signature; the public functions below dispatch on the device (``impl="auto"``), or take ``impl="torch"`` /
``impl="triton"`` explicitly (tests run the Triton path on CPU under ``TRITON_INTERPRET=1``).
"""

from kvcalib.kernels.dispatch import (
    chunked_colsum,
    leverage_scores,
    ragged_compact,
    ragged_decode,
    ragged_decode_padded,
    window_attention_stats,
)

__all__ = [
    "chunked_colsum",
    "leverage_scores",
    "ragged_compact",
    "ragged_decode",
    "ragged_decode_padded",
    "window_attention_stats",
]
