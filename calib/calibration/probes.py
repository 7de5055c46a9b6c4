"""Label-free fidelity probes: how much of the document survives a compressed cache.

A *reconstruction probe* takes a span of the document itself and asks the model to continue it after the
context: it is fed ``[sep] + cue + target`` right after the cached context, where ``cue`` is ``cue_tokens`` tokens
copied from the document and ``target`` the ``probe_tokens`` tokens that truly follow them there. With the full
cache the model copies the continuation from context (induction), so the target's teacher-forced NLL is low; once
the positions it needs are evicted the NLL rises. A *user probe* is a (question, reference answer) pair formatted as
the question of a prompt (``calib.documents.build_prompt``), the answer scored by teacher forcing.

Per probe, fidelity at compression ratio r is ``g = NLL_full / NLL_r`` clipped to [0, 1] (Compactor's y; NLL is the
mean over the probe's target tokens); a context's fidelity is the mean over its probes. The mean next-token
KL(full ‖ r) over every target position is reported beside it.

Defaults (``CalibrationConfig``): K = 6 reconstruction probes of 4 cue + 6 target tokens, no separator (the cue
directly follows the context; ``SEPARATOR`` can add one) — 60 probe tokens per ratio; a whole calibration with
these defaults measured 1.75 prefills (docs/calibration.md §8). Spans are chosen deterministically from ``seed``: the
document part of the context (after the chat header) minus a margin of ``EDGE_MARGIN`` tokens at both ends (beyond
Compactor's protected first 8 / last 4 positions, which would make a probe trivially easy) is cut into K equal
strata and one span is drawn uniformly inside each, so the probes cover the whole document without overlapping.
Documents too short for that margin fall back to the whole document minus its last 4 positions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.lm.protocols import Tokenizer

EDGE_MARGIN = 16  # tokens kept free of probes at both ends of the document
SEPARATOR = ""  # text fed before every reconstruction cue ("" = none)


class ProbeError(KvcalibError):
    pass


@dataclass
class Probe:
    """Tokens fed after the context; ``ids[target_start:]`` are scored (predicted from the position before)."""

    ids: torch.Tensor  # (T,) long
    target_start: int
    kind: str = "reconstruction"  # or "user"
    meta: dict = field(default_factory=dict)

    @property
    def num_targets(self) -> int:
        return int(self.ids.numel()) - self.target_start


@dataclass
class PackedProbes:
    """All probes concatenated into one sequence of T tokens (segment id = probe index). Each probe is fed without
    its last token: under the block-diagonal causal mask no later position of its segment reads it, and no logit
    is taken there (its target is the last predicted token), so leaving it out changes nothing but the cost."""

    ids: torch.Tensor  # (T,)
    segments: torch.Tensor  # (T,) probe index of every token
    pred_index: torch.Tensor  # (M,) index in ``ids`` of the logits predicting each target token
    targets: torch.Tensor  # (M,) target token ids
    owner: torch.Tensor  # (M,) probe index of each target
    n_probes: int


def pack(probes: list[Probe]) -> PackedProbes:
    if not probes:
        raise ProbeError("no probes to pack")
    ids, seg, pred, tgt, own = [], [], [], [], []
    offset = 0
    for k, p in enumerate(probes):
        t = int(p.ids.numel())
        if p.target_start < 1 or p.target_start >= t:
            raise ProbeError(f"probe {k} has no scorable target (target_start={p.target_start}, length={t})")
        ids.append(p.ids[:-1].long())  # the inputs: every token but the last (only ever a target)
        seg.append(torch.full((t - 1,), k, dtype=torch.long))
        pred.append(torch.arange(offset + p.target_start - 1, offset + t - 1))
        tgt.append(p.ids[p.target_start:].long())
        own.append(torch.full((t - p.target_start,), k, dtype=torch.long))
        offset += t - 1
    return PackedProbes(ids=torch.cat(ids), segments=torch.cat(seg), pred_index=torch.cat(pred),
                        targets=torch.cat(tgt), owner=torch.cat(own), n_probes=len(probes))


def span_starts(lo: int, hi: int, n_probes: int, span: int, seed: int,
                avoid: list[tuple[int, int]] | None = None) -> list[int]:
    """K start positions in [lo, hi − span], one drawn uniformly per equal stratum (deterministic in ``seed``).
    Strata narrower than the span still get a start (probes may then overlap). With ``avoid`` (token ranges
    [a, b), e.g. inserted task items) a span never overlaps one of them: the start is drawn among the stratum's
    allowed starts, else the allowed start nearest to the stratum (no allowed start at all: ``ProbeError``)."""
    if hi - lo < span:
        raise ProbeError(f"document too short for probes: {hi - lo} usable tokens, a probe span needs {span}")
    rng = random.Random(seed)
    width = (hi - lo) / n_probes
    allowed = None
    if avoid:
        allowed = [s for s in range(lo, hi - span + 1) if all(s + span <= a or s >= b for a, b in avoid)]
        if not allowed:
            raise ProbeError("no probe span fits between the positions to avoid")
    starts = []
    for k in range(n_probes):
        a = lo + int(round(k * width))
        b = lo + int(round((k + 1) * width)) - span
        b = min(max(a, b), hi - span)
        a = min(a, b)
        if allowed is None:
            starts.append(rng.randint(a, b))
            continue
        inside = [s for s in allowed if a <= s <= b]
        starts.append(rng.choice(inside) if inside else min(allowed, key=lambda s: (abs(s - a), s)))
    return starts


def reconstruction_probes(context_ids: torch.Tensor, doc_start: int, n_probes: int = 4, cue_tokens: int = 4,
                          probe_tokens: int = 10, seed: int = 0, separator_ids: list[int] | None = None,
                          margin: int = EDGE_MARGIN, avoid: list[tuple[int, int]] | None = None) -> list[Probe]:
    """``n_probes`` spans of ``context_ids[doc_start:]`` (the document), each probe = separator + cue + target,
    none overlapping the token ranges ``avoid`` (e.g. the items of a task-truth document)."""
    if n_probes < 0 or cue_tokens < 1 or probe_tokens < 1:
        raise ProbeError("n_probes must be >= 0, cue_tokens and probe_tokens >= 1")
    if n_probes == 0:
        return []
    n = int(context_ids.numel())
    span = cue_tokens + probe_tokens
    lo, hi = doc_start + margin, n - margin
    if hi - lo < span:  # short document: keep clear of Compactor's protected last 4 positions only
        lo, hi = doc_start, n - min(margin, 4)
    if hi - lo < span:
        raise ProbeError(f"document too short for calibration probes: {max(0, n - doc_start)} tokens, a probe of "
                         f"{cue_tokens} cue + {probe_tokens} target tokens needs at least {span + 4}")
    starts = span_starts(lo, hi, n_probes, span, seed, avoid)
    sep = torch.tensor(separator_ids or [], dtype=torch.long)
    probes = []
    for s in starts:
        cue = context_ids[s:s + cue_tokens].long()
        target = context_ids[s + cue_tokens:s + span].long()
        probes.append(Probe(ids=torch.cat([sep, cue, target]), target_start=len(sep) + cue_tokens,
                            kind="reconstruction", meta={"start": s, "cue_tokens": cue_tokens,
                                                         "target_tokens": probe_tokens}))
    return probes


def user_probes(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> list[Probe]:
    """(question, reference answer) probes, the question formatted as in ``build_prompt``."""
    from kvcalib.calib.data.documents import build_prompt

    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ProbeError(f"user probe {i} must be a (question, answer) pair")
        question, answer = pair
        if not str(question).strip() or not str(answer).strip():
            raise ProbeError(f"user probe {i} has an empty question or answer")
        q = build_prompt(tokenizer, "", str(question)).question_ids.long()
        a = torch.tensor(tokenizer(str(answer), add_special_tokens=False).input_ids, dtype=torch.long)
        out.append(Probe(ids=torch.cat([q, a]), target_start=int(q.numel()), kind="user",
                         meta={"question": str(question)}))
    return out


def fidelity_from_nll(nll_full: torch.Tensor, nll_r: torch.Tensor) -> torch.Tensor:
    """Per-probe fidelity g = NLL_full / NLL_r clipped to [0, 1] (g = 1 where NLL_r = 0). Shapes broadcast."""
    g = torch.where(nll_r > 0, nll_full / nll_r.clamp_min(1e-12), torch.ones_like(nll_r))
    return g.clamp(0.0, 1.0)
