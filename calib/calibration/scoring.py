"""Capture and score through an engine: the streaming path (scores accumulated inside the prefill,
``calib.scorers.streaming``) when the engine's capture is the plain ``Engine.capture``, else the reference path."""

from __future__ import annotations

import time

import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.pipeline import Engine
from kvcalib.calib.scorers.base import Scorer
from kvcalib.calib.scorers.streaming import StreamedScores, capture_and_score


def engine_capture_and_score(engine, ids: torch.Tensor, scorer: Scorer, budget: Budget | None = None,
                             nll_stride: int = 1, extra_query_positions: torch.Tensor | None = None,
                             streaming: bool = True) -> StreamedScores:
    """Capture (with the NLL) and score through ``engine`` (a ``calib.pipeline.Engine``): streamed when
    ``streaming`` and the engine's ``capture`` is the plain ``Engine.capture``; engines that override it (the
    sweeps' memoised captures, reused by every method; the CLI's staged engine) get the reference path, the full
    capture from ``engine.capture`` and ``scorer.score`` after it (with ``engine.score_context(budget)``, asked
    for after the capture there, as the staged engine announces its stages in that order)."""
    if streaming and getattr(type(engine), "capture", None) is Engine.capture:
        t0 = time.perf_counter()
        out = capture_and_score(engine.lm, ids, scorer, engine.score_context(budget), compute_nll=True,
                                nll_stride=nll_stride, extra_query_positions=extra_query_positions)
        out.prefill_seconds = time.perf_counter() - t0 - out.score_seconds  # with the NLL and the stacking
        return out
    t0 = time.perf_counter()
    cap = engine.capture(ids, compute_nll=True, nll_stride=nll_stride)
    t1 = time.perf_counter()
    scores = scorer.score(cap, engine.score_context(budget))
    return StreamedScores(cap, scores, t1 - t0, time.perf_counter() - t1)
