"""Throughput of batch calibration (issue 16, item 6): documents per hour of ONE worker process (one torch thread,
as a Celery worker beside others runs) over a corpus of 1–3k-token documents, for ``calibrate`` (``mode=full``) and
``predict`` (``mode=predict``), beside the plain prefills of the same documents in the same process (the baseline:
calibration seconds ÷ prefill seconds).

    python benchmarks/throughput.py [--n-docs 12] [--min-tokens 1000] [--max-tokens 3000] [--threads 1]
                                    [--out results/throughput.json]

Documents are essay pieces cut at seeded random lengths (``calib.data.documents.chunk_by_tokens``), the model is
loaded once (as a worker does), and every stage runs each document once, interleaved (prefill, predict,
calibrate) so a load change on a shared machine hits all three alike. Batching several documents of similar length
into one forward is not implemented: on CPU a batched forward costs the sum of its rows (no idle units to fill),
so it would not raise the throughput here; on a GPU it would (not measured: no GPU was lent).
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


def corpus(tokenizer, n: int, lo: int, hi: int, seed: int) -> list[str]:
    from kvcalib.calib.data.documents import chunk_by_tokens, load_essays

    rng = random.Random(seed)
    essays = sorted(load_essays().items())
    rng.shuffle(essays)
    docs: list[str] = []
    for _, text in essays:
        cut = rng.randint(lo, hi)
        docs += chunk_by_tokens(tokenizer, text, min(lo, cut), cut)[:1]
        if len(docs) >= n:
            break
    return docs[:n]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-docs", type=int, default=12)
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", default="results/throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate, context_ids, predict
    from kvcalib.calib.pipeline import Engine

    eng = Engine.load(args.model)
    config = CalibrationConfig()
    docs = corpus(eng.tokenizer, args.n_docs, args.min_tokens, args.max_tokens, args.seed)
    rows = []
    for text in tqdm(docs, desc="throughput", unit="doc"):
        ids, _ = context_ids(eng, text)
        t0 = time.perf_counter()
        out = eng.lm.model(ids[None], use_cache=True, logits_to_keep=1)  # a plain serving prefill
        t_prefill = time.perf_counter() - t0
        del out
        t0 = time.perf_counter()
        pred = predict(eng, text, config)  # the shipped predictor (service default)
        t_predict = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = calibrate(eng, text, config)
        t_cal = time.perf_counter() - t0
        rows.append({"tokens": int(ids.numel()), "prefill_s": t_prefill, "predict_s": t_predict,
                     "calibrate_s": t_cal, "r_star": res.r_star, "predicted_ratio": pred.ratio})
    total = {k: sum(r[k] for r in rows) for k in ("prefill_s", "predict_s", "calibrate_s")}
    report = {
        "model": args.model, "threads": args.threads, "n_docs": len(rows), "torch": torch.__version__,
        "tokens_mean": statistics.mean(r["tokens"] for r in rows),
        "docs_per_hour": {"calibrate": 3600 * len(rows) / total["calibrate_s"],
                          "predict": 3600 * len(rows) / total["predict_s"],
                          "prefill": 3600 * len(rows) / total["prefill_s"]},
        "calibrate_over_prefill": total["calibrate_s"] / total["prefill_s"],
        "predict_over_prefill": total["predict_s"] / total["prefill_s"],
        "documents": rows,
    }
    d = report["docs_per_hour"]
    print(f"{args.model}, {args.threads} thread(s), {len(rows)} documents of {args.min_tokens}-{args.max_tokens} "
          f"tokens (mean {report['tokens_mean']:.0f})")
    print(f"{'stage':>10} {'docs/hour':>10} {'÷ prefill':>10}")
    print(f"{'prefill':>10} {d['prefill']:>10.0f} {1.0:>10.2f}")
    print(f"{'predict':>10} {d['predict']:>10.0f} {report['predict_over_prefill']:>10.2f}")
    print(f"{'calibrate':>10} {d['calibrate']:>10.0f} {report['calibrate_over_prefill']:>10.2f}")
    write_report(report, args.out)


if __name__ == "__main__":
    main()
