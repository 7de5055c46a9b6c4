"""Conformal risk control (Angelopoulos et al. 2024): λ̂ against a naive reading of the formula, the guarantee
E[loss] ≤ ε on synthetic exchangeable contexts, persistence, and the predictors fitted on task truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvcalib.calib.predictors import (
    ConstantPredictor,
    QuantileGBMPredictor,
    load_predictor,
    predictor_from_json,
    save_predictors,
)
from kvcalib.calib.predictors.risk import (
    FeaturePredictor,
    LinearPredictor,
    RiskControlPredictor,
    crc_lambda,
    fit_truth_predictors,
    lambda_grid,
    loss_at,
    snap_to_grid,
)

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def _contexts(rng: np.random.Generator, n: int, k: int = 5):
    """Synthetic contexts: a feature x, and k questions each lost beyond a threshold near 0.2 + 0.6·x."""
    x = rng.uniform(0, 1, n)
    thr = np.clip(0.2 + 0.6 * x[:, None] + rng.normal(0, 0.12, (n, k)), 0.0, 1.0)  # (n, k)
    lost = np.array(GRID)[None, None, :] >= thr[:, :, None]  # (n, k, R): monotone per question
    losses = lost.mean(1)  # (n, R)
    r_star = np.array([max([0.0] + [g for g, l in zip(GRID, row) if l == 0 and all(
        ll == 0 for gg, ll in zip(GRID, row) if gg <= g)]) for row in losses])
    feats = [{"x": float(v)} for v in x]
    return feats, losses, r_star


def _naive_lambda(base, losses, eps):
    n = len(base)
    for lam in lambda_grid(0.95):
        total = 0.0
        for b, curve in zip(base, losses):
            r = min(max(b - lam, 0.0), 0.95)
            ell = 0.0
            for g, l in zip(GRID, curve):  # the loss of the largest grid ratio <= r
                if g <= r + 1e-9:
                    ell = l
            total += ell
        if n / (n + 1) * (total / n) + 1 / (n + 1) <= eps:
            return lam
    return math.inf


def test_snap_and_loss_lookup():
    assert snap_to_grid([0.05, 0.1, 0.34, 0.96, 0.0], GRID).tolist() == [0.0, 0.1, 0.3, 0.95, 0.0]
    losses = np.array([[0.0] * 5 + [0.5] * 5, [0.2] * 10])
    assert loss_at(GRID, losses, [0.65, 0.05]).tolist() == [0.5, 0.0]
    assert loss_at(GRID, losses, [0.55, 0.05]).tolist() == [0.0, 0.0]
    assert loss_at(GRID, losses, [0.4, 0.1]).tolist() == [0.0, 0.2]


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
def test_crc_lambda_is_the_formula(eps):
    rng = np.random.default_rng(3)
    feats, losses, _ = _contexts(rng, 60)
    base = np.array([f["x"] for f in feats]) * 0.9
    assert crc_lambda(base, GRID, losses, eps) == pytest.approx(_naive_lambda(base, losses, eps))


def test_too_few_calibration_points_never_compress():
    rng = np.random.default_rng(0)
    feats, losses, _ = _contexts(rng, 10)  # B/(n+1) = 1/11 > 0.05
    p = RiskControlPredictor(ConstantPredictor(0.5), 0.05).calibrate(feats, GRID, losses)
    assert math.isinf(p.lam) and p.predict(feats).tolist() == [0.0] * 10


def test_expected_loss_is_controlled_over_many_draws():
    """E over calibration draws and new contexts of the realised loss ≤ ε (Theorem 1), on a base that ranks the
    contexts (the feature) — and the recommended ratios are document-dependent."""
    eps, realised, ratios = 0.1, [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        feats, losses, _ = _contexts(rng, 120)
        base = ConstantPredictor(0.0)
        p = RiskControlPredictor(base, eps)
        p.base = _Feature()
        p.calibrate(feats[:60], GRID, losses[:60])
        pred = p.predict(feats[60:])
        realised.append(loss_at(GRID, losses[60:], pred).mean())
        ratios.append(pred.std())
    assert np.mean(realised) <= eps + 0.005
    assert np.mean(realised) >= eps - 0.05  # not vacuous
    assert np.mean(ratios) > 0.05


class _Feature(ConstantPredictor):
    """A base that predicts the feature itself (for the guarantee test)."""

    def predict(self, features):
        return np.array([f["x"] for f in features])


def _records(rng, n, start=0):
    feats, losses, r_star = _contexts(rng, n)
    out = []
    for i, (f, l, r) in enumerate(zip(feats, losses, r_star)):
        f = dict(f, noise=float(rng.normal()))
        out.append({"id": f"doc{start + i}", "features": f, "ratios": GRID, "loss": l.tolist(),
                    "r_star_task": float(r), "config": {"method": "compactor", "allocator": "adakv"}})
    return out


def test_fit_truth_predictors_and_json_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    train, cal, test = _records(rng, 80), _records(rng, 80, 80), _records(rng, 200, 160)
    preds = fit_truth_predictors(train, cal, epsilon=0.1, alpha=0.1)
    assert set(preds) == {"risk", "risk_global", "conformal", "global"}
    risk = preds["risk"]
    assert isinstance(risk.base, QuantileGBMPredictor) and risk.training["target"] == "task_truth"
    # ε answers requests at τ = 1 − ε (what the service matches a predictor on)
    assert risk.training_config() == {"method": "compactor", "allocator": "adakv", "tolerance": 0.9}
    f_te = [r["features"] for r in test]
    l_te = np.array([r["loss"] for r in test])
    pr, pg = risk.predict(f_te), preds["risk_global"].predict(f_te)
    assert set(pr.tolist()) <= set(GRID) | {0.0} and len(set(pr.tolist())) > 2  # grid ratios, document-dependent
    assert loss_at(GRID, l_te, pr).mean() <= 0.15 and pr.mean() > pg.mean()  # the feature pays off
    save_predictors(tmp_path, preds)
    again = load_predictor(tmp_path, "risk")
    assert isinstance(again, RiskControlPredictor) and again.version == risk.version
    assert np.array_equal(again.predict(f_te), pr)
    d = risk.to_json()
    d["params"]["lambda"] = 0.0
    with pytest.raises(Exception, match="content hash"):
        predictor_from_json(d)


def test_linear_predictor_is_ridge_on_standardised_features():
    """Against the closed form written out: z = (x − μ)/σ, w = (ZᵀZ + λI)⁻¹ Zᵀ(y − ȳ), ŷ = clip(z·w + ȳ)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(40, 2)) * [2.0, 0.5] + [1.0, -3.0]
    y = np.clip(0.4 + 0.1 * x[:, 0] - 0.05 * x[:, 1] + rng.normal(0, 0.02, 40), 0, 0.95)
    feats = [{"a": float(a), "b": float(b)} for a, b in x]
    m = LinearPredictor(["a", "b"], ridge=2.0).fit(feats, y)
    mu, sd = x.mean(0), x.std(0)
    z = (x - mu) / sd
    w = np.linalg.inv(z.T @ z + 2.0 * np.eye(2)) @ z.T @ (y - y.mean())
    want = np.clip(z @ w + y.mean(), 0.0, 0.95)
    assert np.allclose(m.predict(feats), want)
    gap = m.predict([{"a": 1.0}])  # a missing feature takes the training median
    assert np.allclose(gap, np.clip(((np.array([1.0, np.median(x[:, 1])]) - mu) / sd) @ w + y.mean(), 0, 0.95))
    again = predictor_from_json(m.to_json())
    assert np.array_equal(again.predict(feats), m.predict(feats))
    with pytest.raises(Exception, match="at least two"):
        LinearPredictor(["a"]).fit(feats[:1], y[:1])


