"""Task check of calibration: passkey retrieval answered at each context's recommended ratio r*(τ) vs the full cache.

    python benchmarks/calibration_passkey.py [--n 20] [--tokens 1500] [--tolerance 0.95] [--also-ratio 0.5]
                                             [--out results/calibration_passkey.json]

Every example's context is calibrated label-free (reconstruction probes only: the question is never seen), then the
question is answered from the full cache and from the cache compressed at that context's r*. Target: accuracy at r*
≥ 95 % of the full-cache accuracy. ``--also-ratio`` adds a fixed-ratio reference run.
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
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tolerance", type=float, default=0.95)
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--allocator", default="adakv")
    ap.add_argument("--also-ratio", type=float, action="append", default=[])
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--n-probes", type=int, default=None,
                    help="reconstruction probes per context (default: CalibrationConfig's)")
    ap.add_argument("--predictor", default=None,
                    help="also answer at this predictor's ratio (folder or file from `kvcalib fit`)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="results/calibration_passkey.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.n < 1:
        raise SystemExit("--n must be at least 1")

    from tqdm import tqdm

    from kvcalib.calib.budget import Budget
    from kvcalib.calib.cache.ragged import RaggedKVCache
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, _scores, calibrate
    from kvcalib.calib.data import synthetic as tasks
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model)
    extra = {} if args.n_probes is None else {"n_probes": args.n_probes}
    config = CalibrationConfig(method=args.method, allocator=args.allocator, tolerance=args.tolerance, **extra)
    predictor = None
    if args.predictor:
        from kvcalib.calib.predictors import load_predictor

        predictor = load_predictor(args.predictor)
    examples = tasks.passkey(eng.tokenizer, args.n, seed=args.seed, n_tokens=args.tokens)
    rows = []
    t0 = time.perf_counter()
    for ex in tqdm(examples, desc="passkey calibration", unit="ex"):
        res = calibrate(eng, ex.context, config)
        prompt = eng.prompt(ex.context, ex.question)
        cap = eng.capture(prompt.context_ids)
        scores = _scores(eng, cap, config)  # scored exactly as during calibration
        row = {"index": ex.meta["index"], "depth": ex.meta["depth"], "answer": ex.answer,
               "context_tokens": cap.num_tokens, "r_star": res.r_star, "monotone": res.monotone,
               "fidelity": res.fidelity}
        runs = [("full", 0.0), ("calibrated", res.r_star)] + [(f"fixed_{r}", r) for r in args.also_ratio]
        if predictor is not None:  # features come with the calibration result: no extra prefill
            runs.append(("predicted", float(min(max(predictor.predict([res.features])[0], 0.0), 0.95))))
        for name, ratio in runs:
            keep = eng.keep_mask(cap, scores, Budget(ratio=ratio), config.allocator)
            text, _ = eng.answer(RaggedKVCache.from_mask(cap.keys, cap.values, keep), prompt.question_ids,
                                 args.max_new_tokens)
            row[name] = {"ratio": 1.0 - float(keep.float().mean()), "output": text, "correct": ex.score(text)}
        rows.append(row)
    acc = {k: sum(r[k]["correct"] for r in rows) / len(rows) for k in rows[0] if isinstance(rows[0][k], dict)}
    report = {
        "task": "passkey", "n": args.n, "tokens": args.tokens, "seed": args.seed, "method": args.method,
        "allocator": args.allocator, "tolerance": args.tolerance, "config": config.to_dict(),
        "predictor": getattr(predictor, "version", None), "accuracy": acc,
        "relative_accuracy_calibrated": (acc["calibrated"] / acc["full"]) if acc["full"] else None,
        "mean_recommended_ratio": statistics.mean(r["r_star"] for r in rows),
        "min_recommended_ratio": min(r["r_star"] for r in rows),
        "max_recommended_ratio": max(r["r_star"] for r in rows),
        "target": "accuracy at r* >= 0.95 x full-cache accuracy", "seconds": time.perf_counter() - t0,
        "examples": rows,
    }
    report["meets_target"] = bool(acc["full"] == 0 or acc["calibrated"] >= 0.95 * acc["full"])
    print(f"passkey n={args.n} ~{args.tokens} tokens, {args.method}/{args.allocator}, τ={args.tolerance}")
    for k, v in acc.items():
        mean_ratio = statistics.mean(r[k]["ratio"] for r in rows)
        print(f"  {k:>12}: accuracy {v:.2%}  (mean compression ratio {mean_ratio:.3f})")
    print(f"  calibrated / full = {report['relative_accuracy_calibrated']}  -> meets target: {report['meets_target']}")
    write_report(report, args.out, indent=1)


if __name__ == "__main__":
    main()
