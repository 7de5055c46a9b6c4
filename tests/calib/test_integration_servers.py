"""Budgets for servers (issue 17, item 4, engine side): the ``per_layer`` allocator (every head of a layer keeps the
same positions, for paged engines), the compact kept-positions encoding, and the model shape."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib.budget import Budget, BudgetError, allocate, available_allocators
from kvcalib.calib.integrations.servers import decode_kept_positions, encode_kept_positions, model_shape


def naive_per_layer(scores: torch.Tensor, per_head: int) -> torch.Tensor:
    """Reference: per layer, rank positions by the mean over heads (ties: lower position), keep the top per_head
    for every head."""
    n_layers, h, n = scores.shape
    keep = torch.zeros(n_layers, h, n, dtype=torch.bool)
    for l in range(n_layers):
        mean = [float(scores[l, :, j].mean()) for j in range(n)]
        order = sorted(range(n), key=lambda j: (-mean[j], j))[:per_head]
        keep[l, :, order] = True
    return keep


def test_per_layer_is_registered_and_matches_the_naive_reference():
    assert "per_layer" in available_allocators()
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 50, generator=g)
    scores[..., -5:] = float("inf")  # a protected window stays first
    for ratio in (0.0, 0.3, 0.8):
        b = Budget(ratio=ratio)
        keep = allocate(scores, b, "per_layer")
        assert torch.equal(keep, naive_per_layer(scores, b.per_head(50)))
        assert bool((keep == keep[:, :1]).all())
        assert int(keep.sum()) == 4 * 3 * b.per_head(50)
        assert bool(keep[..., -5:].all())
    with pytest.raises(BudgetError, match="reduce"):
        allocate(scores, Budget(ratio=0.5), "per_layer", reduce="median")


def test_kept_positions_encoding_round_trips_and_is_compact():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(3, 2, 200, generator=g) < 0.5
    enc = encode_kept_positions(keep)
    assert torch.equal(decode_kept_positions(enc), keep)
    runs = torch.zeros(2, 2, 1000, dtype=torch.bool)
    runs[..., :4] = True
    runs[..., 500:600] = True
    runs[..., -32:] = True
    enc = encode_kept_positions(runs, layers_only=True)
    assert enc["ranges"] == [[[0, 4], [500, 600], [968, 1000]]] * 2
    assert torch.equal(decode_kept_positions(enc), runs)
    with pytest.raises(ValueError, match="per_layer"):
        encode_kept_positions(keep, layers_only=True)


def test_model_shape(engine):
    shape = model_shape(engine.lm.model)
    spec = engine.lm.spec
    assert (shape.layers, shape.kv_heads, shape.query_heads, shape.head_dim) == \
        (spec.num_layers, spec.num_kv_heads, spec.num_heads, spec.head_dim)
    assert shape.dtype == "fp32" and shape.to_dict()["model_type"] == "llama"


def test_token_ids_hash_matches_a_naive_recomputation():
    import hashlib

    from kvcalib.calib.integrations.servers import token_ids_hash

    ids = [0, 1, 255, 256, 49151, 2**31 - 1]
    naive = hashlib.sha256()
    naive.update(b"smollm2-135m")
    naive.update(b"\x00")
    for i in ids:  # int32 little-endian, byte by byte
        naive.update(bytes([(i >> (8 * k)) & 0xFF for k in range(4)]))
    assert token_ids_hash("smollm2-135m", ids) == naive.hexdigest()
    assert token_ids_hash("smollm2-135m", torch.tensor(ids)) == naive.hexdigest()  # a tensor of the same ids
    assert token_ids_hash("qwen2.5-coder-0.5b", ids) != naive.hexdigest()  # the model is part of the name
    assert token_ids_hash("smollm2-135m", ids[:-1]) != naive.hexdigest()
    assert token_ids_hash("smollm2-135m", []) == hashlib.sha256(b"smollm2-135m\x00").hexdigest()
    for bad in ([-1], [2**31], [1.0], [True], ["3"]):
        with pytest.raises(ValueError, match="token id 0"):
            token_ids_hash("smollm2-135m", bad)


def test_token_ids_engine_prefills_exactly_the_ids(engine):
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, context_ids, featurize
    from kvcalib.calib.integrations.servers import TokenIdsEngine, shape_from_config

    text = "The committee met on Tuesday to review the budget of the new library. " * 6
    prompt_ids, start = context_ids(engine, text)
    eng = TokenIdsEngine(engine, prompt_ids)  # kvcalib's own layout: the same ids, the same document start
    assert eng.document_start() == start and torch.equal(context_ids(eng, eng.document_text())[0], prompt_ids)
    config = CalibrationConfig(ratios=(0.5,))
    _, cap_a, scores_a = featurize(engine, text, config)
    _, cap_b, scores_b = featurize(eng, eng.document_text(), config)
    assert torch.equal(cap_a.input_ids, cap_b.input_ids) and torch.allclose(scores_a, scores_b)
    raw = engine.tokenizer(text, add_special_tokens=False).input_ids  # a server's own layout (no chat header)
    raw_eng = TokenIdsEngine(engine, raw)
    assert raw_eng.document_start() == 0
    _, cap, _ = featurize(raw_eng, raw_eng.document_text(), config)
    assert cap.input_ids.tolist() == raw
    shape = shape_from_config(engine.lm.model.config.to_dict(), "fp32")
    assert shape == model_shape(engine.lm.model)
