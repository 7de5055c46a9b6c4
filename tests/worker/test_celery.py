"""Production topology with real components: PostgreSQL (fresh database), Redis (dedicated DB, private queue name),
real ``celery worker --pool=solo`` subprocesses running the real model; the API in-process.

* a full calibration goes API → Redis → worker → PostgreSQL, and GET /budget serves it;
* a batch of 20 documents completes although its worker is SIGKILLed mid-batch (a new worker takes over): no
  profile lost, none duplicated;
* with the broker down, stored budgets are still served and job submission answers 503.
"""

from __future__ import annotations

import os
import re

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.support import (  # noqa: F401
    DOWN_REDIS,
    FAST_OPTIONS,
    pg_url,
    queue_name,
    redis_url,
    service_env,
    short_documents,
    wait_for,
    worker_pool,
)

pytestmark = [pytest.mark.service, pytest.mark.slow]

VISIBILITY = 6  # seconds before the message of a killed worker is delivered again
LEASE = 4  # seconds of a job's lease: a killed worker's job is taken over once it expired (tests/worker/test_faults)


def make_settings(db_url, broker_url, queue):
    from kvcalib.settings import Settings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR"}
    try:
        return Settings(_env_file=None, database_url=db_url, broker_url=broker_url, queue=queue,
                        gpu_queue=queue + "-gpu", broker_visibility_timeout=VISIBILITY, job_retry_backoff=0.5,
                        broker_timeout=0.5, job_lease_seconds=LEASE, job_dispatch_grace=LEASE,
                        job_sweep_interval=1)
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def stack(pg_url, redis_url, queue_name, engine):  # noqa: F811
    from kvcalib.api.app import create_app

    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text("TRUNCATE batch_items, batches, profiles, curve_points, calibration_runs, documents, "
                             "models, predictors RESTART IDENTITY CASCADE"))
    s = make_settings(pg_url, redis_url, queue_name)
    env = service_env(pg_url, redis_url, queue_name, KVCALIB_BROKER_VISIBILITY_TIMEOUT=VISIBILITY,
                      KVCALIB_JOB_LEASE_SECONDS=LEASE, KVCALIB_JOB_DISPATCH_GRACE=LEASE, KVCALIB_JOB_SWEEP_INTERVAL=1)
    with TestClient(create_app(s)) as client:
        yield client, env, eng
    eng.dispose()


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 22)


def test_full_calibration_through_celery(stack, docs, worker_pool):
    from kvcalib.calib.data.documents import content_hash

    client, env, _ = stack
    assert client.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok"}
    worker_pool.start(env, "alpha", "doomed")  # two solo workers, one model copy each
    r = client.post("/calibrate", json={"mode": "full", "text": docs[0], "options": FAST_OPTIONS})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]

    def finished():
        j = client.get(f"/jobs/{job_id}").json()
        return j if j["status"] in ("succeeded", "failed") else None

    job = wait_for(finished, 120, 0.3, "the job")
    assert job["status"] == "succeeded", job
    b = client.get("/budget", params={"document_hash": content_hash(docs[0]), "tolerance": 0.95})
    assert b.status_code == 200 and b.json()["profile_id"] == job["result"]["profile_id"]


def test_batch_survives_sigkilled_worker(stack, docs, worker_pool):
    client, env, eng = stack
    batch_docs = docs[1:21]
    assert len(batch_docs) == 20
    r = client.post("/batches", json={"documents": [{"text": t, "source": f"doc{i}"} for i, t in
                                                    enumerate(batch_docs)], "options": FAST_OPTIONS})
    assert r.status_code == 202, r.text
    batch_id = r.json()["id"]
    seen_progress = []

    doomed = next(w for w in worker_pool.started if "doomed" in str(w.log))

    def doomed_busy():
        """The run the doomed worker is calibrating right now, once 3 documents are done."""
        b = client.get(f"/batches/{batch_id}", params={"items": "false"}).json()
        seen_progress.append(b["progress"])
        if b["counts"]["succeeded"] < 3:
            return None
        log = doomed.output()
        finished = set(re.findall(r"calibrate_run\[([0-9a-f-]+)\] succeeded", log))
        busy = [t for t in re.findall(r"calibrate_run\[([0-9a-f-]+)\] received", log) if t not in finished]
        if not busy:
            return None
        with eng.connect() as conn:
            row = conn.execute(sa.text("SELECT id, status, attempts FROM calibration_runs WHERE task_id = :t"),
                               {"t": busy[-1]}).one_or_none()
        return row if row is not None and row.status == "running" else None

    orphan = wait_for(doomed_busy, 150, 0.2, "3 documents done and the doomed worker busy")
    doomed.kill()  # mid-calibration: its message is unacked, its run row says "running"
    with eng.connect() as conn:
        status = conn.execute(sa.text("SELECT status FROM calibration_runs WHERE id = :i"), {"i": orphan.id}).scalar()
    assert status == "running", "the killed worker's run is left unfinished"

    worker_pool.start(env, "rescuer")  # replaces the killed worker

    def done():
        b = client.get(f"/batches/{batch_id}").json()
        seen_progress.append(b["progress"])
        return b if b["done"] else None

    final = wait_for(done, 240, 0.5, "the batch to finish after the worker was killed")
    assert final["counts"] == {"queued": 0, "running": 0, "succeeded": 20, "failed": 0}, final
    assert final["progress"] == 1.0 and all(i["profile_id"] for i in final["items"])
    assert any(0.0 < p < 1.0 for p in seen_progress)  # progress was reported along the way
    run_ids = [i["job_id"] for i in final["items"]]
    with eng.connect() as conn:
        ids = ",".join(map(str, run_ids))
        n_profiles = conn.execute(sa.text(f"SELECT count(*) FROM profiles WHERE run_id IN ({ids})")).scalar()
        n_points = conn.execute(sa.text(f"SELECT count(*) FROM curve_points WHERE run_id IN ({ids})")).scalar()
        dup = conn.execute(sa.text("SELECT run_id FROM profiles GROUP BY run_id HAVING count(*) > 1")).all()
        attempts = conn.execute(sa.text("SELECT attempts FROM calibration_runs WHERE id = :i"),
                                {"i": orphan.id}).scalar()
        n_docs = conn.execute(sa.text("SELECT count(*) FROM documents")).scalar()
    assert n_profiles == 20 and n_points == 20 * len(FAST_OPTIONS["ratios"]) and not dup
    assert attempts >= orphan.attempts + 1  # the interrupted run was delivered again and re-run
    assert n_docs == 21  # 20 batch documents + the one of the first test, each stored once


def test_broker_down_budgets_still_served_submissions_503(stack, docs, pg_url):  # noqa: F811
    from kvcalib.api.app import create_app
    from kvcalib.calib.data.documents import content_hash

    _, _, eng = stack
    s = make_settings(pg_url, DOWN_REDIS, "unused")
    with eng.connect() as conn:
        runs_before = conn.execute(sa.text("SELECT count(*) FROM calibration_runs")).scalar()
    with TestClient(create_app(s)) as down:
        b = down.get("/budget", params={"document_hash": content_hash(docs[0])})
        assert b.status_code == 200 and b.json()["source"] == "profile"
        r = down.post("/calibrate", json={"mode": "full", "text": docs[21], "options": FAST_OPTIONS})
        assert r.status_code == 503 and "broker" in r.json()["detail"]
        r = down.post("/batches", json={"documents": [docs[21]]})
        assert r.status_code == 503
        ready = down.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("unavailable")
        assert down.get("/jobs/1").status_code == 200
    with eng.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM calibration_runs")).scalar() == runs_before
