"""Build ``walkthrough.ipynb`` from the cells below (edit this script, not the notebook JSON).

    python notebooks/build.py            # writes notebooks/walkthrough.ipynb (outputs empty)

The notebook reads two environment variables:

* ``KVCALIB_NB_SMALL=1`` — small inputs (3 short documents, 3 ratios, 2 probes, a 4-trial sweep) so CI runs it in
  well under 3 minutes on a CPU;
* ``KVCALIB_NB_FIGURES`` — folder for the PNG figures (default: ``figures/`` beside the notebook).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

FIGURES = ["fidelity_curves.png", "budget_heatmap.png", "predicted_vs_oracle.png", "pareto_front.png"]

CELLS: list[tuple[str, str]] = [
    ("md", """\
# kvcalib walkthrough: calibration curves, budgets, prediction, sweeps

Per-context calibration of KV-cache compression on the real SmolLM2-135M:

1. calibrate a few documents — fidelity vs compression ratio, and r*(τ), the largest ratio whose fidelity stays ≥ τ;
2. look at how the LAVa allocator spreads one document's budget over layers and heads;
3. compare r* *predicted* from cheap context features with the oracle r* from calibration;
4. run a small Optuna sweep of a method's hyperparameters and plot its Pareto front.

`KVCALIB_NB_SMALL=1` switches to small inputs (CI); `KVCALIB_NB_FIGURES` sets where the figures go."""),
    ("code", """\
import os
import tempfile
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMALL = os.environ.get("KVCALIB_NB_SMALL", "0").lower() in ("1", "true", "yes")
if SMALL:  # one thread: on a small or shared CPU (CI) an oversubscribed thread pool is several times slower
    torch.set_num_threads(1)
FIG_DIR = Path(os.environ.get("KVCALIB_NB_FIGURES") or Path.cwd() / "figures")
FIG_DIR.mkdir(parents=True, exist_ok=True)

if SMALL:
    N_DOCS, DOC_TOKENS, RATIOS, N_PROBES = 3, (150, 250), (0.1, 0.3, 0.6), 2
    SWEEP_TRIALS, SWEEP_DOCS = 4, 2
else:
    N_DOCS, DOC_TOKENS, RATIOS, N_PROBES = 8, (400, 800), (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), 4
    SWEEP_TRIALS, SWEEP_DOCS = 16, 3
TAU = 0.95
METHOD = "compactor"
t_start = time.perf_counter()
print(f"small={SMALL}  figures -> {FIG_DIR}")


def save(fig, name):
    path = FIG_DIR / name
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print("wrote", path)
    return path"""),
    ("md", """\
## Documents and the model

Short pieces cut from the essay corpus at line boundaries, taken round-robin over the essays."""),
    ("code", """\
from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
from kvcalib.calib.pipeline import Engine
from kvcalib.sweep import load_corpus

engine = Engine.load("smollm2-135m")
docs = load_corpus(None, tokenizer=engine.tokenizer, min_tokens=DOC_TOKENS[0], max_tokens=DOC_TOKENS[1],
                   max_docs=N_DOCS)
lengths = [len(engine.tokenizer(d, add_special_tokens=False).input_ids) for d in docs]
print(len(docs), "documents, tokens:", lengths)"""),
    ("md", """\
## 1. Fidelity vs compression ratio

`calibrate` runs one prefill, scores the positions once, and evaluates every ratio of the grid against label-free
reconstruction probes (fidelity = NLL with the full cache / NLL with the compressed cache). r* is where the curve
crosses τ."""),
    ("code", """\
config = CalibrationConfig(method=METHOD, allocator="uniform", ratios=RATIOS, tolerance=TAU, n_probes=N_PROBES)
results = []
for i, doc in enumerate(docs):
    res = calibrate(engine, doc, config)
    results.append(res)
    print(f"doc {i}: {res.context_tokens} tokens, r* = {res.r_star:.3f}, monotone={res.monotone}, "
          f"{res.seconds:.1f}s")

