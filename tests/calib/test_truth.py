"""Task truth (real SmolLM2, short documents): questions inserted into any text, batched decoding and teacher
forcing equal to one-row greedy decoding on physically compressed caches, and the loss curve / r*_task against a
naive reference that decodes every (ratio, question) pair alone."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.calibration import probes as P
from kvcalib.calib.calibration.answers import decode_rows, teacher_forced
from kvcalib.calib.calibration.calibrate import context_ids
from kvcalib.calib.calibration.curve import keep_masks
from kvcalib.calib.calibration.truth import (
    TruthConfig,
    TruthError,
    evaluate_truth,
    item_token_spans,
    loss_curve,
    task_r_star,
)
from kvcalib.calib.data.questions import (
    ARTICLES,
    QuestionConfig,
    QuestionError,
    insert_items,
    make_questions,
    normalize,
    token_f1,
)

RATIOS = (0.3, 0.6, 0.9)


@pytest.fixture(scope="module")
def text():
    from kvcalib.calib.data.documents import load_essays

    return load_essays()["aord"][:1100]


@pytest.fixture(scope="module")
def doc(text):
    return make_questions(text, seed=1, config=QuestionConfig(n_needles=2, kv_pairs=0, multi_values=0,
                                                              doc_questions=1))


@pytest.fixture(scope="module")
def prepared(engine, doc):
    ids, start = context_ids(engine, doc.text)
    cap = engine.capture(ids)
    scores = engine.scorer("compactor").score(cap, engine.score_context(Budget(ratio=0.6)))
    return cap, scores, start


# ---------------------------------------------------------------------------------------------------- questions
def test_items_are_inserted_at_sentence_boundaries_with_exact_spans(text):
    doc = make_questions(text, seed=5)
    assert len(doc.spans) == 4 + 1 + 2  # needles, the key–value block, the multi-needle's values
    items = [doc.text[a:b] for a, b in doc.spans]
    assert all(s.endswith(".") for s in items)
    rest = doc.text
    for s in items:
        rest = rest.replace(s + " ", "", 1)
    assert normalize(rest) == normalize(text)  # nothing else changed
    kinds = [q.kind for q in doc.questions]
    assert kinds == ["needle"] * 4 + ["kv", "multi_needle", "document", "document"]
    assert {q.template for q in doc.questions[:4]} == {"number", "name", "date", "place"}
    for q in doc.questions[:4]:  # each needle's answer is in its own item
        (a, b), = q.meta["spans"]
        assert normalize(q.answers[0]) in normalize(doc.text[a:b])
    multi = doc.questions[5]
    assert len(multi.meta["spans"]) == 2 and all(normalize(v) in normalize(doc.text) for v in multi.answers)
    again = make_questions(text, seed=5)
    assert again.text == doc.text and [q.question for q in again.questions] == [q.question for q in doc.questions]
    assert make_questions(text, seed=6).text != doc.text


def test_correctness_and_bad_input():
    doc = make_questions("One sentence. Two sentences here. Three.", seed=0,
                         config=QuestionConfig(n_needles=1, kv_pairs=0, multi_values=2, doc_questions=1))
    multi = doc.questions[1]
    assert multi.is_correct(f"They are {multi.answers[1]} and {multi.answers[0]}!")
    assert not multi.is_correct(f"Only {multi.answers[0]}.")
    assert doc.questions[0].is_correct(doc.questions[0].answers[0].upper() + ".")
    with pytest.raises(QuestionError, match="full-cache answer"):
        doc.questions[2].is_correct("anything")
    with pytest.raises(QuestionError, match="empty"):
        make_questions("   ")
    with pytest.raises(QuestionError, match="kv_pairs"):
        make_questions("text.", config=QuestionConfig(kv_pairs=1))
    with pytest.raises(QuestionError, match="every kind is disabled"):
        make_questions("text.", config=QuestionConfig(0, 0, 0, 0))
    text, spans = insert_items("A b. C d. E f.", [(0.0, "X."), (0.9, "Y."), (0.0, "Z.")])
    assert [text[a:b] for a, b in spans] == ["X.", "Y.", "Z."] and text.startswith("X. Z. A b.")


def test_token_f1_is_squad_f1_without_articles_and_echo():
    assert token_f1("The power of startups", "power of startups!") == 1.0
    assert token_f1("red blue green", "red blue") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    echo = ARTICLES | {"main", "topic", "of", "text", "is"}
    assert token_f1("The main topic of the text is money", "The main topic of the text is power", echo) == 0.0
    assert token_f1("The main topic of the text is", "The main topic", echo) == 1.0  # nothing but echo: agree
    assert token_f1("", "something") == 0.0


def test_loss_curve_and_task_r_star():
    surv = [[True, True, False], [True, False, False]]
    loss, env = loss_curve(surv, 3)
    assert loss == [0.0, 0.5, 1.0] and env == loss
    assert task_r_star([0.3, 0.6, 0.9], loss) == 0.3
    assert task_r_star([0.3, 0.6, 0.9], [0.5, 0.5, 1.0]) == 0.0
    assert task_r_star([0.3, 0.6, 0.9], [0.0, 0.0, 0.0]) == 0.9
    assert loss_curve([], 2) == ([0.0, 0.0], [0.0, 0.0])
    with pytest.raises(TruthError):
        TruthConfig(ratios=(0.5, 1.0))


def test_probes_keep_off_the_inserted_items(engine, doc, prepared):
    cap, _, start = prepared
    avoid = item_token_spans(engine, doc.text, doc.spans)
    assert len(avoid) == len(doc.spans)
    tok = engine.tokenizer
    for (a, b), (ca, cb) in zip(avoid, doc.spans):  # the token ranges decode to the items
        assert normalize(doc.text[ca:cb]) in normalize(tok.decode(cap.input_ids[a:b]))
    probes = P.reconstruction_probes(cap.input_ids, start, 8, 4, 6, seed=0, avoid=avoid)
    for p in probes:
        s, e = p.meta["start"], p.meta["start"] + 10
        assert all(e <= a or s >= b for a, b in avoid)
    plain = P.reconstruction_probes(cap.input_ids, start, 8, 4, 6, seed=0)
    assert [p.meta["start"] for p in plain] == [p.meta["start"] for p in P.reconstruction_probes(
        cap.input_ids, start, 8, 4, 6, seed=0, avoid=[])]



def test_item_spans_when_the_template_merges_the_document_start(engine, text):
    """A document starting with a blank line merges with the chat header's newline (no clean document start): the
    spans come from incremental decoding instead, and still cover exactly the inserted items."""
    doc = make_questions("\n\n" + text, seed=2, config=QuestionConfig(n_needles=2, kv_pairs=0, multi_values=0,
                                                                       doc_questions=0))
    ids, start = context_ids(engine, doc.text)
    assert start == 0  # the header is not a token prefix of this context: the fallback path
    spans = item_token_spans(engine, doc.text, doc.spans)
    assert len(spans) == len(doc.spans) == 2
    for (a, b), (ca, cb) in zip(spans, doc.spans):
        got = normalize(engine.tokenizer.decode(ids[a:b]))
        assert normalize(doc.text[ca:cb]) in got and len(got) < len(normalize(doc.text[ca:cb])) + 12

# ---------------------------------------------------------------------------------------------------- batching
def test_decode_rows_and_teacher_forcing_equal_one_row_greedy_decoding(engine, doc, prepared):
    cap, scores, _ = prepared
    keep = torch.cat([keep_masks(scores, (0.5,), "adakv"), keep_masks(scores, (0.8,), "uniform", full_row=False)])
    prompts = [engine.prompt("", q.question).question_ids for q in doc.questions]  # different lengths
    assert len({int(p.numel()) for p in prompts}) > 1
    rows = keep[[0, 1, 2]]
    out = decode_rows(engine.lm, cap.keys, cap.values, rows, prompts, 10, engine.eos_ids)
    ref = []
    for b in range(3):
        g = greedy_decode(engine.lm.model, RaggedKVCache.from_mask(cap.keys, cap.values, rows[b]), prompts[b], 10,
                          engine.eos_ids)
        ref.append(g.token_ids)
    assert out == ref
    # teacher forcing the full-cache answers: a row survives iff it decodes them exactly
    full = decode_rows(engine.lm, cap.keys, cap.values, keep[:1].expand(3, -1, -1, -1), prompts, 10, engine.eos_ids)
    forced = teacher_forced(engine.lm, cap.keys, cap.values, keep,
                            [(p, torch.tensor(a)) for p, a in zip(prompts, full)])
    surv = forced.survived()  # (3 rows, 3 answers)
    assert surv[0].all()
    for r in range(3):
        dec = decode_rows(engine.lm, cap.keys, cap.values, keep[r:r + 1].expand(3, -1, -1, -1), prompts, 10,
                          engine.eos_ids)
        assert surv[r].tolist() == [d[:len(a)] == a for d, a in zip(dec, full)]


# ---------------------------------------------------------------------------------------------------- truth
def test_truth_equals_a_naive_per_pair_reference(engine, doc, prepared, monkeypatch):
    """Every (ratio, question) pair decoded alone on a physically compressed cache; the grid walked in stages of
    two rows (an answer lost in the first stage is not forced in the second)."""
    from kvcalib.calib.calibration import truth as truth_module

    monkeypatch.setattr(truth_module, "STAGE_ROWS", 2)
    cap, scores, _ = prepared
    cfg = TruthConfig(ratios=RATIOS, doc_min_confidence=0.0, max_answer_tokens=20)
    res = evaluate_truth(engine, doc, cfg, capture=cap, scores=scores)
    keep = keep_masks(scores, RATIOS, cfg.allocator)
    tok = engine.tokenizer
    expected = []
    for q in doc.questions:
        prompt = engine.prompt("", q.question).question_ids
        full = greedy_decode(engine.lm.model, RaggedKVCache.from_full(cap.keys, cap.values), prompt, 20,
                             engine.eos_ids).token_ids
        full_text = tok.decode(full, skip_special_tokens=True)
        counted = q.is_correct(full_text) if q.has_gold else bool(normalize(full_text))
        raw = []
        for r in range(len(RATIOS)):
            ids = greedy_decode(engine.lm.model, RaggedKVCache.from_mask(cap.keys, cap.values, keep[r + 1]), prompt,
                                20, engine.eos_ids).token_ids
            if q.has_gold:
                raw.append(q.is_correct(tok.decode(ids, skip_special_tokens=True)))
            else:  # a flip: the content of the first doc_answer_tokens tokens changed (token F1 < 0.5)
                k = cfg.doc_answer_tokens
                echo = ARTICLES | set(normalize(q.question).split())
                raw.append(token_f1(tok.decode(full[:k], skip_special_tokens=True),
                                    tok.decode(ids[:k], skip_special_tokens=True), echo) >= cfg.doc_min_f1)
        mono = [all(raw[:r + 1]) for r in range(len(raw))]  # lost once lost
        expected.append((counted, mono if counted else [False] * len(raw)))
    assert [(o.counted, o.survived) for o in res.outcomes] == expected
    counted = [s for c, s in expected if c]
    assert res.n_counted == len(counted) >= 2
    want = [sum(not s[r] for s in counted) / len(counted) for r in range(len(RATIOS))]
    assert res.loss == pytest.approx(want) and res.envelope == pytest.approx(want)
    first = next((r for r, l in enumerate(want) if l > 0), None)
    assert res.r_star_task == (RATIOS[-1] if first is None else ([0.0] + list(RATIOS))[first])
    assert res.context_tokens == cap.num_tokens and res.loss_at(0.0) == 0.0
