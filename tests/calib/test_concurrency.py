"""Concurrent model calls on ONE shared model (issue 13, item 1): prefill captures, compress-and-answer runs and
calibrations started at the same time from ≥ 8 threads give byte-identical results to the same calls run one after
another. Every document has the SAME token length, so a call that read another call's activations would not fail
on a shape: it would silently return wrong data, which these tests catch by exact comparison.

Also: the capture hooks are installed once per model (no hook is registered per call), a call that fails leaves no
recorder active, and a forward outside a capture records nothing.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.cache.morphkv import MorphKV
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate, context_ids
from tests.support import equal_length_documents, run_threads

N_THREADS = 8
TOKENS = 224  # context tokens of every document (chat header + document)


def forward_hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def texts(engine):
    return equal_length_documents(engine, N_THREADS, TOKENS)


@pytest.fixture(scope="module")
def contexts(engine, texts):
    ids = [context_ids(engine, t)[0] for t in texts]
    assert len({int(i.numel()) for i in ids}) == 1 and len({tuple(i.tolist()) for i in ids}) == N_THREADS
    return ids


def _capture_fields(cap) -> dict[str, torch.Tensor]:
    return {"keys": cap.keys, "values": cap.values, "keys_pre": cap.keys_pre, "queries": cap.queries,
            "last_logits": cap.last_logits, "token_nll": cap.token_nll}


def _assert_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(got[k], v), f"{what}: {k} differs from the sequential result"
        else:
            assert got[k] == v, f"{what}: {k} differs from the sequential result"


def test_concurrent_prefill_captures_equal_sequential_ones(engine, contexts):
    def capture(ids):
        return _capture_fields(engine.capture(ids, compute_nll=True, nll_stride=4))

    sequential = [capture(ids) for ids in contexts]
    hooks = forward_hook_count(engine.lm.model)
    concurrent = run_threads(capture, [(ids,) for ids in contexts])
    assert forward_hook_count(engine.lm.model) == hooks  # nothing registered (or left behind) per call
    for i, (got, want) in enumerate(zip(concurrent, sequential)):
        _assert_identical(got, want, f"capture {i}")


# method, allocator, decode policy of each compress-and-answer thread (cycled)
RUNS = [("compactor", "uniform", None), ("lookahead", "uniform", None), ("snapkv", "adakv", None),
        ("compactor", "adakv", "morphkv")]


def _compress_and_answer(engine, ids: torch.Tensor, question: torch.Tensor, run: tuple) -> dict:
    method, allocator, policy_name = run
    budget = Budget(ratio=0.5)
    cap = engine.capture(ids)
    scores = engine.scorer(method).score(cap, engine.score_context(budget))  # (L, Hkv, N)
    keep = engine.keep_mask(cap, scores, budget, allocator)  # (L, Hkv, N)
    cache = RaggedKVCache.from_mask(cap.keys, cap.values, keep)
    policy = MorphKV(budget=48, recent=8) if policy_name else None
    text, gen = engine.answer(cache, question, max_new_tokens=6, policy=policy)
    out = {"scores": scores, "keep": keep, "answer": text, "tokens": gen.token_ids}
    if policy is not None:
        out["policy"] = policy.report()
    return out


def test_concurrent_compress_and_answer_equal_sequential_runs(engine, texts, contexts):
    """Eight score → allocate → compress → decode runs (Compactor, Lookahead's draft decoding, SnapKV/AdaKV,
    Compactor with MorphKV eviction while decoding) plus two ``Engine.run`` calls, all at once."""
    question = engine.prompt("", "What is this text about?").question_ids
    args = [(engine, ids, question, RUNS[i % len(RUNS)]) for i, ids in enumerate(contexts)]
    sequential = [_compress_and_answer(*a) for a in args]

    def engine_run(text):
        r = engine.run(text, "Summarise the text.", method="compactor", budget=Budget(ratio=0.6),
                       max_new_tokens=6).to_json()
        r.pop("timings")
        return r

    sequential_runs = [engine_run(t) for t in texts[:2]]
    jobs = [(_compress_and_answer, a) for a in args] + [(engine_run, (t,)) for t in texts[:2]]
    concurrent = run_threads(lambda fn, a: fn(*a), jobs)
    for i, (got, want) in enumerate(zip(concurrent, sequential)):
        _assert_identical(got, want, f"run {i} ({RUNS[i % len(RUNS)]})")
    assert concurrent[len(args):] == sequential_runs
    assert sequential[3]["policy"]["evictions"] > 0  # MorphKV really evicted while the others decoded


def _calibration(engine, text: str) -> dict:
    config = CalibrationConfig(method="compactor", ratios=(0.3, 0.6, 0.9), n_probes=2)
    d = calibrate(engine, text, config).to_dict()
    d.pop("seconds"), d.pop("timings")
    return d


def test_concurrent_calibrations_equal_sequential_ones_in_a_thread_pool(engine, texts):
    """Calibrations (prefill, scores, features, packed probe forward) in a ThreadPoolExecutor whose 4 workers each
    run two calls in turn (a worker thread reuses its context: nothing of a finished call may linger)."""
    sequential = [_calibration(engine, t) for t in texts]
    with ThreadPoolExecutor(max_workers=N_THREADS // 2) as pool:
        concurrent = list(pool.map(lambda t: _calibration(engine, t), texts))
    for i, (got, want) in enumerate(zip(concurrent, sequential)):
        assert got == want, f"calibration {i} differs from the sequential one"
    assert len({d["content_hash"] for d in concurrent}) == N_THREADS


def test_capture_hooks_are_installed_once_and_inactive_outside_a_capture(engine, contexts):
    from kvcalib.calib.lm.hooks import active_recorder

    model = engine.lm.model
    engine.capture(contexts[0][:16])  # any hooks transformers installs lazily on a first forward are in place
    hooks = forward_hook_count(model)
    with pytest.raises(IndexError):  # a failing forward (token id beyond the vocabulary) ...
        engine.capture(torch.tensor([0, 10**9]))
    assert active_recorder() is None  # ... leaves no recorder behind
    with torch.no_grad():  # a plain forward outside any capture records nothing and still works
        out = model.get_decoder()(input_ids=contexts[0][None, :8], use_cache=False)
    assert out.last_hidden_state.shape[:2] == (1, 8)
    engine.capture(contexts[0][:16])
    assert forward_hook_count(model) == hooks
