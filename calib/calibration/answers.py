"""Answers under a grid of compressed caches: batched greedy decoding and packed teacher forcing.

Shared by the task truth (``truth.py``) and the self-answer fidelity (``fidelity.py``):

* ``decode_rows`` — greedy decoding of B rows at once, each row with its own keep mask (a physically compressed
  cache, ``RaggedKVCache.from_mask``) and its own prompt. Prompts of different lengths are right-padded with a
  filler token; every row's real prompt gets the positions N, N+1, … after the context, the fillers are masked out
  of the cache right after the prompt forward (nothing ever attended to them: they come after the real tokens),
  and each row continues at its own position. Equal, row by row, to ``cache.decode.greedy_decode`` on that row's
  compressed cache (tested).
* ``teacher_forced`` — every answer of a list fed after its prompt (one packed sequence, ``curve.packed_hidden``)
  under every keep-mask row of the grid at once (``RaggedKVCache.masked``: no K/V copy); returns, per row and
  answer token, whether the row's top-1 prediction is that token and its log-probability. A greedy answer survives
  a compressed row *exactly* when the row's top-1 agrees at every one of its tokens (by induction over the steps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcalib.calib.cache.ragged import LayerKV, RaggedKVCache
from kvcalib.calib.calibration.curve import packed_hidden
from kvcalib.calib.calibration.probes import Probe, pack

Stop = Callable[[int, list[int]], bool]  # (row, tokens so far) -> stop this row


@torch.no_grad()
def decode_rows(lm, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, prompts: list[torch.Tensor],
                max_new_tokens: int, eos_ids: set[int] | None = None, stop: Stop | None = None,
                max_rows: int = 16, probs: list[list[float]] | None = None) -> list[list[int]]:
    """Greedy answers of B rows: row b decodes after ``prompts[b]`` over the context ``keys``/``values``
    (L, Hkv, N, d) compressed by ``keep[b]`` ((B, L, Hkv, N) bool). A row ends at EOS (kept in its output), after
    ``max_new_tokens`` or when ``stop(b, tokens)`` is true. Rows are decoded ``max_rows`` at a time. When a list
    ``probs`` is given, the probability of every emitted token is appended to it (one list per row)."""
    if keep.dim() == 3:
        keep = keep.unsqueeze(0)
    if keep.shape[0] != len(prompts):
        raise ValueError(f"{keep.shape[0]} keep rows for {len(prompts)} prompts")
    out: list[list[int]] = []
    for s in range(0, len(prompts), max_rows):
        chunk, p = _decode_chunk(lm, keys, values, keep[s:s + max_rows], prompts[s:s + max_rows], max_new_tokens,
                                 eos_ids or set(), (lambda b, t, s=s: stop(s + b, t)) if stop else None)
        out.extend(chunk)
        if probs is not None:
            probs.extend(p)
    return out


def _decode_chunk(lm, keys, values, keep, prompts, max_new_tokens, eos, stop):
    model = lm.model
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    b = keep.shape[0]
    cache = RaggedKVCache.from_mask(keys, values, keep)
    n = cache.next_position
    lens = torch.tensor([int(p.numel()) for p in prompts])
    if int(lens.min()) < 1:
        raise ValueError("every prompt needs at least one token")
    t = int(lens.max())
    filler = min(eos) if eos else 0
    ids = torch.full((b, t), filler, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :p.numel()] = p.long()
    pos = (n + torch.arange(t)).expand(b, t)
    hidden = model.get_decoder()(input_ids=ids.to(device), position_ids=pos.to(device), use_cache=False,
                                 kvcalib_state=cache).last_hidden_state  # (B, t, h)
    logits = head(hidden[torch.arange(b), (lens - 1).to(device)]).float()  # (B, V)
    for li, layer in enumerate(cache.layers):  # mask the fillers out: they are the last t − len_b new slots
        width = layer.keys.shape[2]
        valid = (torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=layer.keys.device)
                 if layer.valid is None else layer.valid.clone())  # (B, Hkv, L)
        for i in range(b):
            valid[i, :, width - t + int(lens[i]):] = False
        cache.layers[li] = LayerKV(layer.keys, layer.values, valid, layer.positions)
    next_pos = n + lens  # (B,) each row's next position
    out: list[list[int]] = [[] for _ in range(b)]
    probs: list[list[float]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens):
        idx = logits.argmax(-1)  # (B,)
        top = torch.softmax(logits, -1).gather(1, idx[:, None])[:, 0]
        nxt = idx.tolist()
        for i, tok in enumerate(nxt):
            if not done[i]:
                out[i].append(tok)
                probs[i].append(float(top[i]))
                done[i] = tok in eos or (stop is not None and stop(i, out[i]))
        if all(done) or step == max_new_tokens - 1:
            break
        feed = torch.tensor([[filler if done[i] else nxt[i]] for i in range(b)])  # (B, 1)
        hidden = model.get_decoder()(input_ids=feed.to(device), position_ids=next_pos.view(b, 1).to(device),
                                     use_cache=False, kvcalib_state=cache).last_hidden_state[:, -1]
        logits = head(hidden).float()
        next_pos = next_pos + 1
    return out, probs


@dataclass
class Forced:
    """Teacher-forced answers under every row: ``agree`` (B, M) top-1 == answer token, ``logp`` (B, M) the answer
    token's log-probability; ``owner`` (M,) the answer each target token belongs to."""

    agree: torch.Tensor
    logp: torch.Tensor
    owner: torch.Tensor

    def survived(self, lengths: list[int] | None = None) -> torch.Tensor:
        """(B, K) True where every token of answer k (its first ``lengths[k]`` tokens) is the row's top-1."""
        k = int(self.owner.max()) + 1 if self.owner.numel() else 0
        idx = _index_in_answer(self.owner)
        use = torch.ones_like(self.owner, dtype=torch.bool)
        if lengths is not None:
            use = idx < torch.tensor(lengths)[self.owner]
        bad = (~self.agree) & use  # (B, M)
        fails = torch.zeros(self.agree.shape[0], k, dtype=torch.long).index_add_(1, self.owner, bad.long())
        return fails == 0

    def prefix_agreement(self) -> torch.Tensor:
        """(B, K) share of answer k's tokens before the row's first disagreement."""
        k = int(self.owner.max()) + 1
        out = torch.zeros(self.agree.shape[0], k, dtype=torch.float64)
        for j in range(k):
            a = self.agree[:, self.owner == j]  # (B, m)
            out[:, j] = a.long().cumprod(-1).sum(-1).double() / max(1, a.shape[1])
        return out

    def mean_logp(self) -> torch.Tensor:
        """(B, K) mean log-probability of answer k's tokens."""
        k = int(self.owner.max()) + 1
        sums = torch.zeros(self.logp.shape[0], k, dtype=torch.float64).index_add_(1, self.owner, self.logp.double())
        return sums / torch.bincount(self.owner, minlength=k).double().clamp_min(1)


