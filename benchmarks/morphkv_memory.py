"""KV-cache bytes held over a long generation: MorphKV (constant C + 1 entries per head) vs the full cache.

Both runs share one process, one model and one prefill; each decodes ``--new-tokens`` tokens greedily with EOS
ignored (fixed length) after the same prompt. Prints a table of bytes held at regular steps with the MorphKV/full
ratio, and writes JSON with the per-step series, peaks, decode speed and token agreement.

    python benchmarks/morphkv_memory.py                       # 1k-token context, 256 new tokens, C=256, R=32
    python benchmarks/morphkv_memory.py --new-tokens 512 --budget 128 --recent 16
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import torch

from kvcalib.calib.cache.decode import greedy_decode
from kvcalib.calib.cache.morphkv import MorphKV
from kvcalib.calib.cache.ragged import RaggedKVCache
from kvcalib.calib.data import synthetic as tasks
from kvcalib.calib.pipeline import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context-tokens", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--budget", type=int, default=256, help="MorphKV C (cache holds C + 1 entries per head)")
    ap.add_argument("--recent", type=int, default=32, help="MorphKV R")
    ap.add_argument("--fuse", default="sum", choices=["sum", "max"])
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--rows", type=int, default=9, help="table rows")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/morphkv_memory.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    eng = Engine.load(args.model)
    context = tasks.haystack(eng.tokenizer, args.context_tokens, random.Random(args.seed))
    prompt = eng.prompt(context, "Write a long, detailed essay continuing the text above.")
    cap = eng.capture(prompt.context_ids)
    model = eng.lm.model

    full_cache = RaggedKVCache.from_full(cap.keys, cap.values)
    full = greedy_decode(model, full_cache, prompt.question_ids, args.new_tokens, ignore_eos=True)
    policy = MorphKV(budget=args.budget, recent=args.recent, fuse=args.fuse, interval=args.interval)
    morph_cache = RaggedKVCache.from_full(cap.keys, cap.values)
    morph = greedy_decode(model, morph_cache, prompt.question_ids, args.new_tokens, policy=policy, ignore_eos=True)

    fb, mb = full.cache_bytes, morph.cache_bytes  # bytes held after each step (both: steps 0..new_tokens-2)
    steps = len(fb)
    agree = sum(a == b for a, b in zip(full.token_ids, morph.token_ids))
    first_diff = next((i for i, (a, b) in enumerate(zip(full.token_ids, morph.token_ids)) if a != b), None)
    rep = policy.report()
    report = {
        "model": args.model,
        "context_tokens": cap.num_tokens,
        "question_tokens": int(prompt.question_ids.numel()),
        "new_tokens": args.new_tokens,
        "morphkv": {k: v for k, v in rep.items() if k in ("budget", "recent", "fuse", "interval", "evictions")},
        "bytes_full": fb,
        "bytes_morphkv": mb,
        "max_entries_per_head_morphkv": rep["max_entries_per_head"][1:],
        "peak_bytes_full": max(fb),
        "peak_bytes_morphkv": max(mb),
        "final_ratio": mb[-1] / fb[-1],
        "peak_ratio": max(mb) / max(fb),
        "memory_saving_at_end": 1 - mb[-1] / fb[-1],
        "tokens_per_s_full": len(full.token_ids) / full.seconds,
        "tokens_per_s_morphkv": len(morph.token_ids) / morph.seconds,
        "token_agreement": agree / len(full.token_ids),
        "first_divergence_step": first_diff,
    }
    mib = 2**20
    print(f"MorphKV C={args.budget} R={args.recent} ({args.fuse}) vs full cache: {cap.num_tokens}-token context, "
          f"{args.new_tokens} new tokens, model {args.model}")
    print(f"{'step':>6}{'full MiB':>11}{'MorphKV MiB':>13}{'ratio':>8}{'entries/head':>14}")
    marks = sorted({min(steps - 1, round(i * (steps - 1) / max(1, args.rows - 1))) for i in range(args.rows)})
    for s in marks:
        print(f"{s:>6}{fb[s] / mib:>11.2f}{mb[s] / mib:>13.2f}{mb[s] / fb[s]:>8.3f}"
              f"{rep['max_entries_per_head'][s + 1]:>14}")
    print(f"peak: full {max(fb) / mib:.2f} MiB, MorphKV {max(mb) / mib:.2f} MiB "
          f"(saving {1 - max(mb) / max(fb):.1%}); decode {report['tokens_per_s_full']:.1f} vs "
          f"{report['tokens_per_s_morphkv']:.1f} tok/s; token agreement {report['token_agreement']:.1%}")
    write_report(report, args.out, stream=sys.stderr)
    return report


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
