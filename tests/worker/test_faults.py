"""Faults against the real production topology (issue 13, items 5 and 6): the API in-process, PostgreSQL, real
``celery worker --pool=solo`` subprocesses running the real model, and a redis-server of this module's own (another
port, no persistence — never the shared one on 6379), which can thus be restarted. Leases are short (3 s) so that
recovery is measured in seconds:

* the broker restarts mid-batch, losing every queued message → every job completes with no client action,
  each computed exactly once (the lost messages are sent again by the sweepers);
* a worker is SIGKILLed mid-job under the default one-hour visibility timeout → the job completes within a few lease
  periods (its lease expires, a sweeper sends it again), while the broker still holds the dead worker's message;
* a job longer than the visibility timeout is redelivered to a second worker while it runs → the live lease makes
  the second delivery return ``busy``: nothing is computed twice.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import subprocess
import time

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.support import FAST_OPTIONS, pg_url, service_env, short_documents, wait_for, worker_pool  # noqa: F401

pytestmark = [pytest.mark.service, pytest.mark.slow]

LEASE, GRACE, SWEEP = 3, 3, 1  # seconds: lease, dispatch grace, sweep interval (settings of the API and workers)
LONG_OPTIONS = {"ratios": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "n_probes": 16}  # ~25 s of one core (quiet)


def free_port() -> int:
    for port in range(6350, 6400):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 6350-6399 for the test's redis-server")


class RedisServer:
    """A private redis-server (no RDB, no AOF): a restart loses every message, like a crashed broker."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import redis

        log = open(self.folder / f"redis-{self.port}.log", "ab")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.folder)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        wait_for(lambda: self._ping(client), 15, 0.1, "redis-server to start")
        client.close()

    @staticmethod
    def _ping(client) -> bool:
        try:
            return bool(client.ping())
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


def fault_settings(db_url: str, broker_url: str, queue: str):
    from kvcalib.settings import Settings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR"}
    try:
        return Settings(_env_file=None, database_url=db_url, broker_url=broker_url, queue=queue,
                        gpu_queue=queue + "-gpu", job_retry_backoff=0.5, broker_timeout=0.5,
                        job_lease_seconds=LEASE, job_dispatch_grace=GRACE, job_sweep_interval=SWEEP)
    finally:
        os.environ.update(saved)


@pytest.fixture(scope="module")
def stack(pg_url, broker, engine):  # noqa: F811
    from kvcalib.api.app import create_app

    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text("TRUNCATE batch_items, batches, profiles, curve_points, calibration_runs, documents, "
                             "models, predictors RESTART IDENTITY CASCADE"))
    queue = f"kvcalib-faults-{secrets.token_hex(3)}"
    s = fault_settings(pg_url, broker.url, queue)
    env = service_env(pg_url, broker.url, queue, KVCALIB_JOB_LEASE_SECONDS=LEASE,
                      KVCALIB_JOB_DISPATCH_GRACE=GRACE, KVCALIB_JOB_SWEEP_INTERVAL=SWEEP)
    with TestClient(create_app(s)) as client:
        yield client, env, eng, s
    eng.dispose()


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 8)


def alive(pool) -> list:
    return [w for w in pool.started if w.proc.poll() is None]


def received(worker, task_id: str) -> bool:
    return f"calibrate_run[{task_id}] received" in worker.output()


def run_row(eng, run_id: int):
    with eng.connect() as conn:
        return conn.execute(sa.text("SELECT id, status, attempts, task_id, progress FROM calibration_runs "
                                    "WHERE id = :i"), {"i": run_id}).one()


def assert_each_profile_once(eng, run_ids: list[int]) -> None:
    ids = ",".join(map(str, run_ids))
    with eng.connect() as conn:
        per_run = dict(conn.execute(sa.text(f"SELECT run_id, count(*) FROM profiles WHERE run_id IN ({ids}) "
                                            "GROUP BY run_id")).all())
    assert per_run == {r: 1 for r in run_ids}


