"""bf16 against fp32 (issue 16, item 5): speed, memory, r* and passkey of the same model in both dtypes, the fp32
engine being the baseline run in the same process.

    python benchmarks/bf16.py [--lengths 1024 2048] [--repeats 2] [--passkey 10] [--passkey-tokens 1500]
                              [--threads N] [--out results/bf16.json]

Per length: the plain prefill (a forward that keeps its KV cache, last-position logits only) and the default
calibration in each dtype, interleaved, medians of ``--repeats`` (wall and process CPU time); the bytes of the KV
cache the prefill keeps; r* of the same document in both dtypes. Then ``--passkey`` passkey examples (1.5k tokens by
default, seed 977, a seed no test uses) answered at the full cache and at ratio 0.5 (Compactor + AdaKV) in both dtypes:
accuracy and agreement. On a CPU without native bf16 matrix units (no AVX-512 BF16 / AMX) bf16 matmuls are
emulated and slower than fp32; the table says what this machine does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402
from memory import document  # noqa: E402
from scaling import timed  # noqa: E402


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return sorted(f for f in flags if "bf16" in f or f.startswith("amx") or f == "avx512f")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--passkey", type=int, default=10, help="passkey examples (0: skip)")
    ap.add_argument("--passkey-tokens", type=int, default=1500)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="results/bf16.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from rich.console import Console
    from rich.table import Table

    from kvcalib.calib.budget import Budget
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate, context_ids
    from kvcalib.calib.data.synthetic import passkey
    from kvcalib.calib.pipeline import Engine

    engines = {"fp32": Engine.load(args.model), "bf16": Engine.load(args.model, dtype="bf16")}
    config = CalibrationConfig()
    warm = document(engines["fp32"].tokenizer, 200)
    for eng in engines.values():
        calibrate(eng, warm, config)

    def plain(eng, ids):
        with torch.no_grad():
            return eng.lm.model(ids[None], use_cache=True, logits_to_keep=1)

    rows = []
    for n in args.lengths:
        text = document(engines["fp32"].tokenizer, n)
        ids, _ = context_ids(engines["fp32"], text)
        times = {d: {"prefill": [], "calibrate": []} for d in engines}
        r_star, cache_bytes = {}, {}
        for _ in range(args.repeats):
            for d, eng in engines.items():
                w, c, out = timed(lambda eng=eng, ids=ids: plain(eng, ids))
                times[d]["prefill"].append((w, c))
                cache_bytes[d] = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers
                                     for t in (layer.keys, layer.values))
                del out
                w, c, res = timed(lambda eng=eng, text=text: calibrate(eng, text, config))
                times[d]["calibrate"].append((w, c))
                r_star[d] = res.r_star
        med = {d: {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
                   for k, v in t.items()} for d, t in times.items()}
        row = {"tokens": int(ids.numel()), "seconds": med, "r_star": r_star, "cache_bytes": cache_bytes,
               "prefill_bf16_over_fp32": med["bf16"]["prefill"][0] / med["fp32"]["prefill"][0],
               "calibrate_bf16_over_fp32": med["bf16"]["calibrate"][0] / med["fp32"]["calibrate"][0],
               "prefill_cpu_bf16_over_fp32": med["bf16"]["prefill"][1] / med["fp32"]["prefill"][1],
               "cache_bf16_over_fp32": cache_bytes["bf16"] / cache_bytes["fp32"],
               "r_star_abs_diff": abs(r_star["bf16"] - r_star["fp32"])}
        rows.append(row)
        print(f"{n:>6} tokens: prefill bf16 ÷ fp32 {row['prefill_bf16_over_fp32']:.2f}, calibrate "
              f"{row['calibrate_bf16_over_fp32']:.2f}, cache {row['cache_bf16_over_fp32']:.2f}, r* "
              f"{r_star['fp32']:.3f} / {r_star['bf16']:.3f}", flush=True)

    pk = None
    if args.passkey:
        tok = engines["fp32"].tokenizer
        examples = passkey(tok, args.passkey, seed=977, n_tokens=args.passkey_tokens)
        answers = {d: {"full": [], "0.5": []} for d in engines}
        for ex in examples:
            for d, eng in engines.items():
                for label, ratio in (("full", 0.0), ("0.5", 0.5)):
                    res = eng.run(ex.context, ex.question, method=config.method, allocator=config.allocator,
                                  budget=Budget(ratio=ratio), max_new_tokens=24)
                    answers[d][label].append(ex.answer in res.answer)
        pk = {"n": len(examples), "seed": 977, "tokens": args.passkey_tokens,
              "accuracy": {d: {k: sum(v) / len(v) for k, v in a.items()} for d, a in answers.items()},
              "agreement_at_0.5": sum(a == b for a, b in zip(answers["fp32"]["0.5"], answers["bf16"]["0.5"]))
              / len(examples)}

    table = Table(title=f"bf16 ÷ fp32 ({args.model}, {torch.get_num_threads()} thread(s), CPU flags "
                        f"{' '.join(cpu_flags()) or 'none of avx512f/bf16/amx'})")
    for c in ("tokens", "prefill fp32 s", "prefill bf16 s", "÷", "calibrate fp32 s", "calibrate bf16 s", "÷",
              "cache ÷", "r* fp32", "r* bf16"):
        table.add_column(c, justify="right")
    for r in rows:
        s = r["seconds"]
        table.add_row(str(r["tokens"]), f"{s['fp32']['prefill'][0]:.2f}", f"{s['bf16']['prefill'][0]:.2f}",
                      f"{r['prefill_bf16_over_fp32']:.2f}", f"{s['fp32']['calibrate'][0]:.2f}",
                      f"{s['bf16']['calibrate'][0]:.2f}", f"{r['calibrate_bf16_over_fp32']:.2f}",
                      f"{r['cache_bf16_over_fp32']:.2f}", f"{r['r_star']['fp32']:.3f}", f"{r['r_star']['bf16']:.3f}")
    Console().print(table)
    if pk:
        acc = pk["accuracy"]
        print(f"passkey ({pk['n']} examples, seed 977): fp32 full {acc['fp32']['full']:.2f} / 0.5 "
              f"{acc['fp32']['0.5']:.2f}; bf16 full {acc['bf16']['full']:.2f} / 0.5 {acc['bf16']['0.5']:.2f}; "
              f"agreement at 0.5 {pk['agreement_at_0.5']:.2f}")
    write_report({"model": args.model, "threads": torch.get_num_threads(), "cpu_flags": cpu_flags(), "rows": rows,
                  "passkey": pk}, args.out)


if __name__ == "__main__":
    main()
