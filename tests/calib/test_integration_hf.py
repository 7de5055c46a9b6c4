"""``compress(model, ...)`` (issue 17, item 1) on the real SmolLM2: compression inside the caller's own forward equals
kvcalib's own ``Engine.run`` (kept positions and answers), the cache holds the budget's bytes, and ``ratio="auto"``
predicts from that same forward (one forward over the context, the features of ``calibrate.featurize``)."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib import Budget, CalibrationConfig, compress, get_scorer
from kvcalib.calib.budget import allocate
from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.calibration.calibrate import predict
from kvcalib.calib.data.documents import load_essays
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.integrations.hf import IntegrationError, KvcalibCompressor, new_cache

QUESTION = "What is the passkey?"
MAX_NEW = 10


@pytest.fixture(scope="module")
def document() -> str:
    essay = load_essays()["aord"]
    return essay[:500] + "\nThe passkey is 48213. Remember it.\n" + essay[500:1000]


@pytest.fixture(scope="module")
def prompt(engine, document):
    return engine.prompt(document, QUESTION)


def own_forward_greedy(model, cache, question_ids: torch.Tensor, steps: int, eos: set[int]) -> list[int]:
    """Greedy decoding through the model's ordinary forward with the kvcalib cache as ``past_key_values``."""
    out = model(question_ids[None], past_key_values=cache)
    tokens: list[int] = []
    for _ in range(steps):
        tok = int(out.logits[0, -1].argmax())
        tokens.append(tok)
        if tok in eos:
            break
        out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values)
    return tokens


@torch.no_grad()
def test_compress_equals_engine_run(engine, document, prompt):
    model = engine.lm.model
    res = engine.run(document, QUESTION, budget=Budget(ratio=0.5), max_new_tokens=MAX_NEW)
    cache = new_cache()
    with compress(model, method="compactor", allocator="adakv", ratio=0.5) as press:
        out = model(prompt.context_ids[None], past_key_values=cache)
    assert press.cache is cache and out.past_key_values is cache
    # kept positions: those of kvcalib's own capture → scores → allocation
    cap = engine.capture(prompt.context_ids)
    scores = get_scorer("compactor").score(cap, engine.score_context(Budget(ratio=0.5)))
    keep = allocate(scores, Budget(ratio=0.5), "adakv")
    assert torch.equal(press.outcome.keep, keep)
    assert cache.kept_counts()[0].tolist() == res.cache_report["kept_per_head"]
    for l, layer in enumerate(cache.layers):  # the cache's slots hold exactly the kept positions, in order
        for h in range(keep.shape[1]):
            held = layer.positions[0, h][layer.positions[0, h] >= 0]
            assert torch.equal(held, keep[l, h].nonzero().flatten())
    assert press.outcome.achieved_ratio == pytest.approx(res.ratio)
    # answers: kvcalib's decoding loop, and the model's own forward continuing from the same cache
    state = cache.snapshot()
    gen = greedy_decode(model, cache, prompt.question_ids, MAX_NEW, engine.eos_ids)
    assert gen.token_ids == res.token_ids
    cache.restore(state)
    assert own_forward_greedy(model, cache, prompt.question_ids, MAX_NEW, engine.eos_ids) == res.token_ids


@torch.no_grad()
def test_bytes_held_follow_the_budget(engine, prompt):
    """per_layer allocation (paged engines): no padding, so the cache holds exactly the budget's bytes."""
    model, ratio = engine.lm.model, 0.75
    with compress(model, allocator="per_layer", ratio=ratio) as press:
        model(prompt.context_ids[None])
    spec, n = engine.lm.spec, int(prompt.context_ids.numel())
    entry = 2 * spec.head_dim * 4  # K and V, fp32
    per_head = Budget(ratio=ratio).per_head(n)
    o = press.outcome
    assert o.kv_bytes_full == spec.num_layers * spec.num_kv_heads * n * entry
    assert o.kv_bytes_held == press.cache.nbytes == spec.num_layers * spec.num_kv_heads * per_head * entry
    assert o.kv_bytes_held <= (1 - ratio + 0.01) * o.kv_bytes_full
    assert all(layer.keys.shape[2] == per_head and layer.valid is None for layer in press.cache.layers)
    assert bool((o.keep == o.keep[:, :1]).all())  # every head of a layer keeps the same positions


