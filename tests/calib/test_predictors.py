"""Predictors of r*: Compactor's parametric curve, quantile boosting as JSON trees, split-conformal coverage,
persistence without pickle, splits and the global-ratio baseline (synthetic data, no model)."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest

from kvcalib.calib import predictors as P
from kvcalib.calib.data.corpus import split_labels
from kvcalib.calib.errors import KvcalibError
from kvcalib.calib.predictors import evaluate_predictors

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def test_compactor_curve_in_retention_and_its_inverse():
    rho = np.linspace(0, 1, 11)
    for b in (-8.0, -1.0, 0.0, 2.0):
        f = P.compactor_curve(rho, b)
        assert f[0] == pytest.approx(0.0, abs=1e-12) and f[-1] == pytest.approx(1.0)
        assert np.all(np.diff(f) > 0)
        # the paper's form (e^{b(ρ−1)} − e^{−b}) / (1 − e^{−b})
        if b != 0:
            paper = (np.exp(b * (rho - 1)) - np.exp(-b)) / (1 - np.exp(-b))
            np.testing.assert_allclose(f, paper, rtol=1e-9, atol=1e-12)
        r = P.retention_for(b, 0.95)
        assert P.compactor_curve(r, b) == pytest.approx(0.95)
    assert P.retention_for(0.0, 0.9) == pytest.approx(0.9)  # b = 0: the diagonal
    # compression ratio = 1 − retention
    par = P.ParametricPredictor(alpha=0.0, beta=-6.0, tau=0.95)
    r_hat = par.ratio_for_nll(3.0)
    assert par.fidelity(3.0, r_hat) == pytest.approx(0.95)
    assert r_hat == pytest.approx(1.0 - P.retention_for(-6.0, 0.95))


def test_parametric_fit_recovers_known_alpha_beta():
    rng = np.random.default_rng(0)
    alpha, beta = -5.0, 9.0
    nll = rng.uniform(2.5, 3.6, 40)
    fid = [P.compactor_curve(1.0 - np.array(GRID), alpha * v + beta).tolist() for v in nll]
    par = P.ParametricPredictor(tau=0.95).fit(nll, [GRID] * len(nll), fid)
    assert par.alpha == pytest.approx(alpha, rel=1e-3, abs=1e-3)
    assert par.beta == pytest.approx(beta, rel=1e-3, abs=1e-3)
    feats = [{"context_nll": float(v)} for v in nll[:5]]
    np.testing.assert_allclose(par.predict(feats), np.clip(1.0 - P.retention_for(alpha * nll[:5] + beta, 0.95),
                                                           0, 0.95), atol=1e-3)


def test_parametric_asymmetric_loss_prefers_under_predicting_fidelity():
    rng = np.random.default_rng(1)
    nll = rng.uniform(2.5, 3.6, 60)
    fid = [np.clip(P.compactor_curve(1.0 - np.array(GRID), -4.0 * v + 6.0) + rng.normal(0, 0.03, len(GRID)),
                   0, 1).tolist() for v in nll]
    sym = P.ParametricPredictor(over_weight=1.0).fit(nll, [GRID] * 60, fid)
    asym = P.ParametricPredictor(over_weight=8.0).fit(nll, [GRID] * 60, fid)
    over = lambda p: np.mean([np.mean(p.fidelity(v, GRID) > f) for v, f in zip(nll, fid)])  # noqa: E731
    assert over(asym) < over(sym) < 0.65
    feats = [{"context_nll": float(v)} for v in nll]
    assert np.all(asym.predict(feats) <= sym.predict(feats) + 1e-9)  # more cautious ratios


def _synthetic(n, rng, noise=0.03):
    feats, y = [], []
    for _ in range(n):
        a, b = rng.normal(), rng.normal()
        feats.append({"a": float(a), "b": float(b), "context_nll": 3.0 + 0.1 * float(b)})
        y.append(float(np.clip(0.3 + 0.08 * a + noise * rng.normal() * (1.5 + np.tanh(b)), 0, 0.95)))
    return feats, np.array(y)


def test_gbm_json_trees_reproduce_sklearn_exactly():
    rng = np.random.default_rng(2)
    feats, y = _synthetic(150, rng)
    g = P.QuantileGBMPredictor(quantile=0.1).fit(feats, y, seed=0)
    x = P.feature_matrix(feats, g.feature_names, g.fill)
    np.testing.assert_allclose(g.raw_predict(x), g.sklearn_model.predict(x), rtol=0, atol=1e-12)
    assert g.feature_names == ["a", "b", "context_nll"]
    # missing features fall back to the training medians
    assert np.isfinite(g.predict([{"a": 0.1}])).all()


def test_conformal_lower_bound_coverage_over_many_seeds():
    """Exchangeable synthetic data: P(r̂ > r*) ≤ α on average over splits (split-conformal guarantee)."""
    alpha, rates = 0.1, []
    for seed in range(300):
        rng = np.random.default_rng(seed)
        y_cal = np.clip(0.3 + 0.1 * rng.standard_normal(40), 0, 0.95)
        y_test = np.clip(0.3 + 0.1 * rng.standard_normal(200), 0, 0.95)
        c = P.ConformalPredictor(P.ConstantPredictor(0.3), alpha).calibrate([{}] * 40, y_cal)
        rates.append(np.mean(c.predict([{}] * 200) > y_test))
    assert np.mean(rates) <= alpha + 0.01
    # with a learned base (fewer seeds: boosting is slower)
    rates = []
    for seed in range(12):
        rng = np.random.default_rng(1000 + seed)
        f_tr, y_tr = _synthetic(80, rng)
        f_cal, y_cal = _synthetic(60, rng)
        f_te, y_te = _synthetic(300, rng)
        g = P.QuantileGBMPredictor(quantile=alpha, hyper={"n_estimators": 60}).fit(f_tr, y_tr, seed=seed)
        c = P.ConformalPredictor(g, alpha).calibrate(f_cal, y_cal)
        rates.append(np.mean(c.predict(f_te) > y_te))
    assert np.mean(rates) <= alpha + 0.04


def test_conformal_quantile_and_too_few_points():
    assert P.conformal_quantile([0.1, 0.2, 0.3, 0.4], 0.2) == 0.4  # ⌈5·0.8⌉ = 4th smallest
    assert P.conformal_quantile([0.3, 0.1], 0.5) == 0.3  # ⌈3·0.5⌉ = 2nd
    assert math.isinf(P.conformal_quantile([0.1, 0.2], 0.1))  # ⌈3·0.9⌉ = 3 > 2
    c = P.ConformalPredictor(P.ConstantPredictor(0.5), 0.1).calibrate([{}, {}], [0.2, 0.3])
    assert c.predict([{}]).tolist() == [0.0]  # not enough evidence: never compress


def test_save_load_round_trip_is_json_and_never_unpickles(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    feats, y = _synthetic(120, rng)
    train = [{"features": f, "r_star": float(v), "ratios": GRID, "fidelity": [1.0] * 10,
              "config": {"tolerance": 0.95, "method": "compactor", "allocator": "uniform"},
              "content_hash": f"h{i}", "doc_id": f"g{i % 30}#{i}"} for i, (f, v) in enumerate(zip(feats, y))]
    preds = P.fit_predictors(train[:70], train[70:], alpha=0.1, seed=0)
    assert set(preds) == {"parametric", "parametric_conformal", "gbm", "conformal", "conformal_median", "global"}
    P.save_predictors(tmp_path, preds, extra={"note": "test"})
    for f in tmp_path.iterdir():
        json.loads(f.read_text())  # every artefact is plain JSON

    def no_pickle(*a, **k):
        raise AssertionError("pickle used while loading a predictor")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    loaded = P.load_predictors(tmp_path)
    for name, p in preds.items():
        q = loaded[name]
        assert q.version == p.version and q.kind == p.kind and q.metrics == json.loads(json.dumps(p.metrics))
        np.testing.assert_allclose(q.predict(feats), p.predict(feats), rtol=0, atol=1e-12)
    assert P.load_predictor(tmp_path).kind == "conformal"  # the manifest's default
    assert P.load_predictor(tmp_path / "gbm.json").version == preds["gbm"].version
    assert preds["conformal"].training_config()["method"] == "compactor"
    ver = preds["gbm"].version.split("-")
    assert ver[0] == "gbm_quantile" and len(ver[1]) == 12 and ver[2].endswith("Z")


def test_tampered_or_foreign_predictor_files_are_refused(tmp_path):
    p = P.ConformalPredictor(P.ConstantPredictor(0.3), 0.1).calibrate([{}] * 30, np.linspace(0.1, 0.5, 30))
    P.save_predictors(tmp_path, {"conformal": p})
    path = tmp_path / "conformal.json"
    d = json.loads(path.read_text())
    d["params"]["offset"] = -0.5  # would silently raise every ratio
    path.write_text(json.dumps(d))
    with pytest.raises(KvcalibError, match="hash"):
        P.load_predictor(tmp_path)
    for bad in ({"format": "other"}, {**d, "kind": "os.system"}, {**d, "format_version": 99}):
        path.write_text(json.dumps(bad))
        with pytest.raises(KvcalibError):
            P.load_predictor(path)
    path.write_text("\x80not json")
    with pytest.raises(KvcalibError):
        P.load_predictor(path)
    with pytest.raises(KvcalibError, match="does not exist"):
        P.load_predictor(tmp_path / "missing.json")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KvcalibError, match="manifest"):
        P.load_predictor(empty)


def test_best_global_ratio_and_metrics():
    y = np.array([0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert P.best_global_ratio(y, 0.0) == 0.05
    assert P.best_global_ratio(y, 0.1) == 0.1 and np.mean(0.1 > y) == 0.1
    assert P.best_global_ratio(y, 0.25) == 0.2
    m = P.violation_metrics([0.1, 0.5], [0.2, 0.4])
    assert m["violation_rate"] == 0.5 and m["mean_ratio"] == pytest.approx(0.3)
    assert m["mean_abs_error"] == pytest.approx(0.1) and m["mean_safe_ratio"] == pytest.approx(0.05)


def test_evaluation_compares_with_the_best_global_ratio():
    labels = [{"features": {"a": float(v)}, "r_star": float(v)} for v in np.linspace(0.05, 0.5, 20)]
    class Exact(P.Predictor):
        kind = "constant"

        def params(self):
            return {"ratio": 0.0}

        def predict(self, features):
            return np.array([f["a"] for f in features])

    rep = evaluate_predictors({"exact": Exact(), "zero": P.ConstantPredictor(0.0)}, labels, 0.1)
    assert rep["predictors"]["exact"]["violation_rate"] == 0.0
    assert rep["predictors"]["exact"]["best_global_ratio"] == pytest.approx(0.05)
    assert rep["predictors"]["exact"]["beats_best_global"]
    assert not rep["predictors"]["zero"]["beats_best_global"]


def test_split_by_group_is_disjoint_and_seeded():
    labels = [{"content_hash": f"h{i}", "doc_id": f"essay{i // 3}#{i % 3}"} for i in range(60)]
    tr, cal, te = split_labels(labels, seed=0)
    groups = [{r["doc_id"].split("#")[0] for r in part} for part in (tr, cal, te)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert len(tr) + len(cal) + len(te) == 60 and 24 <= len(tr) <= 36 and cal and te
    again = split_labels(labels, seed=0)
    assert [r["content_hash"] for r in again[2]] == [r["content_hash"] for r in te]
    assert [r["content_hash"] for r in split_labels(labels, seed=1)[2]] != [r["content_hash"] for r in te]
    with pytest.raises(KvcalibError):
        split_labels(labels[:2])


def test_conformal_refit_is_reproducible_and_older_files_still_load():
    """The content hash of a conformal predictor covers parameters, not the base's fitting time (refitting the same
    labels gives the same hash); a file of an earlier version, whose hash covered that time, still verifies."""
    import hashlib
    import time

    feats = [{"x": float(i)} for i in range(30)]
    y = np.linspace(0.1, 0.8, 30)

    def fit():
        base = P.QuantileGBMPredictor(quantile=0.5).fit(feats, y, seed=0, feature_names=["x"])
        return P.ConformalPredictor(base, 0.1).calibrate(feats, y)

    a = fit()
    time.sleep(1.1)  # another fitting second
    b = fit()
    assert a.base.created != b.base.created and a.content_hash() == b.content_hash()
    old = a.to_json()
    old["params"]["base"]["created"] = "20250101T000000Z"
    old["content_hash"] = hashlib.sha256(json.dumps({"kind": "conformal", "params": old["params"]}, sort_keys=True,
                                                    separators=(",", ":")).encode()).hexdigest()
    again = P.predictor_from_json(old)
    assert again.base.created == "20250101T000000Z" and np.array_equal(again.predict(feats), a.predict(feats))
    tampered = dict(old, params=dict(old["params"], alpha=0.2))
    with pytest.raises(Exception, match="content hash"):
        P.predictor_from_json(tampered)
