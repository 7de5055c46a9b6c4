"""`kvcalib calibrate` → `fit` → `evaluate` on a tiny corpus (real model), resumability, and clear exit-2 errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcalib.cli import app

runner = CliRunner()

TINY = ["--min-tokens", "120", "--max-tokens", "200", "--ratios", "0.3,0.7", "--n-probes", "2",
        "--probe-tokens", "8", "--cue-tokens", "6", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from kvcalib.calib.data.documents import PACKAGE_DATA

    d = tmp_path_factory.mktemp("corpus")
    path = d / "docs.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for f in sorted(PACKAGE_DATA.glob("*.txt")):
            lines = [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            fh.write(json.dumps({"id": f"{f.stem}", "text": "\n".join(lines[:12])}) + "\n")
            fh.write(json.dumps({"id": f"{f.stem}-b", "text": "\n".join(lines[12:24])}) + "\n")
    return path


def test_calibrate_fit_evaluate(engine, corpus, tmp_path):
    labels = tmp_path / "labels.jsonl"
    res = runner.invoke(app, ["calibrate", str(corpus), "--out", str(labels), "--limit", "4", *TINY])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    assert len(rows) == 4 and len({r["content_hash"] for r in rows}) == 4
    assert all(r["ratios"] == [0.3, 0.7] and 0.0 <= r["r_star"] <= 0.7 for r in rows)
    assert all(r["config"]["n_probes"] == 2 and r["doc_id"] for r in rows)
    # the shipped risk controller over r* (default --controller shipped) sets each record's served ratio
    from kvcalib.calib.predictors.bundled import shipped_predictor

    ctrl = shipped_predictor("smollm2-135m", "full_salient")
    for r in rows:
        want = min(float(ctrl.predict([{"r_star_salient": r["r_star"]}])[0]), 0.7)
        assert r["controller"] == ctrl.version and r["ratio"] == pytest.approx(want) and r["ratio"] <= r["r_star"]
    plain = tmp_path / "plain.jsonl"
    res = runner.invoke(app, ["calibrate", str(corpus), "--out", str(plain), "--limit", "1", "--controller", "none",
                              *TINY])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in plain.read_text().splitlines()]
    assert row["controller"] is None and row["ratio"] == row["r_star"] == rows[0]["r_star"]

    again = runner.invoke(app, ["calibrate", str(corpus), "--out", str(labels), "--limit", "4", *TINY])
    assert again.exit_code == 0, again.output
    assert "nothing to do" in again.output and len(labels.read_text().splitlines()) == 4  # resumed, not redone

    preds = tmp_path / "predictors"
    fit = runner.invoke(app, ["fit", str(labels), "--out", str(preds), "--alpha", "0.2", "--json"])
    assert fit.exit_code == 0, fit.output
    out = json.loads(fit.stdout)
    assert out["n_train"] + out["n_cal"] + out["n_test"] == 4 and out["n_test"] >= 1
    assert {"conformal", "gbm", "parametric", "global"} <= set(out["versions"])
    assert (preds / "manifest.json").is_file() and (preds / "conformal.json").is_file()

    ev_dir = tmp_path / "eval"
    ev = runner.invoke(app, ["evaluate", str(labels), "--predictor", str(preds), "--out-dir", str(ev_dir), "--json"])
    assert ev.exit_code == 0, ev.output
    rep = json.loads(ev.stdout)
    assert rep["scope"] == "held-out test split" and rep["n"] == out["n_test"]
    m = rep["predictors"]["conformal"]
    assert {"violation_rate", "mean_ratio", "mean_abs_error", "best_global_ratio"} <= set(m)
    assert (ev_dir / "calibration_eval.png").stat().st_size > 1000 and (ev_dir / "calibration_eval.json").is_file()
    everything = runner.invoke(app, ["evaluate", str(labels), "--predictor", str(preds / "gbm.json"), "--all",
                                     "--alpha", "0.3", "--out-dir", str(ev_dir), "--json"])
    assert everything.exit_code == 0, everything.output
    assert json.loads(everything.stdout)["n"] == 4


@pytest.mark.parametrize("args,message", [
    (["calibrate", "/no/such/corpus", "--out", "{tmp}/l.jsonl"], "does not exist"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--method", "bogus"], "expected one of"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--allocator", "bogus"], "expected one of"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--ratios", "0.5,1.2"], "(0, 1)"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--ratios", "a,b"], "--ratios"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--tolerance", "2"], "tolerance"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--limit", "0"], "--limit"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--fidelity", "bogus"], "unknown fidelity"),
    (["calibrate", "{empty}", "--out", "{tmp}/l.jsonl"], "text"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--controller", "{tmp}/nope.json"], "does not exist"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--controller", "{shipped}/risk.json"],
     "not a risk controller"),
    (["calibrate", "{corpus}", "--out", "{tmp}/l.jsonl", "--controller", "{shipped}:full_reconstruction"],
     "fidelity='reconstruction'"),
    (["fit", "{tmp}/missing.jsonl", "--out", "{tmp}/p"], "does not exist"),
    (["fit", "{garbage}", "--out", "{tmp}/p"], "invalid json"),
    (["fit", "{garbage}", "--out", "{tmp}/p", "--alpha", "1.5"], "--alpha"),
    (["fit", "{garbage}", "--out", "{tmp}/p", "--split", "0.5,0.5"], "--split"),
    (["evaluate", "{garbage}", "--predictor", "{tmp}/nope"], "does not exist"),
    (["evaluate", "{garbage}", "--predictor", "{tmp}"], "manifest"),
])
def test_bad_input_is_a_clear_message_and_exit_2(args, message, corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"id": "x", "text": ""}) + "\n")
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("{not json\n")
    from kvcalib.calib.predictors.bundled import shipped_folder

    args = [a.format(tmp=tmp_path, corpus=corpus, empty=empty, garbage=garbage, shipped=shipped_folder("smollm2-135m"))
            for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message.lower() in " ".join(res.output.split()).lower()  # rich wraps long lines
    assert "Traceback" not in res.output
