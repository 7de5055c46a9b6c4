"""Device dispatch for the kernels (torch reference implementations live in ``naive.py``).

TEMPORARY: until the Triton kernels land, every op dispatches to its torch reference.
"""

from __future__ import annotations

from kvcalib.kernels import naive

window_attention_stats = naive.window_attention_stats
chunked_colsum = naive.chunked_colsum
leverage_scores = naive.leverage_scores
ragged_compact = naive.ragged_compact
ragged_decode = naive.ragged_decode
ragged_decode_padded = naive.ragged_decode_padded
