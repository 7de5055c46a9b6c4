"""Predictors fitted on task truth: `kvcalib fit` on truth labels gives a deterministic risk-control predictor.
(No predictor ships yet — issue 15 — so the shipped-predictor tests land with the shipped files.)"""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from kvcalib.calib.predictors import RiskControlPredictor, load_manifest, load_predictors
from kvcalib.cli import app

GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
MODEL = "smollm2-135m"
runner = CliRunner()


def _params(preds: dict) -> dict:
    """Every predictor's parameters without the timestamps nested bases carry."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "created"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return {k: strip(p.params()) for k, p in preds.items()}


def _record(i: int, rng) -> dict:
    x = float(rng.uniform())
    thr = np.clip(0.2 + 0.6 * x + rng.normal(0, 0.1, 3), 0, 1)
    surv = [[bool(g < t) for g in GRID] for t in thr]
    outcomes = [{"kind": "needle", "template": "number", "gold": ["1"], "counted": True, "confidence": 0.9,
                 "survived": s} for s in surv]
    outcomes.append({"kind": "document", "template": "document", "gold": [], "counted": True, "confidence": 0.2,
                     "survived": [False] * len(GRID)})  # below the confidence gate: never counts
    loss = [float(np.mean([not s[j] for s in surv])) for j in range(len(GRID))]
    return {"format": "kvcalib.truth_record/1", "id": f"src{i // 2}#{i % 2}", "content_hash": f"h{i}",
            "params_hash": "p", "config": {"method": "compactor", "allocator": "adakv"}, "features": {"x": x},
            "ratios": GRID, "loss": loss, "r_star_task": 0.0, "n_counted": 4,
            "truth": {"ratios": GRID, "outcomes": outcomes, "loss": loss, "envelope": loss, "r_star_task": 0.0,
                      "n_counted": 4}}


def test_fit_on_truth_labels_is_risk_control_and_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    labels = tmp_path / "truth.jsonl"
    labels.write_text("".join(json.dumps(_record(i, rng)) + "\n" for i in range(120)))
    outs = []
    for k in range(2):
        out = tmp_path / f"p{k}"
        res = runner.invoke(app, ["fit", str(labels), "--out", str(out), "--split", "0.5,0.5,0", "--epsilon", "0.1",
                                  "--json"])
        assert res.exit_code == 0, res.output
        outs.append(out)
    m = load_manifest(outs[0])
    assert m["default"] == "risk" and m["target"] == "task_truth" and m["split"]["test"] == []
    a, b = load_predictors(outs[0]), load_predictors(outs[1])
    assert set(a) == {"risk", "risk_global", "conformal", "global"}
    assert _params(a) == _params(b) and a["risk"].content_hash() == b["risk"].content_hash()
    risk = a["risk"]
    assert isinstance(risk, RiskControlPredictor) and risk.epsilon == 0.1 and np.isfinite(risk.lam)
    # the confidence gate re-counted the records: the document question never counts, so r*_task is recomputed
    assert risk.metrics["cal"]["loss"] <= 0.1 + 1e-9
    bad = runner.invoke(app, ["fit", str(labels), "--out", str(tmp_path / "x"), "--epsilon", "1.5"])
    assert bad.exit_code == 2 and "epsilon" in bad.output


def test_a_refit_keeps_the_version_of_every_unchanged_predictor(tmp_path):
    """Re-shipping a folder (``calibration_truth.py ship``) after adding a predictor: the unchanged ones keep the
    versions profiles and stored predictions name; a changed or new one gets a fresh version."""
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.calib.predictors.constant import ConstantPredictor
    from kvcalib.calib.predictors.io import keep_unchanged_versions

    assert keep_unchanged_versions(tmp_path / "none", {"a": ConstantPredictor(0.2)}) == []  # no folder yet
    first = {"a": ConstantPredictor(0.2), "b": ConstantPredictor(0.3)}
    for p in first.values():
        p.created = "20200101T000000Z"
    save_predictors(tmp_path, first)
    again = {"a": ConstantPredictor(0.2), "b": ConstantPredictor(0.4), "c": ConstantPredictor(0.1)}
    assert all(p.created != "20200101T000000Z" for p in again.values())  # fresh stamps before
    assert keep_unchanged_versions(tmp_path, again) == ["a"]
    save_predictors(tmp_path, again)
    back = load_predictors(tmp_path)
    assert back["a"].version == first["a"].version  # same parameters: same version
    assert back["b"].version != first["b"].version and back["b"].created != "20200101T000000Z"
    assert back["c"].version == again["c"].version


def test_kvcalib_fit_into_its_own_folder_keeps_the_versions_of_unchanged_predictors(tmp_path):
    """``kvcalib fit --out`` an existing folder: refitting the same labels keeps every version (profiles and
    stored predictions name them); another ε changes the risk-controlled predictors, which get fresh versions."""
    rng = np.random.default_rng(1)
    labels = tmp_path / "truth.jsonl"
    labels.write_text("".join(json.dumps(_record(i, rng)) + "\n" for i in range(60)))
    out = tmp_path / "preds"
    args = ["fit", str(labels), "--out", str(out), "--split", "0.5,0.5,0", "--json"]
    first = runner.invoke(app, [*args, "--epsilon", "0.1"])
    assert first.exit_code == 0, first.output
    v1 = {k: p.version for k, p in load_predictors(out).items()}
    again = runner.invoke(app, [*args, "--epsilon", "0.1"])
    assert again.exit_code == 0 and sorted(json.loads(again.output)["kept"]) == sorted(v1)
    assert {k: p.version for k, p in load_predictors(out).items()} == v1
    other = runner.invoke(app, [*args, "--epsilon", "0.2"])
    assert other.exit_code == 0, other.output
    v3 = {k: p.version for k, p in load_predictors(out).items()}
    changed = {k for k in v1 if v3[k] != v1[k]}
    assert "risk_global" in changed and set(json.loads(other.output)["kept"]) == set(v1) - changed
