"""The README's scale figure from the JSON of ``benchmarks/memory.py`` and ``benchmarks/scaling.py`` (no model run):

* left: peak resident memory above the loaded model, per stage and context length (plain prefill keeping its KV
  cache, ``calibrate`` streaming, the reference capture-then-score path, ``predict``), with the 1.3 × prefill target
  of the absolute peak drawn as a band;
* right: calibration ÷ plain prefill per length, and each stage's share of a prefill.

    python benchmarks/scale_figure.py [--memory results/memory.json] [--scaling results/scaling.json]
                                      [--out docs/img/scale.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

STAGE_LABELS = {"prefill_s": "capture prefill + NLL", "score_s": "scoring", "features_s": "features",
                "probes_s": "probe forward"}
STAGES = {"prefill": "plain prefill (keeps its cache)", "calibrate": "calibrate (streaming)",
          "calibrate_reference": "calibrate (reference path)", "predict": "predict (featurize)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="results/memory.json")
    ap.add_argument("--scaling", default="results/scaling.json")
    ap.add_argument("--out", default="docs/img/scale.png")
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem = json.loads(Path(args.memory).read_text())
    scal = json.loads(Path(args.scaling).read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    for stage, label in STAGES.items():
        pts = sorted((r["tokens"], r["peak_over_baseline_mib"]) for r in mem["rows"] if r["stage"] == stage)
        if pts:
            a.plot(*zip(*pts), "o-", label=label)
    pre = {r["length"]: r for r in mem["rows"] if r["stage"] == "prefill"}
    if pre:
        xs = sorted(r["tokens"] for r in pre.values())
        budget = [0.3 * r["peak_mib"] + r["peak_over_baseline_mib"] for r in sorted(pre.values(),
                                                                                     key=lambda r: r["tokens"])]
        a.plot(xs, budget, "k--", lw=1, label="target: calibrate's peak ≤ 1.3 × prefill's")
    a.set_xscale("log", base=2)
    a.set_xlabel("context tokens")
    a.set_ylabel("peak RSS above the loaded model (MiB)")
    a.set_title(f"memory · {mem.get('model', '')} {mem.get('dtype', '')}", fontsize=9)
    a.legend(fontsize=7)

    rows = sorted(scal["rows"], key=lambda r: r["tokens"])
    xs = [r["tokens"] for r in rows]
    b.plot(xs, [r["calibration"]["ratio"] for r in rows], "o-", color="black", label="calibration ÷ prefill")
    names = sorted({k for r in rows for k in r["calibration"]["stages"]})
    for k in names:
        b.plot(xs, [r["calibration"]["stages"].get(k, 0.0) / r["prefill_s"] for r in rows], ".--",
               label=f"{STAGE_LABELS.get(k, k)} ÷ prefill")
    b.axhline(1.5, color="grey", ls=":", lw=1, label="target 1.5")
    b.set_xscale("log", base=2)
    b.set_xlabel("context tokens")
    b.set_ylabel("seconds ÷ plain prefill")
    b.set_title(f"time · {scal.get('threads', '')} thread(s), {scal.get('method', '')}", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
