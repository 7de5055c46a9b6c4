"""Greedy decoding over a ``RaggedKVCache``.

transformers' ``generate()`` slices caches by the length of layer 0 and so mis-handles pruned caches; this loop
feeds only new tokens, with their original position ids, through the model's ``"kvcalib"`` attention path.
A ``DecodePolicy`` (e.g. MorphKV) may shrink the cache after each step.

Re-entrant: a decode's state is its cache (passed as ``kvcalib_state``) and its policy; the shared model is only
read, so concurrent decodes on one model do not interact.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.lm.protocols import CausalLM


class DecodePolicy(Protocol):
    """``after_step`` runs after every decode step; a policy may also define ``begin(cache)``, called once before
    the prompt is fed (e.g. to make the cache record queries)."""

    def after_step(self, cache: RaggedKVCache, step: int) -> None: ...


@runtime_checkable
class BeginsDecode(Protocol):
    """A decode policy that is also told once, before the prompt is fed, which cache it will manage."""

    def begin(self, cache: RaggedKVCache) -> None: ...


@runtime_checkable
class ReportsDecode(Protocol):
    """A decode policy with a JSON report of what it did (``kvcalib generate --json``)."""

    def report(self) -> dict: ...


@dataclass
class Generation:
    token_ids: list[int]
    seconds: float
    cache_bytes: list[int] = field(default_factory=list)  # bytes held after each step (per batch row)


@torch.no_grad()
def forward_tokens(model: CausalLM, cache: RaggedKVCache, ids: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
    """Append ``ids`` (B, q) to the cache at positions ``next_position..`` and return the logits of the last fed
    token (B, V), or of every fed token (B, q, V) with ``all_logits`` (teacher forcing)."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    pos = torch.arange(cache.next_position, cache.next_position + ids.shape[1], device=device)
    pos = pos.unsqueeze(0).expand(ids.shape[0], -1)  # (B, q)
    out = model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False, kvcalib_state=cache)
    hidden = out.last_hidden_state if all_logits else out.last_hidden_state[:, -1]  # (B, q, h) | (B, h)
    return model.get_output_embeddings()(hidden).float()


@torch.no_grad()
def greedy_decode(
    model: CausalLM,
    cache: RaggedKVCache,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
    policy: DecodePolicy | None = None,
    ignore_eos: bool = False,
) -> Generation:
    """Feed ``prompt_ids`` (q,) after the cached context, then decode greedily (batch row 0).

    With ``ignore_eos`` exactly ``max_new_tokens`` tokens are generated (fixed-length runs, memory benchmarks)."""
    eos = set() if ignore_eos else (eos_token_ids or set())
    t0 = time.perf_counter()
    if isinstance(policy, BeginsDecode):
        policy.begin(cache)
    logits = forward_tokens(model, cache, prompt_ids.view(1, -1))
    out: list[int] = []
    sizes: list[int] = []
    for step in range(max_new_tokens):
        nxt = int(logits[0].argmax())
        out.append(nxt)
        if nxt in eos or step == max_new_tokens - 1:
            break
        logits = forward_tokens(model, cache, torch.tensor([[nxt]]))
        if policy is not None:
            policy.after_step(cache, step)
        sizes.append(cache.nbytes // cache.batch_size)
    return Generation(token_ids=out, seconds=time.perf_counter() - t0, cache_bytes=sizes)


@torch.no_grad()
def greedy_decode_batch(
    model: CausalLM,
    cache: RaggedKVCache,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: set[int] | None = None,
) -> list[list[int]]:
    """Greedy decoding of every batch row of ``cache`` at once (rows = different keep masks of one context).

    Feeds the same ``prompt_ids`` (q,) to all rows, then each row's own argmax. A row that emitted EOS keeps being
    fed EOS (its output is cut there) until every row is done. Equals ``greedy_decode`` row by row up to float
    rounding, at the cost of one B-token forward per step instead of B one-token forwards."""
    eos = eos_token_ids or set()
    b = cache.batch_size
    logits = forward_tokens(model, cache, prompt_ids.view(1, -1).expand(b, -1))  # (B, V)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    filler = next(iter(eos), 0)
    for step in range(max_new_tokens):
        nxt = logits.argmax(-1).tolist()  # (B,)
        for i, tok in enumerate(nxt):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok in eos
        if all(done) or step == max_new_tokens - 1:
            break
        ids = torch.tensor([[filler if done[i] else nxt[i]] for i in range(b)])  # (B, 1)
        logits = forward_tokens(model, cache, ids)
    return out
