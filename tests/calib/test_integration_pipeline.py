"""The ``kv-calib-qa`` transformers pipeline (issue 17, item 2) on the real SmolLM2: one compressed cache serves
several questions, ``ratio="auto"`` predicts from the pipeline's own prefill, and its answers equal kvcalib's own
decoding loop (``Engine.run``) at the same ratio."""

from __future__ import annotations

import pytest
import torch

from kvcalib.calib import Budget
from kvcalib.calib.data.documents import load_essays
from tests.calib.test_integration_hf import EntropyPredictor

QUESTIONS = ["What is the passkey?", "What is the essay about?"]


@pytest.fixture(scope="module")
def pipe(engine):
    from transformers import pipeline

    import kvcalib.calib.integrations.pipeline  # noqa: F401  (registers the task)

    return pipeline("kv-calib-qa", model=engine.lm.model, tokenizer=engine.tokenizer)


def test_task_is_registered(pipe):
    from transformers.pipelines import PIPELINE_REGISTRY

    from kvcalib.calib.integrations.pipeline import KvcalibQAPipeline

    assert "kv-calib-qa" in PIPELINE_REGISTRY.get_supported_tasks()
    assert isinstance(pipe, KvcalibQAPipeline)


def test_questions_reuse_one_cache_and_equal_kvcalib_decoding(engine, pipe):
    essay = load_essays()["aord"]
    text = essay[:400] + "\nThe passkey is 48213. Remember it.\n" + essay[400:900]
    out = pipe(text, questions=QUESTIONS, ratio="auto", predictor=EntropyPredictor(), max_new_tokens=8)
    assert out["predicted"] and out["predictor_version"] == "test-attn-entropy"
    assert 0.0 < out["ratio"] < 1.0 and len(out["answers"]) == len(QUESTIONS)
    for question, ids, answer in zip(QUESTIONS, out["answer_ids"], out["answers"]):
        res = engine.run(text, question, budget=Budget(ratio=out["ratio"]), max_new_tokens=8)
        eos = engine.eos_ids
        assert ids == [t for t in res.token_ids if t not in eos]
        assert answer == res.answer


def test_bad_input_is_refused(pipe):
    from kvcalib.calib.integrations.hf import IntegrationError

    with pytest.raises(IntegrationError, match="question"), torch.no_grad():
        pipe("some context", ratio=0.5)
    with pytest.raises(IntegrationError, match="empty"), torch.no_grad():
        pipe("   ", question="q?", ratio=0.5)
