"""The predictor that really ships (package data, not a stand-in): a fresh install's ``POST /calibrate``
``mode=predict`` answers from it with document-dependent ratios, never the 1 − τ fallback, and ``kvcalib fit`` on
the labels shipped beside it reproduces it exactly (README "Calibration")."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.support import finished_full_calibration, isolated_settings, short_documents

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
BUNDLED = (MODEL, "qwen2.5-coder-0.5b")  # every bundled model ships its predictors


@pytest.mark.parametrize("model", BUNDLED)
def test_the_shipped_predictor_is_fitted_on_task_truth_for_the_service_defaults(model):
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.predictors.bundled import default_predictor, full_controller, shipped_folder, shipped_manifest
    from kvcalib.settings import Settings

    folder = shipped_folder(model)
    assert folder is not None and (folder / "labels.jsonl").is_file(), f"no predictor ships for {model}"
    manifest = shipped_manifest(model)
    assert manifest["default"] == "risk" and manifest["target"] == "task_truth" and manifest["model"] == model
    labels = (folder / "labels.jsonl").read_text(encoding="utf-8").splitlines()
    assert {json.loads(x)["model"] for x in labels if x.strip()} == {model}  # labelled on that very model
    s = Settings(_env_file=None)
    pred = default_predictor(model, s.default_method, s.default_allocator)
    assert pred is not None and pred.kind == "risk"
    cfg = pred.training_config()
    assert (cfg["method"], cfg["allocator"]) == (s.default_method, s.default_allocator)
    assert cfg["tolerance"] == pytest.approx(1 - manifest["epsilon"]) == pytest.approx(s.default_tolerance)
    controller = full_controller(model, CalibrationConfig())  # mode=full profiles of the defaults are controlled
    assert controller is not None and controller.training["name"] == "full_salient"


def _shipped_folders():
    from kvcalib.calib.predictors.bundled import shipped_folders

    return [(model, folder) for model in BUNDLED for folder in shipped_folders(model)]


def test_every_shipped_configuration_is_found_by_its_method_and_allocator():
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.predictors import load_manifest
    from kvcalib.calib.predictors.base import PredictorError
    from kvcalib.calib.predictors.bundled import (
        default_predictor,
        folder_predictor,
        full_controller,
        shipped_folder,
        shipped_folders,
        shipped_manifest,
    )

    assert shipped_folder(MODEL, "kvzip", "global").name == "kvzip-global"  # SmolLM2 ships the KVzip engine too
    for model in BUNDLED:
        folders = shipped_folders(model)
        assert folders[0] == shipped_folder(model)  # the defaults' folder first
        seen = set()
        for folder in folders:
            trained = default_predictor(model, *_engine(folder)).training_config()
            engine = (trained["method"], trained["allocator"])
            assert engine == _engine(folder) and engine not in seen  # one folder per configuration
            seen.add(engine)
            assert shipped_folder(model, *engine) == folder
            assert load_manifest(folder)["model"] == model
            # mode=full calibrations of that engine are controlled by that folder's own controller
            controller = full_controller(model, CalibrationConfig(method=engine[0], allocator=engine[1]))
            assert controller is not None and controller.version == folder_predictor(folder, "full_salient").version
            assert controller.training_config()["method"] == engine[0]
    assert default_predictor(MODEL, "snapkv", "uniform") is None  # nothing ships for it: the caller falls back
    with pytest.raises(PredictorError, match="snapkv"):
        shipped_manifest(MODEL, "snapkv", "uniform")


def _engine(folder) -> tuple[str, str]:
    """(method, allocator) a shipped folder declares: its labels' engine configuration."""
    first = json.loads((folder / "labels.jsonl").read_text(encoding="utf-8").splitlines()[0])
    return first["config"]["method"], first["config"]["allocator"]


@pytest.mark.parametrize("model,folder", _shipped_folders(), ids=lambda x: getattr(x, "name", x))
def test_kvcalib_fit_on_the_shipped_labels_reproduces_the_shipped_predictors(tmp_path, model, folder):
    from kvcalib.calib.predictors import load_manifest, load_predictors
    from kvcalib.cli import app

    m = load_manifest(folder)
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