fig, ax = plt.subplots(figsize=(7, 4.2))
for i, res in enumerate(results):
    line, = ax.plot([0.0, *res.ratios], [1.0, *res.fidelity], marker="o", ms=3, label=f"doc {i}")
    ax.axvline(res.r_star, color=line.get_color(), ls=":", lw=1)
ax.axhline(TAU, color="k", ls="--", lw=1, label=f"τ = {TAU}")
ax.set(xlabel="compression ratio r (share of KV evicted)", ylabel="fidelity",
       title=f"{METHOD}: fidelity vs ratio (dotted: r* per document)")
ax.set_ylim(0, 1.05)
ax.legend(fontsize=8, ncol=2)
save(fig, "fidelity_curves.png")
plt.show()"""),
    ("md", """\
## 2. Where the budget goes: LAVa's layer and head allocation

LAVa gives each layer a budget proportional to the entropy of its scores, then AdaKV-style head-adaptive selection
inside the layer (with a floor per head). Below: kept positions per (layer, kv head) for one document at a fixed
ratio, and the per-layer totals."""),
    ("code", """\
from kvcalib.calib.budget import ALLOCATORS, Budget, allocate

ALLOC = "lava" if "lava" in ALLOCATORS else ("adakv" if "adakv" in ALLOCATORS else "uniform")
if ALLOC != "lava":
    print(f"note: the lava allocator is not available here; showing {ALLOC} instead")
HEAT_RATIO = 0.5
doc = docs[0]
prompt = engine.prompt(doc, "")
cap = engine.capture(prompt.context_ids)
scores = engine.scorer(METHOD).score(cap, engine.score_context())
keep = allocate(scores, Budget(ratio=HEAT_RATIO), ALLOC)  # (L, Hkv, N)
heads = keep.sum(-1).numpy()  # kept positions per (layer, head)
n = cap.num_tokens

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(9, 5), gridspec_kw={"width_ratios": [2, 1]})
im = ax0.imshow(heads / n, aspect="auto", cmap="viridis", vmin=0, vmax=1)
ax0.set(xlabel="kv head", ylabel="layer", title=f"{ALLOC}: kept share per head (r = {HEAT_RATIO})")
ax0.set_xticks(range(heads.shape[1]))
fig.colorbar(im, ax=ax0, label="kept / context tokens")
ax1.barh(np.arange(heads.shape[0]), heads.sum(1) / (heads.shape[1] * n), color="tab:orange")
ax1.axvline(1 - HEAT_RATIO, color="k", ls="--", lw=1, label="uniform")
ax1.invert_yaxis()
ax1.set(xlabel="kept share of the layer", title="per layer")
ax1.legend(fontsize=8)
fig.tight_layout()
save(fig, "budget_heatmap.png")
plt.show()
print(f"{n} tokens; total kept {int(heads.sum())} = {heads.sum() / heads.size / n:.3f} of the cache")"""),
    ("md", """\
## 3. Predicted vs oracle r*

Calibration needs a pass over the probes at every ratio; a predictor maps cheap context features (computed from the
prefill alone) to r*. Here Compactor's parametric curve f(r) = expm1(b(1−r)) / expm1(b), b = α·NLL(context) + β
(`calib.predictors.ParametricPredictor`, an asymmetric least-squares fit that penalises over-prediction) is fitted on
the *other* documents' measured curves (leave one out) and its r* compared with each document's oracle r*. Points
above the diagonal over-compress. (`kvcalib fit` trains the production predictors — quantile GBM and conformal
bounds — on a labelled corpus.)"""),
    ("code", """\
from kvcalib.calib.predictors import ParametricPredictor

oracle, predicted = [], []
for i, res in enumerate(results):
    others = [r for j, r in enumerate(results) if j != i]
    pred = ParametricPredictor(tau=TAU).fit(nll=[r.features["context_nll"] for r in others],
                                            ratios=[r.ratios for r in others],
                                            fidelity=[r.fidelity for r in others])
    oracle.append(res.r_star)
    predicted.append(float(pred.predict([res.features])[0]))
    print(f"doc {i}: NLL {res.features['context_nll']:.2f}, oracle r* {oracle[-1]:.3f}, "
          f"predicted {predicted[-1]:.3f}")