def _index_in_answer(owner: torch.Tensor) -> torch.Tensor:
    idx = torch.zeros_like(owner)
    for j in owner.unique().tolist():
        m = owner == j
        idx[m] = torch.arange(int(m.sum()))
    return idx


@torch.no_grad()
def teacher_forced(lm, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor,
                   pairs: list[tuple[torch.Tensor, torch.Tensor]], max_rows: int | None = None) -> Forced:
    """Feed every (prompt ids, answer ids) pair after the context under every row of ``keep`` (B, L, Hkv, N),
    packed into one sequence; the answers' tokens are the targets."""
    probes = [Probe(ids=torch.cat([q.long(), a.long()]), target_start=int(q.numel()), kind="answer")
              for q, a in pairs]
    packed = pack(probes)
    head = lm.model.get_output_embeddings()
    tgt = packed.targets
    agree, logp = [], []
    step = max_rows or keep.shape[0]
    for s in range(0, keep.shape[0], step):
        cache = RaggedKVCache.masked(keys, values, keep[s:s + step])
        hidden = packed_hidden(lm, cache, packed)  # (b, M, h)
        del cache
        for row in hidden:
            lp = F.log_softmax(head(row).float(), dim=-1)  # (M, V)
            t = tgt.to(lp.device)
            agree.append((lp.argmax(-1) == t).cpu())
            logp.append(lp.gather(1, t[:, None])[:, 0].cpu())
    return Forced(agree=torch.stack(agree), logp=torch.stack(logp), owner=packed.owner)
