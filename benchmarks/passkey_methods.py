"""Passkey accuracy of every scoring method × allocator × compression ratio, with the full cache as baseline.

Each example is prefilled once; its capture is reused for every method, allocator and ratio (methods whose scores
do not depend on the budget are scored once per example), and at each ratio all (method, allocator) caches decode
together as the rows of one batch (``greedy_decode_batch``). Prints a table and writes JSON.

    python benchmarks/passkey_methods.py                 # 20 examples at 1.5k tokens (slow on CPU)
    python benchmarks/passkey_methods.py --n 2           # quick check
    python benchmarks/passkey_methods.py --methods snapkv,lava --allocators uniform,lava --ratios 0.5,0.9
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from kvcalib.calib.budget import Budget, allocate, available_allocators
from kvcalib.calib.cache.decode import greedy_decode_batch
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.data import synthetic as tasks
from kvcalib.calib.pipeline import Engine
from kvcalib.calib.scorers import available_methods, get_scorer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def parse_list(text: str, valid: list[str], what: str) -> list[str]:
    items = valid if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in valid]
    if bad:
        sys.exit(f"unknown {what} {bad}: expected one of {valid}")
    return items


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20, help="number of passkey examples")
    ap.add_argument("--context-tokens", type=int, default=1500)
    ap.add_argument("--ratios", default="0.25,0.5,0.75,0.9")
    ap.add_argument("--methods", default="all", help="comma list or 'all'")
    ap.add_argument("--allocators", default="uniform,adakv,lava", help="comma list or 'all'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=9, help="(method, allocator) rows decoded together per ratio")
    ap.add_argument("--out", default="results/passkey_methods.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_list(args.methods, available_methods(), "method")
    allocators = parse_list(args.allocators, available_allocators(), "allocator")
    ratios = [float(r) for r in args.ratios.split(",")]

    eng = Engine.load(args.model)
    examples = tasks.passkey(eng.tokenizer, args.n, seed=args.seed, n_tokens=args.context_tokens)
    correct: dict[tuple[str, str, float], int] = {}
    full_correct = 0
    rows = []
    t_start = time.perf_counter()
    score_s: dict[str, float] = {m: 0.0 for m in methods}
    for i, ex in enumerate(examples):
        prompt = eng.prompt(ex.context, ex.question)
        cap = eng.capture(prompt.context_ids)
        text, _ = eng.answer(RaggedKVCache.from_full(cap.keys, cap.values), prompt.question_ids, args.max_new_tokens)
        ok = ex.score(text)
        full_correct += ok
        rows.append({"example": i, "method": "full", "allocator": None, "ratio": 0.0, "output": text, "correct": ok})
        scores: dict[tuple[str, float], torch.Tensor] = {}
        for m in methods:
            scorer = get_scorer(m)
            for r in ratios:
                if scorer.budget_dependent or r == ratios[0]:  # e.g. lookahead: scored per ratio
                    t0 = time.perf_counter()
                    scores[(m, r)] = scorer.score(cap, eng.score_context(Budget(ratio=r)))
                    score_s[m] += time.perf_counter() - t0
                else:
                    scores[(m, r)] = scores[(m, ratios[0])]
        for r in ratios:
            # every (method, allocator) at this ratio decodes as one batch row of a physically compressed cache
            combos = [(m, a) for m in methods for a in allocators]
            for s in range(0, len(combos), args.batch):
                part = combos[s:s + args.batch]
                keeps = torch.stack([allocate(scores[(m, r)], Budget(ratio=r), a) for m, a in part])  # (B, L, H, N)
                cache = RaggedKVCache.from_mask(cap.keys, cap.values, keeps)
                outs = greedy_decode_batch(eng.lm.model, cache, prompt.question_ids, args.max_new_tokens,
                                           eng.eos_ids)
                for (m, a), keep, ids in zip(part, keeps, outs):
                    text = eng.tokenizer.decode(ids, skip_special_tokens=True).strip()
                    ok = ex.score(text)
                    correct[(m, a, r)] = correct.get((m, a, r), 0) + ok
                    rows.append({"example": i, "method": m, "allocator": a, "ratio": r, "output": text,
                                 "correct": ok, "achieved_ratio": round(1 - float(keep.float().mean()), 4),
                                 "kept_bytes": int(keep.sum()) * 2 * cap.head_dim * cap.keys.element_size()})
        print(f"[{i + 1}/{len(examples)}] {time.perf_counter() - t_start:.0f}s", file=sys.stderr, flush=True)

    n = len(examples)
    acc = {m: {a: {str(r): correct[(m, a, r)] / n for r in ratios} for a in allocators} for m in methods}
    report = {
        "task": "passkey",
        "model": args.model,
        "n": n,
        "context_tokens": args.context_tokens,
        "seed": args.seed,
        "ratios": ratios,
        "full_accuracy": full_correct / n,
        "accuracy": acc,
        "score_seconds_per_example": {m: round(s / n, 4) for m, s in score_s.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
        "examples": rows,
    }
    print_table(report, methods, allocators, ratios)
    write_report(report, args.out, stream=sys.stderr)
    return report


def print_table(report: dict, methods: list[str], allocators: list[str], ratios: list[float]) -> None:
    head = f"{'method':<12}{'allocator':<10}" + "".join(f"{'r=' + str(r):>9}" for r in ratios)
    print(f"passkey accuracy, n={report['n']}, {report['context_tokens']} tokens, model {report['model']}")
    print(head)
    print("-" * len(head))
    print(f"{'full':<12}{'-':<10}" + "".join(f"{report['full_accuracy']:>9.2f}" for _ in ratios))
    for m in methods:
        for a in allocators:
            print(f"{m:<12}{a:<10}" + "".join(f"{report['accuracy'][m][a][str(r)]:>9.2f}" for r in ratios))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
