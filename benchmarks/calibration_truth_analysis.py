"""Analysis half of ``calibration_truth.py``: fidelity candidates vs task truth, the held-out evaluation of the
predictors fitted on task truth, and the passkey check at the recommended ratios."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

TAUS = (0.8, 0.85, 0.9, 0.95, 0.98)


def read_records(path, doc_min_confidence: float | None = None) -> list[dict]:
    """Truth records re-counted with the document-question confidence gate
    (``calibration.truth_labels.read_truth_labels``)."""
    from kvcalib.calib.calibration.truth_labels import read_truth_labels

    return read_truth_labels(path, doc_min_confidence)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _pearson(a, b) -> float:
    if np.std(a) == 0 or np.std(b) == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _plugin(base, grid, losses, epsilon) -> tuple[float, float]:
    """(mean ratio, loss) of r̂ = ⌊base − λ⌋ with the smallest λ whose in-sample mean loss is ≤ ε (no finite-sample
    correction: the trade-off a base permits, for comparing bases on few documents)."""
    from kvcalib.calib.predictors.risk import lambda_grid, loss_at, snap_to_grid

    for lam in lambda_grid(max(grid)):
        r = snap_to_grid(np.clip(base - lam, 0, max(grid)), grid)
        loss = loss_at(grid, losses, r).mean()
        if loss <= epsilon + 1e-12:
            return float(r.mean()), float(loss)
    return 0.0, 0.0


def compare_fidelities(path, epsilon: float = 0.05) -> dict:
    from kvcalib.calib.calibration.suite import fidelity_r_star

    recs = read_records(path)
    grid = recs[0]["ratios"]
    y = np.array([r["r_star_task"] for r in recs])
    losses = np.array([r["loss"] for r in recs])
    names = sorted(recs[0]["fidelity"])
    rows = []
    const = _plugin(np.zeros(len(recs)), grid, losses, epsilon)
    for name in names:
        best = None
        for tau in TAUS:
            r = np.array([fidelity_r_star(x, name, tau) for x in recs])
            rho = _spearman(r, y)
            ratio, loss = _plugin(r, grid, losses, epsilon)
            row = {"fidelity": name, "tau": tau, "spearman": rho, "pearson": _pearson(r, y),
                   "mean_r_star": float(r.mean()), "ratio_at_eps": ratio, "loss_at_eps": loss}
            rows.append(row)
            if best is None or (rho, ratio) > (best["spearman"], best["ratio_at_eps"]):
                best = row
        best["best_tau"] = True
    report = {"labels": str(path), "n": len(recs), "epsilon": epsilon, "mean_r_star_task": float(y.mean()),
              "global_ratio_at_eps": const[0], "global_loss_at_eps": const[1], "rows": rows}
    print(f"{len(recs)} documents, mean r*_task {y.mean():.3f}; best single ratio at mean loss <= {epsilon}: "
          f"{const[0]:.3f} (loss {const[1]:.3f})")
    print(f"{'fidelity':>15} {'tau':>5} {'spearman':>9} {'pearson':>8} {'mean r*':>8} {'ratio@eps':>10} {'loss':>6}")
    for r in rows:
        mark = " *" if r.get("best_tau") else ""
        print(f"{r['fidelity']:>15} {r['tau']:>5} {r['spearman']:>9.3f} {r['pearson']:>8.3f} {r['mean_r_star']:>8.3f} "
              f"{r['ratio_at_eps']:>10.3f} {r['loss_at_eps']:>6.3f}{mark}")
    return report


def ceiling(path, retest=None, epsilon: float = 0.05, target_gain: float = 1.25) -> dict:
    """How far any predictor could go on these documents at expected answer loss ε: the best single ratio, the
    per-context oracle (``predictors.evaluation.oracle_allocation``: every context's loss curve known) and the mean
    ratio a ``target_gain``× line asks for. With ``retest`` (the same documents labelled with another question seed,
    ``label --like PATH --question-seed 1``): how well one draw of questions ranks the documents for another — the
    rank correlation of the two r*_task, the trade-off r*_task of one draw permits as a risk-control base on the
    other's losses (``_plugin``, as in ``compare``), and the oracle allocation of one draw judged on the other. A
    label-free fidelity cannot rank documents better for the answers than an independent draw of those answers."""
    from kvcalib.calib.predictors.evaluation import oracle_allocation
    from kvcalib.calib.predictors.risk import loss_at

    recs = read_records(path)
    grid = recs[0]["ratios"]
    losses = np.array([r["loss"] for r in recs])
    y = np.array([r["r_star_task"] for r in recs])
    g = global_at_loss(grid, losses, epsilon)
    g_loss = float(loss_at(grid, losses, np.full(len(recs), g)).mean())
    oracle = oracle_allocation(grid, losses, epsilon)
    report = {"labels": str(path), "n": len(recs), "epsilon": epsilon, "mean_r_star_task": float(y.mean()),
              "mean_loss": dict(zip(map(str, grid), losses.mean(0).round(4).tolist())),
              "global": {"ratio": g, "loss": g_loss},
              "oracle": {"mean_ratio": float(oracle.mean()), "loss": float(loss_at(grid, losses, oracle).mean()),
                         "gain_vs_global": float(oracle.mean() / g) if g else None},
              "target": {"gain": target_gain, "mean_ratio": target_gain * g,
                         "share_of_oracle_gain": float((target_gain - 1) * g / (oracle.mean() - g))
                         if oracle.mean() > g else None}}
    print(f"{len(recs)} documents, epsilon {epsilon}: single ratio {g:.2f} (loss {g_loss:.3f}); per-context oracle "
          f"{oracle.mean():.3f} ({report['oracle']['gain_vs_global'] or 0:.2f}x); mean r*_task {y.mean():.3f}; "
          f"{target_gain}x asks {target_gain * g:.3f}")
    if retest:
        other = {r["id"]: r for r in read_records(retest)}
        pairs = [(r, other[r["id"]]) for r in recs if r["id"] in other]
        if not pairs:
            raise SystemExit(f"{retest}: no document in common with {path} (label it with --like {path})")
        a_l = np.array([a["loss"] for a, _ in pairs])
        b_l = np.array([b["loss"] for _, b in pairs])
        a_y = np.array([a["r_star_task"] for a, _ in pairs])
        b_y = np.array([b["r_star_task"] for _, b in pairs])
        alloc = {"a": oracle_allocation(grid, a_l, epsilon), "b": oracle_allocation(grid, b_l, epsilon)}
        draws = {"a": (a_y, a_l), "b": (b_y, b_l)}
        rows = []
        for base, judge in (("a", "b"), ("b", "a")):
            judge_l = draws[judge][1]
            ratio, loss = _plugin(draws[base][0], grid, judge_l, epsilon)
            g_j = global_at_loss(grid, judge_l, epsilon)
            rows.append({"direction": f"{base}->{judge}", "global": g_j, "plugin_ratio": ratio, "plugin_loss": loss,
                         "plugin_gain": ratio / g_j if g_j else None,
                         "oracle_of_base_ratio": float(alloc[base].mean()),
                         "oracle_of_base_loss": float(loss_at(grid, judge_l, alloc[base]).mean()),
                         "oracle_of_judge": float(alloc[judge].mean())})
        loss_corr = {str(g_): _spearman(a_l[:, j], b_l[:, j]) for j, g_ in enumerate(grid)
                     if 0 < a_l[:, j].mean() < 1 and 0 < b_l[:, j].mean() < 1}
        report["retest"] = {"labels": str(retest), "n": len(pairs), "spearman": _spearman(a_y, b_y),
                            "pearson": _pearson(a_y, b_y), "loss_spearman": loss_corr, "rows": rows,
                            "r_star_task": {"a": a_y.tolist(), "b": b_y.tolist()},
                            "mean_loss": {"a": a_l.mean(0).tolist(), "b": b_l.mean(0).tolist()}, "grid": grid}
        print(f"retest on {len(pairs)} documents: Spearman of r*_task between the two question draws "
              f"{report['retest']['spearman']:+.3f} (Pearson {report['retest']['pearson']:+.3f}); of the loss at "
              + ", ".join(f"{g_}: {v:+.2f}" for g_, v in loss_corr.items()))
        print(f"{'base->judged':>12} {'global':>7} {'plug-in':>8} {'loss':>6} {'gain':>6} {'alloc':>6} {'loss':>6} "
              f"{'oracle':>7}")
        for r in rows:
            print(f"{r['direction']:>12} {r['global']:>7.2f} {r['plugin_ratio']:>8.3f} {r['plugin_loss']:>6.3f} "
                  f"{r['plugin_gain'] or 0:>6.2f} {r['oracle_of_base_ratio']:>6.3f} {r['oracle_of_base_loss']:>6.3f} "
                  f"{r['oracle_of_judge']:>7.3f}")
    return report


def plot_retest(report: dict, path: str) -> None:
    """r*_task of one question draw against the other's (jittered), and both draws' mean loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rt = report["retest"]
    a, b = np.array(rt["r_star_task"]["a"]), np.array(rt["r_star_task"]["b"])
    rng = np.random.default_rng(0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.6, 4.0), dpi=120)
    ax1.scatter(a + rng.uniform(-0.02, 0.02, len(a)), b + rng.uniform(-0.02, 0.02, len(b)), s=12, alpha=0.6)
    ax1.plot([0, 1], [0, 1], color="grey", lw=1, ls="--")
    ax1.set_xlabel("r*_task, question draw A")
    ax1.set_ylabel("r*_task, question draw B (same document)")
    ax1.set_title(f"{rt['n']} documents: Spearman {rt['spearman']:+.2f}")
    for name, curve in rt["mean_loss"].items():
        ax2.plot(rt["grid"], curve, marker="o", ms=3, label=f"draw {name.upper()}")
    ax2.axhline(report["epsilon"], color="grey", ls="--", lw=1, label=f"ε = {report['epsilon']}")
    ax2.set_xlabel("compression ratio")
    ax2.set_ylabel("mean answer loss")
    ax2.set_ylim(0, 1)
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def compare_engines(paths, epsilon: float = 0.05, ratios=(0.1, 0.3, 0.5)) -> dict:
    """Which (method, allocator) keeps the most answers: the same documents labelled once per engine configuration
    (``label --method … --allocator …``, one file each; only documents present in every file are compared). Per
    configuration: the mean answer loss at each grid ratio, the best single ratio at mean loss ≤ ε, the mean
    r*_task (what a predictor that knew every r*_task would average at zero loss) and the loss per question kind."""
    sets = []
    for path in paths:
        recs = read_records(path)
        if not recs:
            raise SystemExit(f"{path}: no document with a counted answer")
        sets.append((path, {r.get("id") or r["content_hash"]: r for r in recs}))
    common = set.intersection(*(set(d) for _, d in sets))
    if not common:
        raise SystemExit("the label files share no document (label them with the same --genre/--seed/--*-tokens)")
    rows = []
    for path, by_id in sets:
        recs = [by_id[k] for k in sorted(common)]
        grid = recs[0]["ratios"]
        losses = np.array([r["loss"] for r in recs])
        kinds: dict[str, list[list[bool]]] = {}
        for r in recs:
            for o in r["truth"]["outcomes"]:
                if o["counted"]:
                    kinds.setdefault(f"{o['kind']}:{o['template']}", []).append(o["survived"])
        cfg = recs[0]["config"]
        rows.append({"labels": str(path), "method": cfg["method"], "allocator": cfg["allocator"],
                     "mean_loss": [float(x) for x in losses.mean(0)], "grid": grid,
                     "global_at_eps": global_at_loss(grid, losses, epsilon),
                     "mean_r_star_task": float(np.mean([r["r_star_task"] for r in recs])),
                     "kind_loss": {k: {str(g): float(1 - np.mean([s[j] for s in v])) for j, g in enumerate(grid)}
                                   for k, v in sorted(kinds.items())}})
    report = {"n": len(common), "epsilon": epsilon, "rows": rows}
    print(f"{len(common)} documents in every file; mean answer loss at each ratio, best single ratio at loss <= "
          f"{epsilon}, mean r*_task (the oracle's mean ratio at zero loss)")
    grid = rows[0]["grid"]
    shown = [j for j, g in enumerate(grid) if g <= 0.75]
    print(f"{'method':>10} {'allocator':>9} " + " ".join(f"{grid[j]:>5}" for j in shown)
          + f" {'global@eps':>10} {'r*_task':>8}")
    for r in rows:
        print(f"{r['method']:>10} {r['allocator']:>9} " + " ".join(f"{r['mean_loss'][j]:>5.3f}" for j in shown)
              + f" {r['global_at_eps']:>10.2f} {r['mean_r_star_task']:>8.3f}")
    kinds = sorted({k for r in rows for k in r["kind_loss"]})
    print("loss per question kind at " + ", ".join(str(x) for x in ratios))
    for r in rows:
        cells = [f"{k.split(':')[-1]} " + "/".join(f"{r['kind_loss'][k].get(str(x), float('nan')):.2f}"
                                                   for x in ratios) for k in kinds if k in r["kind_loss"]]
        print(f"{r['method']:>10} {r['allocator']:>9}  " + "  ".join(cells))
    return report


