"""Overhead of ``compress(model, ratio=...)`` (issue 17, item 1): prediction + compression ÷ the plain prefill.

For each context length the same model runs (a) a plain prefill ``model(ids)`` and (b) the prefill under
``compress(model, method, allocator, ratio)`` — scoring inside the forward, then prediction (``ratio="auto"``),
allocation and the compressed cache. overhead = (b − a) / a (median of ``--repeats``); the split of (b) into
forward / scoring / prediction / compression comes from ``CompressionOutcome.timings``; ``overhead_parts`` =
(scoring + prediction + compression) / plain prefill, less sensitive to a loaded machine's drift between the two
runs. Target: ≤ 0.10 at 2k tokens.

    python benchmarks/integration_overhead.py [--tokens 1024 2048] [--ratio auto] [--repeats 3]
        [--device cpu|cuda] [--out results/integration_overhead.json]
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


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--ratio", default="auto", help="'auto' or a ratio in [0, 1)")
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--allocator", default="adakv")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="results/integration_overhead.json")
    args = ap.parse_args()
    ratio = args.ratio if args.ratio == "auto" else float(args.ratio)

    from kvcalib.calib import compress
    from kvcalib.calib.data.documents import build_prompt
    from kvcalib.calib.data.synthetic import haystack
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model, device=args.device)
    model, tok = eng.lm.model, eng.tokenizer
    with torch.no_grad(), compress(model, args.method, args.allocator, ratio, tokenizer=tok):  # warm-up
        model(torch.tensor([[1] * 64], device=args.device))
    rows = []
    for n in args.tokens:
        text = haystack(tok, n, random.Random(0))
        ids = build_prompt(tok, text, "").context_ids[:n][None].to(args.device)  # (1, n) kvcalib's prompt layout
        plain, total, parts = [], [], []
        for _ in range(args.repeats):
            with torch.no_grad():
                _sync(args.device)
                t0 = time.perf_counter()
                model(ids)
                _sync(args.device)
                plain.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                with compress(model, args.method, args.allocator, ratio, tokenizer=tok, text=text) as press:
                    model(ids)
                _sync(args.device)
                total.append(time.perf_counter() - t0)
                parts.append(press.outcome.timings)
        a, b = statistics.median(plain), statistics.median(total)
        split = {k: round(statistics.median(p.get(k, 0.0) for p in parts), 4)
                 for k in ("forward_s", "score_s", "predict_s", "compress_s")}
        rows.append({"context_tokens": int(ids.shape[1]), "plain_prefill_s": round(a, 4),
                     "compressed_prefill_s": round(b, 4), "overhead": round((b - a) / a, 4),
                     "overhead_parts": round((split["score_s"] + split["predict_s"] + split["compress_s"]) / a, 4),
                     "ratio": round(press.outcome.ratio, 4), "predictor": press.outcome.predictor_version, **split})

    print(f"{args.model} on {args.device}, method {args.method}, allocator {args.allocator}, ratio {args.ratio}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'tokens':>7}{'plain s':>10}{'compress s':>12}{'overhead':>10}{'parts':>8}{'score s':>9}{'predict s':>11}"
          f"{'compress s':>12}")
    for r in rows:
        print(f"{r['context_tokens']:>7}{r['plain_prefill_s']:>10.3f}{r['compressed_prefill_s']:>12.3f}"
              f"{r['overhead']:>10.3f}{r['overhead_parts']:>8.3f}{r['score_s']:>9.3f}{r['predict_s']:>11.3f}{r['compress_s']:>12.3f}")
    write_report({"model": args.model, "device": args.device, "method": args.method, "allocator": args.allocator,
                  "ratio": args.ratio, "threads": torch.get_num_threads(), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
