"""Peak memory of a plain prefill that keeps its KV cache, of ``calibrate`` (streaming, the default, and the
reference capture-then-score path) and of ``featurize`` (what ``predict`` costs: one prefill + scores + features),
at several context lengths (issue 16, item 2; target: calibrate's peak ≤ 1.3× the plain prefill's).

    python benchmarks/memory.py [--lengths 1024 2048 4096 8192] [--method compactor] [--dtype fp32]
                                [--threads N] [--out results/memory.json]

Every (stage, length) runs in a fresh child process (``--child``) so that one stage's allocator state never shows in
another's peak: the child loads the model, warms up, then samples its resident set (``/proc/self/statm``) every
2 ms while the stage runs (after ``malloc_trim``, so freed warm-up memory does not mask growth). Reported per
stage: the peak RSS above the post-load baseline (MiB), its ratio to the plain prefill's at the same length, and the
tensor bytes the stage holds at its end (the plain prefill: its KV cache; the captures: what ``prefill`` kept —
keys, values, pre-RoPE keys, queries).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from common import write_report  # noqa: E402

STAGES = ("prefill", "calibrate", "calibrate_reference", "predict", "capture_reference", "capture_streaming")
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Max RSS over a ``with`` block, sampled every ``interval`` seconds by a thread (torch ops release the GIL)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = rss_bytes()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_bytes())


def document(tokenizer, tokens: int) -> str:
    from kvcalib.calib.data.documents import load_essays

    essays = load_essays()
    text = "\n\n".join(essays[k] for k in sorted(essays))
    while len(tokenizer(text, add_special_tokens=False).input_ids) < tokens:
        text = text + "\n\n" + text
    return tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids[:tokens])


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def child(stage: str, tokens: int, method: str, dtype: str, model: str) -> dict:
    import torch

    from kvcalib.calib.calibration import calibrate as cal
    from kvcalib.calib.capture import prefill
    from kvcalib.calib.pipeline import Engine
    from kvcalib.calib.scorers import get_scorer
    from kvcalib.calib.scorers.streaming import capture_and_score

    eng = Engine.load(model, dtype=dtype)
    text = document(eng.tokenizer, tokens)
    ids, _ = cal.context_ids(eng, text)
    config = cal.CalibrationConfig(method=method)
    cal.calibrate(eng, document(eng.tokenizer, 200), config)  # warm-up: every code path once, at a small size
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the warm-up's freed heap back: it would hide the stage's growth
    held = 0
    base = rss_bytes()
    with torch.no_grad(), PeakSampler() as s:
        if stage == "prefill":  # what serving does: a forward that keeps its cache, logits of the last position
            out = eng.lm.model(ids[None], use_cache=True, logits_to_keep=1)
            kv = out.past_key_values
            held = sum(tensor_bytes(layer.keys, layer.values) for layer in kv.layers)
        elif stage in ("calibrate", "calibrate_reference"):
            cal.STREAMING = stage == "calibrate"
            cal.calibrate(eng, text, config)
        elif stage == "predict":
            cal.featurize(eng, text, config)
        elif stage == "capture_reference":
            cap = prefill(eng.lm, ids)
            held = tensor_bytes(cap.keys, cap.values, cap.keys_pre, cap.queries)
        elif stage == "capture_streaming":
            cap = capture_and_score(eng.lm, ids, get_scorer(method)).capture
            held = tensor_bytes(cap.keys, cap.values, cap.keys_pre, cap.queries)
        else:
            raise SystemExit(f"unknown stage {stage!r}: expected one of {STAGES}")
    return {"stage": stage, "tokens": int(ids.numel()), "baseline_mib": base / MIB, "peak_mib": s.peak / MIB,
            "peak_over_baseline_mib": (s.peak - base) / MIB, "held_mib": held / MIB}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the children")
    ap.add_argument("--out", default="results/memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print("RESULT " + json.dumps(child(args.child, args.tokens, args.method, args.dtype, args.model)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for n in args.lengths:
        for stage in args.stages:
            cmd = [sys.executable, __file__, "--child", stage, "--tokens", str(n), "--method", args.method,
                   "--dtype", args.dtype, "--model", args.model] + (["--threads", str(args.threads)]
                                                                    if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(f"{stage} at {n} tokens failed:\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[-1][7:]) | {"length": n})
            r = rows[-1]
            print(f"{stage:>20} {n:>6}: peak {r['peak_mib']:.0f} MiB (+{r['peak_over_baseline_mib']:.0f} over "
                  f"{r['baseline_mib']:.0f}), held {r['held_mib']:.0f} MiB", flush=True)
            write_report({"partial": True, "rows": rows}, args.out)  # kept if a later stage is cut short
    for r in rows:
        base = next((x for x in rows if x["length"] == r["length"] and x["stage"] == "prefill"), None)
        r["ratio_to_prefill"] = (r["peak_mib"] / base["peak_mib"]) if base else None
        r["delta_ratio_to_prefill"] = (r["peak_over_baseline_mib"] / base["peak_over_baseline_mib"]
                                       if base and base["peak_over_baseline_mib"] > 0 else None)
    table = Table(title=f"peak memory ({args.model}, {args.dtype}, method {args.method})")
    for c in ("stage", "tokens", "peak RSS MiB", "÷ prefill", "peak − baseline MiB", "÷ prefill's", "held MiB"):
        table.add_column(c, justify="right")
    for r in rows:
        fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
        table.add_row(r["stage"], str(r["tokens"]), f"{r['peak_mib']:.0f}", fmt(r["ratio_to_prefill"]),
                      f"{r['peak_over_baseline_mib']:.0f}", fmt(r["delta_ratio_to_prefill"]), f"{r['held_mib']:.0f}")
    Console().print(table)
    write_report({"model": args.model, "dtype": args.dtype, "method": args.method, "rows": rows}, args.out)


if __name__ == "__main__":
    main()
