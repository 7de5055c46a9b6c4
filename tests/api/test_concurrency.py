"""Concurrent requests against one API process (issue 13, item 1): predictions, compressed-cache downloads (one with
``method_params``) and an embedded full calibration job, all sharing the process's one model, give the same
answers as the same requests sent one at a time — and none is a 5xx.

The documents all have the same token length: a request reading another request's activations would not fail on
a shape but return wrong data, which the exact comparisons catch. Each phase runs on a fresh embedded service
(SQLite, in-process jobs), so database ids are the only fields that may differ; they are left out.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support import FAST_OPTIONS, equal_length_documents, isolated_settings, run_threads, wait_for

pytestmark = pytest.mark.slow

TOKENS = 224
FULL_TOLERANCE = 0.9  # the full job's profile must not feed the fallback predictor of the predictions (τ = 0.95)


def embedded_client(data_dir) -> TestClient:
    from kvcalib.api.app import create_app

    return TestClient(create_app(isolated_settings(data_dir)))


@pytest.fixture(scope="module")
def requests_(engine) -> list[dict]:
    """One full job first (it runs in the background while the others are served), then predictions and
    compressions of distinct documents of equal length."""
    docs = equal_length_documents(engine, 9, TOKENS)
    reqs = [{"mode": "full", "text": docs[0], "tolerance": FULL_TOLERANCE, "options": FAST_OPTIONS}]
    reqs += [{"mode": "predict", "text": d} for d in docs[1:4]]
    reqs += [{"mode": "predict", "text": docs[4], "options": {"method_params": {"sketch_dim": 48}}}]
    reqs += [{"mode": "compress", "text": d, "ratio": 0.5} for d in docs[5:8]]
    reqs += [{"mode": "compress", "text": docs[8], "ratio": 0.4, "options": {"method_params": {"sketch_dim": 48}}}]
    return reqs


def _outcome(client: TestClient, body: dict, r) -> dict:
    """What a response says, without database ids: the profile of a full job (waited for), the prediction, or the
    downloaded cache's tensors and metadata."""
    from kvcalib.calib.cache.export import load_compressed

    assert r.status_code < 500, f"{body['mode']}: {r.status_code} {r.text[:500]}"
    assert r.status_code in (200, 202), f"{body['mode']}: {r.status_code} {r.text[:500]}"
    if body["mode"] == "full":
        job_id = r.json()["id"]

        def done():
            j = client.get(f"/jobs/{job_id}").json()
            return j if j["status"] in ("succeeded", "failed") else None

        job = wait_for(done, 600, 0.3, f"job {job_id}")
        assert job["status"] == "succeeded", job
        prof = client.get(job["profile_url"]).json()
        return {k: prof[k] for k in ("r_star", "curve", "layer_budgets", "head_budgets", "features", "token_budget",
                                     "context_tokens", "monotone")}
    if body["mode"] == "predict":
        out = r.json()
        out.pop("document_id")
        return out
    ckv = load_compressed(r.content)
    meta = dict(ckv.metadata)
    meta.pop("document_id", None)
    return {"meta": meta, "input_ids": ckv.input_ids.tolist(),
            "positions": [layer.positions.tolist() for layer in ckv.layers],
            "keys": [layer.keys.numpy().tobytes() for layer in ckv.layers],
            "values": [layer.values.numpy().tobytes() for layer in ckv.layers],
            "headers": {k: v for k, v in r.headers.items() if k.startswith("x-kvcalib")}}


def test_concurrent_requests_equal_sequential_ones(tmp_path, requests_):
    with embedded_client(tmp_path / "sequential") as client:
        sequential = [_outcome(client, body, client.post("/calibrate", json=body)) for body in requests_]

    with embedded_client(tmp_path / "concurrent") as client:
        responses = run_threads(lambda body: client.post("/calibrate", json=body), [(body,) for body in requests_])
        assert [r.status_code for r in responses] == [202] + [200] * (len(requests_) - 1), \
            [(r.status_code, r.text[:300]) for r in responses]
        concurrent = [_outcome(client, body, r) for body, r in zip(requests_, responses)]

    for body, got, want in zip(requests_, concurrent, sequential):
        assert got == want, f"concurrent {body['mode']} of {body['text'][:40]!r} differs from the sequential one"
    assert sequential[0]["context_tokens"] == TOKENS and len({str(o) for o in sequential}) == len(requests_)
