"""Streaming scoring (issue 16, item 1): scores taken inside the prefill, layer by layer, equal the reference
capture-then-score path for every query-using method, on the real SmolLM2-135M (GQA: 9 query heads over 3 kv heads),
at odd lengths (a ragged last Compactor chunk, contexts shorter than the observation window). The streaming capture
keeps only the queries still needed, and a ``LayerObserver`` sees every layer's tensors exactly as captured."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.capture import prefill
from kvcalib.calib.data.documents import load_essays
from kvcalib.calib.scorers import get_scorer
from kvcalib.calib.scorers.streaming import LayerwiseScoring, capture_and_score, kept_queries

QUERY_METHODS = [
    ("snapkv", {}),
    ("snapkv", {"window": 16, "pooling": "avg", "kernel": 5}),
    ("lava", {}),
    ("obcache", {}),
    ("obcache", {"saliency": "joint"}),
    ("tova", {}),
    ("compactor", {}),
    ("compactor", {"chunk": 64, "exclude_protected": False}),
    ("lookahead", {"n_pseudo": 3}),
]
LENGTHS = [21, 301]  # shorter than the 32-query window; odd, with a ragged last 256-chunk


@pytest.fixture(scope="module")
def contexts(engine):
    ids = engine.tokenizer(load_essays()["aord"][:3000], add_special_tokens=False, return_tensors="pt").input_ids[0]
    return {n: ids[:n] for n in LENGTHS}


@pytest.fixture(scope="module")
def references(engine, contexts):
    return {n: prefill(engine.lm, ids) for n, ids in contexts.items()}


def reference_scores(cap, scorer, ctx):
    # naive reference: the method's score over the full capture (every query of every layer kept)
    return scorer.score(cap, ctx)


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("method,params", QUERY_METHODS)
def test_streaming_scores_equal_the_reference_path(engine, contexts, references, method, params, n):
    scorer = get_scorer(method, **params)
    ctx = engine.score_context(Budget(ratio=0.5))
    ref = reference_scores(references[n], scorer, ctx)  # (L, Hkv, N)
    out = capture_and_score(engine.lm, contexts[n], scorer, ctx)
    assert out.scores.shape == ref.shape == (engine.lm.spec.num_layers, engine.lm.spec.num_kv_heads, n)
    assert torch.equal(torch.isinf(out.scores), torch.isinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(out.scores[fin], ref[fin], rtol=1e-5, atol=1e-6)
    # the capture keeps the cache exactly and at most the tail of queries the method still reads
    assert torch.equal(out.capture.keys, references[n].keys)
    assert torch.equal(out.capture.values, references[n].values)
    tail = scorer.query_tail() if not scorer.layerwise else 0
    assert out.capture.queries.shape[2] == min(n, tail)
    if scorer.layerwise:
        assert (out.capture.keys_pre is None) != scorer.stream_keeps_keys_pre


def test_streaming_capture_keeps_only_the_requested_queries(engine, contexts, references):
    n = 301
    extra = torch.tensor([150, 200, 290])
    scorer = get_scorer("snapkv")
    out = capture_and_score(engine.lm, contexts[n], scorer, extra_query_positions=extra)
    cap, ref = out.capture, references[n]
    assert torch.equal(cap.query_positions, extra)  # layerwise: no tail needed afterwards
    assert torch.equal(cap.queries, ref.queries[:, :, extra])
    lk = capture_and_score(engine.lm, contexts[n], get_scorer("lookahead", n_pseudo=1),
                           engine.score_context(Budget(ratio=0.5)), extra_query_positions=extra)
    pos = kept_queries(n, 32, extra)
    assert torch.equal(lk.capture.query_positions, pos)
    assert torch.equal(lk.capture.window_queries(32), ref.window_queries(32))
    with pytest.raises(ValueError, match="window 40"):
        lk.capture.window_queries(40)


def test_layer_observer_sees_each_layer_as_captured(engine, contexts, references):
    n = 21
    seen: dict[int, tuple] = {}

    class Recorder:
        def observe(self, layer_idx, q, k, v, k_pre):
            seen[layer_idx] = (q.clone(), k.clone(), v.clone(), k_pre.clone())

    prefill(engine.lm, contexts[n], observers=[Recorder()])
    ref = references[n]
    assert sorted(seen) == list(range(ref.num_layers))
    for i, (q, k, v, kp) in seen.items():
        assert torch.equal(q, ref.queries[i]) and torch.equal(k, ref.keys[i])
        assert torch.equal(v, ref.values[i]) and torch.equal(kp, ref.keys_pre[i])


def test_layerwise_scoring_refuses_a_cross_layer_method():
    with pytest.raises(ValueError, match="not layerwise"):
        LayerwiseScoring(get_scorer("lookahead"))


def test_bad_query_positions_are_a_clear_error(engine, contexts):
    with pytest.raises(ValueError, match="query_positions"):
        prefill(engine.lm, contexts[21], query_positions=torch.tensor([0, 21]))


@pytest.mark.parametrize("method", ["compactor", "snapkv"])
def test_calibration_streams_by_default_with_the_reference_result(engine, method, monkeypatch):
    from kvcalib.calib.calibration import calibrate as cal

    text = load_essays()["aord"][:1200]
    cfg = cal.CalibrationConfig(method=method, ratios=(0.3, 0.6), n_probes=2)
    assert cal.STREAMING
    streamed = cal.calibrate(engine, text, cfg)
    monkeypatch.setattr(cal, "STREAMING", False)
    reference = cal.calibrate(engine, text, cfg)
    assert streamed.r_star == reference.r_star and streamed.fidelity == reference.fidelity
    assert streamed.head_budgets == reference.head_budgets
    assert streamed.features.keys() == reference.features.keys()
    for k, v in reference.features.items():
        assert streamed.features[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k


def test_the_recorder_copies_layers_into_one_buffer_and_falls_back_to_stacking():
    """Each layer is copied into one (L, H, N, d) buffer as the forward produces it, so the stacked capture never
    exists beside a list of per-layer copies; the values equal ``torch.stack`` of the layers. A layer of another
    shape turns the buffer off and the old stacking path answers with the same values."""
    from kvcalib.calib.capture import PrefillRecorder

    gen = torch.Generator().manual_seed(3)
    n_layers, hq, hkv, n, d = 3, 6, 2, 11, 4
    qs = [torch.randn(1, hq, n, d, generator=gen) for _ in range(n_layers)]
    ks = [torch.randn(1, hkv, n, d, generator=gen) for _ in range(n_layers)]
    vs = [torch.randn(1, hkv, n, d, generator=gen) for _ in range(n_layers)]
    pre = [torch.randn(1, n, hkv * d, generator=gen) for _ in range(n_layers)]
    rec = PrefillRecorder(n_layers, None, d)
    for i in range(n_layers):
        rec.record_key_source(i, pre[i])
        rec.record(i, qs[i], ks[i], vs[i])
        ks[i].zero_()  # the forward's own tensors may be reused or freed: the capture holds copies
    keys = rec.stacked("keys")
    assert all(rec.keys[i].data_ptr() == keys[i].data_ptr() for i in range(n_layers))  # views of ONE buffer
    assert keys.is_contiguous() and keys.abs().sum() > 0
    torch.testing.assert_close(rec.stacked("values"), torch.stack([v[0] for v in vs]))
    torch.testing.assert_close(rec.stacked("queries"), torch.stack([q[0] for q in qs]))
    want_pre = torch.stack([p.view(1, n, hkv, d)[0].transpose(0, 1) for p in pre])
    torch.testing.assert_close(rec.stacked("keys_pre"), want_pre)

    odd = PrefillRecorder(2, None, d)
    a, b = torch.randn(1, hkv, n, d, generator=gen), torch.randn(1, hkv, n + 1, d, generator=gen)
    for i, k in enumerate((a, b)):
        odd.record_key_source(i, torch.randn(1, k.shape[2], hkv * d, generator=gen))
        odd.record(i, torch.randn(1, hq, k.shape[2], d, generator=gen), k, k.clone())
    with pytest.raises(RuntimeError):  # ragged layers cannot be stacked: the old path's error, not silent garbage
        odd.stacked("keys")
    assert torch.equal(odd.keys[0], a[0]) and torch.equal(odd.keys[1], b[0])


def test_streaming_compactor_keeps_no_pre_rope_keys_and_matches_the_reference(engine, contexts):
    """Compactor's leverage is per layer, so the streaming path computes it inside the prefill and keeps no pre-RoPE
    key; its scores equal the reference capture's, whose leverage is computed layer by layer from the kept keys."""
    ids = contexts[301]
    scorer = get_scorer("compactor")
    out = capture_and_score(engine.lm, ids, scorer)
    assert out.capture.keys_pre is None and out.capture.queries.shape[2] < ids.numel()
    ref = prefill(engine.lm, ids)
    torch.testing.assert_close(out.scores, scorer.score(ref), atol=1e-5, rtol=1e-5)
    lev = scorer.leverage(ref)  # (L, Hkv, N): each layer alone equals the whole-capture leverage of that layer
    for layer in (0, ref.num_layers - 1):
        one = scorer._leverage(ref.keys_pre[layer:layer + 1])[0]
        torch.testing.assert_close(lev[layer], one)