def test_risk_control_over_a_feature_matches_the_formula():
    """Base = one feature (e.g. the calibration's own r*): λ̂ as the naive search over Λ computes it, and the
    predictor survives a JSON round trip."""
    rng = np.random.default_rng(5)
    feats, losses, _ = _contexts(rng, 120)
    base = FeaturePredictor("x", r_max=0.95)
    assert np.allclose(base.predict(feats), np.clip([f["x"] for f in feats], 0, 0.95))
    assert base.predict([{}]).tolist() == [0.0]  # a missing feature never compresses
    p = RiskControlPredictor(base, 0.1, r_max=0.95).calibrate(feats, GRID, losses)
    assert p.lam == pytest.approx(_naive_lambda(base.predict(feats), losses, 0.1))
    again = predictor_from_json(p.to_json())
    assert np.array_equal(again.predict(feats), p.predict(feats)) and again.base.name == "x"


def test_full_mode_predictors_calibrate_over_every_record():
    """Records with the calibration's own r* per fidelity (``fidelity_r_star``) give one ``full_<fidelity>`` risk
    controller each, whose λ̂ is the naive search over ALL records (the base needs no training split)."""
    from kvcalib.calib.predictors.risk import fit_full_predictors

    rng = np.random.default_rng(7)
    recs = _records(rng, 90)
    for r in recs:  # a noisy fidelity r* that tracks the context's x
        r["fidelity_r_star"] = {"salient": float(np.clip(r["features"]["x"] * 0.8 + rng.normal(0, 0.05), 0, 0.95))}
    got = fit_full_predictors(recs, epsilon=0.1)
    assert set(got) == {"full_salient"}
    p = got["full_salient"]
    base = np.array([r["fidelity_r_star"]["salient"] for r in recs])
    assert p.lam == pytest.approx(_naive_lambda(base, np.array([r["loss"] for r in recs]), 0.1))
    assert p.training_config()["fidelity"] == "salient" and p.training_config()["tolerance"] == 0.9
    assert fit_full_predictors(_records(rng, 5)) == {}  # no fidelity curves: nothing to fit


