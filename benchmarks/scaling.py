"""Long-context scaling of calibration (issue 16, item 3): calibration ÷ plain prefill and each stage's seconds at
several context lengths, with the fitted growth exponent of every stage (seconds ∝ N^b, least squares on log–log;
target: calibration ÷ prefill ≤ 1.5 at every length).

    python benchmarks/scaling.py [--lengths 1024 2048 4096 8192] [--repeats 1] [--method compactor]
                                 [--dtype fp32] [--threads N] [--reference] [--out results/scaling.json]

The baseline is a plain prefill in the same process: one forward that keeps its KV cache and takes the logits of
the last position only (what serving does before decoding). Calibration and prefill runs are interleaved and the
medians compared; wall-clock and process CPU time are both reported (CPU time is the steadier on a shared
machine). Stages come from ``CalibrationResult.timings`` (prefill + NLL, scoring — inside the prefill when
streaming —, features, probes). ``--reference`` also times the reference capture-then-score path.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402
from memory import document  # noqa: E402


def timed(fn) -> tuple[float, float, object]:
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w0, time.process_time() - c0, out


def growth_exponent(lengths: list[int], seconds: list[float]) -> float | None:
    """b of seconds ≈ a·N^b by least squares on (log N, log seconds); None with fewer than 2 usable points."""
    pts = [(math.log(n), math.log(s)) for n, s in zip(lengths, seconds) if s > 0]
    if len(pts) < 2:
        return None
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reference", action="store_true", help="also time the reference capture-then-score path")
    ap.add_argument("--out", default="results/scaling.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from kvcalib.calib.calibration import calibrate as cal
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model, device=args.device, dtype=args.dtype)
    config = cal.CalibrationConfig(method=args.method)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    cal.calibrate(eng, document(eng.tokenizer, 200), config)  # warm-up

    def plain(ids):
        with torch.no_grad():
            out = eng.lm.model(ids[None].to(eng.lm.model.device), use_cache=True, logits_to_keep=1)
        sync()
        return out

    def calib(text, streaming=True):
        cal.STREAMING = streaming
        res = cal.calibrate(eng, text, config)
        sync()
        return res

    modes = [("calibration", True)] + ([("calibration_reference", False)] if args.reference else [])
    rows = []
    for n in args.lengths:
        text = document(eng.tokenizer, n)
        ids, _ = cal.context_ids(eng, text)
        plain(ids[:64])
        pw, pc, runs = [], [], {m: [] for m, _ in modes}
        for _ in range(args.repeats):
            w, c, _ = timed(lambda ids=ids: plain(ids))
            pw.append(w)
            pc.append(c)
            for mode, streaming in modes:
                w, c, res = timed(lambda text=text, streaming=streaming: calib(text, streaming))
                runs[mode].append((w, c, res.timings, res.r_star))
        row = {"tokens": int(ids.numel()), "length": n, "prefill_s": statistics.median(pw),
               "prefill_cpu_s": statistics.median(pc)}
        for mode, _ in modes:
            w = statistics.median(r[0] for r in runs[mode])
            c = statistics.median(r[1] for r in runs[mode])
            stages = {k: statistics.median(r[2][k] for r in runs[mode]) for k in runs[mode][0][2]}
            row[mode] = {"seconds": w, "cpu_s": c, "ratio": w / row["prefill_s"],
                         "cpu_ratio": c / row["prefill_cpu_s"], "stages": stages, "r_star": runs[mode][0][3]}
        rows.append(row)
        print(f"{n:>6} tokens: prefill {row['prefill_s']:.2f} s, calibration ÷ prefill "
              f"{row['calibration']['ratio']:.2f} (cpu {row['calibration']['cpu_ratio']:.2f})", flush=True)

    lengths = [r["tokens"] for r in rows]
    stage_names = sorted({k for r in rows for k in r["calibration"]["stages"]})
    exponents = {"prefill_s": growth_exponent(lengths, [r["prefill_s"] for r in rows]),
                 "calibration_s": growth_exponent(lengths, [r["calibration"]["seconds"] for r in rows])}
    for k in stage_names:
        exponents[k] = growth_exponent(lengths, [r["calibration"]["stages"].get(k, 0.0) for r in rows])

    table = Table(title=f"calibration scaling ({args.model}, {args.dtype}, {args.device}, method {args.method})")
    cols = ["tokens", "prefill s", "calibration s", "÷ prefill", "cpu ÷ prefill"] + stage_names
    for c in cols:
        table.add_column(c, justify="right")
    for r in rows:
        c = r["calibration"]
        table.add_row(str(r["tokens"]), f"{r['prefill_s']:.2f}", f"{c['seconds']:.2f}", f"{c['ratio']:.2f}",
                      f"{c['cpu_ratio']:.2f}", *[f"{c['stages'].get(k, 0.0):.2f}" for k in stage_names])
    fmt = lambda b: "-" if b is None else f"N^{b:.2f}"  # noqa: E731
    table.add_row("growth", fmt(exponents["prefill_s"]), fmt(exponents["calibration_s"]), "", "",
                  *[fmt(exponents[k]) for k in stage_names])
    Console().print(table)
    if args.reference:
        for r in rows:
            print(f"reference path at {r['tokens']}: {r['calibration_reference']['seconds']:.2f} s "
                  f"(÷ prefill {r['calibration_reference']['ratio']:.2f})")
    write_report({"model": args.model, "dtype": args.dtype, "device": args.device, "method": args.method,
                  "threads": torch.get_num_threads(), "rows": rows, "growth_exponents": exponents}, args.out)


if __name__ == "__main__":
    main()
