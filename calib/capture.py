"""Prefill capture: one forward pass over a context that records everything the scorers need.

Per layer: post-RoPE keys and values (exactly what a KV cache holds), pre-RoPE keys (hooked at the key
projection, or at ``k_norm`` for models that normalise keys), and post-RoPE queries of every position (the
observation window is their tail; Compactor's chunked attention needs them all). The prefill itself runs SDPA, not
eager attention: window attention is recomputed from the captured queries by the scorers.

Optionally the token-level negative log-likelihood of the context is computed from the final hidden states in
chunks (the full (N, vocab) logits are never materialised at once), for every token or for every ``nll_stride``-th
one (the LM head over all N positions costs about a sixth of the prefill of a 135M model; a stride of 8 estimates
the mean and quantiles from N/8 tokens at 1/8 of that cost).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from kvcalib.calib.lm.hooks import install_capture_hooks, recording
from kvcalib.calib.lm.registry import LoadedModel


@dataclass
class Capture:
    input_ids: torch.Tensor  # (N,)
    keys: torch.Tensor  # (L, Hkv, N, d) post-RoPE, as cached
    values: torch.Tensor  # (L, Hkv, N, d)
    keys_pre: torch.Tensor  # (L, Hkv, N, d) pre-RoPE
    queries: torch.Tensor  # (L, Hq, Nq, d) post-RoPE queries of the last Nq positions (Nq = N unless limited)
    last_logits: torch.Tensor  # (vocab,) next-token logits after the context
    token_nll: torch.Tensor | None = None  # (M,) NLL of tokens 1, 1+s, 1+2s, ... given their prefix (stride s)
    prefill_seconds: float = 0.0
    extras: dict = field(default_factory=dict)

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

    def window_queries(self, w: int) -> torch.Tensor:
        """(L, Hq, w, d) queries of the last ``w`` context positions."""
        if w > self.queries.shape[2]:
            raise ValueError(f"window {w} exceeds the {self.queries.shape[2]} captured queries")
        return self.queries[:, :, -w:]

    @property
    def context_nll(self) -> float:
        if self.token_nll is None:
            raise ValueError("capture was taken without compute_nll=True")
        return float(self.token_nll.mean())


class PrefillRecorder:
    """The per-call state of one capture: the ``kvcalib_state`` given to the attention path (see
    ``calib.lm.attention``), and the recorder the model's permanent key-source hooks write into while the capture's
    forward runs (see ``calib.lm.hooks``). Nothing of a capture is stored on the shared model."""

    def __init__(self, n_layers: int, query_tail: int | None, head_dim: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.queries: list[torch.Tensor | None] = [None] * n_layers
        self.keys_pre: list[torch.Tensor | None] = [None] * n_layers
        self.query_tail = query_tail
        self.head_dim = head_dim

    def record(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        # q (1, Hq, N, d), k/v (1, Hkv, N, d)
        self.keys[layer_idx] = k[0]
        self.values[layer_idx] = v[0]
        self.queries[layer_idx] = q[0] if self.query_tail is None else q[0, :, -self.query_tail:]

    def record_key_source(self, layer_idx: int, out: torch.Tensor) -> None:
        # out (1, N, Hkv·d) from k_proj, or (1, N, Hkv, d) from k_norm
        b, n = out.shape[0], out.shape[1]
        self.keys_pre[layer_idx] = out.view(b, n, -1, self.head_dim)[0].transpose(0, 1)  # (Hkv, N, d)


@torch.no_grad()
def prefill(
    lm: LoadedModel,
    input_ids: torch.Tensor,
    compute_nll: bool = False,
    query_tail: int | None = None,
    nll_chunk: int = 512,
    nll_stride: int = 1,
) -> Capture:
    """Run one prefill of ``input_ids`` (N,) and capture keys, values, pre-RoPE keys and queries of every layer."""
    model, spec = lm.model, lm.spec
    device = next(model.parameters()).device
    ids = input_ids.to(device).view(1, -1)  # (1, N)
    n = ids.shape[1]
    rec = PrefillRecorder(spec.num_layers, query_tail, spec.head_dim)
    install_capture_hooks(model)  # once per model (load_model already did); a no-op afterwards
    decoder = model.get_decoder()
    t0 = time.perf_counter()
    with recording(rec):  # this call's hooks target, visible to this thread's forward only
        out = decoder(input_ids=ids, position_ids=torch.arange(n, device=device)[None], use_cache=False,
                      kvcalib_state=rec)
    if any(k is None for k in rec.keys_pre):
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
        keys=torch.stack(rec.keys),
        values=torch.stack(rec.values),
        keys_pre=torch.stack(rec.keys_pre),
        queries=torch.stack(rec.queries),
        last_logits=last_logits,
        token_nll=token_nll,
        prefill_seconds=seconds,
    )
