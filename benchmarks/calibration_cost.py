"""Calibration cost: time of a full calibration (default grid of 10 ratios, default probes) ÷ time of one prefill of
the same ~2k-token document, measured in the same process (target ≤ 2.0 on CPU).

    python benchmarks/calibration_cost.py [--tokens 2000] [--repeats 3] [--threads N]
                                          [--out results/calibration_cost.json]

The prefill is ``Engine.capture`` without the context NLL (the cheapest forward that gives the cache). Calibration
and prefill runs are interleaved and the medians compared; wall-clock and process CPU time are both reported (on a
shared machine the CPU-time ratio is the more stable one). The calibration's own breakdown (prefill + NLL, scoring,
features, probes) comes from ``CalibrationResult.timings``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="document tokens (the chat header adds ~24)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--essay", default="worked", help="essay the document is cut from")
    ap.add_argument("--n-probes", type=int, default=None)
    ap.add_argument("--cue-tokens", type=int, default=None)
    ap.add_argument("--probe-tokens", type=int, default=None)
    ap.add_argument("--out", default="results/calibration_cost.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate, context_ids
    from kvcalib.calib.data.documents import load_essays
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model)
    essays = load_essays()
    text = "\n\n".join(essays[k] for k in [args.essay] + sorted(essays))
    ids = eng.tokenizer(text, add_special_tokens=False).input_ids[:args.tokens]
    doc = eng.tokenizer.decode(ids)
    overrides = {k: v for k, v in (("n_probes", args.n_probes), ("cue_tokens", args.cue_tokens),
                                   ("probe_tokens", args.probe_tokens)) if v is not None}
    config = CalibrationConfig(method=args.method, **overrides)
    ctx, _ = context_ids(eng, doc)
    eng.capture(ctx[:64])  # warm-up
    calibrate(eng, eng.tokenizer.decode(ids[:300]), config)

    pre_wall, pre_cpu, cal_wall, cal_cpu, res = [], [], [], [], None
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        eng.capture(ctx)
        pre_wall.append(time.perf_counter() - w)
        pre_cpu.append(time.process_time() - c)
        w, c = time.perf_counter(), time.process_time()
        res = calibrate(eng, doc, config)
        cal_wall.append(time.perf_counter() - w)
        cal_cpu.append(time.process_time() - c)
    med = statistics.median
    report = {
        "model": args.model, "method": args.method, "context_tokens": int(ctx.numel()),
        "threads": torch.get_num_threads(), "repeats": args.repeats, "config": config.to_dict(),
        "prefill_wall_s": round(med(pre_wall), 3), "calibration_wall_s": round(med(cal_wall), 3),
        "ratio_wall": round(med(cal_wall) / med(pre_wall), 3),
        "prefill_cpu_s": round(med(pre_cpu), 3), "calibration_cpu_s": round(med(cal_cpu), 3),
        "ratio_cpu": round(med(cal_cpu) / med(pre_cpu), 3),
        "runs": {"prefill_wall_s": pre_wall, "calibration_wall_s": cal_wall, "prefill_cpu_s": pre_cpu,
                 "calibration_cpu_s": cal_cpu},
        "breakdown_wall_s_last_run": res.timings, "r_star": res.r_star, "target": 2.0,
    }
    report["meets_target"] = bool(min(report["ratio_wall"], report["ratio_cpu"]) <= 2.0)
    t = Table(title=f"calibration cost, {report['context_tokens']} tokens, {report['threads']} thread(s)")
    for col in ("", "prefill", "calibration", "ratio"):
        t.add_column(col)
    t.add_row("wall s", f"{report['prefill_wall_s']:.2f}", f"{report['calibration_wall_s']:.2f}",
              f"{report['ratio_wall']:.2f}")
    t.add_row("CPU s", f"{report['prefill_cpu_s']:.2f}", f"{report['calibration_cpu_s']:.2f}",
              f"{report['ratio_cpu']:.2f}")
    Console().print(t)
    Console().print("breakdown (wall, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in res.timings.items()))
    write_report(report, args.out, indent=1)


if __name__ == "__main__":
    main()
