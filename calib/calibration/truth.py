"""Task truth of a document: which full-cache answers survive each compression ratio of a grid.

For a ``TruthDocument`` (``calib.data.questions``: needles, a key–value block, a multi-needle and generic document
questions inserted into any text), from ONE prefill of the document (laid out as ``Engine.prompt``; the questions
come after the compressed context, so compression stays query-agnostic):

1. the method scores the context once; the grid's keep masks are built as for calibration (``keep_masks``);
2. every question is answered greedily with the **full** cache (``answers.decode_rows``, all questions in one
   batch; a gold answer stops once its gold strings are out or its first sentence ended). A question *counts*
   when that answer is correct (every gold string in it) or, for a document question
   (no gold: the reference is the full-cache answer itself, Dutta et al.'s flips), when it is given consistently:
   non-empty, with a mean top-1 probability ≥ ``doc_min_confidence`` over its compared tokens (a coin-flip answer
   changes under any perturbation and says nothing about compression);
3. each counted answer — cut after its gold strings, or to its first ``doc_answer_tokens`` tokens for a document
   question — is teacher-forced under the grid's rows, ``STAGE_ROWS`` ratios at a time upwards, in one packed
   forward per stage for the answers not yet lost (``answers.teacher_forced``): the row reproduces it exactly iff
   its top-1 agrees at every token;
4. an answer that is not reproduced exactly may still be right in other words: for every such question its
   first failing ratio is decoded for real (``decode_failures``; all questions in one batch) and checked — for
   the gold strings, or for a document question for agreement with the full-cache answer (SQuAD token F1 ≥
   ``doc_min_f1`` over their first ``doc_answer_tokens`` tokens, articles and the question's own words left out:
   a rewording is not a flip, a changed answer is) —
   if it holds, its next failing ratio, and so on.

An answer lost at a ratio counts as lost at every larger one (per-question monotone: decoding stops at the first
real loss, and conformal risk control needs a loss non-increasing in the margin). L(r) = lost / counted at each
grid ratio — monotone by construction, so ``envelope`` (the running maximum, "the worst loss at any ratio ≤ r")
equals it; **r*_task** = the largest grid ratio below the first loss (0 when the first grid ratio already loses an
answer; the largest grid ratio when nothing is lost).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from kvcalib.calib import defaults
from kvcalib.calib.calibration.answers import decode_rows, teacher_forced
from kvcalib.calib.calibration.curve import keep_masks
from kvcalib.calib.data.hashing import content_hash
from kvcalib.calib.data.questions import ARTICLES, Question, TruthDocument, normalize, token_f1
from kvcalib.calib.errors import KvcalibError

STAGE_ROWS = 3  # grid rows teacher-forced per stage (an answer lost in a stage is not forced at larger ratios)


class TruthError(KvcalibError):
    pass



# A document question counts when the full cache answers it with a mean top-1 probability >= this. Chosen on the
# calibration genre (essays) only: at 0.5, 13 of the 15 answers lost at ratio 0.1 (47 documents) were document
# questions of SmolLM2-135M whose full-cache answer was degenerate ("the main topic of the text is the topic of the
# text") or one of several valid ones ("name one place": the needle's city, then another); at 0.8 a document
# question counts where the model is sure of its answer (docs/calibration.md §11).
DOC_MIN_CONFIDENCE = 0.8

@dataclass
class TruthConfig:
    method: str = defaults.METHOD
    method_params: dict = field(default_factory=dict)
    allocator: str = defaults.ALLOCATOR
    allocator_params: dict = field(default_factory=dict)
    ratios: tuple[float, ...] = defaults.RATIOS
    max_answer_tokens: int = 24  # full-cache answers are decoded up to this many tokens (gold found: stop)
    doc_answer_tokens: int = 12  # a document question's answer must survive over its first tokens
    doc_min_confidence: float = DOC_MIN_CONFIDENCE  # ... counted only when the full cache gave it this confidently
    doc_min_f1: float = 0.5  # a reworded document answer still agrees at this token F1 with the full one (> 1: exact)
    decode_failures: bool = True  # re-decode gold answers whose exact wording changed (may still be right)

    def __post_init__(self):
        self.ratios = tuple(sorted(float(r) for r in self.ratios))
        if not self.ratios or any(not 0.0 < r < 1.0 for r in self.ratios):
            raise TruthError(f"ratios must lie in (0, 1), got {list(self.ratios)}")
        if not 0.0 <= float(self.doc_min_confidence) <= 1.0:
            raise TruthError(f"doc_min_confidence must lie in [0, 1], got {self.doc_min_confidence!r}")
        for name in ("max_answer_tokens", "doc_answer_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise TruthError(f"{name} must be an integer >= 1, got {v!r}")


@dataclass
class Outcome:
    kind: str
    template: str
    question: str
    gold: list[str]
    reference: str  # the full-cache answer
    counted: bool
    survived: list[bool]  # per grid ratio (all False when not counted)
    decoded: dict[str, str] = field(default_factory=dict)  # ratio -> answer, for re-decoded pairs
    confidence: float = 0.0  # mean top-1 probability of the full-cache answer (over its compared tokens)


@dataclass
class TruthResult:
    ratios: list[float]
    loss: list[float]  # L(r): share of counted answers lost at each grid ratio
    envelope: list[float]  # running maximum of ``loss`` over the grid
    r_star_task: float
    n_counted: int
    n_questions: int
    outcomes: list[Outcome]
    context_tokens: int
    content_hash: str
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def loss_at(self, ratio: float) -> float:
        """Envelope loss at any ratio: that of the largest grid ratio ≤ ``ratio`` (0 below the grid)."""
        return loss_on_envelope(self.ratios, self.envelope, ratio)


def loss_on_envelope(ratios, envelope, ratio: float) -> float:
    """Step interpolation of a monotone loss curve: the loss of the largest grid ratio ≤ ``ratio``, 0 below it.
    (Between grid points only the lower one is measured: the step is the optimistic reading; risk control uses
    grid ratios only, where it is exact.)"""
    out = 0.0
    for r, l in zip(ratios, envelope):
        if r <= ratio + 1e-12:
            out = float(l)
        else:
            break
    return out


def loss_curve(survived: list[list[bool]], n_ratios: int) -> tuple[list[float], list[float]]:
    """(loss, envelope) per grid ratio from the survival lists of the counted questions."""
    if not survived:
        return [0.0] * n_ratios, [0.0] * n_ratios
    loss = [sum(not s[i] for s in survived) / len(survived) for i in range(n_ratios)]
    env, m = [], 0.0
    for x in loss:
        m = max(m, x)
        env.append(m)
    return loss, env


def task_r_star(ratios, loss) -> float:
    """The largest grid ratio below the first one that loses an answer (0 if the first one does)."""
    prev = 0.0
    for r, l in zip(ratios, loss):
        if l > 0:
            return prev
        prev = float(r)
    return prev


def item_token_spans(engine, text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token ranges [a, b) of the context ``engine.prompt(text, …).context_ids`` covering the character ``spans``
    of ``text`` (the chat header before the document is accounted for)."""
    from kvcalib.calib.calibration.calibrate import context_ids

    ids, doc_start = context_ids(engine, text)
    head = engine.prompt("", "").context_ids
    tok = engine.tokenizer
    head_text = tok.decode(head) if doc_start else ""
    enc = tok(head_text + text, add_special_tokens=False, return_offsets_mapping=True)
    if enc.input_ids == ids.tolist():  # the offsets describe exactly the cached tokens
        base, offsets = 0, enc.offset_mapping
        where = [(a + len(head_text), b + len(head_text)) for a, b in spans]
    else:  # the template merged or normalised text at a boundary: offsets by incremental decoding of the document
        doc_ids = ids[doc_start:].tolist()
        decoded = tok.decode(doc_ids)
        ends, top = [], 0
        for k in range(len(doc_ids)):  # (prefix decodes of a split multi-byte char can shrink: keep them monotone)
            top = max(top, len(tok.decode(doc_ids[:k + 1])))
            ends.append(top)
        offsets = list(zip([0] + ends[:-1], ends))
        base, where = doc_start, []
        for a, b in spans:
            pos = decoded.find(text[a:b], max(0, a - 256))
            pos = decoded.find(text[a:b]) if pos < 0 else pos
            if pos < 0:
                raise TruthError("could not map an inserted item to context tokens (the template changed it)")
            where.append((pos, pos + b - a))
    out = []
    for a, b in where:
        toks = [i for i, (s, e) in enumerate(offsets) if s < b and e > a]
        if toks:
            out.append((base + min(toks), base + max(toks) + 1))
    return out