class EntropyPredictor:
    """A feature-dependent predictor: r = the window queries' attention entropy (any function of the features)."""

    version = "test-attn-entropy"

    def training_config(self) -> dict:
        return {}

    def predict(self, features: list[dict]) -> list[float]:
        return [min(0.9, max(0.0, f["attn_entropy"])) for f in features]


@torch.no_grad()
def test_auto_ratio_from_the_same_single_forward(engine, document, prompt):
    model = engine.lm.model
    forwards: list[int] = []
    handle = model.register_forward_hook(lambda _m, args, out: forwards.append(1))
    try:
        with compress(model, ratio="auto", tokenizer=engine.tokenizer, text=document,
                      predictor=EntropyPredictor()) as press:
            model(prompt.context_ids[None])
    finally:
        handle.remove()
    assert len(forwards) == 1  # one forward over the context: no second prefill for the prediction
    ref = predict(engine, document, CalibrationConfig(), EntropyPredictor())
    o = press.outcome
    assert o.predicted and o.predictor_version == "test-attn-entropy"
    assert o.ratio == pytest.approx(ref.ratio, abs=1e-6)
    assert set(o.features) == set(ref.features)
    for k, v in ref.features.items():
        assert o.features[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
    assert o.keep.sum((-1,)).sum(-1).tolist() == ref.layer_budgets


def test_auto_uses_the_shipped_predictor_else_the_documented_fallback(engine, tmp_path):
    from kvcalib.calib.predictors.bundled import default_predictor
    from tests.support import shipped_predictors

    shipped = default_predictor("smollm2-135m", "compactor", "adakv")
    assert shipped is not None  # a predictor ships for the bundled model
    press = KvcalibCompressor(engine.lm.model, ratio="auto", tokenizer=engine.tokenizer)
    assert press.predictor is shipped
    with shipped_predictors(tmp_path):  # nothing ships: r = 1 − τ, as the service's fallback with no profile
        press = KvcalibCompressor(engine.lm.model, ratio="auto", tokenizer=engine.tokenizer)
        assert float(press.predictor.predict([{"context_nll": 2.0}])[0]) == pytest.approx(1 - 0.95, abs=1e-6)


def test_bad_input_is_refused_clearly(engine):
    model = engine.lm.model
    with pytest.raises(IntegrationError, match="ratio must be"):
        compress(model, ratio="half")
    with pytest.raises(KvcalibError, match=r"\[0, 1\)"):
        compress(model, ratio=1.5)
    with pytest.raises(KvcalibError, match="unknown allocator"):
        compress(model, allocator="bogus")
    with pytest.raises(IntegrationError, match="tokenizer"):
        compress(model, ratio="auto")
    with pytest.raises(IntegrationError, match="batch size 1"), compress(model, ratio=0.5), torch.no_grad():
        model(torch.ones(2, 8, dtype=torch.long))


def test_exported_lazily_from_kvcalib_and_calib():
    import kvcalib
    import kvcalib.calib

    assert kvcalib.compress is kvcalib.calib.compress is compress


def test_example_hf_generate_answers_a_passkey_at_auto(document, tmp_path):
    """examples/hf_generate.py: a plain transformers model + compress(ratio="auto"), one JSON object out."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ctx = tmp_path / "doc.txt"
    ctx.write_text(document, encoding="utf-8")
    script = Path(__file__).resolve().parents[2] / "examples" / "hf_generate.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(script), str(ctx), "What is the passkey? Answer with the number only.",
                          "--ratio", "auto", "--max-new-tokens", "12"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(res) >= {"answer", "ratio", "context_tokens", "kv_bytes_held", "kv_bytes_full"}
    assert "48213" in res["answer"]
    assert res["kv_bytes_held"] <= (1 - res["ratio"] + 0.05) * res["kv_bytes_full"]
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / "missing.txt"), "q"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert bad.returncode == 2 and "missing.txt" in bad.stderr and "Traceback" not in bad.stderr
