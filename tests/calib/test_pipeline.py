"""The core engine on the real SmolLM2-135M: capture, compressed cache, decoding loop, byte accounting."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib.budget import Budget, allocate, select_topk
from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.data.documents import load_essays
from kvcalib.calib.scorers import get_scorer


def test_model_spec_and_offline_conversion_cache(engine):
    from kvcalib.calib.lm.registry import default_cache_dir

    spec = engine.lm.spec
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (30, 9, 3, 64)
    folder = default_cache_dir() / "models" / "smollm2-135m"
    assert (folder / "config.json").exists() and list(folder.glob("*.safetensors"))
    assert engine.lm.model.config._attn_implementation == "kvcalib"


def test_local_model_folder_loads_and_unknown_model_is_clear(engine):
    import pytest

    from kvcalib.calib.lm.registry import ModelNotFoundError, default_cache_dir, resolve_model_dir

    name, folder = resolve_model_dir(str(default_cache_dir() / "models" / "smollm2-135m"))
    assert (folder / "config.json").exists()
    with pytest.raises(ModelNotFoundError, match="smollm2-135m"):
        resolve_model_dir("no-such-model")


def test_capture_matches_plain_model(engine, short_capture):
    """Captured keys/values equal transformers' own DynamicCache; pre-RoPE keys rotate into the cached keys."""
    model = engine.lm.model
    ids = short_capture.input_ids.view(1, -1)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
    finally:
        model.set_attn_implementation("kvcalib")
    for l in (0, 13, 29):
        torch.testing.assert_close(short_capture.keys[l], out.past_key_values.layers[l].keys[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(short_capture.values[l], out.past_key_values.layers[l].values[0],
                                   rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(short_capture.last_logits, out.logits[0, -1], rtol=1e-3, atol=1e-3)
    # RoPE is a rotation: norms of pre- and post-RoPE keys agree position by position
    torch.testing.assert_close(short_capture.keys_pre.norm(dim=-1), short_capture.keys.norm(dim=-1),
                               rtol=1e-4, atol=1e-4)
    nll = torch.nn.functional.cross_entropy(out.logits[0, :-1], ids[0, 1:], reduction="none")
    torch.testing.assert_close(short_capture.token_nll, nll, rtol=1e-3, atol=1e-3)


def test_strided_context_nll_is_a_subsample_of_the_full_one(engine, short_capture):
    strided = engine.capture(short_capture.input_ids, compute_nll=True, nll_stride=3)
    torch.testing.assert_close(strided.token_nll, short_capture.token_nll[::3], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="nll_stride"):
        engine.capture(short_capture.input_ids[:20], compute_nll=True, nll_stride=0)


def test_full_cache_decoding_reproduces_plain_greedy_generation(engine):
    """With nothing evicted, the shipped decoding loop equals transformers' greedy generate() token for token."""
    model, tok = engine.lm.model, engine.tokenizer
    prompt = engine.prompt(load_essays()["hubs"][:1500], "Summarise the essay in one sentence.")
    cap = engine.capture(prompt.context_ids)
    cache = RaggedKVCache.from_full(cap.keys, cap.values)
    ours = greedy_decode(model, cache, prompt.question_ids, max_new_tokens=24, eos_token_ids=engine.eos_ids)
    full = torch.cat([prompt.context_ids, prompt.question_ids]).view(1, -1)
    model.set_attn_implementation("sdpa")
    try:
        ref = model.generate(full, max_new_tokens=24, do_sample=False, pad_token_id=tok.eos_token_id)
    finally:
        model.set_attn_implementation("kvcalib")
    ref_ids = ref[0, full.shape[1]:].tolist()
    assert ours.token_ids == ref_ids[: len(ours.token_ids)]
    assert len(ours.token_ids) == len(ref_ids)


def test_compressed_cache_equals_masked_full_cache(engine, short_capture):
    """Attention over a physically compressed cache equals attention over the full cache with evicted slots masked."""
    cap = short_capture
    scores = get_scorer("compactor").score(cap)
    keep = allocate(scores, Budget(ratio=0.6), "uniform")
    physical = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
    full = RaggedKVCache.from_full(cap.keys, cap.values)
    for layer, m in zip(full.layers, keep):
        layer.valid = m.unsqueeze(0).clone()  # (1, Hkv, N): mask instead of gather
    ids = torch.tensor([[engine.tokenizer.eos_token_id, 1000, 2000]])
    from kvcalib.calib.cache.decode import forward_tokens

    a = forward_tokens(engine.lm.model, physical, ids, all_logits=True)
    b = forward_tokens(engine.lm.model, full, ids, all_logits=True)
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)
    assert physical.next_position == full.next_position == cap.num_tokens + 3


def test_ragged_allocation_generates_and_reports_exact_bytes(engine, short_capture):
    cap = short_capture
    spec = engine.lm.spec
    n = cap.num_tokens
    g = torch.Generator().manual_seed(0)
    counts = torch.randint(8, n // 2, (spec.num_layers, spec.num_kv_heads), generator=g)  # (L, Hkv)
    keep = select_topk(get_scorer("snapkv").score(cap), counts)
    assert torch.equal(keep.sum(-1), counts)
    cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
    elem, d = cap.keys.element_size(), spec.head_dim
    kept = int(counts.sum()) * 2 * d * elem
    # documented padding: per layer, sum over heads of (max count of the layer - count of the head)
    padding = int((counts.max(-1, keepdim=True).values - counts).sum()) * 2 * d * elem
    rep = cache.report()
    assert rep["kept_bytes"] == kept and rep["padding_bytes"] == padding and rep["bytes_held"] == kept + padding
    assert rep["kept_per_head"] == counts.tolist()
    q = engine.prompt("x", "What is the essay about?").question_ids
    gen = greedy_decode(engine.lm.model, cache, q, max_new_tokens=5)
    assert len(gen.token_ids) >= 1
    grown = cache.report()
    # every appended token adds one slot to every head of every layer
    appended = len(q) + len(gen.token_ids) - 1
    assert grown["kept_bytes"] == kept + appended * spec.num_layers * spec.num_kv_heads * 2 * d * elem
    assert grown["padding_bytes"] == padding


def test_budget_arithmetic():
    import math

    import pytest

    from kvcalib.calib.budget import BudgetError

    assert Budget(ratio=0.5).per_head(1001) == math.ceil(0.5 * 1001)
    assert Budget(ratio=0.0).per_head(17) == 17
    assert Budget(tokens=64).per_head(50) == 50
    scores = torch.randn(2, 3, 40)
    assert allocate(scores, Budget(ratio=0.75), "uniform").sum(-1).eq(10).all()
    for bad in (dict(ratio=1.0), dict(ratio=-0.1), dict(tokens=0), dict(), dict(ratio=0.5, tokens=3)):
        with pytest.raises(BudgetError):
            Budget(**bad)
    with pytest.raises(BudgetError, match="expected one of"):
        allocate(scores, Budget(ratio=0.5), "nope")


def test_protected_positions_survive_compression(short_capture):
    scores = get_scorer("snapkv", window=16).score(short_capture)
    keep = allocate(scores, Budget(ratio=0.9), "uniform")
    assert keep[..., -16:].all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the Triton kernels run end to end only on GPU")
def test_engine_runs_end_to_end_on_cuda_with_triton_kernels():
    from kvcalib.calib.pipeline import Engine

    cpu = Engine.load("smollm2-135m")
    gpu = Engine.load("smollm2-135m", device="cuda")
    essays = load_essays()
    text = essays["aord"][:2500] + " The secret passcode for the red door is 31415. " + essays["hubs"][:2500]
    q = "What is the secret passcode for the red door? Answer with the number only."
    for method in ("compactor", "snapkv"):
        a = cpu.run(text, q, method=method, budget=Budget(ratio=0.5), allocator="uniform", max_new_tokens=16)
        b = gpu.run(text, q, method=method, budget=Budget(ratio=0.5), allocator="uniform", max_new_tokens=16)
        assert a.cache_report["kept_per_layer"] == b.cache_report["kept_per_layer"]
        assert "31415" in b.answer


def test_batched_decoding_equals_row_by_row(engine, short_capture):
    """Several keep masks of one context decode together as batch rows with the same tokens as one by one."""
    from kvcalib.calib.cache.decode import greedy_decode_batch

    cap = short_capture
    q = engine.prompt("x", "What is the essay about? Answer in a few words.").question_ids
    keeps = torch.stack([allocate(get_scorer(m).score(cap), Budget(ratio=r), "uniform")
                         for m, r in (("compactor", 0.3), ("snapkv", 0.6), ("keynorm", 0.8))])  # (3, L, H, N)
    batch = greedy_decode_batch(engine.lm.model, RaggedKVCache.from_mask(cap.keys, cap.values, keeps), q, 12,
                                engine.eos_ids)
    for keep, ids in zip(keeps, batch):
        one = greedy_decode(engine.lm.model, RaggedKVCache.from_mask(cap.keys, cap.values, keep), q, 12,
                            engine.eos_ids)
        assert ids == one.token_ids


def test_engine_run_defaults_to_adakv_from_calib_defaults(engine):
    """Engine.run's defaults are calib.defaults' (compactor, adakv): every layer keeps exactly Hkv·⌈(1−r)·N⌉
    entries, spread unevenly over its heads, exactly as ``allocate(..., "adakv")`` of the same scores."""
    from kvcalib.calib import defaults

    assert (defaults.METHOD, defaults.ALLOCATOR) == ("compactor", "adakv")
    text = load_essays()["hubs"][:1200]
    q = "What is the essay about?"
    res = engine.run(text, q, budget=Budget(ratio=0.5), max_new_tokens=4)
    assert (res.method, res.allocator) == ("compactor", "adakv")
    n = res.context_tokens
    assert res.cache_report["kept_per_layer"] == [3 * -(-n // 2)] * 30
    cap = engine.capture(engine.prompt(text, q).context_ids)
    want = allocate(get_scorer("compactor").score(cap, engine.score_context(Budget(ratio=0.5))), Budget(ratio=0.5),
                    "adakv").sum(-1)  # (L, Hkv)
    assert res.cache_report["kept_per_head"] == want.tolist()
    assert len({tuple(row) for row in want.tolist()} - {(-(-n // 2),) * 3}) > 0  # some layer is uneven
    uniform = engine.run(text, q, budget=Budget(ratio=0.5), allocator="uniform", max_new_tokens=4)
    assert uniform.allocator == "uniform" and uniform.cache_report["kept_per_head"] == [[-(-n // 2)] * 3] * 30