def _stages(n: int, size: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) index ranges of at most ``size`` grid rows covering ``range(n)``."""
    return [(lo, min(n, lo + size)) for lo in range(0, n, size)]


def _first_false(flags: list[bool], start: int = 0) -> int:
    """Index of the first False in ``flags[start:]`` (``len(flags)`` when there is none)."""
    return next((i for i in range(start, len(flags)) if not flags[i]), len(flags))


def _agrees(q: Question, text: str, reference: str, min_f1: float) -> bool:
    """A compressed answer keeps a full-cache one: right (gold strings in it), or for a document question, a token
    F1 ≥ ``min_f1`` with the full-cache answer."""
    if q.has_gold:
        return q.is_correct(text)
    echo = set(normalize(q.question).split())  # words of the question repeated in the answer carry no content
    return token_f1(reference, text, ARTICLES | echo) >= min_f1


def _gold_done(q: Question, text: str, n_tokens: int) -> bool:
    """Stop decoding a gold answer: its gold strings are out, or (3+ tokens in) its first sentence ended."""
    return q.is_correct(text) or (n_tokens >= 3 and text.rstrip(" ").endswith((".", "!", "?", "\n")))


def _cut_reference(tok, q: Question, ids: list[int], doc_tokens: int) -> int:
    """How many tokens of the full-cache answer ``ids`` must survive: through the gold strings, or the first
    ``doc_tokens`` for a document question."""
    if not q.has_gold:
        return min(len(ids), doc_tokens)
    for k in range(1, len(ids) + 1):
        if q.is_correct(tok.decode(ids[:k], skip_special_tokens=True)):
            return k
    return len(ids)


def evaluate_truth(engine, doc: TruthDocument, config: TruthConfig | None = None, *, capture=None,
                   scores: torch.Tensor | None = None, keep: torch.Tensor | None = None) -> TruthResult:
    """The loss curve L(r) and r*_task of ``doc`` over ``config.ratios``. ``capture`` / ``scores`` / ``keep``
    (R + 1 rows, the full one first) may be passed when the context was already prefilled and scored."""
    from kvcalib.calib.calibration.calibrate import context_ids

    config = config or TruthConfig()
    if not doc.questions:
        raise TruthError("the document has no questions")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    tok, lm, eos = engine.tokenizer, engine.lm, engine.eos_ids
    if capture is None:
        ids, _ = context_ids(engine, doc.text)
        capture = engine.capture(ids)
    timings["prefill_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    if scores is None:
        from kvcalib.calib.budget import Budget

        mid = config.ratios[len(config.ratios) // 2]
        scores = engine.scorer(config.method, **config.method_params).score(
            capture, engine.score_context(Budget(ratio=mid)))
    if keep is None:
        keep = keep_masks(scores, config.ratios, config.allocator, **config.allocator_params)
    if keep.shape[0] != len(config.ratios) + 1:
        raise TruthError(f"keep holds {keep.shape[0]} rows, expected the full row + {len(config.ratios)} ratios")
    timings["score_s"] = time.perf_counter() - t
    keys, values = capture.keys, capture.values
    qs = doc.questions
    prompts = [engine.prompt("", q.question).question_ids for q in qs]

    # 2. full-cache answers, every question in one batch (a gold answer stops once its gold strings are out)
    t = time.perf_counter()

    def found(b: int, ids: list[int]) -> bool:
        if not qs[b].has_gold:
            return len(ids) >= config.doc_answer_tokens
        return _gold_done(qs[b], tok.decode(ids, skip_special_tokens=True), len(ids))

    full = keep[:1].expand(len(qs), -1, -1, -1)
    probs: list[list[float]] = []
    refs = decode_rows(lm, keys, values, full, prompts, config.max_answer_tokens, eos, stop=found, probs=probs)
    timings["reference_s"] = time.perf_counter() - t
    texts = [tok.decode(r, skip_special_tokens=True).strip() for r in refs]
    confidence = [sum(p[:config.doc_answer_tokens]) / max(1, len(p[:config.doc_answer_tokens])) for p in probs]
    counted = [q.is_correct(x) if q.has_gold else bool(normalize(x)) and c >= config.doc_min_confidence
               for q, x, c in zip(qs, texts, confidence)]
    n_r = len(config.ratios)
    outcomes = [Outcome(q.kind, q.template, q.question, list(q.answers), x, c, [False] * n_r,
                        confidence=round(f, 4)) for q, x, c, f in zip(qs, texts, counted, confidence)]
    idx = [i for i, c in enumerate(counted) if c]
    cuts = {i: _cut_reference(tok, qs[i], refs[i], config.doc_answer_tokens) for i in idx}
    first_loss = {i: n_r for i in idx}
    alive = list(idx)  # answers not lost yet: the grid is walked upwards in stages, each for these only
    timings["forced_s"] = timings["redecode_s"] = 0.0
    for lo, hi in _stages(n_r, STAGE_ROWS):
        if not alive or lo == hi:
            continue
        # 3. the answers teacher-forced under the half's rows in one packed forward
        t = time.perf_counter()
        forced = teacher_forced(lm, keys, values, keep[1 + lo:1 + hi],
                                [(prompts[i], torch.tensor(refs[i][:cuts[i]])) for i in alive])
        surv = forced.survived()  # (hi − lo, len(alive))
        exact = {i: [bool(x) for x in surv[:, k]] for k, i in enumerate(alive)}
        timings["forced_s"] += time.perf_counter() - t
        # 4. a gold answer reworded under compression may still be right: decode, for every question, its first
        #    ratio whose teacher-forced check failed; if right, its next one (rounds, all questions batched)
        t = time.perf_counter()
        lost = {i: _first_false(exact[i]) for i in alive}
        pending = {i: 0 for i in alive if config.decode_failures and (qs[i].has_gold or config.doc_min_f1 <= 1.0)}
        while pending:
            todo = []
            for i, begin in pending.items():
                lost[i] = _first_false(exact[i], begin)
                if lost[i] < hi - lo:
                    todo.append((lost[i], i))
            if not todo:
                break
            rows = keep[torch.tensor([1 + lo + r for r, _ in todo])]

            def got(b: int, ids: list[int], todo=todo) -> bool:
                q = qs[todo[b][1]]
                if not q.has_gold:
                    return len(ids) >= config.doc_answer_tokens
                return _gold_done(q, tok.decode(ids, skip_special_tokens=True), len(ids))

            outs = decode_rows(lm, keys, values, rows, [prompts[i] for _, i in todo], config.max_answer_tokens,
                               eos, stop=got)
            pending = {}
            for (r, i), o in zip(todo, outs):
                text = tok.decode(o, skip_special_tokens=True).strip()
                outcomes[i].decoded[f"{config.ratios[lo + r]:g}"] = text
                if _agrees(qs[i], text, texts[i], config.doc_min_f1):
                    pending[i] = r + 1
        timings["redecode_s"] += time.perf_counter() - t
        for i in list(alive):
            if lost[i] < hi - lo:
                first_loss[i] = lo + lost[i]
                alive.remove(i)
    for i in idx:  # an answer lost at some ratio counts as lost at every larger one
        outcomes[i].survived = [r < first_loss[i] for r in range(n_r)]
    loss, env = loss_curve([o.survived for o in outcomes if o.counted], n_r)
    return TruthResult(ratios=list(config.ratios), loss=loss, envelope=env,
                       r_star_task=task_r_star(config.ratios, loss), n_counted=len(idx), n_questions=len(qs),
                       outcomes=outcomes, context_tokens=int(keys.shape[2]), content_hash=content_hash(doc.text),
                       seconds=time.perf_counter() - t0, timings={k: round(v, 4) for k, v in timings.items()})


def rescore(record: dict, doc_min_confidence: float) -> dict:
    """A truth record (``suite.truth_record``) re-counted with another document-question confidence gate: only
    gates at least as strict as the one it was labelled with are exact (a question below the labelling gate was
    never teacher-forced). Loss curve, r*_task and counts are recomputed from the stored outcomes."""
    rec = dict(record)
    truth = dict(rec["truth"])
    outcomes = [dict(o) for o in truth["outcomes"]]
    for o in outcomes:
        if not o["gold"]:
            o["counted"] = bool(o["counted"]) and o.get("confidence", 0.0) >= doc_min_confidence
    n_r = len(truth["ratios"])
    loss, env = loss_curve([o["survived"] for o in outcomes if o["counted"]], n_r)
    truth.update(outcomes=outcomes, loss=loss, envelope=env, r_star_task=task_r_star(truth["ratios"], loss),
                 n_counted=sum(o["counted"] for o in outcomes))
    rec.update(truth=truth, loss=env, r_star_task=truth["r_star_task"], n_counted=truth["n_counted"],
               doc_min_confidence=doc_min_confidence)
    return rec
