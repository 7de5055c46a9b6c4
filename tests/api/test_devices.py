"""Per-request device through the API (issue 17, item 5), on the embedded service with the real SmolLM2-135M and short
documents: ``device="cpu"`` runs predict, POST /budget, compress, a full calibration and a batch (the job records its
device; the device is not part of the parameters hash); a malformed device, a device this server lacks (``cuda`` on a
CPU-only machine) and a device outside ``allowed_devices`` are 422s saying why; the Python client passes it on."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient

from tests.support import FAST_OPTIONS, isolated_settings, shipped_predictors, short_documents, wait_for

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
NO_CUDA = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 3, min_tokens=200, max_tokens=280)


@pytest.fixture(scope="module")
def api(tmp_path_factory, engine):
    """The embedded service (SQLite, in-process jobs) with its defaults: the worker device (cpu) alone allowed."""
    from kvcalib.api.app import create_app

    s = isolated_settings(tmp_path_factory.mktemp("devices"))
    with shipped_predictors(tmp_path_factory.mktemp("nothing-ships")):
        with TestClient(create_app(s)) as client:
            yield client


def finished(client, job: dict) -> dict:
    def done():
        j = client.get(f"/jobs/{job['id']}").json()
        return j if j["status"] in ("succeeded", "failed") else None

    return wait_for(done, 300, 0.3, "calibration job")


def test_cpu_runs_predict_budget_and_compress(api, docs):
    from kvcalib.service.runtime import _ENGINES

    text = docs[0]
    r = api.post("/calibrate", json={"mode": "predict", "text": text, "model": MODEL, "device": "cpu"})
    assert r.status_code == 200, r.text
    predicted = r.json()
    assert predicted["source"] == "predicted" and predicted["dtype"] == "fp32"
    b = api.post("/budget", json={"text": text, "model": MODEL, "device": "cpu"})
    assert b.status_code == 200, b.text
    default = api.post("/budget", json={"text": text, "model": MODEL}).json()  # the worker device: cpu
    assert b.json() == default and b.json()["ratio"] == predicted["ratio"]
    ids = b.json()["prompt_format"]["context_tokens"]
    t = api.post("/budget", json={"token_ids": list(range(100, 100 + ids)), "model": MODEL, "device": "cpu"})
    assert t.status_code == 200, t.text
    c = api.post("/calibrate", json={"mode": "compress", "text": text, "model": MODEL, "device": "cpu",
                                     "ratio": 0.5})
    assert c.status_code == 200, c.text
    assert (MODEL, "cpu", "fp32") in _ENGINES  # the per-(model, device, dtype) engine


def test_cpu_jobs_record_their_device_outside_the_parameters_hash(api, docs):
    r = api.post("/calibrate", json={"mode": "full", "text": docs[1], "model": MODEL, "options": FAST_OPTIONS,
                                     "device": "cpu"})
    assert r.status_code in (200, 202), r.text
    assert r.json()["device"] == "cpu"
    job = finished(api, r.json())
    assert job["status"] == "succeeded" and job["device"] == "cpu", job
    again = api.post("/calibrate", json={"mode": "full", "text": docs[1], "model": MODEL, "options": FAST_OPTIONS})
    assert again.status_code == 200 and again.json()["id"] == job["id"]  # no device: the same parameters, same job
    assert again.json()["params_hash"] == job["params_hash"]

    b = api.post("/batches", json={"documents": [docs[1]], "model": MODEL, "options": FAST_OPTIONS,
                                   "device": "cpu"})
    assert b.status_code == 202, b.text
    assert b.json()["params"]["device"] == "cpu" and b.json()["counts"]["succeeded"] == 1


def test_malformed_and_missing_devices_are_422(api, docs):
    text = docs[2]
    bodies = [("/calibrate", {"mode": "predict", "text": text}), ("/calibrate", {"mode": "full", "text": text}),
              ("/calibrate", {"mode": "compress", "text": text}), ("/budget", {"text": text}),
              ("/budget", {"token_ids": [1, 2, 3]}), ("/batches", {"documents": [text]})]
    for path, body in bodies:
        r = api.post(path, json={**body, "model": MODEL, "device": "tpu"})
        assert r.status_code == 422, (path, body, r.text)
        assert "device" in json.dumps(r.json()["detail"]) and "pattern" in json.dumps(r.json()["detail"])
        if NO_CUDA:
            r = api.post(path, json={**body, "model": MODEL, "device": "cuda"})
            assert r.status_code == 422, (path, body, r.text)
            assert r.json()["detail"].startswith("device 'cuda' does not exist on this server: torch finds no CUDA "
                                                 "device"), r.json()
    upload = {"file": ("c.jsonl", json.dumps({"text": text}).encode())}
    r = api.post("/batches/upload", files=upload, data={"model": MODEL, "device": "tpu"})
    assert r.status_code == 422, r.text
    if NO_CUDA:
        r = api.post("/batches/upload", files=upload, data={"model": MODEL, "device": "cuda:1"})
        assert r.status_code == 422 and "device 'cuda:1' does not exist on this server" in r.json()["detail"]
    assert api.get("/predictions", params={"document_hash": _hash(text)}).json()["predictions"] == []  # none ran


def _hash(text: str) -> str:
    from kvcalib.calib.data.documents import content_hash

    return content_hash(text)


def test_devices_outside_allowed_devices_are_422(tmp_path, docs):
    from kvcalib.api.app import create_app

    s = isolated_settings(tmp_path, allowed_devices=["cuda:0"])  # the deployment lends its GPU only
    with TestClient(create_app(s)) as client:
        for path, body in (("/calibrate", {"mode": "predict"}), ("/calibrate", {"mode": "full"}), ("/budget", {}),
                           ("/batches", {})):
            body = {**body, "model": MODEL, "device": "cpu"}
            body.update({"documents": [docs[0]]} if path == "/batches" else {"text": docs[0]})
            r = client.post(path, json=body)
            assert r.status_code == 422, (path, r.text)
            assert r.json()["detail"] == ("device 'cpu' is not allowed on this server: allowed devices are "
                                          "['cuda:0'] (KVCALIB_ALLOWED_DEVICES)")


def test_client_passes_the_device(api, docs):
    from kvcalib.client import KvcalibClient, ServiceError

    kv = KvcalibClient()
    kv.http.close()
    kv.http = api  # the torch-free client over the test app
    b = kv.budget(text=docs[0], model=MODEL, predict_missing=True, device="cpu", use_cache=False)
    assert b is not None and b.source == "predicted" and b.dtype == "fp32"
    assert kv.predict(docs[0], model=MODEL, device="cpu")["ratio"] == b.ratio
    with pytest.raises(ServiceError) as err:
        kv.predict_budget(docs[0], model=MODEL, device="tpu")
    assert err.value.status_code == 422
    if NO_CUDA:
        with pytest.raises(ServiceError, match="does not exist on this server") as err:
            kv.budget(text=docs[0], model=MODEL, predict_missing=True, device="cuda", use_cache=False)
        assert err.value.status_code == 422