def test_a_request_for_the_kvzip_engine_is_answered_by_its_shipped_predictor(tmp_path, tokenizer):
    """A kvzip request is answered by the predictor shipped for that engine (one real request), which is
    document-dependent: on the documents it was fitted on, it recommends more than one ratio (read from the shipped
    labels' own features — the same label-free features a request computes, without a model run per document)."""
    from kvcalib.api.app import create_app
    from kvcalib.calib.predictors.bundled import shipped_folder, shipped_predictor

    pred = shipped_predictor(MODEL, method="kvzip", allocator="global")
    assert pred.version != shipped_predictor(MODEL).version
    labels = [json.loads(x) for x in (shipped_folder(MODEL, "kvzip", "global") / "labels.jsonl").read_text(
        encoding="utf-8").splitlines() if x.strip()]
    assert len(set(pred.predict([r["features"] for r in labels]).tolist())) >= 2  # not one ratio for every text
    text = short_documents(tokenizer, 1, 500, 700)[0]  # the version is the point here, not the length
    with TestClient(create_app(isolated_settings(tmp_path))) as c:
        r = c.post("/calibrate", json={"mode": "predict", "text": text, "method": "kvzip", "allocator": "global"})
        assert r.status_code == 200, r.text
        body = r.json()
        listing = c.get("/predictors").json()
    assert body["predictor_version"] == pred.version and body["ratio"] in set(pred.grid) | {0.0}
    listed = {p["version"]: p for p in listing["predictors"]}
    assert pred.version in listed and listed[pred.version]["source"] == "shipped"
    assert listed[pred.version]["training_config"]["method"] == "kvzip"


def test_full_mode_profiles_serve_the_risk_controlled_ratio(tmp_path, tokenizer):
    """``mode=full`` on a fresh install: the profile keeps r* and serves the shipped controller's ⌊r* − λ̂⌋_grid
    (its version as ``predictor_version``), with budgets at that ratio, and ``GET /budget`` answers that ratio. A
    controller registered through ``POST /predictors`` takes over for later calibrations, and never answers a
    prediction from features."""
    from kvcalib.api.app import create_app
    from kvcalib.calib.budget import Budget
    from kvcalib.calib.predictors.bundled import shipped_predictor
    from kvcalib.calib.predictors.risk import FeaturePredictor, RiskControlPredictor

    shipped = shipped_predictor(MODEL, "full_salient")
    docs = short_documents(tokenizer, 2, 500, 700)
    with TestClient(create_app(isolated_settings(tmp_path))) as c:
        def full(text):
            job = finished_full_calibration(c, text)
            return c.get(f"/profiles/{job['result']['profile_id']}").json(), job

        prof, job = full(docs[0])
        want = float(shipped.predict([{"r_star_salient": prof["r_star"]}])[0])
        assert prof["predictor_version"] == shipped.version and prof["ratio"] == pytest.approx(want)
        assert job["result"]["ratio"] == pytest.approx(want) and prof["ratio"] < prof["r_star"]
        n = prof["context_tokens"]
        assert prof["token_budget"] == Budget(ratio=prof["ratio"]).per_head(n)
        assert sum(prof["layer_budgets"]) == pytest.approx(len(prof["layer_budgets"]) * len(prof["head_budgets"][0])
                                                           * n * (1 - prof["ratio"]), rel=0.02)
        b = c.get("/budget", params={"document_hash": prof["document_hash"]}).json()
        assert b["source"] == "profile" and b["ratio"] == pytest.approx(prof["ratio"])
        assert b["predictor_version"] == shipped.version

        mine = RiskControlPredictor(FeaturePredictor("r_star_salient", r_max=0.95), 0.05, lam=0.0,
                                    grid=shipped.grid, r_max=0.95)  # serves ⌊r*⌋_grid
        mine.training = dict(shipped.training)
        r = c.post("/predictors", json=mine.to_json())
        assert r.status_code == 201, r.text
        prof2, _ = full(docs[1])
        grid_below = [g for g in shipped.grid if g <= prof2["r_star"] + 1e-9]
        assert prof2["predictor_version"] == mine.version
        assert prof2["ratio"] == pytest.approx(max(grid_below, default=0.0))
        p = c.post("/calibrate", json={"mode": "predict", "text": docs[1]}).json()
        assert p["predictor_version"] == shipped_predictor(MODEL).version  # the prefill-only default