def test_oracle_allocation_is_the_best_feasible_allocation_by_enumeration():
    """The per-context ceiling at expected loss ε (``evaluation.oracle_allocation``, a MILP) against every
    allocation of {0} ∪ grid to 5 contexts written out: same best mean ratio, and its own loss within ε."""
    import itertools

    from kvcalib.calib.predictors.evaluation import oracle_allocation
    from kvcalib.calib.predictors.risk import loss_at

    grid = [0.25, 0.5, 0.75, 0.9]
    rng = np.random.default_rng(7)
    for trial in range(6):
        counted = rng.integers(2, 8, 5)
        first = rng.integers(0, len(grid) + 1, (5, 8))  # per question: index of the first grid ratio that loses it
        losses = np.array([[np.mean(first[i, :counted[i]] <= j) for j in range(len(grid))] for i in range(5)])
        for eps in (0.0, 0.05, 0.15, 0.4):
            best = -1.0
            for pick in itertools.product(range(len(grid) + 1), repeat=5):  # 0 = ratio 0, j = grid[j - 1]
                loss = np.mean([0.0 if j == 0 else losses[i, j - 1] for i, j in enumerate(pick)])
                if loss <= eps + 1e-12:
                    best = max(best, np.mean([0.0 if j == 0 else grid[j - 1] for j in pick]))
            r = oracle_allocation(grid, losses, eps)
            assert r.mean() == pytest.approx(best, abs=1e-9), (trial, eps)
            assert loss_at(grid, losses, r).mean() <= eps + 1e-9
    # at ε = 0 the oracle is every context's largest loss-free ratio: r*_task
    losses = np.array([[0, 0, 0.5, 1], [0, 0, 0, 0], [0.2, 0.2, 0.4, 1.0]])
    assert oracle_allocation(grid, losses, 0.0).tolist() == [0.5, 0.9, 0.0]