def plot_engines(report: dict, path: str) -> None:
    """Mean answer loss against the compression ratio, one line per engine configuration, with ε."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for r in report["rows"]:
        ax.plot(r["grid"], r["mean_loss"], marker="o", ms=3,
                label=f"{r['method']} + {r['allocator']} (oracle {r['mean_r_star_task']:.2f})")
    ax.axhline(report["epsilon"], color="grey", ls="--", lw=1, label=f"ε = {report['epsilon']}")
    ax.set_xlabel("compression ratio (share of the KV cache evicted)")
    ax.set_ylabel("mean answer loss (share of full-cache answers lost)")
    ax.set_title(f"Which engine keeps the answers ({report['n']} documents, same questions)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def _interval(values: np.ndarray, n_boot: int, rng) -> list[float]:
    if len(values) == 0:
        return [0.0, 0.0]
    idx = rng.integers(0, len(values), (n_boot, len(values)))
    means = values[idx].mean(1)
    return [float(np.quantile(means, 0.05)), float(np.quantile(means, 0.95))]


def global_at_loss(grid, losses, target: float) -> float:
    """The largest grid ratio whose mean loss over ``losses`` is ≤ ``target`` (0 when none)."""
    best = 0.0
    for j, g in enumerate(grid):
        if losses[:, j].mean() <= target + 1e-12:
            best = float(g)
        else:
            break  # mean losses are non-decreasing along the grid
    return best


def held_out_metrics(r, grid, l_te, y_te, l_honest, n_boot: int, rng) -> dict:
    """Mean ratio, realised loss, violation rate (bootstrap 90 % intervals) of test predictions ``r``, and the
    single global ratio at the same loss chosen on ``l_honest`` (honest) and on the test losses (oracle)."""
    from kvcalib.calib.predictors.risk import loss_at

    r = np.asarray(r, dtype=float)
    loss = loss_at(grid, l_te, r)
    viol = (r > y_te + 1e-9).astype(float)
    m = {"mean_ratio": float(r.mean()), "mean_ratio_ci90": _interval(r, n_boot, rng),
         "loss": float(loss.mean()), "loss_ci90": _interval(loss, n_boot, rng),
         "violation_rate": float(viol.mean()), "violation_ci90": _interval(viol, n_boot, rng),
         "distinct_ratios": len(set(np.round(r, 4).tolist()))}
    honest = global_at_loss(grid, l_honest, m["loss"])
    oracle = global_at_loss(grid, l_te, m["loss"])
    m.update({"honest_global": honest,
              "honest_global_test_loss": float(loss_at(grid, l_te, np.full(len(r), honest)).mean()),
              "oracle_global": oracle, "gain_vs_honest": float(r.mean() / honest) if honest else None,
              "gain_vs_oracle": float(r.mean() / oracle) if oracle else None})
    return m


def evaluate_full(args) -> dict:
    """Risk control over the calibration's own r*(τ) of each fidelity candidate (``mode=full``): the base needs no
    training, so every labelled document of the fit genre calibrates the margin λ̂; tested on the other genre."""
    from kvcalib.calib.calibration.suite import fidelity_r_star
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.calib.predictors.risk import fit_full_predictors, r_star_feature, truth_arrays

    fit, test = read_records(args.fit), read_records(args.test)
    names = sorted(set(fit[0].get("fidelity") or {}) & set(test[0].get("fidelity") or {}))
    if not names:
        raise SystemExit("the records hold no common fidelity curve (label with --fidelities, or run `fidelity`)")
    for r in fit + test:  # r*(τ) at this run's τ (read_records reads them at the default tolerance)
        r["fidelity_r_star"] = {name: fidelity_r_star(r, name, args.tau) for name in names}
    _, grid, l_fit, _ = truth_arrays(fit)
    _, _, l_te, y_te = truth_arrays(test)
    rng = np.random.default_rng(args.seed)
    report = {"fit": str(args.fit), "test": str(args.test), "n_fit": len(fit), "n_test": len(test),
              "epsilon": args.epsilon, "tau": args.tau, "grid": grid, "predictors": {}}
    preds = fit_full_predictors(fit, epsilon=args.epsilon, tau=args.tau)
    for key, p in preds.items():
        name = key.removeprefix("full_")
        stars = [float(r["fidelity_r_star"][name]) for r in test]
        m = held_out_metrics(p.predict([{r_star_feature(name): s} for s in stars]), grid, l_te, y_te, l_fit,
                             args.bootstrap, rng)
        m.update(version=p.version, lam=p.lam, mean_fidelity_r_star_test=float(np.mean(stars)))
        report["predictors"][key] = m
        p.metrics["held_out"] = {k: v for k, v in m.items() if k != "version"}
    save_predictors(args.predictors_out, preds, extra={"default": f"full_{names[0]}", "target": "task_truth",
                                                       "labels": str(args.fit), "epsilon": args.epsilon})
    print(f"risk control over r*(τ={args.tau}) of each fidelity: λ̂ from {len(fit)} documents of {args.fit}; "
          f"test on {len(test)} of {args.test}")
    print(f"{'predictor':>22} {'lambda':>6} {'mean r':>7} {'90% CI':>15} {'loss':>6} {'90% CI':>15} {'viol':>5} "
          f"{'honest g':>8} {'oracle g':>8} {'gain':>5}")
    for name, m in report["predictors"].items():
        ci, li = m["mean_ratio_ci90"], m["loss_ci90"]
        gain = f"{m['gain_vs_honest']:.2f}" if m["gain_vs_honest"] else "-"
        print(f"{name:>22} {m['lam']:>6.3f} {m['mean_ratio']:>7.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {m['loss']:>6.3f} "
              f"[{li[0]:.3f}, {li[1]:.3f}] {m['violation_rate']:>5.2f} {m['honest_global']:>8.2f} "
              f"{m['oracle_global']:>8.2f} {gain:>5}")
    return report


def evaluate_split(args) -> dict:
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.calib.predictors.risk import fit_truth_labels, truth_arrays

    fit = read_records(args.fit)
    test = read_records(args.test)
    preds, split = fit_truth_labels(fit, (1 - args.cal_fraction, args.cal_fraction, 0.0), seed=args.seed,
                                    epsilon=args.epsilon, alpha=args.alpha)
    train = [r for r in fit if r["content_hash"] in set(split["train"])]
    cal = [r for r in fit if r["content_hash"] in set(split["cal"])]
    f_te, grid, l_te, y_te = truth_arrays(test)
    _, _, l_cal, _ = truth_arrays(cal)
    rng = np.random.default_rng(args.seed)
    report = {"fit": str(args.fit), "test": str(args.test), "n_train": len(train), "n_cal": len(cal),
              "n_test": len(test), "epsilon": args.epsilon, "alpha": args.alpha, "grid": grid, "predictors": {}}
    # the mode=full controllers read the calibration's r*, not prefill features: `evaluate-full` tests those
    preds = {name: p for name, p in preds.items() if (p.training or {}).get("mode") != "full"}
    for name, p in preds.items():
        m = held_out_metrics(p.predict(f_te), grid, l_te, y_te, l_cal, args.bootstrap, rng)
        m["version"] = p.version
        report["predictors"][name] = m
        p.metrics["held_out"] = {k: v for k, v in m.items() if k != "version"}
    save_predictors(args.predictors_out, preds, extra={"default": "risk", "labels": str(args.fit),
                                                       "epsilon": args.epsilon, "alpha": args.alpha,
                                                       "target": "task_truth", "split": split})
    print(f"fit on {len(train)} + {len(cal)} (calibration) documents of {args.fit}; test on {len(test)} of {args.test}")
    print(f"{'predictor':>12} {'mean r':>7} {'90% CI':>15} {'loss':>6} {'90% CI':>15} {'viol':>5} "
          f"{'honest g':>8} {'oracle g':>8} {'gain':>5}")
    for name, m in report["predictors"].items():
        ci = m["mean_ratio_ci90"]
        li = m["loss_ci90"]
        gain = f"{m['gain_vs_honest']:.2f}" if m["gain_vs_honest"] else "-"
        print(f"{name:>12} {m['mean_ratio']:>7.3f} [{ci[0]:.3f}, {ci[1]:.3f}] {m['loss']:>6.3f} "
              f"[{li[0]:.3f}, {li[1]:.3f}] {m['violation_rate']:>5.2f} {m['honest_global']:>8.2f} "
              f"{m['oracle_global']:>8.2f} {gain:>5}")
    return report


def passkey_check(args) -> dict:
    from tqdm import tqdm

    from kvcalib.calib.budget import Budget
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, predict
    from kvcalib.calib.data import synthetic as tasks
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model)
    config = CalibrationConfig(method=args.method, allocator=args.allocator).validate()
    examples = tasks.passkey(eng.tokenizer, args.n, seed=args.seed, n_tokens=args.tokens)
    rows = []
    t0 = time.perf_counter()
    for ex in tqdm(examples, desc="passkey", unit="ex"):
        pred = predict(eng, ex.context, config, args.predictor)  # None: the shipped default predictor
        row = {"index": ex.meta["index"], "depth": ex.meta["depth"], "answer": ex.answer, "ratio": pred.ratio,
               "predictor": pred.predictor_version}
        for name, ratio in (("full", 0.0), ("recommended", pred.ratio)):
            res = eng.run(ex.context, ex.question, config.method, Budget(ratio=ratio), allocator=config.allocator,
                          max_new_tokens=16)
            row[name] = {"output": res.answer, "correct": ex.score(res.answer), "ratio": res.ratio}
        rows.append(row)
    acc = {k: sum(r[k]["correct"] for r in rows) / len(rows) for k in ("full", "recommended")}
    rel = acc["recommended"] / acc["full"] if acc["full"] else None
    report = {"n": args.n, "seed": args.seed, "tokens": args.tokens, "method": config.method,
              "allocator": config.allocator, "accuracy": acc, "relative": rel,
              "mean_ratio": statistics.mean(r["ratio"] for r in rows), "meets_target": bool(rel is None or
                                                                                             rel >= 0.95),
              "seconds": time.perf_counter() - t0, "examples": rows}
    print(f"passkey n={args.n} seed={args.seed}: full {acc['full']:.2%}, at the recommended ratios "
          f"{acc['recommended']:.2%} (mean ratio {report['mean_ratio']:.3f}); relative {rel}")
    return report
