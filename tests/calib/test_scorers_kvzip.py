"""KVzip (context-reconstruction attention) against a naive reference written from the paper's definition, and the
``global`` allocator (one ranking over every layer and head) against a sort."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib.budget import Budget, allocate
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.scorers import SCORERS, get_scorer
from kvcalib.calib.scorers.kvzip import FIRST_REQUEST, NEXT_REQUEST, head_length


def naive_kvzip(engine, context_ids: torch.Tensor, chunk_size: int, n_sink: int = 4, prev: int = 8) -> torch.Tensor:
    """From the definition, with the model's own prefill: for each chunk, prefill ``context + request`` in one pass
    (the request: repeat prompt, chat tail, the chunk), then for every reconstruction query t and query head the
    softmax over [the n_sink first keys, the chunk's context keys, the request's keys up to t]; a context position's
    score is the max of its weight over t and over the heads sharing its kv head."""
    tok = engine.tokenizer
    from kvcalib.calib.data.documents import chat_frame

    head_text, tail_text = chat_frame(tok)
    enc = lambda s: tok(s, add_special_tokens=False, return_tensors="pt").input_ids[0]  # noqa: E731
    head, tail = enc(head_text), enc(tail_text)
    n = int(context_ids.numel())
    p = int(head.numel())
    assert torch.equal(context_ids[:p], head)  # the documents below are chat-formatted
    cap0 = engine.capture(context_ids)
    n_layers, hkv = cap0.keys.shape[:2]
    out = torch.full((n_layers, hkv, n), float("inf"))
    body = context_ids[p:].tolist()
    chunks = [body[i:i + chunk_size] for i in range(0, len(body), chunk_size)]
    lo = p
    for i, chunk in enumerate(chunks):
        req = enc(FIRST_REQUEST).tolist() if i == 0 else enc(NEXT_REQUEST).tolist() + chunks[i - 1][-prev:]
        req = req + tail.tolist() + chunk
        m = len(req)
        cap = engine.capture(torch.cat([context_ids, torch.tensor(req)]))
        d = cap.keys.shape[-1]
        g = cap.queries.shape[1] // hkv
        for l in range(n_layers):
            for hq in range(cap.queries.shape[1]):
                h = hq // g
                for t in range(m):
                    idx = list(range(n_sink)) + list(range(lo, lo + len(chunk))) + list(range(n, n + t + 1))
                    z = cap.keys[l, h, idx].double() @ cap.queries[l, hq, n + t].double() / d**0.5
                    a = torch.softmax(z, 0)[n_sink:n_sink + len(chunk)].float()
                    cur = out[l, h, lo:lo + len(chunk)]
                    out[l, h, lo:lo + len(chunk)] = a if torch.isinf(cur).all() else torch.maximum(cur, a)
        lo += len(chunk)
    return out


@pytest.fixture(scope="module")
def context(engine):
    from kvcalib.calib.data.documents import load_essays

    return engine.prompt(load_essays()["aord"][:260], "Q?").context_ids  # ~80 tokens, chat head included


@pytest.mark.parametrize("chunk_size", [2048, 23])  # one chunk; several (a request quoting the previous chunk)
def test_kvzip_matches_naive(engine, context, chunk_size):
    cap = engine.capture(context)
    got = get_scorer("kvzip", chunk_size=chunk_size).score(cap, engine.score_context())
    want = naive_kvzip(engine, context, chunk_size)
    p = head_length(engine.tokenizer, context)
    assert p > 4 and torch.isposinf(got[..., :p]).all()  # sinks and the chat head kept
    assert torch.isfinite(got[..., p:]).all()
    torch.testing.assert_close(got[..., p:], want[..., p:], rtol=2e-3, atol=2e-5)
    assert float(got[..., p:].max()) <= 1.0 and float(got[..., p:].min()) >= 0.0


def test_kvzip_without_head_protects_only_the_sinks(engine, context):
    cap = engine.capture(context)
    s = get_scorer("kvzip", keep_head=False).score(cap, engine.score_context())
    assert torch.isposinf(s[..., :4]).all() and torch.isfinite(s[..., 4:]).all()


def test_kvzip_needs_the_model(short_capture):
    with pytest.raises(KvcalibError, match="kvzip needs the model"):
        get_scorer("kvzip").score(short_capture)


def test_head_length_is_zero_for_a_raw_context(engine):
    ids = engine.tokenizer("Just text, no template.", add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert head_length(engine.tokenizer, ids) == 0


@pytest.mark.parametrize("per_head", [1, 9, 40])
def test_global_allocator_keeps_the_overall_top(per_head):
    gen = torch.Generator().manual_seed(per_head)
    s = torch.rand(4, 3, 40, generator=gen)
    s[:, :, :2] = float("inf")
    keep = allocate(s, Budget(tokens=per_head), "global")
    total = 4 * 3 * per_head
    assert int(keep.sum()) == total
    threshold = sorted(s.flatten().tolist(), reverse=True)[total - 1]
    assert bool((s[keep] >= threshold).all()) and bool((s[~keep] <= threshold).all())
    # layer budgets follow the scores: a layer scaled down loses entries to the others
    s2 = s.clone()
    s2[0, :, 2:] *= 0.01
    if 2 < per_head < 38:  # (at 1 the protected entries alone exceed the total)
        assert int(allocate(s2, Budget(tokens=per_head), "global")[0].sum()) < 3 * per_head


def test_kvzip_runs_through_the_engine_and_calibration(engine):
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.calib.data.documents import load_essays

    assert "kvzip" in SCORERS
    text = load_essays()["aord"][:700]
    res = engine.run(text, "What is this essay about?", method="kvzip", budget=Budget(ratio=0.5), allocator="global",
                     max_new_tokens=4)
    assert res.method == "kvzip" and abs(res.ratio - 0.5) < 0.01
    cal = calibrate(engine, text, CalibrationConfig(method="kvzip", allocator="global", ratios=(0.3, 0.7),
                                                    n_probes=1))
    assert len(cal.fidelity) == 2 and 0.0 <= cal.r_star <= 0.7
