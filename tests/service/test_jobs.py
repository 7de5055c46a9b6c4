"""Jobs under leases (issue 13, items 4–7), with the real model wherever a calibration runs:

* exact attempt counts for ``JOB_MAX_RETRIES`` = 0, 1, 2, through the embedded executor and the Celery task;
* a live lease blocks a second execution (it returns ``busy`` without loading the model); of concurrent claims
  exactly one wins; the heartbeat keeps a lease alive past its length and notices a takeover;
* the sweeper sends again a run whose lease expired and a queued run whose message is gone — once, even with two
  sweepers — and leaves alone a run whose message the executor still holds;
* the embedded API's sweeper thread finishes a run left ``running`` by a dead process once its lease expired;
* the cap on documents per batch request (413 with a message, nothing written).

Faults are injected around the model (a loader that raises before handing the real engine over), never into it.
"""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from kvcalib.service import repository as repo
from kvcalib.service.db import Database, upgrade
from kvcalib.service.jobs import InProcessDispatcher, execute_run
from kvcalib.service.leases import Heartbeat, LeasePolicy, claim, new_owner
from kvcalib.service.orm import utcnow
from kvcalib.service.sweeper import Sweeper
from tests.support import clean_pg, isolated_settings, pg_url, short_documents, wait_for  # noqa: F401  (fixtures)

TINY = {"ratios": [0.5], "n_probes": 1}  # one ratio, one probe: the cheapest real calibration


@pytest.fixture(scope="module")
def texts(tokenizer):
    return short_documents(tokenizer, 8)


def seed(db: Database, text: str, revision: str = "test-revision", options: dict | None = None) -> int:
    """A queued run of ``text`` (as the API writes it), its id."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.data.documents import content_hash

    config = CalibrationConfig.from_dict(dict(options or TINY))
    with db.session() as s:
        model = repo.get_or_create_model(s, name="smollm2-135m", revision=revision)
        doc = repo.get_or_create_document(s, text=text, content_hash=content_hash(text))
        run, _ = repo.get_or_create_run(s, document=doc, model=model, params=config.to_dict(),
                                        params_hash=config.params_hash(), method=config.method,
                                        allocator=config.allocator, tolerance=config.tolerance)
        return run.id


def row(db: Database, run_id: int):
    with db.session() as s:
        return repo.get_run(s, run_id=run_id)


class FlakyLoader:
    """Hands over the real engine, after raising a transient error on the first ``failures`` calls."""

    def __init__(self, engine, failures: int = 0):
        self.engine, self.failures, self.calls = engine, failures, 0

    def __call__(self, name: str):
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"transient failure {self.calls}")
        return self.engine


class Recorder:
    """An executor that records what it is sent (``outstanding``: the task ids it claims to hold)."""

    kind = "recorder"

    def __init__(self, held: set[str] | None = None):
        self.sent: list[int] = []
        self.held = held
        self.lock = threading.Lock()

    def check(self) -> None:
        pass

    def submit(self, run_id: int) -> str:
        with self.lock:
            self.sent.append(run_id)
            return f"rec-{run_id}-{len(self.sent)}"

    def outstanding(self) -> set[str] | None:
        return self.held

    def close(self, wait: bool = False) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- item 4
@pytest.mark.slow
@pytest.mark.parametrize("max_retries,failures,status,attempts", [
    (0, 1, "failed", 1), (1, 1, "succeeded", 2), (2, 2, "succeeded", 3), (2, 3, "failed", 3)])
def test_attempts_are_counted_once_embedded(tmp_path, engine, texts, caplog, max_retries, failures, status,
                                            attempts):
    """``JOB_MAX_RETRIES=r`` makes at most r + 1 attempts, numbered 1, 2, …: the first attempt is attempt 1."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(db.url)
    run_id = seed(db, texts[0], engine.lm.spec.revision)
    loader = FlakyLoader(engine, failures)
    ex = InProcessDispatcher(db, loader, max_attempts=max_retries + 1, backoff=0.0)
    caplog.set_level("WARNING", logger="kvcalib.jobs")
    try:
        ex.submit(run_id)
        wait_for(lambda: ex.pending() == 0, 120, 0.1, "the run to finish")
    finally:
        ex.close()
    run = row(db, run_id)
    assert (run.status, run.attempts) == (status, attempts)
    assert loader.calls == attempts
    assert run.lease_owner is None and run.lease_expires_at is None  # every attempt released its lease
    logged = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert logged == [f"run {run_id} attempt {i}/{max_retries + 1} failed: RuntimeError: transient failure {i}"
                      for i in range(1, min(failures, max_retries + 1) + 1)]
    if status == "failed":
        assert f"transient failure {attempts}" in run.error
    db.dispose()


