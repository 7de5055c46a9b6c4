"""Calibration grounded in answers: label documents with task truth, compare the fidelity candidates, fit on one
genre, evaluate on another (held out), check passkey at the recommended ratios.

    # 1. label (resumable, appends JSONL; one process, one thread)
    python benchmarks/calibration_truth.py label --genre essays --n-docs 24 --min-tokens 500 --max-tokens 1000 \\
        --fidelities all --out results/truth/essays_small.jsonl
    python benchmarks/calibration_truth.py label --genre essays --n-docs 120 --min-tokens 1000 --max-tokens 2000 \\
        --out results/truth/essays.jsonl
    python benchmarks/calibration_truth.py label --genre metadata --n-docs 110 --min-tokens 1000 --max-tokens 2000 \\
        --out results/truth/metadata.jsonl
    # 2. the fidelity candidates against the truth (rank correlation with r*_task, reduction at ε)
    python benchmarks/calibration_truth.py compare results/truth/essays_small.jsonl
    # 2b. which (method, allocator) keeps the most answers (same documents, one label file per configuration)
    python benchmarks/calibration_truth.py engines results/truth/compactor-adakv.jsonl results/truth/snapkv-adakv.jsonl
    # 3. fit on essays (train + calibration split), test on the held-out genre
    python benchmarks/calibration_truth.py evaluate --fit results/truth/essays.jsonl \\
        --test results/truth/metadata.jsonl --epsilon 0.05 --out results/calibration_truth.json
    # 4. ship the predictors fitted on the calibration genre as package data (compact labels beside them; exactly
    #    what `kvcalib fit calib/predictors/shipped/<model>/labels.jsonl --split 0.5,0.5,0` reproduces)
    python benchmarks/calibration_truth.py ship results/truth/essays.jsonl --model smollm2-135m
    # 4b. the ceiling at ε: the per-context oracle, and one question draw against another (test-retest)
    python benchmarks/calibration_truth.py label --genre essays --min-tokens 1000 --max-tokens 1600 \\
        --method kvzip --allocator global --like results/truth/essays_kvzip.jsonl --question-seed 1 \\
        --out results/truth/essays_kvzip_q1.jsonl
    python benchmarks/calibration_truth.py ceiling results/truth/essays_kvzip.jsonl \\
        --retest results/truth/essays_kvzip_q1.jsonl
    # 5. passkey at each context's recommended ratio (a seed no test uses)
    python benchmarks/calibration_truth.py passkey --predictor results/truth/predictors --n 20 --seed 4242

Genres: ``essays`` — the essay corpus (``calib.data.documents``); ``metadata`` — the long descriptions of the
installed packages' METADATA files (technical documentation prose: READMEs, changelogs, usage), a genre that plays
no part in any choice (labelled only for the final evaluation); ``corpus`` — one's own texts (``--corpus PATH``),
to fit one's own predictor (``kvcalib fit LABELS --out predictors/``). Documents are cut at line boundaries, each
text at
a seeded random length in min..max tokens (at most ``--per-source`` pieces per essay / package); splits are by
source. Every document gets needles, a key–value block, a multi-needle and document questions
(``calib.data.questions``, seed from the document id).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside it, also under -m
from calibration_truth_analysis import (  # noqa: E402
    ceiling,
    compare_engines,
    compare_fidelities,
    evaluate_full,
    evaluate_split,
    passkey_check,
    plot_engines,
    plot_retest,
)
from common import write_report  # noqa: E402


# ---------------------------------------------------------------------------------------------------- genres
def metadata_texts() -> list[tuple[str, str]]:
    """(package, long description) of every installed distribution with a description of 4k+ characters (kvcalib's
    own README excluded: it is ours, so it is not held out)."""
    from importlib import metadata

    out, seen = [], set()
    for dist in metadata.distributions():
        name = (dist.metadata.get("Name") or "").lower()
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        if name and name not in seen and name != "kvcalib" and len(body) >= 4000:  # not our own README
            seen.add(name)
            out.append((name, body))
    return sorted(out)


def essay_texts() -> list[tuple[str, str]]:
    from kvcalib.calib.data.documents import load_essays

    return sorted(load_essays().items())


GENRES = {"essays": essay_texts, "metadata": metadata_texts, "corpus": None}


def documents(tokenizer, genre: str, n_docs: int, min_tokens: int, max_tokens: int, seed: int,
              per_source: int, corpus: str | None = None) -> list[tuple[str, str]]:
    """(id, text) pieces of ``genre`` (``corpus``: one's own folder of .txt or JSONL of {"id", "text"}): each
    source cut at a seeded random length in min..max tokens."""
    from kvcalib.calib.data.corpus import read_texts
    from kvcalib.calib.data.documents import chunk_by_tokens

    rng = random.Random(seed)
    if genre == "corpus":
        if not corpus:
            raise SystemExit("--genre corpus needs --corpus PATH (a folder of .txt or a JSONL of {id, text})")
        texts = sorted(read_texts(corpus))
    else:
        texts = GENRES[genre]()
    rng.shuffle(texts)
    pieces: list[tuple[str, str]] = []
    for name, text in texts:
        cut = rng.randint(min_tokens, max_tokens)
        chunks = chunk_by_tokens(tokenizer, text, min(min_tokens, cut), cut)
        tag = f"@s{seed}" if seed else ""  # other cuts of the same sources: other ids, same source group
        pieces += [(f"{genre}:{name}#{i}{tag}", c) for i, c in enumerate(chunks[:per_source])]
    rng.shuffle(pieces)
    return pieces[:n_docs]


def documents_by_id(tokenizer, args, ids: list[str], source: str) -> dict[str, str]:
    """{id: text} of the labelled documents ``ids`` (read from ``source``), rebuilt from every cut they name (an id
    tagged ``@s<seed>`` comes from the cut of that seed, an untagged one from seed 0; ``documents``) with the
    genre and token arguments; an id no cut holds is a clear error."""
    seeds = {int(i.rsplit("@s", 1)[1]) if "@s" in i else 0 for i in ids}
    texts = {k: v for sd in sorted(seeds)
             for k, v in documents(tokenizer, args.genre, 10**6, args.min_tokens, args.max_tokens, sd,
                                   args.per_source, args.corpus)}
    if missing := [i for i in ids if i not in texts]:
        raise SystemExit(f"{source}: {len(missing)} documents are not in these cuts (first {missing[0]}; other "
                         "--genre/--*-tokens/--per-source?)")
    return texts


def _json_arg(text: str, flag: str) -> dict:
    """A JSON object given on the command line (``{}`` when empty)."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise SystemExit(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{flag} must be a JSON object, got {text!r}")
    return value


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shard must be I/N (two integers), got {text!r}") from None
    if not 0 <= i < n:
        raise SystemExit(f"--shard I/N needs 0 <= I < N, got {text!r}")
    return i, n


