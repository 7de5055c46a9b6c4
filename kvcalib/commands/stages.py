"""Stages of a long command shown on stderr: a rich status line (spinner) for the stage in progress and one line per
finished stage with its duration; silent under ``--json`` so that stdout stays pure JSON.

``StagedEngine`` is the engine with its pipeline stages (prefill, scoring, compression, decoding) reported as
``Engine.run`` / ``calibrate`` / ``predict`` enter them — the pipeline itself stays in ``calib.pipeline``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import torch
from rich.markup import escape
from rich.status import Status

from kvcalib.calib import defaults
from kvcalib.calib.budget import Budget
from kvcalib.calib.cache.decode import DecodePolicy, Generation
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.capture import Capture
from kvcalib.calib.lm.protocols import LanguageModel
from kvcalib.calib.pipeline import Engine
from kvcalib.calib.scorers import ScoreContext
from kvcalib.commands.common import console


@dataclass
class Stages:
    """``begin(label)`` ends the stage in progress (printing ``✓ label (1.2 s)``) and starts the next one."""

    quiet: bool = False
    prefix: str = ""
    _status: Status | None = field(default=None, init=False, repr=False)
    _label: str | None = field(default=None, init=False)
    _t0: float = field(default=0.0, init=False)

    def __enter__(self) -> Stages:
        if not self.quiet:
            self._status = console.status("", spinner="dots")
            self._status.start()
        return self

    def begin(self, label: str) -> None:
        self.end()
        self._label, self._t0 = self.prefix + label, time.perf_counter()
        if self._status is not None:
            self._status.update(f"{escape(self._label)} …")

    def end(self) -> None:
        if self._label is not None and not self.quiet:
            console.print(f"[green]✓[/] {escape(self._label)} [dim]({time.perf_counter() - self._t0:.1f} s)[/]",
                          soft_wrap=True, highlight=False)
        self._label = None

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        self.begin(label)
        yield
        self.end()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.end()
        self._label = None
        if self._status is not None:
            self._status.stop()
            self._status = None


class StagedEngine(Engine):
    """``Engine`` whose stage methods announce themselves to ``stages`` before they run."""

    def __init__(self, lm: LanguageModel, stages: Stages, score_label: str = "scoring"):
        super().__init__(lm)
        self.stages, self.score_label = stages, score_label

    def capture(self, context_ids: torch.Tensor, compute_nll: bool = False, nll_stride: int = 1) -> Capture:
        self.stages.begin(f"prefill of {context_ids.numel()} tokens")
        return super().capture(context_ids, compute_nll=compute_nll, nll_stride=nll_stride)

    def score_context(self, budget: Budget | None = None) -> ScoreContext:
        self.stages.begin(self.score_label)
        return super().score_context(budget)

    def keep_mask(self, cap: Capture, scores: torch.Tensor, budget: Budget, allocator: str = defaults.ALLOCATOR,
                  **alloc_params: Any) -> torch.Tensor:
        self.stages.begin(f"{allocator} budgets and compression")
        return super().keep_mask(cap, scores, budget, allocator, **alloc_params)

    def answer(self, cache: RaggedKVCache, question_ids: torch.Tensor, max_new_tokens: int = 32,
               policy: DecodePolicy | None = None) -> tuple[str, Generation]:
        self.stages.begin(f"decoding (up to {max_new_tokens} tokens)")
        return super().answer(cache, question_ids, max_new_tokens, policy)


def load_staged_engine(model: str, stages: Stages, score_label: str = "scoring", device: str = "cpu",
                       dtype: str = "fp32") -> StagedEngine:
    """Load ``model`` as the stage ``loading model …`` and wrap it in a ``StagedEngine``."""
    from kvcalib.commands.common import load_engine

    stages.begin(f"loading model {model}")
    eng = load_engine(model, device=device, dtype=dtype)
    stages.end()
    return StagedEngine(eng.lm, stages, score_label)