violations = sum(p > o + 1e-9 for p, o in zip(predicted, oracle))

fig, ax = plt.subplots(figsize=(4.8, 4.6))
ax.scatter(oracle, predicted, color="tab:green")
hi = max(0.05, *oracle, *predicted) * 1.1
ax.plot([0, hi], [0, hi], "k--", lw=1, label="predicted = oracle")
ax.fill_between([0, hi], [0, hi], [hi, hi], color="tab:red", alpha=0.08, label="over-compression")
ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="oracle r* (calibration)", ylabel="predicted r* (features only)",
       title=f"Compactor-curve predictor, leave one out ({violations}/{len(oracle)} above oracle)")
ax.legend(fontsize=8)
save(fig, "predicted_vs_oracle.png")
plt.show()"""),
    ("md", """\
## 4. A sweep and its Pareto front

`kvcalib sweep` tunes a method's hyperparameters with Optuna (NSGA-II) on two objectives: the mean r* over a corpus
(maximise) and the mean fidelity loss at r* on held-out probes (minimise). The notebook runs a small in-process
sweep on a temporary SQLite storage (set `KVCALIB_NB_STUDY` to plot an existing study of the service database
instead). Trial 0 is the method's published defaults."""),
    ("code", """\
from kvcalib import sweep as sw

study_name = os.environ.get("KVCALIB_NB_STUDY")
if study_name:
    storage = sw.make_storage()
else:
    tmp = tempfile.mkdtemp(prefix="kvcalib-nb-")
    storage = sw.make_storage(f"sqlite:///{tmp}/sweep.db")
    spec = sw.SweepSpec(model="smollm2-135m", method="snapkv", allocator="uniform", documents=docs[:SWEEP_DOCS],
                        ratios=RATIOS, tolerance=TAU, n_probes=N_PROBES, holdout_probes=max(1, N_PROBES // 2),
                        population_size=max(4, SWEEP_TRIALS // 3), objective="reconstruction")
    study_name = sw.study_name(spec.model, spec.method, spec.allocator, "notebook")
    sw.open_study(spec, study_name, storage)
    done, failed = sw.run_inprocess(study_name, SWEEP_TRIALS, storage=storage, load_engine=lambda _: engine)
    print(f"{done} trials completed, {failed} failed")
study = sw.load_study(study_name, storage)
rows = sw.trial_rows(study, pareto_only=False)
for r in sw.trial_rows(study):
    print(f"trial {r['trial']:>3}: mean r* {r['r_star_mean']:.3f}, loss {r['fidelity_loss']:.4f}, {r['params']}")"""),
    ("code", """\
fig, ax = plt.subplots(figsize=(6.5, 4.2))
x = [r["r_star_mean"] for r in rows]
y = [r["fidelity_loss"] for r in rows]
ax.scatter(x, y, c="lightgray", edgecolors="gray", label="trials")
front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["r_star_mean"])
ax.plot([r["r_star_mean"] for r in front], [r["fidelity_loss"] for r in front], "o-", color="tab:red",
        label="Pareto front")
for r in rows:
    if r["baseline"]:
        ax.scatter([r["r_star_mean"]], [r["fidelity_loss"]], marker="*", s=180, color="tab:blue", zorder=3,
                   label="published defaults")
ax.set(xlabel="mean r* (KV reduction granted; higher is better)",
       ylabel="held-out fidelity loss (lower is better)", title=f"Pareto front of {study_name}")
ax.legend(fontsize=8)
save(fig, "pareto_front.png")
plt.show()"""),
    ("code", """\
print(f"notebook ran in {time.perf_counter() - t_start:.1f}s;",
      "figures:", sorted(p.name for p in FIG_DIR.glob("*.png")))"""),
]


def build() -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, (kind, src) in enumerate(CELLS):
        cell = new_markdown_cell(src) if kind == "md" else new_code_cell(src)
        cell["id"] = f"cell-{i:02d}"  # stable ids: rebuilding gives an identical file
        nb.cells.append(cell)
    return nb


def main() -> Path:
    out = HERE / "walkthrough.ipynb"
    nbformat.write(build(), out)
    return out


if __name__ == "__main__":
    print(main())
