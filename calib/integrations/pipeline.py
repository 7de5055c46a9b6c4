"""The ``kv-calib-qa`` transformers pipeline (issue 17, item 2), registered as kvpress registers its own.

>>> import kvcalib.calib.integrations.pipeline            # registers the task
>>> from transformers import pipeline
>>> pipe = pipeline("kv-calib-qa", model=model, tokenizer=tok)
>>> pipe(context, questions=["What is the passkey?", "Who wrote it?"], ratio="auto")
{"answers": [...], "answer": "...", "ratio": 0.3, "context_tokens": 812, "kv_bytes_held": ..., ...}

The context is prefilled once under ``compress`` (``calib.integrations.hf``: scored, allocated and compressed inside
that forward; ``ratio="auto"`` predicts from it), then every question is answered from the same compressed cache
through the model's own forward (greedy), the cache put back (``RaggedKVCache.snapshot`` / ``restore``) between
questions. The prompt layout is kvcalib's (``build_prompt``: chat header + document | question + assistant turn).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from kvcalib.calib import defaults
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.data.documents import build_prompt
from kvcalib.calib.integrations.hf import IntegrationError, compress, new_cache

TASK = "kv-calib-qa"


@torch.no_grad()
def answer_from_cache(model: torch.nn.Module, cache: RaggedKVCache, question_ids: torch.Tensor, max_new_tokens: int,
                      eos_ids: set[int]) -> list[int]:
    """Greedy tokens (EOS excluded) after ``question_ids`` (q,), through the model's own forward with the kvcalib
    cache as ``past_key_values``; the cache is put back as it was afterwards."""
    state = cache.snapshot()
    device = next(model.parameters()).device
    try:
        out = model(question_ids.to(device)[None], past_key_values=cache)
        tokens: list[int] = []
        for _ in range(max_new_tokens):
            tok = int(out.logits[0, -1].argmax())
            if tok in eos_ids:
                break
            tokens.append(tok)
            out = model(torch.tensor([[tok]], device=device), past_key_values=cache)
        return tokens
    finally:
        cache.restore(state)


def eos_ids(model: torch.nn.Module, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen if isinstance(gen, list) else [gen])
    return {i for i in ids if i is not None}


class KvcalibQAPipeline(Pipeline):
    """Context + one or more questions over one kvcalib-compressed cache (``ratio``: a number or ``"auto"``)."""

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = True

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None,
                             ratio: float | str | None = None, method: str | None = None,
                             allocator: str | None = None, tolerance: float | None = None, predictor: Any = None,
                             max_new_tokens: int | None = None, **kwargs: Any):
        qs = list(questions or []) + ([question] if question is not None else [])
        pre = {"questions": qs}
        fwd = {"ratio": 0.5 if ratio is None else ratio, "method": method or defaults.METHOD,
               "allocator": allocator or defaults.ALLOCATOR,
               "tolerance": defaults.TOLERANCE if tolerance is None else tolerance, "predictor": predictor,
               "max_new_tokens": 32 if max_new_tokens is None else int(max_new_tokens)}
        return pre, fwd, {}

    def preprocess(self, context: str, questions: list[str] = ()) -> dict:
        if not isinstance(context, str) or not context.strip():
            raise IntegrationError("kv-calib-qa: the context is empty")
        if not questions:
            raise IntegrationError("kv-calib-qa: give question= or questions=[...]")
        prompts = [build_prompt(self.tokenizer, context, q) for q in questions]
        return {"context": context, "context_ids": prompts[0].context_ids,
                "question_ids": [p.question_ids for p in prompts]}

    def _forward(self, inputs: dict, ratio: float | str = 0.5, method: str = defaults.METHOD,
                 allocator: str = defaults.ALLOCATOR, tolerance: float = defaults.TOLERANCE, predictor: Any = None,
                 max_new_tokens: int = 32) -> dict:
        model = self.model
        cache = new_cache()
        with compress(model, method=method, allocator=allocator, ratio=ratio, tolerance=tolerance,
                      tokenizer=self.tokenizer, text=inputs["context"], predictor=predictor) as press:
            model(inputs["context_ids"].to(next(model.parameters()).device)[None], past_key_values=cache)
        eos = eos_ids(model, self.tokenizer)
        answers = [answer_from_cache(model, cache, q, max_new_tokens, eos) for q in inputs["question_ids"]]
        return {"answer_ids": answers, "outcome": press.outcome}

    def postprocess(self, outputs: dict) -> dict:
        answers = [self.tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in outputs["answer_ids"]]
        return {"answers": answers, "answer": answers[0], "answer_ids": outputs["answer_ids"],
                **outputs["outcome"].to_json()}


def register() -> None:
    """Register the ``kv-calib-qa`` task with transformers' pipeline registry (idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=KvcalibQAPipeline, pt_model=AutoModelForCausalLM)


register()