# ---------------------------------------------------------------------------------------------------- label
def label(args) -> None:
    from tqdm import tqdm

    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.calibration.fidelity import FIDELITIES
    from kvcalib.calib.calibration.suite import truth_record
    from kvcalib.calib.calibration.truth import TruthConfig
    from kvcalib.calib.data.hashing import content_hash
    from kvcalib.calib.data.questions import QuestionConfig, make_questions
    from kvcalib.calib.pipeline import Engine

    fids = FIDELITIES if args.fidelities == "all" else tuple(f for f in args.fidelities.split(",") if f and
                                                                f != "none")
    eng = Engine.load(args.model)
    config = CalibrationConfig(method=args.method, allocator=args.allocator,
                               method_params=_json_arg(args.method_params, "--method-params"),
                               allocator_params=_json_arg(args.allocator_params, "--allocator-params")).validate()
    # every document question is labelled; the confidence gate is applied when the records are read
    tcfg = TruthConfig(method=config.method, method_params=config.method_params, allocator=config.allocator,
                       allocator_params=config.allocator_params, ratios=config.ratios, doc_min_confidence=0.0)
    out = Path(args.out)
    done = set()
    if out.is_file():
        for line in out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                r = json.loads(line)
                done.add(r["id"])
    try:
        qcfg = QuestionConfig(*(int(x) for x in args.questions.split(","))).validate()
    except (TypeError, ValueError) as exc:
        raise SystemExit("--questions must be four integers n_needles,kv_pairs,multi_values,doc_questions: "
                         f"{exc}") from None
    if args.like:  # the documents of another label file (a retest with another --question-seed, another engine)
        like = [json.loads(x)["id"] for x in Path(args.like).read_text(encoding="utf-8").splitlines() if x.strip()]
        texts = documents_by_id(eng.tokenizer, args, like, f"--like {args.like}")
        docs = [(i, texts[i]) for i in like]
    else:
        docs = documents(eng.tokenizer, args.genre, args.n_docs, args.min_tokens, args.max_tokens, args.seed,
                         args.per_source, args.corpus)
    if args.shard:  # I/N: every N-th document from the I-th (parallel labelling processes, one file each)
        k, n = _shard(args.shard)
        docs = docs[k::n]
    todo = [(i, t) for i, t in docs if i not in done]
    print(f"{len(docs)} {args.genre} documents, {len(docs) - len(todo)} done, {len(todo)} to label -> {out}",
          flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(todo, desc=f"truth {args.genre}", unit="doc", mininterval=5)
    for doc_id, text in bar:
        qseed = args.question_seed + zlib.crc32(doc_id.encode())
        doc = make_questions(text, qseed, qcfg)
        t0 = time.perf_counter()
        rec = truth_record(eng, doc, config, fids, doc_id=doc_id, genre=args.genre, truth_config=tcfg)
        rec["source_hash"] = content_hash(text)
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")
        bar.set_postfix_str(f"{rec['context_tokens']} tok r*_task {rec['r_star_task']:.2f} "
                            f"counted {rec['n_counted']} {time.perf_counter() - t0:.0f}s")


# ---------------------------------------------------------------------------------------------------- fidelity
def add_fidelity(args) -> None:
    """Add fidelity curves (``--fidelities``) to truth records labelled without them: each document is rebuilt
    from the same genre / cut arguments and question seed (its content hash checked), prefilled and probed again;
    the truth is kept as labelled. Resumable (appends to ``--out``)."""
    from tqdm import tqdm

    from kvcalib.calib.calibration.calibrate import CalibrationConfig, _noop, _prepare
    from kvcalib.calib.calibration.suite import document_fidelity_curves
    from kvcalib.calib.data.hashing import content_hash
    from kvcalib.calib.data.questions import QuestionConfig, make_questions
    from kvcalib.calib.pipeline import Engine

    fids = tuple(f for f in args.fidelities.split(",") if f)
    eng = Engine.load(args.model)
    records = [json.loads(x) for x in Path(args.labels).read_text(encoding="utf-8").splitlines() if x.strip()]
    if args.shard:
        i, n = _shard(args.shard)
        records = records[i::n]
    out = Path(args.out)
    done = {json.loads(x)["id"] for x in out.read_text(encoding="utf-8").splitlines() if x.strip()} \
        if out.is_file() else set()
    texts = documents_by_id(eng.tokenizer, args, [r["id"] for r in records], args.labels)
    qcfg = QuestionConfig(*(int(x) for x in args.questions.split(","))).validate()
    for rec in tqdm([r for r in records if r["id"] not in done], desc="fidelity", unit="doc", mininterval=5):
        doc = make_questions(texts[rec["id"]], rec["question_seed"], qcfg)
        if content_hash(doc.text) != rec["content_hash"]:
            raise SystemExit(f"{rec['id']}: rebuilt document differs (other --genre/--seed/--*-tokens/--questions?)")
        config = CalibrationConfig.from_dict(rec["config"], stored=True)
        cap, doc_start, _, keep, _, _ = _prepare(eng, doc.text, config, _noop)
        rec = dict(rec, fidelity=document_fidelity_curves(eng, doc, cap, doc_start, keep, config, fids))
        with out.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, allow_nan=False) + "\n")


