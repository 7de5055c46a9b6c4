"""The truth suite: one labelled record per document — label-free features, every fidelity candidate's curve and
the task truth (loss curve, r*_task) — from ONE prefill.

A record is what predictors are fitted on (``calib.predictors.risk``) and what the fidelity candidates are
compared on (``benchmarks/calibration_truth.py``); records are appended to JSONL files (resumable: a document is
done when a record with its content hash and the config's hash exists).
"""

from __future__ import annotations

import dataclasses
import time

from kvcalib.calib.calibration.calibrate import CalibrationConfig, _noop, _prepare
from kvcalib.calib.calibration.curve import largest_safe_ratio
from kvcalib.calib.calibration.fidelity import FIDELITIES, fidelity_curves
from kvcalib.calib.calibration.truth import TruthConfig, evaluate_truth, item_token_spans
from kvcalib.calib.data.hashing import content_hash
from kvcalib.calib.data.questions import TruthDocument

RECORD_FORMAT = "kvcalib.truth_record/1"


def truth_record(engine, doc: TruthDocument, config: CalibrationConfig | None = None,
                 fidelities=FIDELITIES, doc_id: str | None = None, truth_config: TruthConfig | None = None,
                 genre: str = "") -> dict:
    """Features, fidelity curves and task truth of ``doc`` under ``config`` (method, allocator, grid, probes)."""
    config = (config or CalibrationConfig()).validate()
    t0 = time.perf_counter()
    # exactly what calibrate / predict compute (features from the strided context NLL); the keytoken candidate
    # needs every token's NLL, which its config makes _prepare capture (features still from every 8th token)
    prep = dataclasses.replace(config, fidelity="keytoken") if "keytoken" in fidelities else config
    cap, doc_start, scores, keep, feats, _ = _prepare(engine, doc.text, prep, _noop)
    t_feat = time.perf_counter() - t0
    tcfg = truth_config or TruthConfig(method=config.method, method_params=config.method_params,
                                       allocator=config.allocator, allocator_params=config.allocator_params,
                                       ratios=config.ratios)
    truth = evaluate_truth(engine, doc, tcfg, capture=cap, scores=scores, keep=keep)
    t1 = time.perf_counter()
    curves = document_fidelity_curves(engine, doc, cap, doc_start, keep, config, fidelities)
    return {
        "format": RECORD_FORMAT, "id": doc_id, "genre": genre, "content_hash": content_hash(doc.text),
        "params_hash": config.params_hash(), "config": config.to_dict(), "model": getattr(engine.lm, "name", ""),
        "context_tokens": int(cap.num_tokens), "features": feats, "ratios": list(config.ratios),
        "truth": truth.to_dict(), "loss": truth.envelope, "r_star_task": truth.r_star_task,
        "n_counted": truth.n_counted, "fidelity": curves, "question_seed": doc.seed,
        "timings": {"features_s": round(t_feat, 3), "truth_s": round(truth.seconds, 3),
                    "fidelity_s": round(time.perf_counter() - t1, 3),
                    "total_s": round(time.perf_counter() - t0, 3)},
    }


def document_fidelity_curves(engine, doc: TruthDocument, cap, doc_start: int, keep, config: CalibrationConfig,
                             fidelities=FIDELITIES) -> dict[str, list[float]]:
    """The curves of the fidelity candidates on a truth document's prefill, with ``config``'s probe settings and
    the probes kept off the inserted items (the calibration never sees them)."""
    if not fidelities:
        return {}
    avoid = item_token_spans(engine, doc.text, doc.spans)
    return fidelity_curves(engine, cap, doc_start, keep, tuple(fidelities), n_probes=config.n_probes,
                           cue_tokens=config.cue_tokens, probe_tokens=config.probe_tokens, seed=config.seed,
                           avoid=avoid)


def fidelity_r_star(record: dict, name: str, tau: float) -> float:
    """r*(τ) of one fidelity candidate of a record (``curve.largest_safe_ratio``)."""
    return float(largest_safe_ratio(record["ratios"], record["fidelity"][name], tau)[0])


def compact_record(record: dict, digits: int = 6) -> dict:
    """What fitting needs of a truth record (features, fidelity curves, grid, per-question survival, loss,
    r*_task), floats rounded to ``digits`` significant digits: the shipped label files (``kvcalib fit`` reads them
    as it reads full ones)."""

    def r(x: float) -> float:
        return float(f"{x:.{digits}g}")

    truth = record["truth"]
    outcomes = [{"kind": o["kind"], "template": o["template"], "gold": o["gold"], "counted": o["counted"],
                 "confidence": o.get("confidence", 0.0), "survived": o["survived"]} for o in truth["outcomes"]]
    keep = ("format", "id", "genre", "content_hash", "params_hash", "config", "model", "context_tokens", "ratios",
            "loss", "r_star_task", "n_counted", "question_seed")
    out = {k: record[k] for k in keep if k in record}
    out["features"] = {k: r(v) for k, v in record["features"].items()}
    if record.get("fidelity"):  # the candidates' curves: mode=full risk control is fitted on them
        out["fidelity"] = {k: [r(x) for x in v] for k, v in record["fidelity"].items()}
    out["truth"] = {"ratios": truth["ratios"], "outcomes": outcomes, "loss": truth["loss"],
                    "envelope": truth["envelope"], "r_star_task": truth["r_star_task"], "n_counted": truth["n_counted"]}
    return out
