"""End-to-end GPU benchmark (issue 16, item 7): plain prefill, streaming capture + scoring, the reference
capture-then-score path, and a full calibration, with calibration ÷ prefill and peak CUDA memory, at 8k tokens on
SmolLM2-135M (its whole context) and 32k tokens on Qwen2.5-Coder-0.5B.

    python benchmarks/gpu_e2e.py                                   # both cases, bf16, cuda; results/gpu_e2e.json
    python benchmarks/gpu_e2e.py --cases smollm2-135m:8192 --dtype fp32 --repeats 3
    python benchmarks/gpu_e2e.py --device cpu --cases smollm2-135m:512   # smoke run of the script itself

Without a GPU (and without ``--device cpu``) nothing is timed: the script says so, writes a JSON stating it, and
exits 0. Times are medians over ``--repeats`` after a warm-up; peak memory is ``torch.cuda.max_memory_allocated``
over each stage (tensor bytes, not the caching allocator's reserve).
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
from memory import document  # noqa: E402

MIB = 2**20


def measure(fn, device: str, repeats: int) -> dict:
    cuda = device.startswith("cuda")
    secs, peaks = [], []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
            peaks.append((torch.cuda.max_memory_allocated() - base) / MIB)
        secs.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(secs), "peak_mib": statistics.median(peaks) if peaks else None}


def run_case(model: str, tokens: int, args) -> dict:
    from kvcalib.calib.calibration import calibrate as cal
    from kvcalib.calib.capture import prefill
    from kvcalib.calib.pipeline import Engine
    from kvcalib.calib.scorers import get_scorer
    from kvcalib.calib.scorers.streaming import capture_and_score

    eng = Engine.load(model, device=args.device, dtype=args.dtype)
    text = document(eng.tokenizer, tokens)
    ids, _ = cal.context_ids(eng, text)
    config = cal.CalibrationConfig(method=args.method)
    scorer = get_scorer(args.method)
    cal.calibrate(eng, document(eng.tokenizer, 300), config)  # warm-up (kernels compile, caches fill)
    dev_ids = ids.to(args.device)

    def plain():
        with torch.no_grad():
            eng.lm.model(dev_ids[None], use_cache=True, logits_to_keep=1)

    def reference():
        scorer.score(prefill(eng.lm, ids), eng.score_context())

    def streaming():
        capture_and_score(eng.lm, ids, scorer, eng.score_context())

    def calibration():
        cal.STREAMING = True
        cal.calibrate(eng, text, config)

    row = {"model": model, "tokens": int(ids.numel()), "dtype": args.dtype, "method": args.method}
    for name, fn in (("prefill", plain), ("capture_score_streaming", streaming),
                     ("capture_score_reference", reference), ("calibration", calibration)):
        try:
            row[name] = measure(fn, args.device, args.repeats)
        except torch.OutOfMemoryError as exc:
            row[name] = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        print(f"{model} {tokens}: {name} {row[name]}", flush=True)
    p = row["prefill"].get("seconds")
    for name in ("capture_score_streaming", "capture_score_reference", "calibration"):
        if p and "seconds" in row[name]:
            row[name]["ratio_to_prefill"] = row[name]["seconds"] / p
            if row[name]["peak_mib"] and row["prefill"]["peak_mib"]:
                row[name]["peak_ratio_to_prefill"] = row[name]["peak_mib"] / row["prefill"]["peak_mib"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["smollm2-135m:8192", "qwen2.5-coder-0.5b:32768"],
                    help="model:tokens pairs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="results/gpu_e2e.json")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: nothing measured (run this on a GPU machine)")
        write_report({"measured": False, "reason": "no CUDA device"}, args.out)
        return
    from rich.console import Console
    from rich.table import Table

    rows = []
    for case in args.cases:
        model, _, tokens = case.partition(":")
        try:
            rows.append(run_case(model, int(tokens or 8192), args))
        except Exception as exc:  # noqa: BLE001 - one case failing (model not installed) must not lose the others
            rows.append({"model": model, "tokens": int(tokens or 0), "error": f"{type(exc).__name__}: {exc}"})
            print(f"{case}: {rows[-1]['error']}", flush=True)
    table = Table(title=f"end to end on {args.device} ({args.dtype}, method {args.method})")
    for c in ("model", "tokens", "stage", "seconds", "÷ prefill", "peak MiB", "peak ÷ prefill"):
        table.add_column(c, justify="right")
    f = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        for stage in ("prefill", "capture_score_streaming", "capture_score_reference", "calibration"):
            s = r.get(stage, {"error": r.get("error", "")})
            table.add_row(r["model"], str(r["tokens"]), stage, s.get("error") or f(s.get("seconds")),
                          f(s.get("ratio_to_prefill")), f(s.get("peak_mib")), f(s.get("peak_ratio_to_prefill")))
    Console().print(table)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    write_report({"measured": True, "device": name, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
