"""kvpress interop (issue 17, item 3). kvpress is optional and never a test dependency: the press's scoring function
(``layer_scores`` over the layer inputs a kvpress hook receives) is checked against kvcalib's own scores without
kvpress; the kvpress-backed tests are skipped with a reason when kvpress is not installed."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from kvcalib.calib import get_scorer
from kvcalib.calib.integrations.kvpress import layer_compression_ratios, layer_inputs, layer_scores

HAS_KVPRESS = importlib.util.find_spec("kvpress") is not None
LAYER = 7


@pytest.fixture(scope="module")
def hooked(engine, short_capture):
    """The (hidden_states, position_embeddings) layer LAYER's attention received during a prefill of the capture's
    tokens — what a kvpress forward hook sees."""
    attn = engine.lm.model.get_decoder().layers[LAYER].self_attn
    seen = {}

    def hook(_m, args, kwargs):
        seen["hidden"] = kwargs.get("hidden_states", args[0] if args else None)
        seen["pos"] = kwargs["position_embeddings"]

    h = attn.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        engine.capture(short_capture.input_ids)
    finally:
        h.remove()
    return attn, seen["hidden"], seen["pos"]


@torch.no_grad()
def test_layer_inputs_rebuild_the_captured_queries_and_keys(hooked, short_capture):
    attn, hidden, pos = hooked
    q, k_pre = layer_inputs(attn, hidden, pos)
    torch.testing.assert_close(q[0], short_capture.queries[LAYER], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(k_pre[0], short_capture.keys_pre[LAYER], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["compactor", "snapkv", "keynorm", "tova"])
@torch.no_grad()
def test_press_scores_equal_kvcalib_scores(method, hooked, short_capture):
    """The scoring function of KvcalibPress, run on one layer's kvpress inputs, equals kvcalib's scores of that
    layer from the full capture."""
    attn, hidden, pos = hooked
    q, k_pre = layer_inputs(attn, hidden, pos)
    cap = short_capture
    scorer = get_scorer(method)
    got = layer_scores(scorer, q, cap.keys[LAYER][None], cap.values[LAYER][None], k_pre)[0]  # (Hkv, N)
    ref = scorer.score(cap, None)[LAYER]
    assert got.shape == ref.shape
    assert torch.equal(torch.isposinf(got), torch.isposinf(ref))
    fin = torch.isfinite(ref)
    torch.testing.assert_close(got[fin], ref[fin], rtol=1e-3, atol=1e-4)


def test_layer_ratios_of_a_stored_budget():
    budget = {"ratio": 0.5, "context_tokens": 10, "layer_budgets": [10, 6, 4], "head_budgets": [[5, 5], [3, 3], [2, 2]]}
    assert layer_compression_ratios(budget) == [0.5, 0.7, 0.8]
    assert layer_compression_ratios({"ratio": 0.5}) == []


@pytest.mark.skipif(not HAS_KVPRESS, reason="kvpress is an optional extra (pip install 'kvcalib[kvpress]'), "
                                            "not installed here")
def test_kvcalib_press_in_kvpress_pipeline(engine):  # pragma: no cover - needs kvpress
    from kvcalib.calib.integrations.kvpress import budget_to_press, kvcalib_press

    press = kvcalib_press("compactor", compression_ratio=0.5)
    assert press.compression_ratio == 0.5
    lava = budget_to_press({"ratio": 0.5, "method": "snapkv", "allocator": "lava", "context_tokens": 10,
                            "layer_budgets": [10, 6, 4], "head_budgets": [[5, 5], [3, 3], [2, 2]]})
    assert type(lava).__name__ == "PerLayerCompressionPress"


@pytest.mark.skipif(HAS_KVPRESS, reason="checks the message shown without kvpress")
def test_without_kvpress_the_error_is_clear():
    from kvcalib.calib.integrations.kvpress import KvpressMissingError, kvcalib_press

    with pytest.raises(KvpressMissingError, match="pip install"):
        kvcalib_press("compactor")


def test_kvzip_is_refused_as_a_per_layer_press():
    from kvcalib.calib.errors import KvcalibError
    from kvcalib.calib.integrations.kvpress import kvcalib_press

    with pytest.raises(KvcalibError, match="KVzipPress"):  # before kvpress is even imported
        kvcalib_press("kvzip")
