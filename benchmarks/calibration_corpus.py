"""Corpus experiment: calibrate essay chunks, fit the predictors, evaluate the violation rate and KV reduction of
the conformal predictor against the best single global ratio.

    python benchmarks/calibration_corpus.py [--n-docs 80] [--min-tokens 1000] [--max-tokens 1500] [--alpha 0.1]
                                            [--splits 20] [--out-dir results/calibration_corpus] [--threads 1]

Equivalent CLI sequence (one split):

    kvcalib calibrate ../shared/data/essays --out results/calibration_corpus/labels.jsonl \\
        --min-tokens 1000 --max-tokens 1500 --limit 80 --shuffle 0
    kvcalib fit results/calibration_corpus/labels.jsonl --out results/calibration_corpus/predictors --alpha 0.1
    kvcalib evaluate results/calibration_corpus/labels.jsonl --predictor results/calibration_corpus/predictors \\
        --out-dir results/calibration_corpus

The reported run (docs/calibration.md §10: 223 essay chunks of 1k–3k tokens, 12-probe labels, two processes):

    python benchmarks/calibration_corpus.py --spread --chunkings 4 --n-docs 400 --min-tokens 1000 \
        --max-tokens 3000 --n-probes 12 --out-dir results/corpus13 --shard 0/2   # and --shard 1/2 beside it
    python benchmarks/calibration_corpus.py --skip-calibrate --out-dir results/corpus13

Labelling is resumable (stop and rerun at will). Beyond the single held-out split (seed 0) the fit/evaluate step is
repeated over ``--splits`` random train/calibration/test splits (by essay) and averaged, since one test split of
~20 documents measures a violation rate to ±0.07 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch


def mixed_corpus(path: Path, tokenizer, n_docs: int, seed: int, min_tokens: int, max_tokens: int) -> Path:
    """A heterogeneous corpus (``--mixed``): half essay chunks, half chunks of the Python standard library's source
    files (two genres whose curves truly differ), min..max tokens each, ids ``{essay|module}#{i}`` so splits
    keep every essay / module on one side."""
    import random
    import sysconfig

    from kvcalib.calib.data.corpus import load_corpus
    from kvcalib.calib.data.documents import chunk_by_tokens, essays_dir

    rng = random.Random(seed)
    essays = load_corpus(essays_dir(), tokenizer, min_tokens, max_tokens, seed=seed)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rng.shuffle(files)
    code = []
    for f in files:
        if len(code) >= n_docs - n_docs // 2:
            break
        pieces = chunk_by_tokens(tokenizer, f.read_text(encoding="utf-8", errors="replace"), min_tokens, max_tokens)
        code += [(f"py-{f.stem}#{i}", t) for i, t in enumerate(pieces[:2])]
    docs = [(d.id, d.text) for d in essays[:n_docs // 2]] + code[:n_docs - n_docs // 2]
    _write_atomic(path, docs)
    return path


def spread_corpus(path: Path, tokenizer, n_docs: int, seed: int, min_tokens: int, max_tokens: int,
                  chunkings: int = 1) -> Path:
    """Essay chunks whose lengths spread uniformly over min..max tokens (``--spread``; ``chunk_by_tokens`` fills
    chunks up to the maximum, so an ordinary corpus has nearly one length). Ids ``{essay}#{i}``.

    ``chunkings`` > 1 cuts every essay again with other random lengths (ids ``{essay}#c{k}-{i}``): more documents
    from the same text, overlapping those of the first cut — splits stay by essay, so no test essay is ever seen."""
    import random

    from kvcalib.calib.data.documents import essays_dir, load_essays

    rng = random.Random(seed)
    essays = load_essays(essays_dir())
    names = sorted(essays)
    rng.shuffle(names)
    docs = []
    for name, cut in ((nm, c) for c in range(chunkings) for nm in names):
        lines = [ln for ln in essays[name].splitlines() if ln.strip()]
        tag = "" if cut == 0 else f"c{cut}-"
        target, cur, n, i = rng.randint(min_tokens, max_tokens), [], 0, 0
        for ln in lines:
            cur.append(ln)
            n += len(tokenizer(ln + "\n", add_special_tokens=False).input_ids)
            if n >= target:
                if n <= max_tokens * 1.1:
                    docs.append((f"{name}#{tag}{i}", "\n".join(cur)))
                    i += 1
                target, cur, n = rng.randint(min_tokens, max_tokens), [], 0
    rng.shuffle(docs)
    _write_atomic(path, docs[:n_docs])
    return path


def _write_atomic(path: Path, docs: list[tuple[str, str]]) -> None:
    """Write the (id, text) corpus as JSONL through a rename, so that shards generating it at once never read a
    half-written file."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for doc_id, text in docs:
            fh.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    os.replace(tmp, path)


def read_label_files(out_dir: Path) -> list[dict]:
    """Every label of ``out_dir``: ``labels.jsonl`` and the shards' ``labels.I.jsonl``."""
    from kvcalib.calib.data.corpus import read_labels

    return [r for f in sorted(out_dir.glob("labels*.jsonl")) for r in read_labels(f)]


def calibrate_corpus(args, labels: Path) -> None:
    from tqdm import tqdm

    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.calib.data.corpus import append_label, done_keys, load_corpus
    from kvcalib.calib.data.documents import essays_dir
    from kvcalib.calib.pipeline import Engine

    extra = {} if args.n_probes is None else {"n_probes": args.n_probes}
    config = CalibrationConfig(method=args.method, allocator=args.allocator, tolerance=args.tolerance, **extra)
    eng = Engine.load(args.model)
    if args.mixed or args.spread:
        out = Path(args.out_dir) / "corpus.jsonl"
        if args.mixed:
            corpus = mixed_corpus(out, eng.tokenizer, args.n_docs, args.seed, args.min_tokens, args.max_tokens)
        else:
            corpus = spread_corpus(out, eng.tokenizer, args.n_docs, args.seed, args.min_tokens, args.max_tokens,
                                   args.chunkings)
        docs = load_corpus(corpus, eng.tokenizer, 1, 10**6)  # already cut: one document per line
        for d in docs:  # keep the ids of the generated corpus (load_corpus appends #0 to single pieces)
            d.id = d.id[:-2] if d.id.endswith("#0") and d.id.count("#") > 1 else d.id
    else:
        docs = load_corpus(args.corpus or essays_dir(), eng.tokenizer, args.min_tokens, args.max_tokens,
                           limit=args.n_docs, seed=args.seed)
    done = done_keys(read_label_files(labels.parent))
    todo = [d for d in docs if (d.content_hash, config.params_hash()) not in done]
    print(f"{len(docs)} documents ({len(docs) - len(todo)} already labelled)")
    shard, n_shards = args.shard
    todo = todo[shard::n_shards]
    for d in tqdm(todo, desc="calibrate", unit="doc"):
        append_label(labels, calibrate(eng, d.text, config, doc_id=d.id, full_curve=True).to_dict())


def summarise(rows: list[dict], alpha: float, splits: int, seed: int, out_dir: Path) -> dict:
    from kvcalib.calib.data.corpus import split_labels
    from kvcalib.calib.predictors import (
        default_feature_names,
        evaluate_predictors,
        fit_predictors,
        plot_evaluation,
        save_predictors,
    )

    y = np.array([r["r_star"] for r in rows])
    summary = {"n_docs": len(rows), "alpha": alpha,
               "r_star": {"mean": float(y.mean()), "std": float(y.std()), "min": float(y.min()),
                          "q10": float(np.quantile(y, 0.1)), "median": float(np.median(y)),
                          "q90": float(np.quantile(y, 0.9)), "max": float(y.max()),
                          "at_largest_grid_ratio": int(np.sum(y >= max(rows[0]["ratios"]) - 1e-9)),
                          "interpolated_below_first_grid_ratio": int(np.sum(y < min(rows[0]["ratios"])))},
               "non_monotone": int(sum(not r["monotone"] for r in rows)),
               "mean_seconds_per_doc": float(np.mean([r["seconds"] for r in rows])),
               "mean_context_tokens": float(np.mean([r["context_tokens"] for r in rows]))}
    # feature correlations with r* (what carries signal)
    names = default_feature_names([r["features"] for r in rows])  # common to every label, no per-layer ones
    corr = {}
    for k in names:
        x = np.array([r["features"].get(k, np.nan) for r in rows], dtype=float)
        if np.isfinite(x).all() and x.std() > 0 and y.std() > 0:
            corr[k] = float(np.corrcoef(x, y)[0, 1])
    summary["top_feature_correlations"] = dict(sorted(corr.items(), key=lambda kv: -abs(kv[1]))[:10])

    per_split = []
    for s in range(seed, seed + splits):
        train, cal, test = split_labels(rows, seed=s)
        preds = fit_predictors(train, cal, alpha=alpha, seed=s)
        rep = evaluate_predictors(preds, test, alpha)
        if s == seed:  # the reported single split: saved predictors, PNG, JSON
            for name, m in rep["predictors"].items():
                preds[name].metrics["test"] = {k: v for k, v in m.items() if k != "predictions"}
            save_predictors(out_dir / "predictors", preds, extra={
                "alpha": alpha, "config": rows[0]["config"],
                "split": {"seed": s, "train": [r["content_hash"] for r in train],
                          "cal": [r["content_hash"] for r in cal], "test": [r["content_hash"] for r in test]}})
            plot_evaluation(test, rep, out_dir / "calibration_eval.png", float(rows[0]["config"]["tolerance"]))
            single = json.loads(json.dumps(rep))
            for m in single["predictors"].values():
                m.pop("predictions", None)
            summary["split0"] = single
        per_split.append(rep)
    agg = {}
    for name in per_split[0]["predictors"]:
        ms = [rep["predictors"][name] for rep in per_split]
        # pooled over splits: total violations / total test documents, mean ratio over all test documents
        n = sum(m["n"] for m in ms)
        viol = sum(m["violation_rate"] * m["n"] for m in ms) / n
        mean_ratio = sum(m["mean_ratio"] * m["n"] for m in ms) / n
        agg[name] = {"violation_rate": viol, "mean_ratio": mean_ratio,
                     "mean_abs_error": sum(m["mean_abs_error"] * m["n"] for m in ms) / n,
                     "best_global_ratio_same_violation": statistics.mean(m["best_global_ratio"] for m in ms),
                     "gain_over_best_global": statistics.mean(m["gain_over_best_global"] for m in ms),
                     "splits_beating_best_global": sum(m["beats_best_global"] for m in ms),
                     "split_violation_rates": [m["violation_rate"] for m in ms]}
    summary["splits"] = splits
    summary["over_splits"] = agg
    return summary


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"shard index must satisfy 0 <= I < N, got {text!r}")
    return i, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None, help="folder of .txt or JSONL (default: the shared essays)")
    ap.add_argument("--n-docs", type=int, default=80)
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=1500)
    ap.add_argument("--method", default="compactor")
    ap.add_argument("--allocator", default="adakv")
    ap.add_argument("--tolerance", type=float, default=0.95)
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n-probes", type=int, default=None, help="reconstruction probes (default: CalibrationConfig's)")
    ap.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                    help="label only every N-th document from the I-th (0-based), into labels.I.jsonl: run N "
                         "processes at once, then once more with --skip-calibrate (every labels*.jsonl is read)")
    ap.add_argument("--skip-calibrate", action="store_true", help="only fit/evaluate the existing labels")
    ap.add_argument("--spread", action="store_true",
                    help="essay chunks with lengths spread uniformly over --min-tokens..--max-tokens")
    ap.add_argument("--chunkings", type=int, default=1,
                    help="with --spread: cut every essay this many times with different random lengths")
    ap.add_argument("--mixed", action="store_true",
                    help="heterogeneous variant: half essay chunks, half Python standard-library source chunks")
    ap.add_argument("--out-dir", default="results/calibration_corpus")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shard, n_shards = args.shard
    labels = out_dir / ("labels.jsonl" if n_shards == 1 else f"labels.{shard}.jsonl")
    if not args.skip_calibrate:
        calibrate_corpus(args, labels)
        if n_shards > 1:
            print(f"shard {shard}/{n_shards} done; summarise with --skip-calibrate once every shard is")
            return

    from kvcalib.calib.data.corpus import consistent_labels

    rows = consistent_labels(read_label_files(out_dir))
    summary = summarise(rows, args.alpha, args.splits, args.seed, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    r = summary["r_star"]
    print(f"{summary['n_docs']} documents, ~{summary['mean_context_tokens']:.0f} tokens, "
          f"{summary['mean_seconds_per_doc']:.1f} s each; r* mean {r['mean']:.3f} ± {r['std']:.3f} "
          f"(q10 {r['q10']:.3f}, median {r['median']:.3f}, q90 {r['q90']:.3f}); non-monotone {summary['non_monotone']}")
    print("top feature correlations with r*: " + ", ".join(
        f"{k} {v:+.2f}" for k, v in list(summary["top_feature_correlations"].items())[:6]))
    s0 = summary["split0"]
    print(f"split 0 ({s0['n']} test documents):")
    for name, m in s0["predictors"].items():
        print(f"  {name:>22}: violation {m['violation_rate']:.3f}  mean ratio {m['mean_ratio']:.3f}  "
              f"best global at ≤ that violation {m['best_global_ratio']:.3f}  beats: {m['beats_best_global']}")
    print(f"pooled over {summary['splits']} splits:")
    for name, m in summary["over_splits"].items():
        print(f"  {name:>22}: violation {m['violation_rate']:.3f}  mean ratio {m['mean_ratio']:.3f}  "
              f"best global (same violation, per split) {m['best_global_ratio_same_violation']:.3f}  "
              f"gain {m['gain_over_best_global']:+.3f}  beats in {m['splits_beating_best_global']}/{summary['splits']}")
    print(f"wrote {out_dir / 'summary.json'}, {out_dir / 'calibration_eval.png'}, {out_dir / 'predictors'}/")


if __name__ == "__main__":
    main()
