"""Calibration: one-pass curves equal physically compressed ones, r* refinement, the API contract (real model)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction

import pytest
import torch

from kvcalib.calib.budget import Budget
from kvcalib.calib.cache.ragged import RaggedKVCache, segment_offsets
from kvcalib.calib.calibration import curve as C
from kvcalib.calib.calibration import probes as P
from kvcalib.calib.calibration.calibrate import (
    CalibrationConfig,
    CalibrationResult,
    Prediction,
    budgets_at,
    calibrate,
    context_ids,
    predict,
)
from kvcalib.calib.errors import KvcalibError


@pytest.fixture(scope="module")
def scored(engine, short_capture):
    scores = engine.scorer("compactor").score(short_capture)
    head = int(engine.prompt("", "").context_ids.numel())
    return short_capture, scores, head


@pytest.fixture(scope="module")
def short_text():
    from kvcalib.calib.data.documents import load_essays

    return load_essays()["aord"][:1400]


def _probes(engine, cap, head, with_user=True):
    sep = engine.tokenizer("\n\n", add_special_tokens=False).input_ids  # exercise the separator path
    probes = P.reconstruction_probes(cap.input_ids, head, n_probes=2 if with_user else 3, cue_tokens=6,
                                     probe_tokens=8, seed=0, separator_ids=sep)
    if with_user:
        probes += P.user_probes(engine.tokenizer, [("What is this essay about?", "Startups and money.")])
    return probes


def _assert_same_curve(a: C.Curve, b: C.Curve):
    assert a.ratios == b.ratios
    torch.testing.assert_close(torch.tensor(a.nll_full), torch.tensor(b.nll_full), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(a.nll), torch.tensor(b.nll), atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(a.fidelity), torch.tensor(b.fidelity), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(a.kl), torch.tensor(b.kl), atol=2e-4, rtol=1e-3)


def test_one_pass_rows_equal_physically_compressed_caches_with_probes_fed_one_by_one(engine, scored):
    """Rows: the full reference, uniform at 0.7 and AdaKV at 0.4 (heads keep different counts: padded rows);
    probes: two reconstruction probes and a user probe of another length, packed into one sequence."""
    cap, scores, head = scored
    probes = _probes(engine, cap, head)
    keep = torch.cat([C.keep_masks(scores, (0.7,), "uniform"), C.keep_masks(scores, (0.4,), "adakv",
                                                                              full_row=False)])
    assert keep.shape[0] == 3 and len(set(keep[2].sum(-1).flatten().tolist())) > 1
    nll, kl = C.evaluate_rows(engine.lm, cap.keys, cap.values, keep, probes)
    ref_nll, ref_kl = C.physical_rows(engine.lm, cap.keys, cap.values, keep, probes)
    torch.testing.assert_close(nll, ref_nll, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(kl, ref_kl, atol=2e-4, rtol=1e-3)
    fid = P.fidelity_from_nll(nll[0], nll[1:])
    ref_fid = P.fidelity_from_nll(ref_nll[0], ref_nll[1:])
    torch.testing.assert_close(fid, ref_fid, atol=1e-4, rtol=1e-4)
    assert kl[0] == 0.0 and kl[1] > kl[2] > 0.0  # 0.7 loses more than 0.4
    # the same rows evaluated two at a time (bounded memory) give the same numbers
    nll2, kl2 = C.evaluate_rows(engine.lm, cap.keys, cap.values, keep, probes, max_rows=2)
    torch.testing.assert_close(nll2, nll, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl2, kl, atol=1e-5, rtol=1e-4)


def test_one_pass_curve_packs_the_grid(engine, scored):
    cap, scores, head = scored
    probes = _probes(engine, cap, head, with_user=False)
    c = C.one_pass_curve(engine.lm, cap.keys, cap.values, scores, probes, (0.8, 0.4), "uniform")
    assert c.ratios == [0.4, 0.8] and len(c.fidelity) == len(c.kl) == 2 and len(c.probe_fidelity[0]) == 3
    assert all(0.0 <= f <= 1.0 for f in c.fidelity) and c.kl[1] > c.kl[0] > 0.0
    assert c.kept_fraction[0] == pytest.approx(0.6, abs=0.01) and c.kept_fraction[1] == pytest.approx(0.2, abs=0.01)


def test_packed_forward_leaves_the_cache_unchanged_and_plain_appends_still_work(engine, scored):
    cap, scores, head = scored
    keep = C.keep_masks(scores, (0.5,), "uniform")
    cache = RaggedKVCache.masked(cap.keys, cap.values, keep)
    assert cache.batch_size == 2 and cache.kept_counts()[1].sum() < cache.kept_counts()[0].sum()
    before = (cache.next_position, [l.keys.shape for l in cache.layers])
    packed = P.pack(_probes(engine, cap, head, with_user=False))
    C.packed_hidden(engine.lm, cache, packed)
    assert (cache.next_position, [l.keys.shape for l in cache.layers]) == before and cache.segments is None
    # a masked row and the physically compressed cache give the same next-token logits on ordinary appends
    from kvcalib.calib.cache.decode import forward_tokens

    ids = torch.tensor([[1116, 504, 3275]])
    a = forward_tokens(engine.lm.model, cache, ids.expand(2, -1), all_logits=True)[1]
    b = forward_tokens(engine.lm.model, RaggedKVCache.from_mask(cap.keys, cap.values, keep[1]), ids,
                       all_logits=True)[0]
    torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)


def test_keep_masks_match_the_allocators():
    from kvcalib.calib import budget

    torch.manual_seed(0)
    s = torch.randn(4, 3, 200)
    s[..., :8] = float("inf")
    s[..., 50:90] = 0.25  # ties
    for alloc in ("uniform", "adakv"):
        k = C.keep_masks(s, (0.1, 0.5, 0.95), alloc)
        assert k[0].all()
        for i, r in enumerate((0.1, 0.5, 0.95)):
            assert torch.equal(k[i + 1], budget.allocate(s, budget.Budget(ratio=r), alloc))


def test_coverage_features_match_a_naive_count():
    from kvcalib.calib.calibration.features import coverage_features

    gen = torch.Generator().manual_seed(3)
    ratios = (0.2, 0.5, 0.8)
    keep = torch.rand(3, 2, 3, 40, generator=gen) > torch.tensor(ratios)[:, None, None, None]  # (R, L, H, N)
    f = coverage_features(keep, ratios, doc_start=5, window=6)
    q05 = []
    for i, r in enumerate(ratios):
        cov = [Fraction(sum(bool(keep[i, l, h, p]) for l in range(2) for h in range(3)), 6) for p in range(40)]
        wins = [sum(cov[a:a + 6]) / 6 for a in range(5, 40 - 6 + 1)]  # exact: a window of exactly 1/2 is not < 1/2
        q05.append(float(torch.quantile(torch.tensor([float(w) for w in wins], dtype=torch.float64), 0.05)))
        assert f[f"win_cov_q05_r{r:g}"] == pytest.approx(q05[-1])
        assert f[f"win_cov_lt50_r{r:g}"] == pytest.approx(sum(w < 0.5 for w in wins) / len(wins))
    # crossings: a level is crossed between the grid points that bracket it (linear interpolation from ratio 0)
    for level, name in ((0.7, "win_cov_r70"), (0.5, "win_cov_r50")):
        qs, grid = [1.0, *q05], [0.0, *ratios]
        i = next(j for j in range(1, 4) if qs[j] < level)
        want = grid[i - 1] + (qs[i - 1] - level) / (qs[i - 1] - qs[i]) * (grid[i] - grid[i - 1])
        assert f[name] == pytest.approx(want)
    assert f["win_cov_r70"] <= f["win_cov_r50"]


def test_segment_offsets_and_probe_packing():
    assert segment_offsets(torch.tensor([0, 0, 1, 1, 1, 2])).tolist() == [0, 1, 0, 1, 2, 0]
    p1 = P.Probe(ids=torch.tensor([5, 6, 7, 8]), target_start=2)
    p2 = P.Probe(ids=torch.tensor([9, 10, 11]), target_start=1)
    packed = P.pack([p1, p2])
    assert packed.ids.tolist() == [5, 6, 7, 9, 10]  # each probe's last token is only a target: never fed
    assert packed.segments.tolist() == [0, 0, 0, 1, 1]
    assert packed.pred_index.tolist() == [1, 2, 3, 4] and packed.targets.tolist() == [7, 8, 10, 11]
    assert packed.owner.tolist() == [0, 0, 1, 1]
    with pytest.raises(KvcalibError):
        P.pack([P.Probe(ids=torch.tensor([1, 2]), target_start=2)])


def test_probe_spans_are_deterministic_stratified_and_away_from_the_edges():
    ids = torch.arange(1000)
    a = P.reconstruction_probes(ids, doc_start=40, n_probes=4, cue_tokens=8, probe_tokens=12, seed=3)
    b = P.reconstruction_probes(ids, doc_start=40, n_probes=4, cue_tokens=8, probe_tokens=12, seed=3)
    c = P.reconstruction_probes(ids, doc_start=40, n_probes=4, cue_tokens=8, probe_tokens=12, seed=4)
    starts = [p.meta["start"] for p in a]
    assert starts == [p.meta["start"] for p in b] and starts != [p.meta["start"] for p in c]
    assert starts == sorted(starts) and all(s2 - s1 >= 20 for s1, s2 in zip(starts, starts[1:]))
    assert starts[0] >= 40 + P.EDGE_MARGIN and starts[-1] + 20 <= 1000 - P.EDGE_MARGIN
    for p in a:  # cue then the true continuation of the document
        s = p.meta["start"]
        assert p.ids.tolist() == list(range(s, s + 20)) and p.target_start == 8
    short = P.reconstruction_probes(torch.arange(60), doc_start=30, n_probes=2, cue_tokens=8, probe_tokens=12)
    assert all(30 <= p.meta["start"] and p.meta["start"] + 20 <= 56 for p in short)  # margins shrink, edges kept
    with pytest.raises(KvcalibError, match="too short"):
        P.reconstruction_probes(torch.arange(50), doc_start=30, n_probes=2, cue_tokens=8, probe_tokens=12)


def test_fidelity_is_the_clipped_nll_ratio():
    g = P.fidelity_from_nll(torch.tensor([1.0, 1.0, 0.5, 0.0]), torch.tensor([2.0, 0.5, 0.5, 0.0]))
    assert g.tolist() == [0.5, 1.0, 1.0, 1.0]


# ------------------------------------------------------------------------------------------------ r*
def test_r_star_interpolates_to_the_crossing():
    r, grid, mono = C.largest_safe_ratio([0.1, 0.2, 0.3, 0.4], [0.99, 0.97, 0.93, 0.8], 0.95)
    assert grid == 0.2 and mono
    assert r == pytest.approx(0.2 + (0.97 - 0.95) / (0.97 - 0.93) * 0.1)


def test_r_star_edges():
    assert C.largest_safe_ratio([0.1, 0.5], [0.99, 0.96], 0.95)[:2] == (0.5, 0.5)  # all safe: no extrapolation
    r, grid, _ = C.largest_safe_ratio([0.1, 0.5], [0.9, 0.5], 0.95)  # first grid point already fails
    assert grid == 0.0 and r == pytest.approx(0.05)
    assert C.largest_safe_ratio([0.5, 0.1], [0.5, 0.9], 0.95)[0] == pytest.approx(0.05)  # order-free


def test_non_monotone_curves_are_flagged_and_read_conservatively():
    r, grid, mono = C.largest_safe_ratio([0.1, 0.2, 0.3, 0.4], [0.97, 0.90, 0.98, 0.96], 0.95)
    assert not mono
    assert grid == 0.1 and 0.1 < r < 0.2  # the recovery above τ at 0.3–0.4 is not trusted
    assert C.largest_safe_ratio([0.1, 0.2], [0.97, 0.975], 0.95)[2]  # within tolerance: still monotone
    assert not C.is_monotone([0.9, 0.95])


# ------------------------------------------------------------------------------------------------ config
def test_config_round_trip_hash_and_validation():
    cfg = CalibrationConfig(ratios=(0.5, 0.1), tolerance=0.9, n_probes=2)
    assert cfg.ratios == (0.1, 0.5)
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    back = CalibrationConfig.from_dict(d)
    assert back == cfg and back.params_hash() == cfg.params_hash()
    assert CalibrationConfig(seed=1).params_hash() != CalibrationConfig().params_hash()
    code = ("from kvcalib.calib.calibration.calibrate import CalibrationConfig as C;"
            "print(C(ratios=(0.5, 0.1), tolerance=0.9, n_probes=2).params_hash())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert other == cfg.params_hash()


@pytest.mark.parametrize("d,message", [
    ({"method": "bogus"}, "expected one of"),
    ({"allocator": "bogus"}, "expected one of"),
    ({"ratios": [0.5, 1.0]}, "(0, 1)"),
    ({"ratios": [0.0]}, "(0, 1)"),
    ({"ratios": []}, "at least one"),
    ({"ratios": [0.2, 0.2]}, "distinct"),
    ({"ratios": "0.5"}, "list"),
    ({"tolerance": 1.5}, "tolerance"),
    ({"n_probes": -1}, "n_probes"),
    ({"probe_tokens": 0}, "probe_tokens"),
    ({"method_params": {"nope": 1}}, "unknown parameter"),
    ({"allocator": "adakv", "allocator_params": {"beta": 1}}, "expected ['alpha']"),
    ({"allocator": "uniform", "allocator_params": {"alpha": 0.2}}, "unknown parameter"),
    ({"allocator": "lava", "allocator_params": {"alpha": "0.2"}}, "must be a float"),
    ({"allocator": "adakv", "allocator_params": {"alpha": True}}, "must be a float"),
    ({"allocator_params": [0.2]}, "allocator_params must be an object"),
    ({"colour": "red"}, "unknown calibration field"),
])
def test_bad_config_is_a_kvcalib_error_naming_the_choices(d, message):
    with pytest.raises(KvcalibError, match=None) as exc:
        CalibrationConfig.from_dict(d)
    assert message.lower() in str(exc.value).lower()


def test_config_allocator_params_hash_and_round_trip():
    import hashlib

    plain = CalibrationConfig(fidelity="reconstruction")  # the only fidelity before the field existed
    legacy = {k: v for k, v in plain.to_dict().items()
              if k not in ("allocator_params", "fidelity")}  # a config of before both fields
    blob = json.dumps(legacy, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert plain.to_dict()["allocator_params"] == {}
    assert plain.params_hash() == hashlib.sha256(blob.encode("utf-8")).hexdigest()  # stored keys stay valid
    assert CalibrationConfig.from_dict(legacy, stored=True) == plain  # a stored legacy config reads as it was
    cfg = CalibrationConfig(allocator="adakv", allocator_params={"alpha": 0.4})
    assert cfg.params_hash() != plain.params_hash()
    assert cfg.params_hash() != CalibrationConfig(allocator="adakv", allocator_params={"alpha": 0.3}).params_hash()
    back = CalibrationConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.params_hash() == cfg.params_hash()


def test_allocator_params_reach_the_allocator(engine, scored):
    """``budgets_at`` with allocator parameters equals AdaKV applied directly with them (and differs from the
    default floor when the floor binds)."""
    from kvcalib.calib.budget import adakv

    _, scores, _ = scored
    per_head = Budget(ratio=0.8).per_head(scores.shape[-1])
    for alpha in (0.0, 1.0):
        _, heads = budgets_at(scores, 0.8, "adakv", alpha=alpha)
        assert heads == adakv(scores, per_head, alpha=alpha).sum(-1).tolist()  # (L, Hkv)
    assert budgets_at(scores, 0.8, "adakv", alpha=1.0)[1] != budgets_at(scores, 0.8, "adakv")[1]


# ------------------------------------------------------------------------------------------------ API
def test_calibrate_contract(engine, short_text):
    seen = []
    cfg = CalibrationConfig(ratios=(0.2, 0.5, 0.8), n_probes=2, probe_tokens=8, cue_tokens=6, allocator="uniform",
                            fidelity="reconstruction")  # user probes are reconstruction probes
    res = calibrate(engine, short_text, cfg, progress=lambda f, m: seen.append((f, m)),
                    user_probes=[("What is this essay about?", "Startups.")])
    n = res.context_tokens
    assert res.ratios == [0.2, 0.5, 0.8] and len(res.fidelity) == len(res.kl) == 3
    assert 0.0 <= res.r_star <= 0.8 and isinstance(res.monotone, bool)
    assert len(res.layer_budgets) == 30 and len(res.head_budgets) == 30 and len(res.head_budgets[0]) == 3
    assert res.layer_budgets == [sum(h) for h in res.head_budgets]
    assert res.layer_budgets == [3 * Budget(ratio=res.r_star).per_head(n)] * 30  # uniform allocation at r*
    assert res.features["n_tokens"] == n and "context_nll" in res.features and "mass_kept_r0.5" in res.features
    assert 0.0 <= res.features["win_cov_q05_r0.5"] <= 1.0 and 0.0 <= res.features["win_cov_r50"] <= 0.8
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1][0] == 1.0
    # the kept positions at r* travel beside the record (a server layout needs no second prefill), unserialised
    assert res.keep.shape == (30, 3, n) and res.keep.sum(-1).tolist() == res.head_budgets
    assert res.context_ids.numel() == n and 0 < res.doc_start < n and "keep" not in res.to_dict()
    assert res.ratio == res.r_star and res.controller is None  # no controller: the served ratio is r*
    assert len(res.probe_fidelity) == 3 and len(res.probe_fidelity[0]) == 3  # 2 reconstruction + 1 user
    d = res.to_dict()
    assert json.loads(json.dumps(d)) == d and d["params_hash"] == cfg.params_hash()
    back = CalibrationResult.from_dict(d)
    assert back.r_star == res.r_star and back.config == cfg and back.head_budgets == res.head_budgets
    with pytest.raises(KvcalibError):
        CalibrationResult.from_dict({"config": cfg.to_dict()})


def test_risk_controller_sets_the_served_ratio_and_its_budgets(engine, short_text):
    """With a risk controller over r* (``mode=full``), the result keeps r* and serves ⌊r* − λ⌋_grid — computed here
    by hand — with the budgets and the keep mask at that ratio; a controller fitted for another fidelity or τ, or a
    prefill-only predictor, is refused before any model work."""
    from kvcalib.calib.calibration.calibrate import check_controller
    from kvcalib.calib.predictors.risk import FeaturePredictor, RiskControlPredictor

    cfg = CalibrationConfig(ratios=(0.2, 0.5, 0.8), n_probes=2, probe_tokens=8, cue_tokens=6, allocator="uniform",
                            fidelity="reconstruction", tolerance=0.5)
    ctrl = RiskControlPredictor(FeaturePredictor("r_star_reconstruction", r_max=0.8), 0.05, lam=0.25,
                                grid=cfg.ratios, r_max=0.8)
    ctrl.training = {"config": {"method": cfg.method, "allocator": "uniform", "fidelity": "reconstruction",
                                "fidelity_tau": 0.5, "tolerance": 0.95}}
    res = calibrate(engine, short_text, cfg, controller=ctrl)
    want = max([g for g in cfg.ratios if g <= res.r_star - 0.25 + 1e-9], default=0.0)  # the largest grid ratio ≤
    assert res.ratio == pytest.approx(want) and res.controller == ctrl.version
    n = res.context_tokens
    assert res.layer_budgets == [3 * Budget(ratio=res.ratio).per_head(n)] * 30  # uniform allocation at the ratio
    assert res.keep.sum(-1).tolist() == res.head_budgets
    back = CalibrationResult.from_dict(res.to_dict())
    assert back.ratio == res.ratio and back.controller == ctrl.version and back.r_star == res.r_star
    old = res.to_dict()
    del old["ratio"], old["controller"]  # a record from before the field: it serves r*
    assert CalibrationResult.from_dict(old).ratio == res.r_star
    for field_, value, says in (("fidelity", "salient", "fidelity"), ("fidelity_tau", 0.95, "τ = 0.95"),
                                ("allocator", "adakv", "allocator")):
        bad = RiskControlPredictor(ctrl.base, 0.05, lam=0.25, grid=cfg.ratios, r_max=0.8)
        bad.training = {"config": dict(ctrl.training["config"], **{field_: value})}
        with pytest.raises(KvcalibError, match=says):
            calibrate(engine, "never reaches the model", cfg, controller=bad)
    plain = RiskControlPredictor(ctrl.base, 0.05, lam=0.25, grid=cfg.ratios, r_max=0.8)
    plain.training = {"config": {"method": cfg.method, "allocator": "uniform", "tolerance": 0.95}}
    with pytest.raises(KvcalibError, match="not a risk controller"):
        check_controller(plain, cfg)


def test_predict_featurize_and_budgets(engine, short_text, scored):
    from kvcalib.calib.predictors import ConstantPredictor

    cap, scores, _ = scored
    layers, heads = budgets_at(scores, 0.5, "uniform")
    assert heads == [[-(-cap.num_tokens // 2)] * 3] * 30 and layers == [3 * heads[0][0]] * 30
    assert budgets_at(scores, 0.0, "adakv")[0] == [3 * cap.num_tokens] * 30
    with pytest.raises(KvcalibError):
        budgets_at(scores, 1.0, "uniform")
    cfg = CalibrationConfig(ratios=(0.2, 0.5))
    ids, start = context_ids(engine, short_text)
    assert start > 0 and ids[:start].tolist() == engine.prompt("", "").context_ids.tolist()
    pred = predict(engine, short_text, cfg, ConstantPredictor(0.99))  # clipped to the grid's largest ratio
    assert isinstance(pred, Prediction) and pred.ratio == 0.5 and pred.context_tokens == ids.numel()
    assert pred.token_budget == Budget(ratio=0.5).per_head(ids.numel())
    assert pred.layer_budgets == [3 * pred.token_budget] * 30 and len(pred.head_budgets) == 30
    assert pred.predictor_version.startswith("constant-") and pred.features["n_tokens"] == ids.numel()
    with pytest.raises(KvcalibError, match="empty"):
        calibrate(engine, "   ", cfg)


@pytest.mark.parametrize("fidelity", ["reconstruction", "salient"])
def test_the_curve_stops_at_its_first_failing_ratio_with_the_same_r_star(engine, short_text, monkeypatch, fidelity):
    """By default the probe rows are fed in ascending steps and stop after the step holding the first ratio whose
    fidelity < τ: r*, the budgets and the values of the evaluated ratios equal those of the whole grid, the curve is
    a prefix of it ending there, and fewer rows are fed. ``full_curve=True`` evaluates every ratio."""
    from kvcalib.calib.calibration import curve as CV

    fed = []
    real = CV.packed_hidden

    def counting(lm, cache, packed):
        fed.append(cache.batch_size)
        return real(lm, cache, packed)

    for mod in ("kvcalib.calib.calibration.curve", "kvcalib.calib.calibration.fidelity"):
        monkeypatch.setattr(f"{mod}.packed_hidden", counting)
    ratios = tuple(round(0.1 * i, 1) for i in range(1, 10))
    cfg = CalibrationConfig(ratios=ratios, n_probes=3, allocator="uniform", fidelity=fidelity, tolerance=0.97)
    full = calibrate(engine, short_text, cfg, full_curve=True)
    rows_full, fed[:] = sum(fed), []
    short = calibrate(engine, short_text, cfg)
    rows_short = sum(fed)
    first_fail = next((i for i, f in enumerate(full.fidelity) if f < cfg.tolerance), None)
    assert first_fail is not None and first_fail < 6, full.fidelity  # this document fails early at τ = 0.97
    k = len(short.fidelity)
    assert first_fail < k <= first_fail + CV.STEP and short.ratios == list(ratios[:k])
    assert short.fidelity == pytest.approx(full.fidelity[:k], abs=1e-6)
    assert short.kl == pytest.approx(full.kl[:k], abs=1e-6)
    assert short.r_star == pytest.approx(full.r_star) and short.r_star_grid == full.r_star_grid
    assert short.head_budgets == full.head_budgets
    assert rows_full == len(ratios) + 1 and rows_short == k + 1 < rows_full
    assert CV.row_steps(11, True) == [(0, 4), (4, 7), (7, 10), (10, 11)] and CV.row_steps(11, False) == [(0, 11)]
