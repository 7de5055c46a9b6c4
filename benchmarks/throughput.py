"""Throughput of batch calibration (issue 16, item 6): documents per hour of ONE worker process (one torch thread,
as a Celery worker beside others runs) over a corpus of 1–3k-token documents, for ``calibrate`` (``mode=full``) and
``predict`` (``mode=predict``), beside the plain prefills of the same documents in the same process (the baseline:
calibration seconds ÷ prefill seconds).

    python benchmarks/throughput.py [--n-docs 12] [--min-tokens 1000] [--max-tokens 3000] [--threads 1]
                                    [--out results/throughput.json]

Documents are essay pieces cut at seeded random lengths (``calib.data.documents.chunk_by_tokens``), the model is
loaded once (as a worker does), and every stage runs each document once, interleaved (prefill, predict,
calibrate) so a load change on a shared machine hits all three alike.

Batching: ``--pairs K`` also times K pairs of documents of similar length (neighbours by length, both cut to the
shorter) fed as ONE batch-2 forward against the two forwards one after the other, in the same process. Whether
batching documents would raise a worker's throughput is that ratio: on CPU a batched forward costs about the sum of
its rows (no idle units to fill; 0.97 measured on the 2-core development machine), so calibration does not batch
documents; on a GPU it would (not measured: no GPU was lent).
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
    ap.add_argument("--pairs", type=int, default=3, help="pairs of similar-length documents timed batched (0: skip)")
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
    batching = batched_pairs(eng, docs, args.pairs) if args.pairs else None
    total = {k: sum(r[k] for r in rows) for k in ("prefill_s", "predict_s", "calibrate_s")}
    report = {
        "model": args.model, "threads": args.threads, "n_docs": len(rows), "torch": torch.__version__,
        "tokens_mean": statistics.mean(r["tokens"] for r in rows),
        "docs_per_hour": {"calibrate": 3600 * len(rows) / total["calibrate_s"],
                          "predict": 3600 * len(rows) / total["predict_s"],
                          "prefill": 3600 * len(rows) / total["prefill_s"]},
        "calibrate_over_prefill": total["calibrate_s"] / total["prefill_s"],
        "predict_over_prefill": total["predict_s"] / total["prefill_s"],
        "documents": rows, "batching": batching,
    }
    d = report["docs_per_hour"]
    print(f"{args.model}, {args.threads} thread(s), {len(rows)} documents of {args.min_tokens}-{args.max_tokens} "
          f"tokens (mean {report['tokens_mean']:.0f})")
    print(f"{'stage':>10} {'docs/hour':>10} {'÷ prefill':>10}")
    print(f"{'prefill':>10} {d['prefill']:>10.0f} {1.0:>10.2f}")
    print(f"{'predict':>10} {d['predict']:>10.0f} {report['predict_over_prefill']:>10.2f}")
    print(f"{'calibrate':>10} {d['calibrate']:>10.0f} {report['calibrate_over_prefill']:>10.2f}")
    if batching:
        print(f"batch of 2 similar-length documents ÷ the two one after the other: "
              f"{batching['batched_over_sequential']:.2f} ({len(batching['pairs'])} pairs)")
    write_report(report, args.out)


@torch.no_grad()
def batched_pairs(eng, docs: list[str], k: int) -> dict:
    """Plain prefills of ``k`` pairs of neighbouring-length documents (cut to the shorter of each pair): one
    batch-2 forward against two batch-1 forwards, seconds of each (alternated, the better of two runs each)."""
    from kvcalib.calib.calibration.calibrate import context_ids

    ids = sorted((context_ids(eng, t)[0] for t in docs), key=lambda x: int(x.numel()))
    pairs = []
    for a, b in list(zip(ids[0::2], ids[1::2]))[:k]:
        n = min(int(a.numel()), int(b.numel()))
        x = torch.stack([a[:n], b[:n]])  # (2, n)
        seq, bat = [], []
        for _ in range(2):
            t0 = time.perf_counter()
            for row in x:
                eng.lm.model(row[None], use_cache=True, logits_to_keep=1)
            seq.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            eng.lm.model(x, use_cache=True, logits_to_keep=1)
            bat.append(time.perf_counter() - t0)
        pairs.append({"tokens": n, "sequential_s": min(seq), "batched_s": min(bat)})
    return {"pairs": pairs, "batched_over_sequential": sum(p["batched_s"] for p in pairs)
            / sum(p["sequential_s"] for p in pairs)}


if __name__ == "__main__":
    main()
