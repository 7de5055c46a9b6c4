"""KVzip — Kim et al., NeurIPS 2025, "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction".

A KV pair matters as much as the model needs it to *reconstruct the context* from the cache. After the prefill, the
model is teacher-forced through a repeat request over the full cache:

    [cache: head + context] "\\n\\nRepeat the previous context exactly." + <chat tail> + context

(the chat tail is the template's text after a user turn, ending in the assistant prompt; a context longer than
``chunk_size`` tokens is reconstructed chunk by chunk from the same cache, each later request "Repeat the part of
the previous context exactly, starting with" + the previous chunk's last ``prev_tokens`` tokens). For the context
positions j of a chunk c, per layer and query head, with the reconstruction queries q_t (post-RoPE):

    A_t = softmax(q_t [K_sink; K_c; K_rep,≤t]ᵀ / √d)      over the ``n_sink`` first cached keys, the chunk's cached
                                                           keys and the reconstruction's own keys (causal)
    s_j = max_t max_{g ∈ group} A_t[j]                    (max over the queries and the GQA group)

The first ``n_sink`` positions are kept (attention sinks), and so are the chat template's head tokens before the
context (``keep_head``, kvcalib's choice: the reference scores them 0, so they go first; they are ~20 tokens).
Scores are attention probabilities, comparable across layers: the paper ranks all layers and heads together
(kvcalib's ``global`` allocator); any allocator reads them. The cost is one more forward over the context (2–3× the
prefill, the paper's figure); the reference computes the same scores inside the attention hook, here they are taken
after that forward from the recorded queries and the appended keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvcalib.calib.capture import Capture
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers.base import PROTECTED, ScoreContext, Scorer

FIRST_REQUEST = "\n\nRepeat the previous context exactly."
NEXT_REQUEST = "\n\nRepeat the part of the previous context exactly, starting with"


def head_length(tokenizer, input_ids: torch.Tensor) -> int:
    """How many leading ``input_ids`` are the chat template's head (0 when the context does not start with it)."""
    from kvcalib.calib.data.documents import chat_frame

    head = chat_frame(tokenizer)[0]
    if not head:
        return 0
    ids = tokenizer(head, add_special_tokens=False, return_tensors="pt").input_ids[0]
    p = int(ids.numel())
    return p if p <= int(input_ids.numel()) and torch.equal(input_ids[:p].cpu(), ids) else 0


def reconstruction_requests(tokenizer, context_ids: torch.Tensor, chunk_size: int,
                            prev_tokens: int = 8) -> list[torch.Tensor]:
    """The teacher-forced repeat inputs, one per chunk of ``context_ids`` (c,): request + chat tail + chunk."""
    from kvcalib.calib.data.documents import chat_frame

    def enc(text: str) -> torch.Tensor:
        return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]

    tail = enc(chat_frame(tokenizer)[1])
    chunks = list(torch.split(context_ids, chunk_size))
    out = []
    for i, chunk in enumerate(chunks):
        req = enc(FIRST_REQUEST) if i == 0 else torch.cat([enc(NEXT_REQUEST), chunks[i - 1][-prev_tokens:]])
        out.append(torch.cat([req, tail, chunk]))
    return out


def reconstruction_max(q: torch.Tensor, k: torch.Tensor, sink: int, c: int, own: torch.Tensor) -> torch.Tensor:
    """(Hkv, c) max over the m queries and the GQA group of A = softmax(q kᵀ/√d) at the chunk's c keys, for one
    layer: q (Hq, m, d), k (Hkv, sink + c + m, d) = [sinks; chunk; the queries' own keys], ``own`` (m, m) True where
    query t must not see own key u > t. In place on one (Hkv, g, m, S) buffer (the exp is the cost)."""
    hkv, _, d = k.shape
    hq, m, _ = q.shape
    g = hq // hkv
    z = torch.matmul(q.view(hkv, g, m, d), k.transpose(1, 2).unsqueeze(1))  # (Hkv, g, m, S)
    z.mul_(d**-0.5)
    z[..., sink + c:].masked_fill_(own, float("-inf"))
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    a = z[..., sink:sink + c] / z.sum(-1, keepdim=True)  # (Hkv, g, m, c)
    return a.amax(dim=(1, 2))


@dataclass
class KVzip(Scorer):
    name: ClassVar[str] = "kvzip"
    reads_queries: ClassVar[bool] = False  # its queries come from the reconstruction forward, not the prefill
    n_sink: int = 4
    chunk_size: int = 2048
    prev_tokens: int = 8  # tokens of the previous chunk quoted in a later chunk's request
    keep_head: bool = True

    @torch.no_grad()
    def score(self, cap: Capture, ctx: ScoreContext | None = None) -> torch.Tensor:
        if ctx is None or ctx.lm is None:
            raise KvcalibError("kvzip needs the model to reconstruct the context: pass ScoreContext(lm=...)")
        from kvcalib.calib.cache.decode import forward_tokens
        from kvcalib.calib.cache.ragged import RaggedKVCache

        n_layers, hkv, n, d = cap.keys.shape
        tok = ctx.lm.tokenizer
        ids = cap.input_ids.cpu()
        start = head_length(tok, ids) if self.keep_head else 0
        sink = min(self.n_sink, n)
        start = max(start, sink)
        scores = torch.full((n_layers, hkv, n), PROTECTED, device=cap.keys.device)  # (L, Hkv, N)
        if start >= n:
            return scores
        cache = RaggedKVCache.from_full(cap.keys, cap.values)
        state = cache.snapshot()
        lo = start
        for req in reconstruction_requests(tok, ids[start:], self.chunk_size, self.prev_tokens):
            c = min(self.chunk_size, n - lo)  # context positions lo..lo+c reconstructed by this request
            m = int(req.numel())
            cache.restore(state)
            cache.record_queries = m
            forward_tokens(ctx.lm.model, cache, req[None])
            own = torch.ones(m, m, dtype=torch.bool, device=scores.device).triu(1)  # t sees its own keys ≤ t
            for l in range(n_layers):
                q = cache.recent_queries[l][0].float()  # (Hq, m, d)
                k = torch.cat([cap.keys[l, :, :sink], cap.keys[l, :, lo:lo + c],
                               cache.layers[l].keys[0, :, n:]], dim=1).float()  # (Hkv, S = sink + c + m, d)
                scores[l, :, lo:lo + c] = reconstruction_max(q, k, sink, c, own)
            lo += c
        return scores
