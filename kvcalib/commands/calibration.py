"""CLI commands of the calibration stage: ``calibrate`` (label a corpus), ``fit`` (train predictors), ``evaluate``.

    kvcalib calibrate CORPUS --out labels.jsonl [--method compactor --allocator adakv --tolerance 0.95 ...]
    kvcalib fit labels.jsonl --out predictors/ [--alpha 0.1 --seed 0]
    kvcalib evaluate labels.jsonl --predictor predictors/ [--alpha 0.1 --out-dir results/calibration_eval]
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from tqdm import tqdm

from kvcalib.calib import defaults
from kvcalib.commands.common import (
    DeviceOpt,
    DtypeOpt,
    console,
    emit_json,
    fail,
    friendly_errors,
    load_engine,
    read_text_file,
)


def _ratios(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        vals = tuple(float(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        fail(f"--ratios must be comma-separated numbers in (0, 1), got {text!r}")
    if not vals:
        fail("--ratios is empty")
    return vals


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if len(vals) != 3 or any(v < 0 for v in vals) or abs(sum(vals) - 1.0) > 1e-6:
        fail(f"--split must be three non-negative fractions summing to 1 (train,cal,test), got {text!r}")
    return vals  # type: ignore[return-value]


@friendly_errors
def calibrate_cmd(
    corpus: Annotated[Path, typer.Argument(help="Folder of .txt files or JSONL of {\"id\", \"text\"}.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Label file (JSONL), appended to; resumable.")],
    method: Annotated[str, typer.Option("--method", "-m", help="Scoring method.")] = defaults.METHOD,
    allocator: Annotated[str, typer.Option("--allocator", "-a", help="Budget allocator.")] = defaults.ALLOCATOR,
    tolerance: Annotated[float, typer.Option(help="Fidelity threshold τ for r*.")] = defaults.TOLERANCE,
    ratios: Annotated[str | None, typer.Option(help="Comma-separated ratio grid (default 0.1..0.9,0.95).")] = None,
    limit: Annotated[int | None, typer.Option(help="Calibrate at most this many documents.")] = None,
    min_tokens: Annotated[int, typer.Option(help="Smallest document (tokens) after chunking.")] = 1000,
    max_tokens: Annotated[int, typer.Option(help="Largest document (tokens) after chunking.")] = 3000,
    n_probes: Annotated[int | None, typer.Option(help="Reconstruction probes per document.")] = None,
    probe_tokens: Annotated[int | None, typer.Option(help="Scored tokens per probe.")] = None,
    cue_tokens: Annotated[int | None, typer.Option(help="Cue tokens per probe.")] = None,
    seed: Annotated[int, typer.Option(help="Probe span seed.")] = 0,
    fidelity: Annotated[str | None, typer.Option(help="Label-free fidelity of the curve: reconstruction, kl, "
                                                      "salient, keytoken, self_answer, self_prob (docs/"
                                                      "calibration.md §11; default: the library's).")] = None,
    shuffle: Annotated[int | None, typer.Option(help="Shuffle the documents with this seed before --limit.")]
    = None,
    model: Annotated[str, typer.Option(help="Registry name or local HF model folder.")] = defaults.MODEL,
    dtype: DtypeOpt = "fp32",
    device: DeviceOpt = "cpu",
    controller: Annotated[str, typer.Option(help="Risk controller over r* that sets each result's `ratio` (expected "
                                                 "answer loss <= ε): 'shipped' (the one shipped for the model, when "
                                                 "it fits the fidelity and τ), 'none' (ratio = r*), or a predictor "
                                                 "file / folder[:name] fitted by `kvcalib fit`.")] = "shipped",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Calibrate every document of CORPUS (quality curve, r*, and the risk-controlled ratio) and append one result
    per line to --out."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, calibrate
    from kvcalib.calib.data.corpus import append_label, done_keys, load_corpus, read_labels, read_texts

    cfg = {"method": method, "allocator": allocator, "tolerance": tolerance, "seed": seed}
    if ratios is not None:
        cfg["ratios"] = _ratios(ratios)
    for k, v in (("n_probes", n_probes), ("probe_tokens", probe_tokens), ("cue_tokens", cue_tokens),
                 ("fidelity", fidelity)):
        if v is not None:
            cfg[k] = v
    config = CalibrationConfig.from_dict(cfg)  # bad input fails here, before the model loads
    ctrl = _controller(controller, model, config)
    if limit is not None and limit < 1:
        fail("--limit must be at least 1")
    read_texts(corpus)  # existence / format check before the model loads
    if out.exists() and out.is_dir():
        fail(f"--out {str(out)!r} is a folder; give a .jsonl file")
    done = done_keys(read_labels(out, must_exist=False))
    from kvcalib.commands.stages import Stages

    with Stages(quiet=quiet) as stages:
        with stages.stage(f"loading model {model}"):
            eng = load_engine(model, device=device, dtype=dtype)
        with stages.stage(f"cutting {corpus} into {min_tokens}..{max_tokens}-token documents"):
            docs = load_corpus(corpus, eng.tokenizer, min_tokens, max_tokens, limit=limit, seed=shuffle)
    ph = config.params_hash()
    todo = [d for d in docs if (d.content_hash, ph) not in done]
    console.print(f"[dim]{len(docs)} documents, {len(docs) - len(todo)} already labelled, {len(todo)} to go "
                  f"({config.method}/{config.allocator}, τ={config.tolerance})[/]")
    bar = tqdm(total=len(todo), desc="calibrate", unit="doc", disable=quiet)
    stars, served = [], []
    for d in todo:
        def progress(frac: float, msg: str, d=d) -> None:
            bar.set_postfix_str(f"{d.id}: {msg}", refresh=True)

        res = calibrate(eng, d.text, config, progress=progress, doc_id=d.id, controller=ctrl,
                        full_curve=True)  # labels: curve-fitting predictors read the whole grid
        append_label(out, res.to_dict())
        stars.append(res.r_star)
        served.append(res.ratio)
        bar.update(1)
    bar.close()
    if stars:
        console.print(f"labelled {len(stars)} documents → {out}; mean r* {sum(stars) / len(stars):.3f} "
                      f"(min {min(stars):.3f}, max {max(stars):.3f})")
        if ctrl is not None:
            console.print(f"risk-controlled ratio ({ctrl.version}): mean {sum(served) / len(served):.3f}")
    else:
        console.print(f"nothing to do: every document is already in {out}")


def _controller(spec: str, model: str, config):
    """The risk controller of ``--controller``: None for 'none' (and for 'shipped' when none ships that fits),
    else a loaded and checked predictor; a bad value is a CLI error."""
    from kvcalib.calib.calibration.calibrate import check_controller

    if spec == "none":
        return None
    if spec == "shipped":
        from kvcalib.calib.predictors.bundled import full_controller

        ctrl = full_controller(model, config)
        if ctrl is None:
            console.print(f"[dim]no risk controller ships for {model} with fidelity {config.fidelity} at "
                          f"τ={config.tolerance}: ratio = r*[/]")
        return ctrl
    from kvcalib.calib.predictors import load_predictor

    path, _, name = spec.partition(":") if not Path(spec).exists() else (spec, "", "")
    ctrl = load_predictor(path, name or None)
    check_controller(ctrl, config)
    return ctrl


def _metrics_table(title: str, report: dict) -> Table:
    t = Table(title=title)
    for col in ("predictor", "violation", "mean r̂", "mean |r̂−r*|", "best global (≤ viol.)", "beats global"):
        t.add_column(col)
    for name, m in report["predictors"].items():
        t.add_row(name, f"{m['violation_rate']:.3f}", f"{m['mean_ratio']:.3f}", f"{m['mean_abs_error']:.3f}",
                  f"{m['best_global_ratio']:.3f}", "yes" if m["beats_best_global"] else "no")
    return t


def _strip(report: dict) -> dict:
    out = json.loads(json.dumps(report))
    for m in out.get("predictors", {}).values():
        m.pop("predictions", None)
    return out


@friendly_errors
def fit_cmd(
    labels: Annotated[Path, typer.Argument(help="Label file written by `kvcalib calibrate`.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the predictors (JSON) and manifest.")],
    alpha: Annotated[float, typer.Option(help="Target violation rate P(r̂ > r*) of the conformal predictor.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Split and boosting seed.")] = 0,
    split: Annotated[str, typer.Option(help="train,cal,test fractions (split by essay).")] = "0.5,0.25,0.25",
    per_layer: Annotated[bool, typer.Option(help="Also learn from per-layer score features.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
    epsilon: Annotated[float, typer.Option(help="Truth labels: target expected answer loss of the risk-controlled "
                                                "predictor.")] = 0.05,
):
    """Fit the parametric (Compactor), learned (quantile boosting) and conformal predictors of r*; save them.
    Truth labels (benchmarks/calibration_truth.py) give the risk-controlled predictors instead (README)."""
    from kvcalib.calib.data.corpus import consistent_labels, read_labels, split_labels
    from kvcalib.calib.predictors import evaluate_predictors, fit_predictors, save_predictors

    if not 0.0 < alpha < 1.0:
        fail(f"--alpha must lie in (0, 1), got {alpha}")
    fr = _fractions(split)
    from kvcalib.calib.calibration.truth_labels import is_truth_label_file

    if labels.is_file() and read_text_file(labels, "label file") and is_truth_label_file(labels):  # UTF-8 first
        return _fit_truth(labels, out, alpha, epsilon, seed, fr, as_json)
    rows = consistent_labels(read_labels(labels))
    train, cal, test = split_labels(rows, seed=seed, fractions=fr)
    if not train or not cal:
        fail(f"too few labelled documents ({len(rows)}) for a train/calibration split")
    preds = fit_predictors(train, cal, alpha=alpha, seed=seed, per_layer_features=per_layer)
    report = evaluate_predictors(preds, test, alpha) if test else {"n": 0, "predictors": {}}
    for name, m in report["predictors"].items():
        preds[name].metrics["test"] = {k: v for k, v in m.items() if k != "predictions"}
    tau = rows[0]["config"].get("tolerance")
    kept = _keep_versions(out, preds)
    save_predictors(out, preds, extra={
        "labels": str(labels), "alpha": alpha, "tolerance": tau, "config": rows[0]["config"],
        "split": {"seed": seed, "fractions": list(fr), "train": [r["content_hash"] for r in train],
                  "cal": [r["content_hash"] for r in cal], "test": [r["content_hash"] for r in test]},
        "test_report": _strip(report)})
    if as_json:
        emit_json({"out": str(out), "n_train": len(train), "n_cal": len(cal), "n_test": len(test),
                   "versions": {k: p.version for k, p in preds.items()}, "kept": kept, "test": _strip(report)})
        return
    console.print(f"split: {len(train)} train / {len(cal)} calibration / {len(test)} test documents")
    if test:
        console.print(_metrics_table(f"held-out test (α = {alpha}, τ = {tau})", report))
    console.print(f"saved {len(preds)} predictors to {out}/ (default: conformal, {preds['conformal'].version}; "
                  f"versions kept: {', '.join(kept) or 'none'})")


def _keep_versions(out: Path, preds: dict) -> list[str]:
    """Refitting into an existing folder: unchanged predictors keep the versions profiles and stored predictions
    name (``predictors.io.keep_unchanged_versions``); a folder that cannot be read as predictors keeps none."""
    from kvcalib.calib.predictors.base import PredictorError
    from kvcalib.calib.predictors.io import keep_unchanged_versions

    try:
        return keep_unchanged_versions(out, preds)
    except PredictorError:
        return []


def _fit_truth(labels: Path, out: Path, alpha: float, epsilon: float, seed: int, fr, as_json: bool) -> None:
    """``kvcalib fit`` on truth labels: risk control of the answer loss (``predictors.risk.fit_truth_labels``)."""
    from kvcalib.calib.calibration.truth_labels import read_truth_labels
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.calib.predictors.risk import fit_truth_labels

    if not 0.0 < epsilon < 1.0:
        fail(f"--epsilon must lie in (0, 1), got {epsilon}")
    rows = read_truth_labels(labels)
    preds, split = fit_truth_labels(rows, fr, seed=seed, epsilon=epsilon, alpha=alpha)
    kept = _keep_versions(out, preds)
    save_predictors(out, preds, extra={"default": "risk", "labels": str(labels), "epsilon": epsilon, "alpha": alpha,
                                       "target": "task_truth", "split": split})
    if as_json:
        emit_json({"out": str(out), "versions": {k: p.version for k, p in preds.items()}, "kept": kept,
                   "metrics": {k: p.metrics for k, p in preds.items()}})
        return
    console.print(f"split: {len(split['train'])} train / {len(split['cal'])} calibration / {len(split['test'])} "
                  f"test documents (truth labels, ε = {epsilon}, α = {alpha})")
    for name, p in preds.items():
        m = p.metrics.get("test") or p.metrics["cal"]
        console.print(f"  {name:>12}: mean ratio {m['mean_ratio']:.3f}, answer loss {m['loss']:.3f}, "
                      f"violation {m['violation_rate']:.3f} ({'test' if 'test' in p.metrics else 'calibration'})")
    console.print(f"saved {len(preds)} predictors to {out}/ (default: risk, {preds['risk'].version}; versions "
                  f"kept: {', '.join(kept) or 'none'})")


@friendly_errors
def evaluate_cmd(
    labels: Annotated[Path, typer.Argument(help="Label file written by `kvcalib calibrate`.")],
    predictor: Annotated[Path, typer.Option("--predictor", "-p", help="Predictor folder (or one .json file).")],
    alpha: Annotated[float | None, typer.Option(
        help="Target violation rate; conformal predictors are re-calibrated to it when their calibration split "
             "is in LABELS.")] = None,
    out_dir: Annotated[Path, typer.Option(help="Where the JSON report and PNG go.")] = Path("results/calibration_eval"),
    all_labels: Annotated[bool, typer.Option("--all", help="Evaluate on every label, not only the held-out test "
                                                          "split recorded at fit time.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report.")] = False,
):
    """Held-out violation rate, mean KV reduction and error of predictors vs the best single global ratio."""
    import numpy as np

    from kvcalib.calib.data.corpus import consistent_labels, read_labels
    from kvcalib.calib.predictors import (
        ConformalPredictor,
        evaluate_predictors,
        load_manifest,
        load_predictors,
        plot_evaluation,
    )

    if alpha is not None and not 0.0 < alpha < 1.0:
        fail(f"--alpha must lie in (0, 1), got {alpha}")
    preds = load_predictors(predictor)
    rows = consistent_labels(read_labels(labels))
    manifest = load_manifest(predictor) if predictor.is_dir() else {}
    split = manifest.get("split") or {}
    by_hash = {r["content_hash"]: r for r in rows}
    held = rows
    scope = "all labels"
    if not all_labels and split.get("test"):
        held = [by_hash[h] for h in split["test"] if h in by_hash]
        scope = "held-out test split"
        if not held:
            fail("none of the predictor's test documents are in LABELS (use --all to evaluate on every label)")
    cfg = rows[0]["config"]
    for name, p in preds.items():
        trained = p.training_config()
        for key in ("method", "allocator", "tolerance"):
            if trained and key in trained and trained[key] != cfg.get(key):
                fail(f"predictor {name!r} was trained for {key}={trained[key]!r}, labels have {cfg.get(key)!r}")
    target = alpha if alpha is not None else float(manifest.get("alpha", 0.1))
    recalibrated = []
    if alpha is not None and split.get("cal"):
        cal = [by_hash[h] for h in split["cal"] if h in by_hash]
        for name, p in preds.items():
            if isinstance(p, ConformalPredictor) and abs(p.alpha - alpha) > 1e-12 and cal:
                pool = cal
                if name == "global":  # the global ratio was calibrated on train + cal
                    pool = cal + [by_hash[h] for h in split.get("train", []) if h in by_hash]
                p.calibrate([r["features"] for r in pool], np.array([r["r_star"] for r in pool]), alpha)
                recalibrated.append(name)
    report = evaluate_predictors(preds, held, target)
    report.update({"scope": scope, "labels": str(labels), "predictor": str(predictor), "recalibrated": recalibrated,
                   "tolerance": cfg.get("tolerance"), "method": cfg.get("method"),
                   "allocator": cfg.get("allocator")})
    out_dir.mkdir(parents=True, exist_ok=True)
    tau = float(cfg.get("tolerance", defaults.TOLERANCE))
    png = plot_evaluation(held, report, out_dir / "calibration_eval.png", tau)
    (out_dir / "calibration_eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if as_json:
        emit_json(_strip(report))
        return
    console.print(f"{scope}: {len(held)} documents; mean oracle r* {report['mean_oracle_ratio']:.3f}; "
                  f"best global ratio at α={target}: {report['best_global_at_alpha']['ratio']:.3f}")
    console.print(_metrics_table(f"evaluation (α = {target})", report))
    console.print(f"wrote {out_dir / 'calibration_eval.json'} and {png}")


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate_cmd)
    app.command("fit")(fit_cmd)
    app.command("evaluate")(evaluate_cmd)
