"""Shipped predictors, stored predictions and predictor registration through the API (issue 15, item 4), on the
embedded default with the real SmolLM2-135M: a fresh install predicts with the predictor shipped for its model
(here a predictor folder standing in for the package data), every predicted budget is stored once, and predictors
are listed and registered through ``/predictors``."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.support import isolated_settings, shipped_predictors, short_documents

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
TRAINED = {"method": "compactor", "allocator": "adakv", "tolerance": 0.95}  # the service's defaults


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 5, 200, 400)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory, docs, tokenizer):
    """A predictor folder shipped for smollm2-135m: a ridge predictor of the ratio on the context length (fitted on
    synthetic labels, so two documents of different lengths get different ratios), the manifest's default, and a
    constant one beside it."""
    from kvcalib.calib.predictors import ConstantPredictor, save_predictors
    from kvcalib.calib.predictors.risk import LinearPredictor

    lengths = sorted({len(tokenizer(d, add_special_tokens=False).input_ids) for d in docs[:2]})
    assert len(lengths) == 2, "the first two documents must differ in length"
    linear = LinearPredictor(["n_tokens"], ridge=0.0).fit([{"n_tokens": 100.0}, {"n_tokens": 500.0}], [0.2, 0.6])
    constant = ConstantPredictor(0.25)
    for p in (linear, constant):
        p.training = {"config": dict(TRAINED)}
    root = tmp_path_factory.mktemp("shipped")
    save_predictors(root / MODEL, {"risk": linear, "constant": constant}, extra={"model": MODEL})
    with shipped_predictors(root):
        yield {"default": linear, "constant": constant, "folder": root / MODEL}


def embedded(data_dir, **settings) -> TestClient:
    from kvcalib.api.app import create_app

    return TestClient(create_app(isolated_settings(data_dir, **settings)))


@pytest.fixture(scope="module")
def client(tmp_path_factory, engine, shipped):
    with embedded(tmp_path_factory.mktemp("fresh")) as c:
        yield c


def predict(client, text, **extra):
    r = client.post("/calibrate", json={"mode": "predict", "text": text, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def stored(client, text, **params):
    from kvcalib.calib.data.documents import content_hash

    r = client.get("/predictions", params={"document_hash": content_hash(text), "model": MODEL, **params})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_a_fresh_install_predicts_with_the_shipped_predictor(client, shipped, docs):
    version = shipped["default"].version
    listing = client.get("/predictors").json()
    assert listing["defaults"][MODEL] == version
    mine = {p["name"]: p for p in listing["predictors"] if p["source"] == "shipped"}
    assert set(mine) == {"risk", "constant"} and mine["risk"]["default"] and not mine["constant"]["default"]
    assert mine["risk"]["model"] == MODEL and mine["risk"]["training_config"] == TRAINED
    assert mine["risk"]["version"] == version and mine["risk"]["kind"] == "linear"
    assert mine["risk"]["created_at"] is None  # not served yet

    a, b = predict(client, docs[0]), predict(client, docs[1])
    for p in (a, b):
        assert p["source"] == "predicted" and p["predictor_version"] == version
        assert not p["predictor_version"].startswith("fallback")
        assert p["ratio"] == pytest.approx(float(shipped["default"].predict([p["features"]])[0]))
    assert a["ratio"] != b["ratio"]  # document-dependent: two documents, two ratios

    after = {p["version"]: p for p in client.get("/predictors").json()["predictors"]}
    assert after[version]["created_at"] is not None and after[version]["source"] == "shipped"  # recorded when served
    from kvcalib.service import repository as repo

    with client.app.state.service.db.session() as s:
        row = repo.latest_predictor(s)
        assert (row.version, row.source, row.artefact_path) == (version, "shipped", str(shipped["folder"]))


def test_predictions_are_stored_once(client, shipped, docs):
    first = predict(client, docs[0])  # predicted by the previous test too
    rows = stored(client, docs[0])
    assert len(rows) == 1
    row = rows[0]
    assert row["ratio"] == first["ratio"] and row["token_budget"] == first["token_budget"]
    assert row["context_tokens"] == first["context_tokens"] and row["features"]["n_tokens"] == row["context_tokens"]
    assert (row["predictor_version"], row["predictor_kind"]) == (shipped["default"].version, "linear")
    assert (row["method"], row["allocator"], row["tolerance"]) == ("compactor", "adakv", 0.95)
    assert row["model"] == MODEL and row["model_revision"] == first["model_revision"]

    r = client.post("/budget", json={"text": docs[0]})  # the same prediction through POST /budget: not stored again
    assert r.status_code == 200 and r.json()["ratio"] == first["ratio"]
    assert stored(client, docs[0]) == rows

    other = client.post("/budget", json={"text": docs[0], "tolerance": 0.9}).json()  # shipped for τ = 0.95 only
    assert other["predictor_version"] == "fallback-parametric-b0"
    rows = stored(client, docs[0])
    assert [r["predictor_version"] for r in rows] == ["fallback-parametric-b0", shipped["default"].version]
    assert len(stored(client, docs[0], limit=1)) == 1
    assert client.get("/predictions", params={"document_hash": "nope"}).status_code == 422
    assert client.get("/predictions", params={"limit": 0}).status_code == 422


def test_hash_only_mode_stores_predictions_and_never_the_text(tmp_path, shipped, docs):
    from kvcalib.calib.data.documents import content_hash
    from kvcalib.service import repository as repo

    with embedded(tmp_path, store_document_text=False) as c:
        db = c.app.state.service.db
        b = c.post("/budget", json={"text": docs[2]}).json()  # the document itself is not stored
        p = predict(c, docs[3])  # stored by hash only
        with db.session() as s:
            assert repo.get_document_by_hash(s, content_hash=content_hash(docs[2])) is None
            assert repo.get_document(s, document_id=p["document_id"]).text == ""
        assert [r["ratio"] for r in stored(c, docs[2])] == [b["ratio"]]
        assert [r["ratio"] for r in stored(c, docs[3])] == [p["ratio"]]
        r = c.delete(f"/documents/{p['document_id']}")
        assert r.status_code == 200 and r.json()["predictions"] == 1
        assert stored(c, docs[3]) == [] and len(stored(c, docs[2])) == 1


def test_register_list_and_serve_a_predictor(tmp_path, shipped, docs):
    from kvcalib.calib.predictors import ConstantPredictor
    from kvcalib.client import KvcalibClient

    mine = ConstantPredictor(0.42)
    mine.training = {"config": dict(TRAINED)}
    elsewhere = ConstantPredictor(0.11)
    elsewhere.training = {"config": dict(TRAINED)}
    with embedded(tmp_path) as c:
        r = c.post("/predictors", json=mine.to_json())
        assert r.status_code == 201, r.text
        out = r.json()
        assert out["source"] == "registered" and out["version"] == mine.version and out["default"]
        assert out["model"] is None and out["training_config"] == TRAINED and out["created_at"]
        assert c.post("/predictors", json=mine.to_json()).status_code == 200  # registered before: idempotent
        r = c.post("/predictors", json=elsewhere.to_json(), params={"model": "qwen2.5-coder-0.5b"})
        assert r.status_code == 201 and r.json()["model"] == "qwen2.5-coder-0.5b"

        listing = c.get("/predictors").json()
        by_version = {p["version"]: p for p in listing["predictors"]}
        assert listing["defaults"] == {MODEL: mine.version, "qwen2.5-coder-0.5b": elsewhere.version}
        assert by_version[shipped["default"].version]["source"] == "shipped"
        assert not by_version[shipped["default"].version]["default"]  # the newest registered one wins

        p = predict(c, docs[4])
        assert p["predictor_version"] == mine.version and p["ratio"] == pytest.approx(0.42)
        assert stored(c, docs[4])[0]["predictor_version"] == mine.version
        r = c.post("/calibrate", json={"mode": "compress", "text": docs[4]})  # the same prediction: stored once
        assert r.status_code == 200 and r.headers["x-kvcalib-budget-source"] == "predicted"
        assert len(stored(c, docs[4])) == 1
        r = c.post("/calibrate", json={"mode": "compress", "text": docs[0]})  # a compression's prediction is stored
        assert r.status_code == 200 and float(r.headers["x-kvcalib-ratio"]) == pytest.approx(0.42)
        [row] = stored(c, docs[0])
        assert row["predictor_version"] == mine.version and row["token_budget"] < row["context_tokens"]

        kv = KvcalibClient()
        kv.http = c  # the client's calls through the in-process app
        assert kv.predictors()["defaults"][MODEL] == mine.version
        assert kv.predictions(text=docs[4])[0]["ratio"] == pytest.approx(0.42)
        path = tmp_path / "again.json"
        path.write_text(json.dumps(mine.to_json()))
        assert kv.register_predictor(path)["version"] == mine.version


def test_malformed_predictor_registration_is_422(client, shipped):
    from kvcalib.calib.predictors import ConstantPredictor

    good = ConstantPredictor(0.3).to_json()
    cases = [
        ([], None),
        ({}, "not a kvcalib predictor"),
        ({**good, "kind": "nope"}, "unknown predictor kind"),
        ({**good, "params": {"ratio": 0.99}}, "content hash"),
        ({**good, "params": {"ratio": "x"}}, "invalid constant predictor parameters"),
        ({**good, "metrics": [1, 2]}, "metrics"),
        ({**good, "training": {"config": [1]}}, "training.config"),
        ({**good, "created": "x" * 500}, "predictor version"),
        ({"format": "kvcalib.predictor", "format_version": 1, "kind": "risk", "params": {"base": 7},
          "content_hash": "0"}, "invalid predictor"),
    ]
    before = client.get("/predictors").json()
    for body, reason in cases:
        r = client.post("/predictors", json=body)
        assert r.status_code == 422, (body, r.text)
        if reason:
            assert reason in str(r.json()["detail"]), (reason, r.text)
    raw = b'{"format": "kvcalib.predictor", "format_version": 1, "kind": "constant", "params": {"ratio": NaN}}'
    r = client.post("/predictors", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "invalid predictor" in r.json()["detail"]
    r = client.post("/predictors", json=good, params={"model": "gpt-9"})
    assert r.status_code == 422 and MODEL in r.text
    assert client.get("/predictors").json() == before  # nothing registered


def test_predictor_endpoints_need_their_tokens(tmp_path, shipped):
    from kvcalib.calib.predictors import ConstantPredictor

    w, rd = ({"Authorization": f"Bearer {t}"} for t in ("writer", "reader"))
    with embedded(tmp_path, api_token="writer", api_read_token="reader") as c:
        body = ConstantPredictor(0.3).to_json()
        assert c.post("/predictors", json=body).status_code == 401
        assert c.post("/predictors", json=body, headers=rd).status_code == 401  # reading is not writing
        assert c.post("/predictors", json=body, headers=w).status_code == 201
        for path in ("/predictors", "/predictions"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers=rd).status_code == 200