@pytest.mark.slow
@pytest.mark.parametrize("max_retries,failures,status,attempts", [(1, 1, "succeeded", 2), (1, 2, "failed", 2)])
def test_attempts_are_counted_once_by_the_celery_task(tmp_path, engine, texts, monkeypatch, max_retries, failures,
                                                      status, attempts):
    """The Celery task path (``calibrate_run`` with its ``self.retry``), applied eagerly: same counts."""
    from kvcalib.settings import Settings
    from kvcalib.worker import tasks

    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    upgrade(db.url)
    run_id = seed(db, texts[1], engine.lm.spec.revision)
    s = Settings(_env_file=None, database_url=db.url, broker_url="redis://127.0.0.1:6390/0",
                 job_max_retries=max_retries, job_retry_backoff=0.0)
    loader = FlakyLoader(engine, failures)
    monkeypatch.setattr(tasks.app.conf, "kvcalib_settings", s)
    monkeypatch.setattr(tasks, "_db", db)
    monkeypatch.setattr(tasks, "load_engine", loader)
    result = tasks.calibrate_run.apply(args=[run_id])
    assert result.get()["status"] == status
    run = row(db, run_id)
    assert (run.status, run.attempts, loader.calls) == (status, attempts, attempts)
    db.dispose()


# ---------------------------------------------------------------------------------------------------- item 6
def test_live_lease_blocks_a_second_execution(db, engine, texts):
    run_id = seed(db, texts[2], engine.lm.spec.revision)
    holder = new_owner()
    with db.session() as s:
        assert claim(s, run_id=run_id, owner=holder, lease_seconds=30, attempt=1, task_id="first-delivery")
    loader = FlakyLoader(engine)
    out = execute_run(db, run_id, loader, max_attempts=3, task_id="second-delivery")
    assert out.status == "busy" and loader.calls == 0  # the model was not even asked for
    run = row(db, run_id)
    assert (run.status, run.attempts, run.lease_owner, run.task_id) == ("running", 1, holder, "first-delivery")


def test_one_of_concurrent_claims_wins(db, texts):
    run_id = seed(db, texts[3])
    barrier = threading.Barrier(6)
    wins, errors = [], []

    def contend(i: int) -> None:
        try:
            with db.session() as s:
                barrier.wait(5)
                if claim(s, run_id=run_id, owner=f"owner-{i}", lease_seconds=30, attempt=1, task_id=None):
                    wins.append(i)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(wins) == 1
    run = row(db, run_id)
    assert run.lease_owner == f"owner-{wins[0]}" and run.attempts == 1


def test_heartbeat_renews_the_lease_and_notices_a_takeover(db, texts):
    run_id = seed(db, texts[4])
    policy = LeasePolicy(lease_seconds=0.6, sweep_interval=1.0)
    me = new_owner()
    with db.session() as s:
        assert claim(s, run_id=run_id, owner=me, lease_seconds=policy.lease_seconds, attempt=1, task_id=None)
    with Heartbeat(db, run_id, me, policy) as hb:
        time.sleep(1.5)  # 2.5 lease lengths: alive only because it is renewed
        assert not hb.lost.is_set()
        with db.session() as s:  # nobody else can claim it
            assert not claim(s, run_id=run_id, owner="intruder", lease_seconds=5, attempt=2, task_id=None)
            repo.set_run(s, run_id=run_id, lease_expires_at=utcnow() - dt.timedelta(seconds=1))  # expire it…
            assert claim(s, run_id=run_id, owner="intruder", lease_seconds=5, attempt=2, task_id=None)  # …taken
        wait_for(hb.lost.is_set, 5, 0.05, "the heartbeat to notice the takeover")
    assert row(db, run_id).lease_owner == "intruder"


