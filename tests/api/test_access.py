"""Access, data and operations (issue 13, items 8, 9 and 10): a blank token refuses to start, the optional read
token, ``DELETE /documents/{id}``, hash-only storage, metrics with bounded labels (process, domain, multiprocess
mode), ``PredictOut`` in the schema and ``/docs`` served from local assets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from tests.support import FAST_OPTIONS, RecordingDispatcher, isolated_settings, short_documents, wait_for

pytestmark = pytest.mark.slow


def recording_app(data_dir, **overrides):
    from kvcalib.api.app import create_app

    return create_app(isolated_settings(data_dir, **overrides), dispatcher=RecordingDispatcher(), resume=False)


# ---------------------------------------------------------------------------------------------------- item 9
@pytest.mark.parametrize("var", ["api_token", "api_read_token"])
def test_blank_token_refuses_to_start(tmp_path, var):
    from kvcalib.api.app import create_app
    from kvcalib.calib.errors import KvcalibError

    for blank in ("", "   "):
        with pytest.raises(KvcalibError, match=f"KVCALIB_{var.upper()} is set but blank"):
            create_app(isolated_settings(tmp_path, **{var: blank}), dispatcher=RecordingDispatcher(), resume=False)


def test_serve_refuses_a_blank_token_with_a_clear_message(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kvcalib.cli import app
    from kvcalib.settings import get_settings

    for k in list(os.environ):
        if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR":
            monkeypatch.delenv(k)
    monkeypatch.setenv("KVCALIB_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("KVCALIB_API_TOKEN", " ")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    r = CliRunner().invoke(app, ["serve", "--port", "1"])
    get_settings.cache_clear()
    assert r.exit_code == 2 and "KVCALIB_API_TOKEN is set but blank" in r.output and "Traceback" not in r.output


def test_read_token_guards_stored_data(tmp_path):
    app = recording_app(tmp_path, api_token="writer", api_read_token="reader")
    w, rd, bad = ({"Authorization": f"Bearer {t}"} for t in ("writer", "reader", "nope"))
    with TestClient(app) as c:
        for path in ("/jobs/1", "/batches/1", "/profiles/1", "/profiles/1/curve.png",
                     "/budget?document_hash=" + "a" * 64):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers=bad).status_code == 401, path
            assert c.get(path, headers=rd).status_code == 404, path  # the read token reads …
            assert c.get(path, headers=w).status_code == 404, path  # … and so does the write token
        assert c.post("/budget", json={"text": "hi"}, headers=rd).status_code == 401  # reading is not writing
        assert c.delete("/documents/1", headers=rd).status_code == 401
        assert c.delete("/documents/1", headers=w).status_code == 404
        for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
            assert c.get(path).status_code == 200, path  # operations and documentation stay open


def test_delete_document_removes_text_profiles_and_runs_hash_only_mode(tmp_path, tokenizer):
    """Hash-only mode end to end, with real embedded jobs: a full calibration keeps the text for its job and loses
    it once the job is finished; predictions never store it; DELETE removes the document and all it produced."""
    from kvcalib.api.app import create_app
    from kvcalib.calib.data.documents import content_hash
    from kvcalib.service import repository as repo

    texts = short_documents(tokenizer, 2, 100, 150)
    app = create_app(isolated_settings(tmp_path, store_document_text=False))
    with TestClient(app) as c:
        db = app.state.service.db
        r = c.post("/calibrate", json={"mode": "full", "text": texts[0], "options": FAST_OPTIONS})
        assert r.status_code == 202, r.text
        job = r.json()

        def finished():
            j = c.get(f"/jobs/{job['id']}").json()
            return j if j["status"] in ("succeeded", "failed") else None

        job = wait_for(finished, 300, 0.3, "job")
        assert job["status"] == "succeeded", job
        with db.session() as s:
            doc = repo.get_document(s, document_id=job["document_id"])
            assert doc.text == "" and doc.n_bytes == len(texts[0].encode()) and doc.content_hash == job["document_hash"]
        # the stored profile still answers by hash; anything needing the text asks for it
        assert c.get("/budget", params={"document_hash": content_hash(texts[0])}).status_code == 200
        r = c.post("/calibrate", json={"mode": "compress", "document_id": job["document_id"]})
        assert r.status_code == 422 and "not stored" in r.json()["detail"]
        assert c.post("/calibrate", json={"mode": "compress", "text": texts[0]}).status_code == 200  # with the text
        p = c.post("/calibrate", json={"mode": "predict", "text": texts[1]}).json()
        with db.session() as s:
            assert repo.get_document(s, document_id=p["document_id"]).text == ""  # never stored

        profile_id = job["result"]["profile_id"]
        r = c.delete(f"/documents/{job['document_id']}")
        assert r.status_code == 200, r.text
        assert r.json() == {"document_id": job["document_id"], "document_hash": content_hash(texts[0]), "runs": 1,
                            "profiles": 1, "curve_points": len(FAST_OPTIONS["ratios"]), "batch_items": 0,
                            "predictions": 0}
        assert c.get(f"/jobs/{job['id']}").status_code == 404
        assert c.get(f"/profiles/{profile_id}").status_code == 404
        assert c.get("/budget", params={"document_hash": content_hash(texts[0])}).status_code == 404
        assert c.delete(f"/documents/{job['document_id']}").status_code == 404
        with db.session() as s:
            assert repo.get_document_by_hash(s, content_hash=content_hash(texts[0])) is None
            assert repo.get_document(s, document_id=p["document_id"]) is not None  # others untouched


def test_delete_refuses_a_document_with_an_unfinished_job(tmp_path, tokenizer):
    app = recording_app(tmp_path)  # jobs are recorded, never run: the job stays queued
    with TestClient(app) as c:
        job = c.post("/calibrate", json={"mode": "full", "text": short_documents(tokenizer, 1)[0]}).json()
        r = c.delete(f"/documents/{job['document_id']}")
        assert r.status_code == 409 and str(job["id"]) in r.json()["detail"]
        assert c.get(f"/jobs/{job['id']}").status_code == 200


# ---------------------------------------------------------------------------------------------------- item 8
def test_metrics_labels_are_bounded_and_domain_metrics_exported(tmp_path, engine):
    import random
    import string

    from kvcalib.service import repository as repo
    from kvcalib.service.jobs import token_budget_of

    app = recording_app(tmp_path)
    rng = random.Random(0)
    with TestClient(app) as c:
        for _ in range(300):  # 300 random methods: once 301 series
            method = "".join(rng.choice(string.ascii_uppercase) for _ in range(8))
            assert c.request(method, "/budget").status_code < 500
        for i in range(50):  # random paths: no series per path
            c.get(f"/nowhere/{i}")
        text = "The harbour committee met on Tuesday evening to discuss the new pier and its costs."
        r = c.post("/calibrate", json={"mode": "predict", "text": text})
        assert r.status_code == 200
        kind = "fallback" if r.json()["predictor_version"].startswith("fallback") else "trained"  # shipped or not
        assert c.post("/calibrate", json={"mode": "compress", "text": text, "ratio": 0.5}).status_code == 200
        with app.state.service.db.session() as s:  # one stored profile, as a worker would write it
            from types import SimpleNamespace

            model = repo.get_or_create_model(s, name="smollm2-135m", revision="r")
            doc = repo.get_or_create_document(s, text="stored", content_hash="f" * 64, token_count=200)
            run, _ = repo.get_or_create_run(s, document=doc, model=model, params={}, params_hash="h" * 64,
                                            method="compactor", allocator="adakv", tolerance=0.95)
            res = SimpleNamespace(ratios=[0.3, 0.6], fidelity=[0.99, 0.9], kl=None, r_star=0.42, ratio=0.42,
                                  controller=None, context_tokens=200,
                                  monotone=True, layer_budgets=[1], head_budgets=[[1]], features={}, seconds=7.5)
            repo.save_result(s, run=run, result=res, token_budget=token_budget_of(0.42, 200))
        text = c.get("/metrics").text
    series = [line for line in text.splitlines() if line.startswith("kvcalib_http_requests_total{")]
    methods = {line.split('method="')[1].split('"')[0] for line in series}
    routes = {line.split('route="')[1].split('"')[0] for line in series}
    assert methods <= {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER"} and "OTHER" in methods
    assert routes <= {"/budget", "/calibrate", "unmatched", "/metrics"} and len(series) <= 8
    assert "process_resident_memory_bytes" in text and "python_gc_objects_collected_total" in text
    assert 'kvcalib_budget_answers_total{route="/calibrate",source="predicted"} 1.0' in text
    assert 'kvcalib_budget_answers_total{route="/calibrate",source="ratio"} 1.0' in text
    assert f'kvcalib_predictions_total{{predictor="{kind}"}} 1.0' in text
    assert "kvcalib_predicted_ratio_count 1.0" in text
    assert 'kvcalib_profile_r_star_bucket{le="0.4"} 0.0' in text
    assert 'kvcalib_profile_r_star_bucket{le="0.45"} 1.0' in text
    assert "kvcalib_profile_r_star_sum 0.42" in text and "kvcalib_calibration_seconds_sum 7.5" in text
    assert 'kvcalib_calibration_seconds_bucket{le="10.0"} 1.0' in text and "kvcalib_store_up 1.0" in text
    assert 'kvcalib_jobs{status="queued"} 1.0' in text


def test_metrics_multiprocess_mode(tmp_path):
    """``uvicorn --workers N``: with PROMETHEUS_MULTIPROC_DIR every process writes there and any one serves the sum
    (two processes here, each counting one request)."""
    prom = tmp_path / "prom"
    prom.mkdir()
    code = ("from kvcalib.api.metrics import Metrics\n"
            "m = Metrics(lambda: None)\n"
            "m.observe_request('GET', '/budget', 200, 0.01)\n"
            "m.observe_budget('/budget', 'profile', 0.5, None)\n"
            "print(m.render().decode())\n")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(prom)}
    outs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert all(o.returncode == 0 for o in outs), outs[-1].stderr
    last = outs[-1].stdout
    assert 'kvcalib_http_requests_total{method="GET",route="/budget",status="200"} 2.0' in last
    assert 'kvcalib_budget_answers_total{route="/budget",source="profile"} 2.0' in last
    assert "kvcalib_store_up 0.0" in last  # no service here: the store figures are left out, not an error


# ---------------------------------------------------------------------------------------------------- item 10
def test_openapi_defines_predict_out_and_docs_are_served_locally(tmp_path):
    app = recording_app(tmp_path)
    with TestClient(app) as c:
        spec = c.get("/openapi.json").json()
        schemas = spec["components"]["schemas"]
        assert "PredictOut" in schemas and "features" in schemas["PredictOut"]["properties"]
        refs = json.dumps(spec).count('"#/components/schemas/')
        assert refs and all(ref.split("/")[-1] in schemas for ref in
                            {p.split('"')[0] for p in json.dumps(spec).split('"#/components/schemas/')[1:]})
        html = c.get("/docs").text
        assert "cdn." not in html and "unpkg" not in html and "/static-offline-docs/swagger-ui-bundle.js" in html
        js = c.get("/static-offline-docs/swagger-ui-bundle.js")
        css = c.get("/static-offline-docs/swagger-ui.css")
        assert js.status_code == 200 and len(js.content) > 100_000 and "SwaggerUIBundle" in js.text[:2000]
        assert css.status_code == 200 and ".swagger-ui" in css.text[:500]
        assert "cdn." not in c.get("/redoc").text
