"""Fidelity candidates (real SmolLM2, a short document): the packed statistics against the one-pass curve, LongPPL's
key tokens against a naive short-context reference, salient tokens, and ``calibrate`` with a candidate."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F

from kvcalib.calib.budget import Budget
from kvcalib.calib.calibration import fidelity as FD
from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate, context_ids
from kvcalib.calib.calibration.curve import evaluate_rows, keep_masks, one_pass_curve
from kvcalib.calib.calibration.probes import reconstruction_probes

RATIOS = (0.3, 0.7)


@pytest.fixture(scope="module")
def text():
    from kvcalib.calib.data.documents import load_essays

    return load_essays()["hubs"][:1200]


@pytest.fixture(scope="module")
def setup(engine, text):
    ids, start = context_ids(engine, text)
    cap = engine.capture(ids, compute_nll=True)  # every token's NLL (keytoken)
    scores = engine.scorer("compactor").score(cap, engine.score_context(Budget(ratio=0.5)))
    keep = keep_masks(scores, RATIOS, "adakv")
    return cap, scores, keep, start


def test_salient_positions_find_numbers_names_and_rare_words(tokenizer):
    ids = torch.tensor(tokenizer("In 1987 the harbour of Valparaiso was quiet, said the old harbour master.",
                                 add_special_tokens=False).input_ids)
    pos = FD.salient_positions(tokenizer, ids, 0, len(ids))
    words = {tokenizer.decode(ids[p]).strip() for p in pos}
    assert any(w.isdigit() for w in words) and any(w.startswith("Val") for w in words)
    assert "harbour" not in words  # seen twice: not rare


def test_probe_stats_equal_the_one_pass_curve(engine, setup):
    cap, scores, keep, start = setup
    probes = reconstruction_probes(cap.input_ids, start, 4, 4, 6, seed=0)
    stats = FD.probe_stats(engine.lm, cap.keys, cap.values, keep, probes)
    nll, kl = evaluate_rows(engine.lm, cap.keys, cap.values, keep, probes)
    torch.testing.assert_close(stats.nll, nll.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(stats.kl.mean(1), kl.double(), atol=1e-4, rtol=1e-3)  # equal-length probes
    assert torch.all((stats.prefix >= 0) & (stats.prefix <= 1))  # copied spans: top-1 need not be the text
    curves = FD.fidelity_curves(engine, cap, start, keep, ("reconstruction", "kl"), n_probes=4, cue_tokens=4,
                                probe_tokens=6)
    ref = one_pass_curve(engine.lm, cap.keys, cap.values, scores, probes, RATIOS, "adakv", keep=keep)
    assert curves["reconstruction"] == pytest.approx(ref.fidelity, abs=1e-5)
    assert curves["kl"] == pytest.approx([math.exp(-k) for k in ref.kl], rel=1e-3)


def test_the_kl_beside_a_candidate_reads_that_candidate_s_own_probes(engine, setup):
    """``kl_of``: the KL curve over the salient probes' targets, computed by hand from ``probe_stats`` on those
    probes alone; the same whatever other candidates share the forward, and not the reconstruction probes' KL."""
    cap, _, keep, start = setup
    alone = FD.fidelity_curves(engine, cap, start, keep, ("salient",), n_probes=3, kl_of="salient")
    mixed = FD.fidelity_curves(engine, cap, start, keep, ("reconstruction", "kl", "salient"), n_probes=3,
                               kl_of="salient")
    assert set(alone) == {"salient", "kl_of"}
    assert alone["kl_of"] == pytest.approx(mixed["kl_of"], rel=1e-4)
    assert alone["salient"] == pytest.approx(mixed["salient"], abs=1e-5)
    assert alone["kl_of"] != pytest.approx(mixed["kl"], rel=1e-3)
    ids, n = cap.input_ids, cap.input_ids.numel()
    lo, hi = start + FD.EDGE_MARGIN, n - FD.EDGE_MARGIN
    cands = [p for p in FD.salient_positions(engine.tokenizer, ids, lo, hi, 0) if lo + 4 <= p <= hi - 6]
    probes = FD._probes_at(ids, FD._spread(cands, 3, lo, hi), 4, 6, "salient")
    stats = FD.probe_stats(engine.lm, cap.keys, cap.values, keep, probes)
    by_hand = [math.exp(-float(stats.kl[i, :].mean())) for i in range(1, keep.shape[0])]
    assert alone["kl_of"] == pytest.approx(by_hand, rel=1e-4)
    with pytest.raises(ValueError, match="unknown fidelity"):
        FD.fidelity_curves(engine, cap, start, keep, ("salient",), kl_of="nope")


def test_key_tokens_follow_longppl_with_a_naive_short_context(engine, setup):
    cap, _, _, start = setup
    ids = cap.input_ids
    lo = start + FD.EDGE_MARGIN
    short = FD.local_logp(engine.lm, ids, lo)
    n = ids.numel()
    for p in (lo + 1, lo + 20, lo + FD.LOCAL_CHUNK + 30, n - 2):  # naive: the chunk's prefix fed alone
        c = lo + (p - lo) // FD.LOCAL_CHUNK * FD.LOCAL_CHUNK
        with torch.no_grad():
            logits = engine.lm.model(input_ids=ids[c:p].view(1, -1)).logits[0, -1].float()
        assert float(short[p]) == pytest.approx(float(F.log_softmax(logits, -1)[ids[p]]), abs=2e-3)
    assert math.isnan(float(short[lo]))
    keyp = FD.key_token_positions(engine.lm, ids, cap.token_nll, lo, n)
    long_lp = -cap.token_nll.double()
    lsd = [float(long_lp[p - 1] - short[p]) for p in keyp]
    assert all(x > FD.LSD_MIN for x in lsd) and lsd == sorted(lsd, reverse=True)
    assert all(float(long_lp[p - 1]) > FD.LOGP_MIN and (p - lo) % FD.LOCAL_CHUNK >= FD.LOCAL_MIN for p in keyp)


def test_every_candidate_and_calibrate_with_one(engine, setup, text):
    cap, _, keep, start = setup
    avoid = [(start + 40, start + 80)]
    curves = FD.fidelity_curves(engine, cap, start, keep, FD.FIDELITIES, n_probes=3, avoid=avoid)
    assert set(curves) == set(FD.FIDELITIES)
    for name, c in curves.items():
        assert len(c) == len(RATIOS) and all(0.0 <= x <= 1.0 + 1e-9 for x in c), name
    res = calibrate(engine, text, CalibrationConfig(ratios=RATIOS, fidelity="salient", n_probes=3))
    assert res.config.fidelity == "salient" and len(res.fidelity) == len(RATIOS) and len(res.kl) == len(RATIOS)
    assert 0.0 <= res.r_star <= max(RATIOS)
    # the default is the salient spans (§11); the historical reconstruction keeps the hash it had before the field
    assert CalibrationConfig().fidelity == "salient"
    legacy = {k: v for k, v in CalibrationConfig(fidelity="reconstruction").to_dict().items() if k != "fidelity"}
    assert CalibrationConfig.from_dict(legacy, stored=True).fidelity == "reconstruction"
    assert CalibrationConfig.from_dict(legacy).fidelity == "salient"  # a new request takes today's default
    old_hash = hashlib.sha256(json.dumps({k: v for k, v in legacy.items() if k != "allocator_params" or v},
                                         sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert CalibrationConfig(fidelity="reconstruction").params_hash() == old_hash
    assert CalibrationConfig().params_hash() != old_hash
