"""The README's figures, drawn from one real calibration of SmolLM2-135M (one thread, ~1 minute):

* ``docs/img/curve.png`` — a document's label-free fidelity curve (the default fidelity) with τ and r*, beside the
  task truth on the same document: the share of full-cache answers lost at each ratio (``calib.calibration.truth``)
  and the ratio the shipped ``mode=full`` risk controller recommends;
* ``docs/img/budget_heatmap.png`` — the kept fraction of every (layer, kv head) at that ratio under AdaKV.

    python benchmarks/figures.py [--essay NAME] [--tokens 1400] [--out docs/img] [--json results/figures.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--essay", default=None, help="essay name (default: the first in sorted order)")
    ap.add_argument("--tokens", type=int, default=1400)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--json", default="results/figures.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kvcalib.calib.budget import Budget, allocate
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, apply_controller, calibrate, featurize
    from kvcalib.calib.calibration.truth import TruthConfig, evaluate_truth
    from kvcalib.calib.data.documents import load_essays
    from kvcalib.calib.data.questions import make_questions
    from kvcalib.calib.pipeline import Engine
    from kvcalib.calib.predictors.bundled import shipped_predictor

    eng = Engine.load("smollm2-135m")
    essays = load_essays()
    name = args.essay or sorted(essays)[0]
    ids = eng.tokenizer(essays[name], add_special_tokens=False).input_ids[: args.tokens]
    doc = make_questions(eng.tokenizer.decode(ids), seed=args.seed)
    config = CalibrationConfig()
    res = calibrate(eng, doc.text, config)
    truth = evaluate_truth(eng, doc, TruthConfig(method=config.method, allocator=config.allocator,
                                                 ratios=config.ratios))
    full = shipped_predictor("smollm2-135m", f"full_{config.fidelity}")
    r_hat = apply_controller(full, config, res.r_star)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    ax.plot(res.ratios, res.fidelity, "o-", label=f"fidelity ({config.fidelity} probes)")
    ax.plot(truth.ratios, [1 - x for x in truth.envelope], "s-", color="tab:green",
            label=f"answers kept ({truth.n_counted} questions)")
    ax.axhline(config.tolerance, color="grey", ls="--", lw=1, label=f"τ = {config.tolerance:g}")
    ax.axvline(res.r_star, color="tab:blue", ls=":", lw=1.5, label=f"r*(τ) = {res.r_star:.2f}")
    ax.axvline(truth.r_star_task, color="tab:green", ls=":", lw=1.5, label=f"r*_task = {truth.r_star_task:.2f}")
    ax.axvline(r_hat, color="tab:red", lw=2, label=f"recommended (risk control, ε = 0.05) = {r_hat:.2f}")
    ax.set_xlabel("compression ratio (share of the KV cache evicted)")
    ax.set_ylabel("fidelity / share of answers kept")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"essay '{name}', {res.context_tokens} tokens · SmolLM2-135M · {config.method}/{config.allocator}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "curve.png")
    plt.close(fig)

    _, _, scores = featurize(eng, doc.text, config)
    ratio = r_hat if r_hat > 0 else res.r_star
    keep = allocate(scores, Budget(ratio=ratio), config.allocator)  # (L, Hkv, N)
    frac = keep.float().mean(-1)  # (L, Hkv)
    fig, ax = plt.subplots(figsize=(4.2, 5.2), dpi=110)
    im = ax.imshow(frac.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(frac.shape[1]))
    ax.set_title(f"kept fraction per (layer, head) at ratio {ratio:.2f}\n{config.allocator} over {config.method} "
                 "scores", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.08)
    fig.tight_layout()
    fig.savefig(out / "budget_heatmap.png")
    plt.close(fig)

    report = {"essay": name, "context_tokens": res.context_tokens, "ratios": res.ratios, "fidelity": res.fidelity,
              "r_star": res.r_star, "answers_lost": truth.envelope, "r_star_task": truth.r_star_task,
              "n_counted": truth.n_counted, "recommended": r_hat, "heatmap_ratio": ratio,
              "kept_fraction": frac.tolist(), "figures": [str(out / "curve.png"), str(out / "budget_heatmap.png")]}
    print(f"{name}: {res.context_tokens} tokens, r*(τ) {res.r_star:.3f}, r*_task {truth.r_star_task:.2f}, "
          f"recommended {r_hat:.2f}; kept fraction per head {float(frac.min()):.2f}..{float(frac.max()):.2f}")
    write_report(report, args.json)


if __name__ == "__main__":
    main()
