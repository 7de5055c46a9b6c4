"""The client's cache helpers on the real model: a compressed cache turned into a transformers ``DynamicCache``
(``to_dynamic_cache``) and a budget applied to a full ``DynamicCache`` (``apply_budget``) give the same next-token
logits as kvcalib's own ragged decode path, when fed with the original position ids."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_model(engine):
    """A plain transformers copy of the model (sdpa attention, no kvcalib hooks)."""
    from transformers import AutoModelForCausalLM

    from kvcalib.calib.lm.registry import resolve_model_dir

    _, folder = resolve_model_dir("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def setup(engine, short_capture):
    cap = short_capture
    scores = engine.scorer("compactor").score(cap, engine.score_context())
    question = engine.prompt("", "What is the essay about?").question_ids
    return cap, scores, question


def ragged_logits(engine, cache, question):
    from kvcalib.calib.cache.decode import forward_tokens

    return forward_tokens(engine.lm.model, cache, question.view(1, -1))[0]


@torch.no_grad()
def hf_logits(hf_model, dyn, next_position, question):
    q = question.view(1, -1)
    pos = torch.arange(next_position, next_position + q.shape[1]).view(1, -1)
    out = hf_model(input_ids=q, past_key_values=dyn, position_ids=pos, use_cache=True)
    return out.logits[0, -1].float()


def test_compressed_response_as_dynamic_cache(engine, hf_model, setup):
    from kvcalib.calib.budget import Budget, allocate
    from kvcalib.calib.cache.export import cache_to_safetensors, load_compressed
    from kvcalib.calib.cache.ragged import RaggedKVCache
    from kvcalib.client import to_dynamic_cache

    cap, scores, question = setup
    keep = allocate(scores, Budget(ratio=0.6), "uniform")
    data = cache_to_safetensors(RaggedKVCache.from_mask(cap.keys, cap.values, keep), cap.input_ids)
    ckv = load_compressed(data)
    ref = ragged_logits(engine, ckv.to_ragged_cache(), question)
    dyn, next_pos = to_dynamic_cache(ckv)
    assert next_pos == cap.num_tokens and dyn.get_seq_length() == int(keep[0, 0].sum())
    got = hf_logits(hf_model, dyn, next_pos, question)
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()
    assert int(got.argmax()) == int(ref.argmax())


def test_apply_budget_to_full_dynamic_cache(engine, hf_model, setup):
    from transformers import DynamicCache

    from kvcalib.calib.budget import Budget, select_topk
    from kvcalib.calib.cache.ragged import RaggedKVCache
    from kvcalib.client import apply_budget

    cap, scores, question = setup
    full = DynamicCache()
    with torch.no_grad():
        hf_model(input_ids=cap.input_ids.view(1, -1), past_key_values=full, use_cache=True)
    n_layers, hkv, n = scores.shape
    per_head = Budget(ratio=0.5).per_head(n)
    counts = torch.full((n_layers, hkv), per_head)
    dyn, next_pos = apply_budget(full, counts.tolist(), scores=scores, protect_first=0, protect_last=0)
    assert next_pos == n and dyn.get_seq_length() == per_head
    ref_cache = RaggedKVCache.from_mask(cap.keys, cap.values, select_topk(scores, counts))
    ref = ragged_logits(engine, ref_cache, question)
    got = hf_logits(hf_model, dyn, next_pos, question)
    assert torch.allclose(got, ref, atol=2e-3, rtol=1e-3), (got - ref).abs().max()

    # ragged budgets are topped up to the widest head: every budgeted position is kept
    ragged = counts.clone()
    ragged[:, 0] = per_head // 2
    dyn2, _ = apply_budget(full, ragged.tolist(), scores=scores, protect_first=0, protect_last=0)
    assert dyn2.get_seq_length() == per_head
