"""The pipeline in one place: document → prefill capture → scores → budget allocation → compressed cache → answer.

>>> eng = Engine.load("smollm2-135m")
>>> res = eng.run(context, question, method="compactor", budget=Budget(ratio=0.5))   # allocator: adakv
>>> res.answer, res.cache_report["bytes_held"]

Defaults (model, method, allocator) come from ``calib.defaults``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvcalib.calib import budget as budgets
from kvcalib.calib import defaults
from kvcalib.calib.budget import Budget
from kvcalib.calib.cache.decode import DecodePolicy, Generation, greedy_decode
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.capture import Capture, prefill
from kvcalib.calib.data.documents import Prompt, build_prompt
from kvcalib.calib.lm.protocols import LanguageModel, Tokenizer
from kvcalib.calib.lm.registry import load_model
from kvcalib.calib.scorers import ScoreContext, Scorer, get_scorer


@dataclass
class RunResult:
    answer: str
    token_ids: list[int]
    method: str
    allocator: str
    ratio: float  # achieved compression ratio (1 − kept / full)
    context_tokens: int
    cache_report: dict
    timings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "answer": self.answer,
            "method": self.method,
            "allocator": self.allocator,
            "ratio": round(self.ratio, 4),
            "context_tokens": self.context_tokens,
            "kept_tokens_per_layer": self.cache_report["kept_per_layer"],
            "bytes_held": self.cache_report["bytes_held"],
            "kept_bytes": self.cache_report["kept_bytes"],
            "padding_bytes": self.cache_report["padding_bytes"],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }


class Engine:
    """One loaded model and the pipeline's stages as methods (``run`` chains them); satisfies
    ``calib.calibration.protocols.CalibrationEngine``."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm

    @classmethod
    def load(cls, model: str = defaults.MODEL, device: str = "cpu", cache_dir: Path | None = None,
             dtype: str | torch.dtype = "fp32") -> Engine:
        """``model``: a registry name or a local Hugging Face folder; ``dtype``: fp32 | bf16 | fp16;
        ``device``: cpu | cuda[:N]. Unsupported architectures raise ``UnsupportedModelError`` (a KvcalibError)."""
        return cls(load_model(model, device=device, dtype=dtype, cache_dir=cache_dir))

    @property
    def tokenizer(self) -> Tokenizer:
        return self.lm.tokenizer

    @property
    def eos_ids(self) -> set[int]:
        ids = {self.tokenizer.eos_token_id}
        gen = self.lm.model.generation_config
        if gen is not None and gen.eos_token_id is not None:
            ids |= set(gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id])
        return {i for i in ids if i is not None}

    def prompt(self, context: str, question: str) -> Prompt:
        return build_prompt(self.tokenizer, context, question)

    def capture(self, context_ids: torch.Tensor, compute_nll: bool = False, nll_stride: int = 1) -> Capture:
        return prefill(self.lm, context_ids, compute_nll=compute_nll, nll_stride=nll_stride)

    def score_context(self, budget: Budget | None = None) -> ScoreContext:
        return ScoreContext(lm=self.lm, budget=budget, eos_ids=self.eos_ids)

    @staticmethod
    def scorer(method: str | Scorer, **params) -> Scorer:
        return method if isinstance(method, Scorer) else get_scorer(method, **params)

    def keep_mask(self, cap: Capture, scores: torch.Tensor, budget: Budget, allocator: str = defaults.ALLOCATOR,
                  **alloc_params) -> torch.Tensor:
        """(L, Hkv, N) keep mask of ``scores`` (L, Hkv, N) under ``budget``, spread by ``allocator``."""
        return budgets.allocate(scores, budget, allocator, **alloc_params)

    def answer(self, cache: RaggedKVCache, question_ids: torch.Tensor, max_new_tokens: int = 32,
               policy: DecodePolicy | None = None) -> tuple[str, Generation]:
        gen = greedy_decode(self.lm.model, cache, question_ids, max_new_tokens, self.eos_ids, policy)
        text = self.tokenizer.decode(gen.token_ids, skip_special_tokens=True).strip()
        return text, gen

    def run(self, context: str, question: str, method: str | Scorer = defaults.METHOD, budget: Budget | None = None,
            allocator: str = defaults.ALLOCATOR, max_new_tokens: int = 32, method_params: dict | None = None,
            policy: DecodePolicy | None = None) -> RunResult:
        """Prefill ``context``, score it with ``method``, keep ``budget`` by ``allocator``, answer ``question``."""
        budget = budget or Budget(ratio=0.0)
        scorer = self.scorer(method, **(method_params or {}))
        budgets.check_allocator(allocator)  # fail before the prefill, not after
        prompt = self.prompt(context, question)
        t = {}
        cap = self.capture(prompt.context_ids)
        t["prefill_s"] = cap.prefill_seconds
        t0 = time.perf_counter()
        scores = scorer.score(cap, self.score_context(budget))  # (L, Hkv, N)
        t["score_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        keep = self.keep_mask(cap, scores, budget, allocator)  # (L, Hkv, N)
        cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
        t["compress_s"] = time.perf_counter() - t0
        report = cache.report()
        text, gen = self.answer(cache, prompt.question_ids, max_new_tokens, policy)
        t["decode_s"] = gen.seconds
        n = cap.num_tokens
        ratio = 1.0 - float(keep.float().mean())
        return RunResult(answer=text, token_ids=gen.token_ids, method=scorer.name, allocator=allocator,
                         ratio=ratio, context_tokens=n, cache_report=report, timings=t)
