"""Label-free fidelity candidates: how much of a context survives each compressed cache, without any question.

Every candidate yields a curve f(r) ∈ [0, 1] over the grid (f = 1 for the full cache) from which r*(τ) follows
(``curve.largest_safe_ratio``). All are computed from ONE packed teacher-forced forward over the grid's rows
(``probe_stats``), so several can be compared on the same prefill:

* ``reconstruction`` — today's probes (``probes.reconstruction_probes``): mean NLL ratio NLL_full / NLL_r of
  spans of the document copied after it (Compactor's y).
* ``kl`` — next-token KL: f = exp(−mean KL(full ‖ r)) over the reconstruction probes' target positions.
* ``salient`` — reconstruction probes whose target starts at a *salient* token: a number, a capitalised word
  inside a sentence (proper nouns) or a rare token (seen once in the context, alphabetic, 4+ characters); NLL ratio.
* ``keytoken`` — LongPPL key tokens (Fang et al., ICLR 2025): tokens whose log-probability depends strongly on the
  long context, LSD = log p(x | long) − log p(x | short local context) > 2 with log p(x | long) > −2 (the short
  context: the token's own 64-token chunk, at least 16 tokens in; one extra forward over the document); the probe
  target starts at the key tokens of largest LSD; NLL ratio.
* ``self_answer`` / ``self_prob`` — generic prompts (``SELF_PROMPTS``, disjoint from the truth's document
  questions) answered greedily with the full cache, then teacher-forced under each row: the share of answer tokens
  before the first top-1 disagreement (``self_answer``), or the probability ratio exp(mean log p_r − mean log
  p_full) of the answer clipped to 1 (``self_prob``).

Probe spans never overlap the token ranges ``avoid`` (inserted task items: the calibration never sees them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.calibration.answers import decode_rows
from kvcalib.calib.calibration.curve import below, packed_hidden, row_steps
from kvcalib.calib.calibration.probes import EDGE_MARGIN, Probe, fidelity_from_nll, pack, reconstruction_probes

FIDELITIES = ("reconstruction", "kl", "salient", "keytoken", "self_answer", "self_prob")
SELF_PROMPTS = ("Summarize the text above in one sentence.", "Repeat the first sentence of the text above.",
                "Give a short title for the text above.")
SELF_TOKENS = 8  # tokens of each self-answer
LOCAL_CHUNK = 64  # short context of LongPPL's key tokens
LOCAL_MIN = 16  # a key token needs at least this much local context in its chunk
LSD_MIN, LOGP_MIN = 2.0, -2.0  # LongPPL's thresholds


@dataclass
class ProbeStats:
    """Per row (B, the full reference first) and probe (K): mean target NLL, mean KL(full ‖ row) over the probe's
    targets, and the share of targets before the first top-1 disagreement with the target token."""

    nll: torch.Tensor  # (B, K)
    kl: torch.Tensor  # (B, K)
    prefix: torch.Tensor  # (B, K)


@torch.no_grad()
def probe_stats(lm, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor, probes: list[Probe],
                max_rows: int | None = None, until: Callable[[ProbeStats], bool] | None = None) -> ProbeStats:
    """One packed forward of ``probes`` under every row of ``keep`` (B, L, Hkv, N; row 0 = the reference).
    ``until``: rows are fed in ascending steps (``curve.row_steps``) and evaluation stops after the first step whose
    statistics so far make ``until`` true (the stats then hold the rows evaluated)."""
    packed = pack(probes)
    head = lm.model.get_output_embeddings()
    k = packed.n_probes
    owner, tgt = packed.owner, packed.targets
    counts = torch.bincount(owner, minlength=k).double()
    nll, kl, prefix, ref = [], [], [], None
    for s, e in row_steps(keep.shape[0], until is not None, max_rows):
        cache = RaggedKVCache.masked(keys, values, keep[s:e])
        hidden = packed_hidden(lm, cache, packed)  # (b, M, h)
        del cache
        for row in hidden:
            lp = F.log_softmax(head(row).float(), dim=-1).cpu()  # (M, V)
            if ref is None:
                ref = lp
            tok_nll = -lp.gather(1, tgt[:, None])[:, 0].double()
            tok_kl = (ref.exp() * (ref - lp)).sum(-1).clamp_min(0).double()
            agree = (lp.argmax(-1) == tgt).long()
            nll.append(torch.zeros(k, dtype=torch.float64).index_add_(0, owner, tok_nll) / counts)
            kl.append(torch.zeros(k, dtype=torch.float64).index_add_(0, owner, tok_kl) / counts)
            pre = torch.zeros(k, dtype=torch.float64)
            for j in range(k):
                pre[j] = agree[owner == j].cumprod(0).sum().double() / counts[j]
            prefix.append(pre)
        if until is not None and until(ProbeStats(nll=torch.stack(nll), kl=torch.stack(kl),
                                                  prefix=torch.stack(prefix))):
            break
    return ProbeStats(nll=torch.stack(nll), kl=torch.stack(kl), prefix=torch.stack(prefix))


# ---------------------------------------------------------------------------------------------------- targets
def _allowed(p: int, span: tuple[int, int], avoid) -> bool:
    a, b = p - span[0], p + span[1]
    return all(b <= x or a >= y for x, y in avoid or [])


def _spread(candidates: list[int], n: int, lo: int, hi: int) -> list[int]:
    """Up to ``n`` of the (priority-ordered) candidates, at most one per equal stratum of [lo, hi) first."""
    width = max(1.0, (hi - lo) / max(1, n))
    chosen, used = [], set()
    for p in candidates:
        s = int((p - lo) // width)
        if s not in used:
            chosen.append(p)
            used.add(s)
        if len(chosen) == n:
            return sorted(chosen)
    for p in candidates:
        if p not in chosen:
            chosen.append(p)
        if len(chosen) == n:
            break
    return sorted(chosen)


def _probes_at(ids: torch.Tensor, starts: list[int], cue: int, target: int, kind: str) -> list[Probe]:
    return [Probe(ids=ids[p - cue:p + target].long(), target_start=cue, kind=kind, meta={"start": p - cue})
            for p in starts]


def salient_positions(tokenizer, ids: torch.Tensor, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Positions in [lo, hi) of salient tokens — numbers, capitalised words inside a sentence, rare tokens — in a
    seeded random order (numbers and names first)."""
    toks = tokenizer.convert_ids_to_tokens(ids.tolist())
    text = [tokenizer.convert_tokens_to_string([t]) for t in toks]
    counts: dict[int, int] = {}
    for i in ids.tolist():
        counts[i] = counts.get(i, 0) + 1
    first, second = [], []
    for p in range(max(lo, 1), hi):
        w, prev = text[p], text[p - 1].strip()
        core = w.strip()
        if any(c.isdigit() for c in core):
            first.append(p)
        elif core[:1].isupper() and w.startswith(" ") and prev and prev[-1] not in ".!?:\"'":
            first.append(p)
        elif counts[int(ids[p])] == 1 and core.isalpha() and len(core) >= 4:
            second.append(p)
    rng = random.Random(seed)
    rng.shuffle(first)
    rng.shuffle(second)
    return first + second


