"""The predictor that really ships (package data, not a stand-in): a fresh install's ``POST /calibrate``
``mode=predict`` answers from it with document-dependent ratios, never the 1 − τ fallback, and ``kvcalib fit`` on
the labels shipped beside it reproduces it exactly (README "Calibration")."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.support import isolated_settings, short_documents

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"


def test_the_shipped_predictor_is_fitted_on_task_truth_for_the_service_defaults():
    from kvcalib.calib.predictors.bundled import default_predictor, shipped_folder, shipped_manifest
    from kvcalib.settings import Settings

    folder = shipped_folder(MODEL)
    assert folder is not None and (folder / "labels.jsonl").is_file(), "no predictor ships for the bundled model"
    manifest = shipped_manifest(MODEL)
    assert manifest["default"] == "risk" and manifest["target"] == "task_truth"
    s = Settings(_env_file=None)
    pred = default_predictor(MODEL, s.default_method, s.default_allocator)
    assert pred is not None and pred.kind == "risk"
    cfg = pred.training_config()
    assert (cfg["method"], cfg["allocator"]) == (s.default_method, s.default_allocator)
    assert cfg["tolerance"] == pytest.approx(1 - manifest["epsilon"]) == pytest.approx(s.default_tolerance)


def test_kvcalib_fit_on_the_shipped_labels_reproduces_the_shipped_predictors(tmp_path):
    from kvcalib.calib.predictors import load_predictors
    from kvcalib.calib.predictors.bundled import shipped_folder, shipped_manifest
    from kvcalib.cli import app

    folder = shipped_folder(MODEL)
    m = shipped_manifest(MODEL)
    split = ",".join(str(x) for x in m["split"]["fractions"])
    r = CliRunner().invoke(app, ["fit", str(folder / "labels.jsonl"), "--out", str(tmp_path), "--split", split,
                                 "--epsilon", str(m["epsilon"]), "--alpha", str(m["alpha"]),
                                 "--seed", str(m["split"]["seed"]), "--json"])
    assert r.exit_code == 0, r.output
    mine, shipped = load_predictors(tmp_path), load_predictors(folder)
    assert set(mine) == set(shipped)
    for name in shipped:  # same parameters (the version's hash part), whatever the fitting time
        assert mine[name].content_hash() == shipped[name].content_hash(), name


def test_a_fresh_install_predicts_document_dependent_ratios_from_the_shipped_predictor(tmp_path, engine, tokenizer):
    from kvcalib.api.app import create_app
    from kvcalib.calib.predictors.bundled import shipped_predictor

    version = shipped_predictor(MODEL).version
    docs = short_documents(tokenizer, 8, 1000, 1400)  # the length the predictor was fitted on
    ratios = {}
    with TestClient(create_app(isolated_settings(tmp_path))) as c:
        for i, text in enumerate(docs):
            r = c.post("/calibrate", json={"mode": "predict", "text": text})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["predictor_version"] == version and not body["predictor_version"].startswith("fallback")
            ratios[i] = body["ratio"]
            if len(set(ratios.values())) >= 2:
                break
        listing = c.get("/predictors").json()
    assert len(set(ratios.values())) >= 2, f"every document got the same ratio: {ratios}"
    assert listing["defaults"][MODEL] == version
    assert json.dumps(ratios)  # plain floats