# ---------------------------------------------------------------------------------------------------- ship
SHIP_SPLIT = (0.5, 0.5, 0.0)  # train / calibration / (no) test: the held-out test is another genre


def ship(args) -> None:
    """Compact the calibration genre's truth records into ``calib/predictors/shipped/<model>/labels.jsonl`` and fit
    the shipped predictors from that very file (as ``kvcalib fit … --split 0.5,0.5,0`` does: same versions)."""
    from kvcalib.calib import defaults
    from kvcalib.calib.calibration.suite import compact_record
    from kvcalib.calib.calibration.truth_labels import read_truth_labels
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.calib.predictors.bundled import SHIPPED, config_folder_name
    from kvcalib.calib.predictors.io import keep_unchanged_versions
    from kvcalib.calib.predictors.risk import fit_truth_labels

    records = [json.loads(x) for x in Path(args.labels).read_text(encoding="utf-8").splitlines() if x.strip()]
    models = {r.get("model") for r in records}
    if models != {args.model}:
        raise SystemExit(f"{args.labels} holds records of models {sorted(map(str, models))}, not only {args.model}")
    engines = {(r["config"]["method"], r["config"]["allocator"]) for r in records}
    if len(engines) != 1:
        raise SystemExit(f"{args.labels} mixes engine configurations {sorted(engines)}")
    method, allocator = engines.pop()
    folder = SHIPPED / args.model  # the package defaults' folder; another configuration ships beside it
    if (method, allocator) != (defaults.METHOD, defaults.ALLOCATOR):
        folder = folder / config_folder_name(method, allocator)
    folder.mkdir(parents=True, exist_ok=True)
    labels = folder / "labels.jsonl"
    labels.write_text("".join(json.dumps(compact_record(r), allow_nan=False) + "\n" for r in records),
                      encoding="utf-8")
    rows = read_truth_labels(labels)
    preds, split = fit_truth_labels(rows, SHIP_SPLIT, seed=args.seed, epsilon=args.epsilon, alpha=args.alpha)
    kept = keep_unchanged_versions(folder, preds)  # an unchanged predictor keeps the version it shipped with
    save_predictors(folder, preds, extra={"default": "risk", "labels": "labels.jsonl", "epsilon": args.epsilon,
                                          "alpha": args.alpha, "target": "task_truth", "split": split,
                                          "model": args.model, "genre": sorted({r.get("genre", "") for r in rows})})
    print(f"shipped {len(preds)} predictors for {args.model} fitted on {len(rows)} documents -> {folder}/ "
          f"(default risk {preds['risk'].version}; versions kept: {', '.join(kept) or 'none'})")


