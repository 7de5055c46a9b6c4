"""How well a predictor of r* does on labelled contexts: violation rate P(r̂ > r*), mean KV reduction, and the best
single global ratio at the same violation rate — the baseline a per-context predictor has to beat."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kvcalib.calib.predictors.base import Predictor


def violation_metrics(pred, r_star) -> dict:
    """Violation rate P(r̂ > r*), mean KV reduction (mean r̂), mean |r̂ − r*| and the mean reduction kept safe."""
    p, y = np.asarray(pred, dtype=float), np.asarray(r_star, dtype=float)
    if len(y) == 0:
        return {"n": 0}
    viol = p > y + 1e-9
    return {"n": int(len(y)), "violation_rate": float(viol.mean()), "mean_ratio": float(p.mean()),
            "mean_abs_error": float(np.abs(p - y).mean()), "mean_oracle_ratio": float(y.mean()),
            "mean_safe_ratio": float(np.where(viol, 0.0, p).mean())}


def best_global_ratio(r_star, max_violation: float) -> float:
    """The largest single ratio g with violation rate mean(g > r*) ≤ ``max_violation`` on these contexts."""
    y = np.sort(np.asarray(r_star, dtype=float))
    n = len(y)
    if n == 0:
        return 0.0
    allowed = int(math.floor(max_violation * n + 1e-9))  # contexts that may have r* < g
    if allowed >= n:
        return float(y[-1])
    return float(y[allowed])  # g = y[allowed]: exactly `allowed` contexts have r* < g (ties count as safe)


def evaluate_predictors(predictors: dict[str, Predictor], labels: list[dict], alpha: float) -> dict:
    """Metrics of every predictor on ``labels`` and the best single global ratio at the same (or lower) violation
    rate — the baseline a per-context predictor has to beat."""
    feats = [r["features"] for r in labels]
    y = np.array([r["r_star"] for r in labels], dtype=float)
    out = {"n": len(labels), "alpha": alpha, "mean_oracle_ratio": float(y.mean()) if len(y) else None,
           "oracle_r_star_std": float(y.std()) if len(y) else None, "predictors": {}}
    g_alpha = best_global_ratio(y, alpha)
    out["best_global_at_alpha"] = {"ratio": g_alpha, "violation_rate": float((g_alpha > y + 1e-9).mean())}
    for name, p in predictors.items():
        pred = p.predict(feats)
        m = violation_metrics(pred, y)
        g = best_global_ratio(y, m["violation_rate"])
        m["best_global_ratio"] = g
        m["best_global_violation_rate"] = float((g > y + 1e-9).mean())
        m["gain_over_best_global"] = m["mean_ratio"] - g
        m["beats_best_global"] = bool(m["mean_ratio"] > g + 1e-9)
        m["version"] = p.version
        m["predictions"] = [float(v) for v in pred]
        out["predictors"][name] = m
    return out


def plot_evaluation(labels: list[dict], report: dict, path: str | Path, tau: float) -> Path:
    """Two panels into ``path`` (PNG): the held-out quality curves with τ, and predicted r̂ against oracle r*."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for r in labels:
        a1.plot([0.0] + list(r["ratios"]), [1.0] + list(r["fidelity"]), color="tab:blue", alpha=0.25, lw=0.8)
    a1.axhline(tau, color="tab:red", ls="--", lw=1, label=f"τ = {tau}")
    a1.set_xlabel("compression ratio")
    a1.set_ylabel("probe fidelity (NLL_full / NLL_r)")
    a1.set_title(f"quality curves ({len(labels)} held-out contexts)")
    a1.legend()
    y = np.array([r["r_star"] for r in labels])
    lim = max(0.05, float(y.max()) * 1.1 if len(y) else 1.0)
    for name, m in report["predictors"].items():
        p = np.array(m["predictions"])
        a2.scatter(y, p, s=14, alpha=0.7, label=f"{name} (viol {m['violation_rate']:.2f}, mean {m['mean_ratio']:.3f})")
        lim = max(lim, float(p.max()) * 1.1 if len(p) else lim)
    a2.plot([0, lim], [0, lim], color="black", lw=0.8)
    a2.set_xlim(0, lim)
    a2.set_ylim(0, lim)
    a2.set_xlabel("oracle r*")
    a2.set_ylabel("predicted r̂")
    a2.set_title("predicted vs oracle (above the diagonal = violation)")
    a2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def oracle_allocation(grid, losses, epsilon: float) -> np.ndarray:
    """The per-context ratios r_i ∈ {0} ∪ grid with the largest mean ratio at mean loss (1/n) Σ ℓ_i(r_i) ≤ ε, given
    every context's loss curve ``losses`` (n, R) — the ceiling of any predictor at expected loss ε on these contexts
    (it knows the answers' losses; a predictor sees features). A multiple-choice knapsack, solved exactly as a
    mixed-integer programme (``scipy.optimize.milp``, HiGHS): x_ij ∈ {0, 1} picks ratio j for context i."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix, eye, kron

    ls = np.asarray(losses, dtype=float)  # (n, R)
    n = ls.shape[0]
    if n == 0:
        return np.zeros(0)
    options = np.concatenate([[0.0], np.asarray(grid, dtype=float)])  # (R + 1,): ratio 0 loses nothing
    cost = np.concatenate([np.zeros((n, 1)), ls], axis=1)  # (n, R + 1)
    k = len(options)
    one_each = kron(eye(n), np.ones((1, k)))  # Σ_j x_ij = 1
    budget = csr_matrix(cost.reshape(1, -1))  # Σ_ij ℓ_ij x_ij ≤ ε n
    res = milp(c=-np.tile(options, n), integrality=np.ones(n * k),
               constraints=[LinearConstraint(one_each, 1, 1),
                            LinearConstraint(budget, -np.inf, epsilon * n + 1e-9)],
               bounds=Bounds(0, 1))
    if not res.success:  # cannot happen (all-zero ratios are feasible); say so rather than return garbage
        raise RuntimeError(f"oracle allocation: {res.message}")
    pick = np.asarray(res.x).reshape(n, k).argmax(1)
    return options[pick]