@torch.no_grad()
def local_logp(lm, ids: torch.Tensor, lo: int, chunk: int = LOCAL_CHUNK) -> torch.Tensor:
    """log p(ids[i] | its own ``chunk``-token chunk up to i) for i in [lo, N) (−inf-free; NaN where i is a chunk's
    first token). Chunks are cut from ``lo`` and fed as one batch (plain causal attention)."""
    model = lm.model
    device = next(model.parameters()).device
    n = int(ids.numel())
    starts = list(range(lo, n, chunk))
    width = min(chunk, n - lo)
    batch = torch.zeros(len(starts), width, dtype=torch.long)
    lens = []
    for j, s in enumerate(starts):
        piece = ids[s:s + width]
        batch[j, :piece.numel()] = piece
        lens.append(int(piece.numel()))
    hidden = model.get_decoder()(input_ids=batch.to(device), use_cache=False).last_hidden_state  # (C, w, h)
    head = model.get_output_embeddings()
    out = torch.full((n,), math.nan, dtype=torch.float64)
    for j, s in enumerate(starts):
        if lens[j] < 2:
            continue
        lp = F.log_softmax(head(hidden[j, :lens[j] - 1]).float(), dim=-1).cpu()  # predicts tokens 1..len−1
        out[s + 1:s + lens[j]] = lp.gather(1, batch[j, 1:lens[j], None])[:, 0].double()
    return out


def key_token_positions(lm, ids: torch.Tensor, token_nll: torch.Tensor, lo: int, hi: int) -> list[int]:
    """LongPPL key tokens in [lo, hi), largest LSD first. ``token_nll`` (N − 1,): NLL of token i + 1 given its whole
    prefix (a stride-1 capture)."""
    long_lp = torch.full((int(ids.numel()),), math.nan, dtype=torch.float64)
    long_lp[1:] = -token_nll.double().cpu()
    short = local_logp(lm, ids, lo)
    lsd = long_lp - short
    pos = torch.arange(ids.numel())
    in_chunk = (pos - lo) % LOCAL_CHUNK
    ok = (lsd > LSD_MIN) & (long_lp > LOGP_MIN) & (in_chunk >= LOCAL_MIN) & (pos >= lo) & (pos < hi)
    cand = pos[ok]
    return cand[torch.argsort(lsd[ok], descending=True)].tolist()


# ---------------------------------------------------------------------------------------------------- curves
def _nll_fidelity(stats: ProbeStats, sel: list[int]) -> list[float]:
    if not sel:
        return []
    return fidelity_from_nll(stats.nll[0, sel].unsqueeze(0), stats.nll[1:, sel]).mean(1).tolist()


