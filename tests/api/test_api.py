"""The API on the embedded default: nothing configured but a temp data dir → SQLite (auto-migrated) and in-process
execution, with the real SmolLM2-135M. Full calibration → job → profile → budget → compressed-cache download,
predict, batches, restart resume, input errors, the bearer token."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.support import FAST_OPTIONS, isolated_settings, shipped_predictors, short_documents, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 6)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, engine):
    """The embedded service with no shipped predictor (the fallback is tested here; the shipped default in
    test_predictors.py)."""
    from kvcalib.api.app import create_app

    data_dir = tmp_path_factory.mktemp("embedded")
    s = isolated_settings(data_dir)
    with shipped_predictors(tmp_path_factory.mktemp("nothing-ships")):
        app = create_app(s)
        with TestClient(app) as client:
            client.settings = s
            yield client


def full(client, text, **extra):
    body = {"mode": "full", "text": text, "options": FAST_OPTIONS, **extra}
    return client.post("/calibrate", json=body)


def wait_job(client, job_id, timeout=180):
    def done():
        j = client.get(f"/jobs/{job_id}").json()
        return j if j["status"] in ("succeeded", "failed") else None

    return wait_for(done, timeout, 0.3, f"job {job_id}")


def test_embedded_default_uses_sqlite_and_in_process_jobs(embedded):
    s = embedded.settings
    assert s.embedded and s.is_sqlite and s.db_url.endswith("kvcalib.db")
    assert (s.data_dir / "kvcalib.db").exists()  # created and migrated at start-up
    r = embedded.get("/readyz").json()
    assert r == {"ready": True, "checks": {"database": "ok", "broker": "in-process"}, "execution": "in-process"}
    assert embedded.get("/healthz").json()["status"] == "ok"


def test_full_calibration_job_profile_budget(embedded, docs):
    from kvcalib.calib.data.documents import content_hash

    text = docs[0]
    r = full(embedded, text)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == job["url"] and job["status"] in ("queued", "running", "succeeded")
    job = wait_job(embedded, job["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["result"]["profile_id"] and job["attempts"] == 1
    prof = embedded.get(job["profile_url"]).json()
    assert [c["ratio"] for c in prof["curve"]] == FAST_OPTIONS["ratios"]
    assert len(prof["head_budgets"]) == 30 and len(prof["head_budgets"][0]) == 3
    assert prof["document_hash"] == content_hash(text) and prof["tolerance"] == 0.95
    png = embedded.get(prof["curve_png_url"])
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"

    b = embedded.get("/budget", params={"document_hash": content_hash(text), "model": "smollm2-135m",
                                        "tolerance": 0.95})
    assert b.status_code == 200, b.text
    b = b.json()
    assert b["source"] == "profile" and b["ratio"] == prof["r_star"] and b["head_budgets"] == prof["head_budgets"]
    assert b["token_budget"] == prof["token_budget"] and sum(b["layer_budgets"]) == sum(map(sum, b["head_budgets"]))

    # the same (document, model, parameters) again: the same job, already done, nothing recomputed
    again = full(embedded, text)
    assert again.status_code == 200 and again.json()["id"] == job["id"]
    # another tolerance is another parameter set; the 404 of an uncalibrated τ says which τ exist
    miss = embedded.get("/budget", params={"document_hash": content_hash(text), "tolerance": 0.5})
    assert miss.status_code == 404 and "0.95" in miss.json()["detail"] and "POST /calibrate" in miss.json()["detail"]
    metrics = embedded.get("/metrics").text
    assert 'kvcalib_jobs{status="succeeded"}' in metrics and 'route="/budget"' in metrics


def test_finished_document_is_answered_while_the_broker_is_down(embedded, docs):
    """Resubmitting a calibrated document needs no broker: the stored result comes back (200), not a 503; a new
    document is a 503 and nothing of it is written."""
    from kvcalib.api.app import create_app
    from kvcalib.service import repository as repo
    from tests.support import DOWN_REDIS

    s = isolated_settings(embedded.settings.data_dir, broker_url=DOWN_REDIS,
                          database_url=embedded.settings.db_url)
    with TestClient(create_app(s, resume=False)) as down:
        done = embedded.get("/jobs/1").json()
        assert done["status"] == "succeeded"
        r = full(down, docs[0])
        assert r.status_code == 200, r.text
        assert r.json()["id"] == done["id"] and r.json()["result"] == done["result"]
        with down.app.state.service.db.session() as sess:
            before = repo.run_counts(sess)
        r = full(down, docs[5])
        assert r.status_code == 503 and r.headers["retry-after"]
        with down.app.state.service.db.session() as sess:
            assert repo.run_counts(sess) == before
            from kvcalib.calib.data.documents import content_hash

            assert repo.get_document_by_hash(sess, content_hash=content_hash(docs[5])) is None


def test_compress_download_loads_back(embedded, docs, engine):
    from kvcalib.calib.cache.export import load_compressed
    from kvcalib.calib.data.documents import content_hash

    text = docs[0]  # calibrated by the previous test: the profile's budgets are used
    r = embedded.post("/calibrate", json={"mode": "compress", "text": text, "options": FAST_OPTIONS})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream"
    ckv = load_compressed(r.content)
    prof = embedded.get("/budget", params={"document_hash": content_hash(text)}).json()
    assert r.headers["x-kvcalib-budget-source"] == "profile"
    assert ckv.head_budgets == prof["head_budgets"] and ckv.metadata["document_hash"] == content_hash(text)
    cache = ckv.to_ragged_cache()
    assert cache.next_position == ckv.context_tokens
    answer, _ = engine.answer(cache, engine.prompt("", "What is this text about?").question_ids, max_new_tokens=4)
    assert isinstance(answer, str)

    r = embedded.post("/calibrate", json={"mode": "compress", "text": docs[1], "ratio": 0.5})
    assert r.status_code == 200 and r.headers["x-kvcalib-budget-source"] == "ratio"
    ckv = load_compressed(r.content)
    assert abs(ckv.ratio - 0.5) < 0.05


def test_predict_and_post_budget(embedded, docs):
    r = embedded.post("/calibrate", json={"mode": "predict", "text": docs[2]})
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["source"] == "predicted" and 0.0 <= p["ratio"] < 1.0 and p["features"]
    assert len(p["head_budgets"]) == 30 and p["document_id"]
    b = embedded.post("/budget", json={"text": docs[2]}).json()
    assert b["source"] == "predicted" and b["ratio"] == p["ratio"]
    b = embedded.post("/budget", json={"text": docs[0], "options": FAST_OPTIONS}).json()  # calibrated before
    assert b["source"] == "profile"
    # no trained predictor here: the documented fallback is the median stored r* (docs[0]'s profile)
    assert p["predictor_version"] == "fallback-store-median-n1" and p["ratio"] == b["ratio"]
    r = embedded.post("/calibrate", json={"mode": "compress", "text": docs[2]})
    assert r.status_code == 200 and r.headers["x-kvcalib-budget-source"] == "predicted"


def test_batch_upload_jsonl_completes(embedded, docs):
    lines = [json.dumps({"text": docs[0], "id": "a"}), json.dumps(docs[3]), ""]  # docs[0] is calibrated already
    r = embedded.post("/batches/upload", files={"file": ("corpus.jsonl", "\n".join(lines).encode())},
                      data={"options": json.dumps(FAST_OPTIONS)})
    assert r.status_code == 202, r.text
    b = r.json()
    assert b["total"] == 2 and b["counts"]["succeeded"] >= 1

    def done():
        v = embedded.get(f"/batches/{b['id']}").json()
        return v if v["done"] else None

    final = wait_for(done, 180, 0.3, "batch")
    assert final["counts"]["succeeded"] == 2 and final["progress"] == 1.0 and final["status"] == "succeeded"
    assert all(i["profile_id"] for i in final["items"])


def test_unfinished_jobs_resume_after_restart(tmp_path, docs):
    """A job accepted by a process that died before running it is run by the next process on the same data dir."""
    from kvcalib.api.app import create_app

    class Lost:  # accepts jobs and never runs them: the process "dies" afterwards
        kind = "in-process"

        def check(self):
            pass

        def submit(self, run_id):
            return None

        def close(self, wait=False):
            pass

    s = isolated_settings(tmp_path)
    with TestClient(create_app(s, dispatcher=Lost())) as c1:
        job = full(c1, docs[4]).json()
        assert job["status"] == "queued"
    with TestClient(create_app(s)) as c2:  # restart: resumes the queued job
        assert wait_job(c2, job["id"])["status"] == "succeeded"


def test_input_errors_are_4xx_with_clear_messages(embedded):
    post = lambda body: embedded.post("/calibrate", json=body)  # noqa: E731
    r = post({"text": "hello world", "model": "gpt-5"})
    assert r.status_code == 422 and "smollm2-135m" in r.text  # the valid choices are listed
    r = post({"text": "hello world", "method": "nope"})
    assert r.status_code == 422 and "compactor" in r.text and "snapkv" in r.text
    r = post({"text": "hello world", "allocator": "nope"})
    assert r.status_code == 422 and "uniform" in r.text
    r = embedded.get("/budget", params={"document_hash": "a" * 64, "model": "nope"})
    assert r.status_code == 422 and "smollm2-135m" in r.text
    assert post({"text": "hello", "tolerance": 1.5}).status_code == 422
    assert post({"text": "hello", "options": {"ratios": [1.5]}}).status_code == 422
    assert post({"text": "hello", "options": {"method_params": {"bogus": 1}}}).status_code == 422
    assert post({"text": "hello", "document_id": 1}).status_code == 422  # two documents
    assert post({"document_id": 10**12}).status_code == 404
    assert post({"document_hash": "0" * 64, "mode": "predict"}).status_code == 404
    assert post({"text": "x" * (1_000_001)}).status_code == 413  # bytes
    r = post({"text": "word " * 9000})  # ~9000 tokens: over the token limit
    assert r.status_code == 413 and "tokens" in r.json()["detail"]
    assert post({"text": "a\u0000b"}).status_code == 422
    raw = lambda data: embedded.post("/calibrate", content=data, headers={"content-type": "application/json"})  # noqa
    assert raw(b'{"text": "\\ud800 lone surrogate"}').status_code == 422
    r = raw(b'{"text": "\xff\xfe not utf-8"}')
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]  # as documented (was 400)
    assert raw(b"{not json").status_code == 422
    r = embedded.post("/batches/upload", files={"file": ("c.jsonl", b"\xff\xfe")})
    assert r.status_code == 422 and "UTF-8" in r.json()["detail"]
    assert embedded.get("/budget", params={"document_hash": "xyz"}).status_code == 422
    assert embedded.get("/jobs/0").status_code == 422 and embedded.get("/jobs/99999").status_code == 404


def test_bearer_token_protects_write_endpoints(tmp_path):
    from kvcalib.api.app import create_app

    with TestClient(create_app(isolated_settings(tmp_path, api_token="s3cret"))) as c:
        body = {"text": "hello", "model": "nope"}
        assert c.post("/calibrate", json=body).status_code == 401
        assert c.post("/calibrate", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.post("/calibrate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 422
        assert c.post("/batches", json={"documents": ["x"]}).status_code == 401
        assert c.get("/budget", params={"document_hash": "a" * 64}).status_code == 404  # reads stay open
        assert "HTTPBearer" in json.dumps(c.get("/openapi.json").json()["components"]["securitySchemes"])


def test_configured_predictor_is_used_and_registered(tmp_path, docs):
    """A trained predictor (KVCALIB_PREDICTOR_PATH) answers the (method, allocator, τ) it was trained for and is
    recorded in the predictors table; other settings fall back (no stored profile: Compactor's curve, b = 0)."""
    from kvcalib.api.app import create_app
    from kvcalib.calib.predictors import ParametricPredictor, save_predictors

    s = isolated_settings(tmp_path / "data", predictor_path=tmp_path / "pred")
    pred = ParametricPredictor(alpha=0.0, beta=3.0, tau=0.95)
    pred.training = {"config": {"method": "compactor", "allocator": s.default_allocator, "tolerance": 0.95}}
    save_predictors(tmp_path / "pred", {"parametric": pred})
    with TestClient(create_app(s)) as c:
        r = c.post("/calibrate", json={"mode": "predict", "text": docs[5]}).json()
        assert r["predictor_version"] == pred.version
        assert abs(r["ratio"] - float(pred.ratio_for_nll([0.0])[0])) < 1e-9  # b does not depend on the NLL here
        from kvcalib.service import repository as repo

        with c.app.state.service.db.session() as sess:
            assert repo.latest_predictor(sess).version == pred.version
        r = c.post("/budget", json={"text": docs[5], "tolerance": 0.9}).json()
        assert r["predictor_version"] == "fallback-parametric-b0" and abs(r["ratio"] - 0.1) < 1e-9
