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