# ---------------------------------------------------------------------------------------------------- item 5
def test_sweeper_sends_expired_and_lost_runs_once(db, texts):
    policy = LeasePolicy(lease_seconds=30, dispatch_grace=5, sweep_interval=1, fallback_grace=600)
    dead, lost, fresh, held = (seed(db, t) for t in texts[:4])
    past = utcnow() - dt.timedelta(seconds=60)
    with db.session() as s:
        assert claim(s, run_id=dead, owner="dead-host:1:x", lease_seconds=30, attempt=1, task_id="t-dead")
        repo.set_run(s, run_id=dead, lease_expires_at=past)  # its worker stopped renewing a minute ago
        repo.set_run(s, run_id=lost, task_id="t-lost", dispatched_at=past, updated_at=past)
        repo.set_run(s, run_id=held, task_id="t-held", dispatched_at=past, updated_at=past)
        repo.set_run(s, run_id=fresh, task_id="t-fresh", dispatched_at=utcnow())  # within the grace period
    executor = Recorder(held={"t-held"})
    a, b = Sweeper(db, executor, policy), Sweeper(db, executor, policy)
    barrier = threading.Barrier(2)
    reports = []

    def sweep(sw):
        barrier.wait(5)
        reports.append(sw.sweep())

    threads = [threading.Thread(target=sweep, args=(sw,)) for sw in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(executor.sent) == sorted([dead, lost])  # each once, by one of the two sweepers
    assert sorted(r for rep in reports for r in rep.expired) == [dead]
    assert sorted(r for rep in reports for r in rep.lost) == [lost]
    for run_id in (dead, lost):
        run = row(db, run_id)
        assert run.status == "queued" and run.lease_owner is None and run.task_id.startswith(f"rec-{run_id}")
    assert row(db, dead).attempts == 1  # the dead worker's attempt still counts
    assert a.sweep().dispatched == 0  # just sent: nothing to do until the grace period passed again
    # an executor that cannot list its messages: the queued run waits for the fallback grace
    blind = Recorder(held=None)
    with db.session() as s:
        repo.set_run(s, run_id=held, dispatched_at=past, updated_at=past)
    assert Sweeper(db, blind, policy).sweep().dispatched == 0
    with db.session() as s:
        old = utcnow() - dt.timedelta(seconds=700)
        repo.set_run(s, run_id=held, dispatched_at=old, updated_at=old)
    assert Sweeper(db, blind, policy).sweep().lost == [held]


@pytest.mark.slow
def test_embedded_sweeper_finishes_a_dead_process_run(tmp_path, engine, texts):
    """A run left ``running`` by an embedded process that died: the next process finishes it once the lease
    expired, with no client action."""
    from fastapi.testclient import TestClient

    from kvcalib.api.app import create_app

    s = isolated_settings(tmp_path, job_lease_seconds=2.0, job_sweep_interval=0.5, job_dispatch_grace=1.0)
    db = Database(s.db_url)
    upgrade(db.url)
    run_id = seed(db, texts[5], engine.lm.spec.revision)
    with db.session() as ses:  # the dead process had claimed it; its lease runs 2 s more
        assert claim(ses, run_id=run_id, owner="dead-host:1:x", lease_seconds=2.0, attempt=1, task_id="inproc-x")
    t0 = time.monotonic()
    with TestClient(create_app(s, load_engine=lambda name: engine)) as client:
        assert client.get(f"/jobs/{run_id}").json()["status"] == "running"  # the live lease is respected
        job = wait_for(lambda: (j := client.get(f"/jobs/{run_id}").json())["status"] == "succeeded" and j,
                       120, 0.2, "the swept run to finish")
    assert job["attempts"] == 2 and time.monotonic() - t0 > 1.5  # taken over only after the lease expired
    db.dispose()


# ---------------------------------------------------------------------------------------------------- item 7
def test_batch_document_cap(tmp_path, texts):
    import json

    from fastapi.testclient import TestClient

    from kvcalib.api.app import create_app
    from kvcalib.settings import Settings

    assert Settings.model_fields["max_batch_documents"].default == 1000
    executor = Recorder(held=set())
    s = isolated_settings(tmp_path, max_batch_documents=3)
    docs = texts[:4]
    with TestClient(create_app(s, dispatcher=executor, resume=False)) as client:
        r = client.post("/batches", json={"documents": docs})
        assert r.status_code == 413 and "at most 3 documents" in r.json()["detail"], r.text
        r = client.post("/batches/upload", files={"file": ("c.jsonl", "\n".join(map(json.dumps, docs)))})
        assert r.status_code == 413 and "at most 3 documents" in r.json()["detail"], r.text
        assert client.get("/jobs/1").status_code == 404 and executor.sent == []  # nothing written or queued
        r = client.post("/batches", json={"documents": docs[:3]})
        assert r.status_code == 202 and r.json()["total"] == 3 and len(executor.sent) == 3
