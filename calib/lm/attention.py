"""kvcalib's attention path, registered with transformers' ``AttentionInterface`` as ``"kvcalib"``.

Why a registered attention function rather than a ``Cache`` subclass: transformers builds its causal mask from the
sequence length of layer 0, which is wrong once layers (and heads) hold different numbers of positions. With the
``"kvcalib"`` implementation the model builds no mask at all (a registered mask function returns ``None``) and this
function decides per call, from the ``kvcalib_state`` keyword that flows through ``model(...)`` to every layer:

* no state            -> plain causal SDPA over the given keys (ordinary prefill, identical to ``sdpa``);
* a ``PrefillRecorder`` -> causal SDPA, and the layer's post-RoPE keys, values and queries are recorded;
* a ``RaggedKVCache``  -> the new keys/values are appended to the cache and the queries attend to every valid
  cached slot plus, causally, to the new tokens (see ``calib.cache`` for the layout);
* a ``RaggedKVCache`` whose ``segments`` is set (packed calibration probes) -> the new tokens attend to every
  valid cached slot and causally only to the new tokens of their own segment (block-diagonal); the cache is read,
  not extended (see ``packed_attention``).

Models are called with ``use_cache=False`` so transformers never allocates a ``DynamicCache`` of its own.

Re-entrancy: this function keeps no state of its own; everything a call reads or writes is its ``kvcalib_state``
(a per-call recorder or cache), so one model serves concurrent calls from several threads. The model is set to this
implementation once, at load (``install_attention``), never per call.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

ATTN_NAME = "kvcalib"
_REGISTERED = False
_REGISTER_LOCK = threading.Lock()


def _sdpa(q, k, v, mask, scale, causal):
    # q (B, Hq, q, d), k/v (B, Hkv, L, d), mask broadcastable to (B, Hq, q, L) bool or None
    if k.device.type == "cuda" and mask is not None and q.shape[2] == 1:
        from kvcalib.kernels import ragged_decode_padded

        return ragged_decode_padded(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          scale=scale, enable_gqa=q.shape[1] != k.shape[1])


def cache_attention(cache, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """Append k/v (B, Hkv, q, d) to ``cache`` and attend with q (B, Hq, q, d). Returns (B, Hq, q, d)."""
    segments = getattr(cache, "segments", None)
    if segments is not None and segments.numel() == q.shape[2] and q.shape[2] > 0:
        return packed_attention(cache, layer_idx, q, k, v, scale, segments)
    cache.remember_queries(layer_idx, q)
    keys, values, valid = cache.append(layer_idx, k, v)  # (B, Hkv, L, d), (B, Hkv, L) | None
    q_len, total = q.shape[2], keys.shape[2]
    mask = None
    if q_len > 1 or valid is not None:
        cols = torch.arange(total, device=q.device)
        rows = torch.arange(q_len, device=q.device)
        causal = cols[None, :] <= (total - q_len + rows[:, None])  # (q, L)
        if valid is None:
            mask = causal[None, None]  # (1, 1, q, L)
        else:
            group = q.shape[1] // keys.shape[1]
            m = valid.repeat_interleave(group, dim=1)  # (B, Hq, L)
            mask = m[:, :, None, :] & causal[None, None]  # (B, Hq, q, L)
    if q.shape[0] != keys.shape[0]:
        q = q.expand(keys.shape[0], -1, -1, -1)
    return _sdpa(q, keys, values, mask, scale, causal=False)


def packed_attention(cache, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     segments: torch.Tensor) -> torch.Tensor:
    """Packed probe tokens (cache.segments set): ``q`` (B, Hq, q, d) attends to every valid cached slot of its row
    and, causally, to the new tokens ``k``/``v`` (B, Hkv, q, d) of its own segment only (block-diagonal).

    The cache is read, not extended: probe tokens are transient (a packed forward leaves the cache unchanged).
    Per batch row the valid slots are gathered first (the row's physically compressed cache, padding only where
    its heads keep different counts), so a row at ratio r costs (1 − r) of a full row; the query heads sharing a
    kv head are folded into the query axis so K/V are never repeated."""
    layer = cache.layers[layer_idx]
    b = max(q.shape[0], k.shape[0], layer.keys.shape[0])
    hkv, d = layer.keys.shape[1], layer.keys.shape[3]
    hq, q_len = q.shape[1], q.shape[2]
    g = hq // hkv
    seg = segments.to(q.device)
    rows = torch.arange(q_len, device=q.device)
    block = (seg[:, None] == seg[None, :]) & (rows[None, :] <= rows[:, None])  # (q, q)
    new_mask = torch.zeros(q_len, q_len, dtype=q.dtype, device=q.device).masked_fill_(~block, float("-inf"))
    new_mask = new_mask.repeat(g, 1)  # (g·q, q): folded row j·q + t is query t of head j
    n_full = layer.keys.shape[2]
    # [zeros for every cached slot | block-diagonal part]; a row keeping n slots uses its last n + q columns
    template = torch.cat([new_mask.new_zeros(g * q_len, n_full), new_mask], dim=-1)
    q = q.expand(b, -1, -1, -1)
    k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
    outs = []
    for i in range(b):
        ck = layer.keys[min(i, layer.keys.shape[0] - 1)]  # (Hkv, N, d)
        cv = layer.values[min(i, layer.values.shape[0] - 1)]
        pad = None
        if layer.valid is not None:
            m = layer.valid[min(i, layer.valid.shape[0] - 1)]  # (Hkv, N)
            counts = m.sum(-1)
            width = int(counts.max())
            if width < m.shape[-1] or not bool(m.all()):
                order = torch.sort((~m).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # (Hkv, W)
                idx = order.unsqueeze(-1).expand(-1, -1, d)
                ck, cv = torch.gather(ck, 1, idx), torch.gather(cv, 1, idx)
                if bool((counts < width).any()):
                    pad = torch.arange(width, device=q.device)[None, :] >= counts[:, None]  # (Hkv, W)
        n = ck.shape[1]
        keys = torch.cat([ck, k[i]], dim=1).unsqueeze(0)  # (1, Hkv, n + q, d)
        values = torch.cat([cv, v[i]], dim=1).unsqueeze(0)
        if pad is None:
            mask = template[:, n_full - n:][None, None]
        else:
            cache_part = torch.zeros(hkv, 1, n, dtype=q.dtype, device=q.device).masked_fill_(pad[:, None],
                                                                                            float("-inf"))
            mask = torch.cat([cache_part.expand(hkv, g * q_len, n), new_mask.expand(hkv, -1, -1)], dim=-1)[None]
        qf = q[i].reshape(1, hkv, g * q_len, d)
        outs.append(F.scaled_dot_product_attention(qf, keys, values, attn_mask=mask, scale=scale))
    return torch.cat(outs).reshape(b, hq, q_len, d)


def kvcalib_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = kwargs.get("kvcalib_state")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if state is None:
        out = _sdpa(query, key, value, None, scale, causal=query.shape[2] > 1)
    elif hasattr(state, "append"):
        out = cache_attention(state, module.layer_idx, query, key, value, scale)
    else:
        state.record(module.layer_idx, query, key, value)
        out = _sdpa(query, key, value, None, scale, causal=query.shape[2] > 1)
    return out.transpose(1, 2).contiguous(), None  # (B, q, Hq, d)


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Register the ``"kvcalib"`` attention and mask functions with transformers (once per process)."""
    global _REGISTERED
    with _REGISTER_LOCK:
        if _REGISTERED:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, kvcalib_attention)
        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
        _REGISTERED = True


def install_attention(model: torch.nn.Module) -> None:
    register()
    model.set_attn_implementation(ATTN_NAME)