def test_broker_restart_mid_batch_loses_nothing(stack, docs, worker_pool, broker):  # noqa: F811
    client, env, eng, _ = stack
    need = 2 - len(alive(worker_pool))
    if need > 0:
        worker_pool.start(env, *[f"steady{i}" for i in range(need)])  # two, started together; kept for the next test
    batch = docs[:5]
    r = client.post("/batches", json={"documents": batch, "options": FAST_OPTIONS})
    assert r.status_code == 202, r.text
    batch_id, job_ids = r.json()["id"], [i["job_id"] for i in r.json()["items"]]

    def first_done():
        b = client.get(f"/batches/{batch_id}").json()
        return b if b["counts"]["succeeded"] >= 1 else None

    wait_for(first_done, 120, 0.3, "the first document of the batch")
    broker.restart()  # every queued message is gone, and the running jobs' unacked ones
    t0 = time.monotonic()
    queued = {r: row.task_id for r in job_ids if (row := run_row(eng, r)).status == "queued"}
    assert queued, "the batch finished before the broker could be restarted"
    wait_for(lambda: all(run_row(eng, r).task_id != old for r, old in queued.items()), 60, 0.2,
             "the lost messages to be sent again")
    resent_after = time.monotonic() - t0
    assert resent_after <= GRACE + 3 * SWEEP + 5, f"sent again {resent_after:.1f} s after the restart"

    def done():
        b = client.get(f"/batches/{batch_id}").json()
        return b if b["done"] else None

    final = wait_for(done, 150, 0.5, "the batch to finish after the broker restart")
    recovery = time.monotonic() - t0
    assert final["counts"] == {"queued": 0, "running": 0, "succeeded": 5, "failed": 0}, final
    run_ids = [i["job_id"] for i in final["items"]]
    assert_each_profile_once(eng, run_ids)
    rows = [run_row(eng, r) for r in run_ids]
    assert [row.attempts for row in rows] == [1] * 5  # nothing computed twice, nothing retried
    print(f"\nbroker restart: {len(queued)} queued messages lost, sent again {resent_after:.1f} s after the restart; "
          f"batch of 5 done {recovery:.1f} s after it; 0 lost, 0 duplicated")


def test_sigkilled_worker_job_completes_within_a_few_leases(stack, docs, worker_pool):  # noqa: F811
    """Default visibility timeout (3600 s): the broker would redeliver in an hour; the lease does it in seconds."""
    from kvcalib.worker.dispatch import CeleryDispatcher

    client, env, eng, s = stack
    assert s.broker_visibility_timeout == 3600 and "KVCALIB_BROKER_VISIBILITY_TIMEOUT" not in env
    need = 2 - len(alive(worker_pool))
    if need > 0:
        worker_pool.start(env, *[f"spare{i}" for i in range(need)])
    r = client.post("/calibrate", json={"mode": "full", "text": docs[5], "options": FAST_OPTIONS})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]

    def busy_worker():
        row = run_row(eng, run_id)
        if row.status != "running" or row.progress <= 0.0:
            return None
        return next(((w, row.task_id) for w in alive(worker_pool) if received(w, row.task_id)), None)

    doomed, first_task = wait_for(busy_worker, 120, 0.1, "a worker calibrating the job")
    doomed.kill()  # no ack, no restore: its message stays unacknowledged in the broker for an hour
    t_kill = time.monotonic()
    retaken = wait_for(lambda: (row := run_row(eng, run_id)).attempts == 2 and row, 60, 0.1,
                       "another worker to take the job over")
    takeover = time.monotonic() - t_kill
    final = wait_for(lambda: (row := run_row(eng, run_id)).status in ("succeeded", "failed") and row, 120, 0.2,
                     "the job to finish")
    done_after = time.monotonic() - t_kill
    assert final.status == "succeeded" and final.attempts == 2
    assert takeover <= 4 * LEASE, f"taken over {takeover:.1f} s after the kill"
    assert retaken.task_id != first_task  # a new message, sent by a sweeper…
    assert any(received(w, retaken.task_id) for w in alive(worker_pool))
    assert first_task in CeleryDispatcher(s).outstanding()  # …while the broker still holds the dead one's
    assert_each_profile_once(eng, [run_id])
    print(f"\nSIGKILL: taken over {takeover:.1f} s and done {done_after:.1f} s after the kill "
          f"(lease {LEASE} s, visibility timeout 3600 s)")


def test_live_lease_blocks_a_redelivered_long_job(stack, docs, worker_pool):  # noqa: F811
    """A job ~4× longer than the visibility timeout: the broker hands it to the idle worker while the first one
    computes; the second delivery finds the live lease and returns ``busy`` without computing."""
    client, env, eng, _ = stack
    for w in alive(worker_pool):
        w.stop()
    short_vt = dict(env, KVCALIB_BROKER_VISIBILITY_TIMEOUT="2")
    worker_pool.start(short_vt, "first", "second")
    r = client.post("/calibrate", json={"mode": "full", "text": docs[6], "options": LONG_OPTIONS})
    assert r.status_code == 202, r.text
    run_id = r.json()["id"]
    final = wait_for(lambda: (row := run_row(eng, run_id)).status in ("succeeded", "failed") and row, 180, 0.3,
                     "the long job to finish")
    assert final.status == "succeeded" and final.attempts == 1  # claimed once: computed once
    assert_each_profile_once(eng, [run_id])
    workers = alive(worker_pool)[-2:]
    task = final.task_id
    got = [w for w in workers if received(w, task)]
    assert len(got) == 2, "the broker redelivered the running job to the second worker"
    busy = [w for w in got if re.search(rf"calibrate_run\[{task}\] succeeded in [0-9.]+s: .*'status': 'busy'",
                                        w.output())]
    assert len(busy) >= 1, "the second delivery returned busy"
    print(f"\nlong job (visibility timeout 2 s): delivered {sum(w.output().count(f'[{task}] received') for w in got)}"
          f" times, computed once")