def _curve(name: str, stats: ProbeStats, where: dict[str, list[int]]) -> list[float]:
    """Candidate ``name``'s fidelity at every evaluated grid row of ``stats`` (row 0, the reference, excluded)."""
    if name == "reconstruction":
        return _nll_fidelity(stats, where["recon"])
    if name == "kl":
        return torch.exp(-stats.kl[1:, where["recon"]].mean(1)).tolist()
    if name in ("salient", "keytoken"):
        return _nll_fidelity(stats, where[name])
    if name == "self_answer":
        return stats.prefix[1:, where["self"]].mean(1).tolist()
    d = stats.nll[0, where["self"]].unsqueeze(0) - stats.nll[1:, where["self"]]  # self_prob
    return torch.exp(d).clamp(max=1.0).mean(1).tolist()


PROBE_GROUPS = {"reconstruction": "recon", "kl": "recon", "salient": "salient", "keytoken": "keytoken",
                "self_answer": "self", "self_prob": "self"}  # the probes each candidate reads


def fidelity_curves(engine, cap, doc_start: int, keep: torch.Tensor, names=FIDELITIES, *, n_probes: int = 6,
                    cue_tokens: int = 4, probe_tokens: int = 6, seed: int = 0,
                    avoid: list[tuple[int, int]] | None = None,
                    kl_of: str | None = None, tau: float | None = None) -> dict[str, list[float]]:
    """The fidelity curve (one value per grid row of ``keep[1:]``) of every candidate in ``names``. ``cap`` must
    hold the per-token NLL (stride 1) for ``keytoken``. ``kl_of``: also return ``"kl_of"``, the next-token KL
    curve exp(−mean KL(full ‖ r)) over the target positions of that candidate's own probes — what a calibration
    reports beside its fidelity without a second set of probes (the ``kl`` candidate reads the reconstruction
    probes). ``tau`` (one candidate in ``names``): the curves end at that candidate's first ratio with fidelity
    < τ — the rows above it are never fed (``probe_stats(until=…)``); r*(τ) reads nothing beyond it."""
    unknown = sorted(set(names) - set(FIDELITIES)) + ([kl_of] if kl_of is not None and kl_of not in FIDELITIES
                                                      else [])
    if unknown:
        raise ValueError(f"unknown fidelity {unknown}: expected one of {list(FIDELITIES)}")
    wanted = set(names) | ({kl_of} if kl_of else set())
    ids = cap.input_ids
    n = int(ids.numel())
    span = cue_tokens + probe_tokens
    lo, hi = doc_start + EDGE_MARGIN, n - EDGE_MARGIN
    if hi - lo < span:
        lo, hi = doc_start, n - min(EDGE_MARGIN, 4)
    groups: dict[str, list[Probe]] = {}
    if {"reconstruction", "kl"} & wanted:
        groups["recon"] = reconstruction_probes(ids, doc_start, n_probes, cue_tokens, probe_tokens, seed,
                                                avoid=avoid)

    def targeted(cands: list[int], kind: str) -> list[Probe]:
        ok = [p for p in cands if lo + cue_tokens <= p <= hi - probe_tokens
              and _allowed(p, (cue_tokens, probe_tokens), avoid)]
        picked = _spread(ok, n_probes, lo, hi)
        if len(picked) < n_probes:  # too few salient tokens: fill with ordinary spans
            extra = reconstruction_probes(ids, doc_start, n_probes - len(picked), cue_tokens, probe_tokens,
                                          seed + 1, avoid=list(avoid or []) + [(p - cue_tokens, p + probe_tokens)
                                                                                 for p in picked])
            picked += [pr.meta["start"] + cue_tokens for pr in extra]
        return _probes_at(ids, picked, cue_tokens, probe_tokens, kind)

    if "salient" in wanted:
        groups["salient"] = targeted(salient_positions(engine.tokenizer, ids, lo, hi, seed), "salient")
    if "keytoken" in wanted:
        if cap.token_nll is None or cap.token_nll.numel() != n - 1:
            raise ValueError("the keytoken fidelity needs a capture with the per-token NLL (compute_nll, stride 1)")
        groups["keytoken"] = targeted(key_token_positions(engine.lm, ids, cap.token_nll, lo, hi), "keytoken")
    if {"self_answer", "self_prob"} & wanted:
        prompts = [engine.prompt("", q).question_ids for q in SELF_PROMPTS]
        answers = decode_rows(engine.lm, cap.keys, cap.values, keep[:1].expand(len(prompts), -1, -1, -1), prompts,
                              SELF_TOKENS, engine.eos_ids)
        groups["self"] = [Probe(ids=torch.cat([p.long(), torch.tensor(a)]), target_start=int(p.numel()),
                                kind="self") for p, a in zip(prompts, answers)]
    probes, where = [], {}
    for g, ps in groups.items():
        where[g] = list(range(len(probes), len(probes) + len(ps)))
        probes += ps
    until = None
    if tau is not None:
        if len(names) != 1:
            raise ValueError(f"tau stops the curve of one candidate, got {list(names)}")
        (name,) = names

        def until(st: ProbeStats) -> bool:
            return below(_curve(name, st, where), tau)

    stats = probe_stats(engine.lm, cap.keys, cap.values, keep, probes, until=until)
    out: dict[str, list[float]] = {name: _curve(name, stats, where) for name in names}
    if kl_of:
        out["kl_of"] = torch.exp(-stats.kl[1:, where[PROBE_GROUPS[kl_of]]].mean(1)).tolist()
    return out
