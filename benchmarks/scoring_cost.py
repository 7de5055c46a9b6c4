"""Scoring cost per method: time to score a 2k-token context ÷ time of its prefill, same process.

    python benchmarks/scoring_cost.py [--tokens 2048] [--repeats 3] [--out results/scoring_cost.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="results/scoring_cost.json")
    args = ap.parse_args()

    from kvcalib.calib.budget import Budget
    from kvcalib.calib.data.synthetic import haystack
    from kvcalib.calib.pipeline import Engine
    from kvcalib.calib.scorers import available_methods

    eng = Engine.load(args.model)
    ids = eng.tokenizer(haystack(eng.tokenizer, args.tokens, random.Random(0)), return_tensors="pt").input_ids[0]
    eng.capture(ids[:64])  # warm-up
    prefill_s, cap = [], None
    for _ in range(args.repeats):
        cap = eng.capture(ids)
        prefill_s.append(cap.prefill_seconds)
    base = statistics.median(prefill_s)
    ctx = eng.score_context(Budget(ratio=0.5))
    rows = []
    for name in args.methods or available_methods():
        scorer = eng.scorer(name)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            scorer.score(cap, ctx)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        rows.append({"method": name, "score_s": round(t, 4), "score_over_prefill": round(t / base, 4)})

    print(f"context {cap.num_tokens} tokens, prefill {base:.3f} s (median of {args.repeats}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'method':<12}{'score s':>10}{'score/prefill':>15}")
    for r in rows:
        print(f"{r['method']:<12}{r['score_s']:>10.3f}{r['score_over_prefill']:>15.3f}")
    write_report({"context_tokens": cap.num_tokens, "prefill_s": base, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