def _document_args(p: argparse.ArgumentParser) -> None:
    """Which documents and questions (``documents`` + ``make_questions``), shared by ``label`` and ``fidelity``."""
    p.add_argument("--genre", choices=sorted(GENRES), required=True)
    p.add_argument("--corpus", default=None, help="with --genre corpus: a folder of .txt or a JSONL file")
    p.add_argument("--min-tokens", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--per-source", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", default="4,4,0,2",
                   help="n_needles,kv_pairs,multi_values,doc_questions per document (the multi-needle is off by "
                        "default: SmolLM2-135M never answers it with the full cache, so it would never count)")
    p.add_argument("--model", default="smollm2-135m")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lb = sub.add_parser("label", help="label documents with task truth (+ fidelity curves)")
    _document_args(lb)
    lb.add_argument("--out", required=True)
    lb.add_argument("--n-docs", type=int, default=24)
    lb.add_argument("--question-seed", type=int, default=0)
    lb.add_argument("--like", default=None, help="a truth-label file: label its documents (by id, from every cut "
                    "its ids name; overrides --n-docs and --seed), e.g. with another --question-seed for the retest")
    lb.add_argument("--fidelities", default="none", help="'all', 'none' or a comma-separated list")
    lb.add_argument("--method", default="compactor")
    lb.add_argument("--method-params", default="{}", help='JSON, e.g. \'{"blend": 0.5}\'')
    lb.add_argument("--allocator-params", default="{}", help='JSON, e.g. \'{"alpha": 0.5}\'')
    lb.add_argument("--allocator", default="adakv")
    lb.add_argument("--shard", default=None, help="I/N: every N-th document from the I-th (parallel processes)")
    cp = sub.add_parser("compare", help="fidelity candidates vs task truth")
    cp.add_argument("labels")
    cp.add_argument("--epsilon", type=float, default=0.05)
    cp.add_argument("--out", default="results/calibration_truth_fidelity.json")
    en = sub.add_parser("engines", help="(method, allocator) configurations vs task truth, same documents")
    en.add_argument("labels", nargs="+", help="one truth-label file per configuration (label --method/--allocator)")
    en.add_argument("--epsilon", type=float, default=0.05)
    en.add_argument("--out", default="results/calibration_truth_engines.json")
    en.add_argument("--plot", default=None, help="a PNG of the loss curves, e.g. docs/img/engines.png")
    ev = sub.add_parser("evaluate", help="fit on one genre, test on another")
    ev.add_argument("--fit", required=True)
    ev.add_argument("--test", required=True)
    ev.add_argument("--epsilon", type=float, default=0.05)
    ev.add_argument("--alpha", type=float, default=0.1)
    ev.add_argument("--cal-fraction", type=float, default=0.5)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--bootstrap", type=int, default=2000)
    ev.add_argument("--predictors-out", default="results/truth/predictors")
    ev.add_argument("--out", default="results/calibration_truth.json")
    fd = sub.add_parser("fidelity", help="add fidelity curves to truth records labelled without them")
    fd.add_argument("labels")
    _document_args(fd)  # exactly what `label` was given: the documents are rebuilt from them
    fd.add_argument("--out", required=True)
    fd.add_argument("--fidelities", default="reconstruction")
    fd.add_argument("--shard", default=None, help="I/N: every N-th record from the I-th")
    sh = sub.add_parser("ship", help="compact labels + fitted predictors into the package (shipped default)")
    sh.add_argument("labels")
    sh.add_argument("--model", default="smollm2-135m")
    sh.add_argument("--epsilon", type=float, default=0.05)
    sh.add_argument("--alpha", type=float, default=0.1)
    sh.add_argument("--seed", type=int, default=0)
    ef = sub.add_parser("evaluate-full", help="risk control over the calibration's r* (mode=full), held out")
    ef.add_argument("--fit", required=True)
    ef.add_argument("--test", required=True)
    ef.add_argument("--epsilon", type=float, default=0.05)
    ef.add_argument("--tau", type=float, default=0.95)
    ef.add_argument("--seed", type=int, default=0)
    ef.add_argument("--bootstrap", type=int, default=2000)
    ef.add_argument("--predictors-out", default="results/truth/predictors_full")
    ef.add_argument("--out", default="results/calibration_truth_full.json")
    ce = sub.add_parser("ceiling", help="the per-context oracle at ε and, with --retest, one question draw vs another")
    ce.add_argument("labels")
    ce.add_argument("--retest", default=None, help="the same documents labelled with another --question-seed "
                    "(label --like LABELS)")
    ce.add_argument("--epsilon", type=float, default=0.05)
    ce.add_argument("--target-gain", type=float, default=1.25)
    ce.add_argument("--plot", default=None, help="with --retest: a PNG, e.g. docs/img/retest_kvzip.png")
    ce.add_argument("--out", default="results/calibration_truth_ceiling.json")
    pk = sub.add_parser("passkey", help="passkey accuracy at the recommended ratios")
    pk.add_argument("--predictor", default=None, help="predictor folder/file (default: the shipped one)")
    pk.add_argument("--n", type=int, default=20)
    pk.add_argument("--seed", type=int, default=4242)
    pk.add_argument("--tokens", type=int, default=1500)
    pk.add_argument("--out", default="results/calibration_truth_passkey.json")
    pk.add_argument("--method", default="compactor", help="the engine compressing (and its shipped predictor)")
    pk.add_argument("--allocator", default="adakv")
    pk.add_argument("--model", default="smollm2-135m")
    for p in (lb, pk, fd):
        p.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if hasattr(args, "threads"):
        torch.set_num_threads(args.threads)
    if args.cmd == "label":
        label(args)
    elif args.cmd == "compare":
        write_report(compare_fidelities(args.labels, args.epsilon), args.out)
    elif args.cmd == "engines":
        report = compare_engines(args.labels, args.epsilon)
        write_report(report, args.out)
        if args.plot:
            plot_engines(report, args.plot)
    elif args.cmd == "fidelity":
        add_fidelity(args)
    elif args.cmd == "ship":
        ship(args)
    elif args.cmd == "evaluate-full":
        write_report(evaluate_full(args), args.out)
    elif args.cmd == "ceiling":
        report = ceiling(args.labels, args.retest, args.epsilon, args.target_gain)
        write_report(report, args.out)
        if args.plot and "retest" in report:
            plot_retest(report, args.plot)
    elif args.cmd == "evaluate":
        write_report(evaluate_split(args), args.out)
    else:
        write_report(passkey_check(args), args.out)


if __name__ == "__main__":
    main()
