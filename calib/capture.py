"""Prefill capture: one forward pass over a context that records everything the scorers need.

Per layer: post-RoPE keys and values (exactly what a KV cache holds), pre-RoPE keys (hooked at the key
projection, or at ``k_norm`` for models that normalise keys), and post-RoPE queries of every position (the
observation window is their tail; Compactor's chunked attention needs them all). The prefill itself runs SDPA, not
eager attention: window attention is recomputed from the captured queries by the scorers.

Streaming (issue 16): ``prefill(..., observers=[...])`` calls every ``LayerObserver`` with one layer's
(q, k, v, k_pre) while that layer runs, so scorers accumulate their statistics inside the forward and a layer's full
queries never outlive it; ``query_positions`` then keeps only the queries still needed afterwards (observation
window, sampled feature queries) and ``keep_keys_pre=False`` drops the pre-RoPE keys (see
``calib.scorers.streaming``). Without them the capture keeps everything: the readable reference path.

Optionally the token-level negative log-likelihood of the context is computed from the final hidden states in
chunks (the full (N, vocab) logits are never materialised at once), for every token or for every ``nll_stride``-th
one (the LM head over all N positions costs about a sixth of the prefill of a 135M model; a stride of 8 estimates
the mean and quantiles from N/8 tokens at 1/8 of that cost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from kvcalib.calib.lm.hooks import install_capture_hooks, recording
from kvcalib.calib.lm.registry import LoadedModel


@dataclass
class Capture:
    input_ids: torch.Tensor  # (N,)
    keys: torch.Tensor  # (L, Hkv, N, d) post-RoPE, as cached
    values: torch.Tensor  # (L, Hkv, N, d)
    keys_pre: torch.Tensor | None  # (L, Hkv, N, d) pre-RoPE; None when a streaming capture dropped them
    queries: torch.Tensor  # (L, Hq, Nq, d) post-RoPE queries of the last Nq positions (Nq = N unless limited)
    last_logits: torch.Tensor  # (vocab,) next-token logits after the context
    token_nll: torch.Tensor | None = None  # (M,) NLL of tokens 1, 1+s, 1+2s, ... given their prefix (stride s)
    prefill_seconds: float = 0.0
    extras: dict = field(default_factory=dict)
    query_positions: torch.Tensor | None = None  # (Nq,) sorted absolute positions of ``queries``; None: the last Nq

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    @property
    def num_layers(self) -> int:
        return self.keys.shape[0]

    @property
    def head_dim(self) -> int:
        return self.keys.shape[-1]

    @property
    def group_size(self) -> int:
        return self.queries.shape[1] // self.keys.shape[1]

    def positions(self) -> torch.Tensor:
        """(Nq,) absolute positions of the captured queries."""
        if self.query_positions is not None:
            return self.query_positions
        n, nq = self.num_tokens, self.queries.shape[2]
        return torch.arange(n - nq, n)

    def window_queries(self, w: int) -> torch.Tensor:
        """(L, Hq, w, d) queries of the last ``w`` context positions."""
        nq, n = self.queries.shape[2], self.num_tokens
        tail = self.positions()[-w:] if w else self.positions()[:0]
        if w > nq or (w and int(tail[0]) != n - w):
            raise ValueError(f"window {w} exceeds the {nq} captured queries (of positions ending at {n - 1})")
        return self.queries[:, :, nq - w:]

    @property
    def context_nll(self) -> float:
        if self.token_nll is None:
            raise ValueError("capture was taken without compute_nll=True")
        return float(self.token_nll.mean())


class LayerObserver(Protocol):
    """Called once per decoder layer while a capture's forward runs, right after the layer computed its attention
    inputs: q (Hq, N, d) post-RoPE queries, k / v (Hkv, N, d) post-RoPE keys and values (what the cache holds),
    k_pre (Hkv, N, d) pre-RoPE keys. Tensors are views of the forward's own activations: copy what must outlive the
    call. Observers run in the thread of the forward (one per call: never shared between concurrent captures)."""

    def observe(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_pre: torch.Tensor) -> None: ...


class PrefillRecorder:
    """The per-call state of one capture: the ``kvcalib_state`` given to the attention path (see
    ``calib.lm.attention``), and the recorder the model's permanent key-source hooks write into while the capture's
    forward runs (see ``calib.lm.hooks``). Nothing of a capture is stored on the shared model.

    ``observers`` see each layer's tensors during the forward; ``query_positions`` (sorted absolute positions)
    selects the queries kept afterwards (overrides ``query_tail``); ``keep_keys_pre=False`` keeps no pre-RoPE key."""

    def __init__(self, n_layers: int, query_tail: int | None, head_dim: int,
                 observers: Sequence[LayerObserver] = (), query_positions: torch.Tensor | None = None,
                 keep_keys_pre: bool = True):
        self.n_layers = n_layers
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.queries: list[torch.Tensor | None] = [None] * n_layers
        self.keys_pre: list[torch.Tensor | None] = [None] * n_layers
        self.seen_pre = [False] * n_layers
        # (L, H, N, d) buffers the layers are copied into as the forward runs: the stacked capture exists once,
        # never beside a list of per-layer tensors (``stacked``); a layer of another shape falls back to stacking
        self._bufs: dict[str, torch.Tensor | None] = {}
        self.query_tail = query_tail
        self.head_dim = head_dim
        self.observers = list(observers)
        self.query_positions = query_positions
        self.keep_keys_pre = keep_keys_pre

    def _slot(self, name: str, layer_idx: int, t: torch.Tensor) -> torch.Tensor:
        """``t`` (H, N, d) copied into layer ``layer_idx`` of the ``name`` buffer (made at the first layer); the
        slot (a view) is returned. A layer whose shape, dtype or device differs from the first turns the buffer off
        (``stacked`` then stacks the per-layer tensors, the old path)."""
        buf = self._bufs.get(name, ...)
        if buf is ...:
            buf = self._bufs[name] = t.new_empty((self.n_layers, *t.shape))
        if buf is None or buf.shape[1:] != t.shape or buf.dtype != t.dtype or buf.device != t.device:
            if buf is not None:  # earlier layers keep their slots (views); stacking copies them
                self._bufs[name] = None
            return t
        buf[layer_idx].copy_(t)
        return buf[layer_idx]

    def stacked(self, name: str) -> torch.Tensor:
        """The (L, H, N, d) capture of ``name`` (keys, values, keys_pre, queries): the buffer the layers were copied
        into when every layer went there, else ``torch.stack`` of the per-layer tensors."""
        layers = getattr(self, name)
        buf = self._bufs.get(name)
        if isinstance(buf, torch.Tensor) and all(x is not None and x.data_ptr() == buf[i].data_ptr()
                                                 for i, x in enumerate(layers)):
            return buf
        return torch.stack(layers)

    def record(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # q (1, Hq, N, d), k/v (1, Hkv, N, d); the layer's key-source hook has already run (k_proj precedes attention)
        self.keys[layer_idx] = self._slot("keys", layer_idx, k[0])
        self.values[layer_idx] = self._slot("values", layer_idx, v[0])
        k_pre = self.keys_pre[layer_idx]
        for obs in self.observers:
            obs.observe(layer_idx, q[0], k[0], v[0], k_pre)
        if not self.keep_keys_pre:
            self.keys_pre[layer_idx] = None
        elif k_pre is not None:
            self.keys_pre[layer_idx] = self._slot("keys_pre", layer_idx, k_pre)
        if self.query_positions is not None:
            self.queries[layer_idx] = q[0, :, self.query_positions.to(q.device)]  # (Hq, Nq, d) a copy
        else:
            tail = self.query_tail
            self.queries[layer_idx] = (self._slot("queries", layer_idx, q[0]) if tail is None
                                       else q[0, :, max(0, q.shape[2] - tail):].clone())

    def record_key_source(self, layer_idx: int, out: torch.Tensor) -> None:
        # out (1, N, Hkv·d) from k_proj, or (1, N, Hkv, d) from k_norm
        b, n = out.shape[0], out.shape[1]
        self.keys_pre[layer_idx] = out.view(b, n, -1, self.head_dim)[0].transpose(0, 1)  # (Hkv, N, d)
        self.seen_pre[layer_idx] = True


@torch.no_grad()
def prefill(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    compute_nll: bool = False,
    query_tail: int | None = None,
    nll_chunk: int = 128,
    nll_stride: int = 1,
    observers: Sequence[LayerObserver] = (),
    query_positions: torch.Tensor | None = None,
    keep_keys_pre: bool = True,
) -> Capture:
    """Run one prefill of ``input_ids`` (N,) and capture keys, values, pre-RoPE keys and queries of every layer
    (``observers`` / ``query_positions`` / ``keep_keys_pre``: the streaming options, see ``PrefillRecorder``)."""
    model, spec = lm.model, lm.spec
    device = next(model.parameters()).device
    ids = input_ids.to(device).view(1, -1)  # (1, N)
    n = ids.shape[1]
    if query_tail is not None and query_tail < 0:
        raise ValueError(f"query_tail must be >= 0, got {query_tail}")
    if query_positions is not None:
        query_positions = torch.unique(query_positions.long().flatten())  # sorted, distinct
        if query_positions.numel() and (int(query_positions[0]) < 0 or int(query_positions[-1]) >= n):
            raise ValueError(f"query_positions must lie in [0, {n})")
    rec = PrefillRecorder(spec.num_layers, query_tail, spec.head_dim, observers, query_positions, keep_keys_pre)
    install_capture_hooks(model)  # once per model (load_model already did); a no-op afterwards
    decoder = model.get_decoder()
    t0 = time.perf_counter()
    with recording(rec):  # this call's hooks target, visible to this thread's forward only
        out = decoder(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=False,
                      kvcalib_state=rec)
    if not all(rec.seen_pre):
        raise RuntimeError("the capture hooks recorded no pre-RoPE keys: the model's layers were replaced after "
                           "loading")
    hidden = out.last_hidden_state[0]  # (N, hidden)
    head = model.get_output_embeddings()
    last_logits = head(hidden[-1:]).float()[0]  # (vocab,)
    token_nll = None
    if compute_nll:
        if nll_stride < 1:
            raise ValueError(f"nll_stride must be >= 1, got {nll_stride}")
        at = torch.arange(0, n - 1, nll_stride, device=device)  # (M,) positions predicting tokens at + 1
        parts = []
        for s in range(0, at.numel(), nll_chunk):
            idx = at[s:s + nll_chunk]
            logits = head(hidden[idx]).float()  # (chunk, vocab)
            parts.append(torch.nn.functional.cross_entropy(logits, ids[0, idx + 1], reduction="none"))
        token_nll = torch.cat(parts) if parts else torch.zeros(0)
    seconds = time.perf_counter() - t0
    return Capture(
        input_ids=ids[0].cpu(),
        keys=rec.stacked("keys"),
        values=rec.stacked("values"),
        keys_pre=rec.stacked("keys_pre") if keep_keys_pre else None,
        queries=rec.stacked("queries"),
        last_logits=last_logits,
        token_nll=token_nll,
        prefill_seconds=seconds,
        query_positions=query_positions.cpu() if query_positions is not None else None,
    )
