"""Fixtures and helpers of the service tests (imported by tests/test_service_*.py).

Real components only: a fresh PostgreSQL database per test session (``kvcalib_test_<random>``, created through the
``test`` database, dropped at the end), a dedicated Redis DB number (flushed before and after) with a queue name
unique to the session, and real ``celery worker`` subprocesses.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_ADMIN = os.environ.get("KVCALIB_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_BASE = os.environ.get("KVCALIB_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("KVCALIB_TEST_REDIS_DB", "13"))
DOWN_REDIS = "redis://127.0.0.1:6390/0"  # nothing listens there: a broker that is down

# Small calibration settings: seconds per document on 2 CPU cores.
FAST_OPTIONS = {"ratios": [0.3, 0.6, 0.9], "n_probes": 2}


def short_documents(tokenizer, n: int, min_tokens: int = 150, max_tokens: int = 250) -> list[str]:
    """``n`` distinct short documents (150–250 tokens) cut from the essay corpus."""
    from kvcalib.calib.data.documents import chunk_by_tokens, load_essays

    docs: list[str] = []
    for text in load_essays().values():
        docs += chunk_by_tokens(tokenizer, text, min_tokens, max_tokens)
        if len(docs) >= n:
            break
    docs = list(dict.fromkeys(docs))
    i = 0
    while len(docs) < n:  # bundled corpus too small: vary existing pieces
        docs.append(f"Note {i}.\n" + docs[i % len(docs)])
        i += 1
    return docs[:n]


# ---------------------------------------------------------------------------------------------------- PostgreSQL
def _pg_admin():
    import psycopg

    return psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3)


@contextmanager
def scratch_pg_database(prefix: str = "kvcalib_test"):
    """URL (psycopg driver) of a new, empty PostgreSQL database, dropped on exit."""
    try:
        admin = _pg_admin()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL is not reachable (start it: .ci/services.sh) at {PG_ADMIN}: {exc}")
    name = f"{prefix}_{secrets.token_hex(4)}"
    admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
    try:
        yield f"{base}/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture(scope="session")
def pg_url():
    """URL of a fresh PostgreSQL database migrated to head; dropped at the end of the session."""
    from kvcalib.service.db import upgrade

    with scratch_pg_database() as url:
        upgrade(url)
        yield url


@pytest.fixture()
def clean_pg(pg_url):
    """The session database, emptied of rows (schema kept) before the test."""
    import sqlalchemy as sa

    eng = sa.create_engine(pg_url)
    with eng.begin() as conn:
        conn.execute(sa.text("TRUNCATE batch_items, batches, profiles, curve_points, calibration_runs, documents, "
                             "models, predictors, predictions RESTART IDENTITY CASCADE"))
    eng.dispose()
    return pg_url


# ---------------------------------------------------------------------------------------------------- Redis
@contextmanager
def redis_db(db: int):
    """URL of Redis DB number ``db`` (``KVCALIB_TEST_REDIS``), flushed before and after; fails the test when Redis
    is down."""
    import redis

    url = f"{REDIS_BASE}/{db}"
    client = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"Redis is not reachable (start it: .ci/services.sh) at {url}: {exc}")
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def redis_url():
    with redis_db(REDIS_DB) as url:
        yield url


@pytest.fixture(scope="session")
def queue_name():
    return f"kvcalib-test-{secrets.token_hex(3)}"


def service_env(db_url: str, broker_url: str | None, queue: str, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVCALIB_")}
    for k in ("KVCALIB_CACHE_DIR", "KVCALIB_ESSAYS"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update({"KVCALIB_DATABASE_URL": db_url, "KVCALIB_QUEUE": queue, "KVCALIB_GPU_QUEUE": queue + "-gpu",
                "KVCALIB_JOB_RETRY_BACKOFF": "0.5", "KVCALIB_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    if broker_url:
        env["KVCALIB_BROKER_URL"] = broker_url
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ---------------------------------------------------------------------------------------------------- workers
class WorkerProcess:
    """A real ``celery -A kvcalib.worker.app worker --pool=solo -c 1`` subprocess."""

    def __init__(self, env: dict[str, str], log: Path, name: str):
        self.log = log
        self.fh = open(log, "wb")
        cmd = [sys.executable, "-m", "celery", "-A", "kvcalib.worker.app", "worker", "--pool=solo", "-c", "1",
               "-Q", env["KVCALIB_QUEUE"], "--without-gossip", "--without-mingle", "--without-heartbeat",
               "-n", f"{name}@%h", "--loglevel=INFO"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
            if " ready." in self.output():
                return
            time.sleep(0.2)
        raise TimeoutError(f"celery worker not ready after {timeout}s:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: no warm shutdown, no ack, no message restore — a crashed machine."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.fh.close()


class WorkerPool:
    """Starts workers (in parallel when asked for several) and stops every one of them at the end."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[WorkerProcess] = []

    def start(self, env: dict[str, str], *names: str) -> list[WorkerProcess]:
        new = [WorkerProcess(env, self.folder / f"{n}-{len(self.started) + i}.log", n) for i, n in enumerate(names)]
        self.started += new
        for w in new:
            w.wait_ready()
        return new

    def stop_all(self) -> None:
        for w in self.started:
            w.stop()


@pytest.fixture(scope="module")
def worker_pool(tmp_path_factory):
    pool = WorkerPool(tmp_path_factory.mktemp("workers"))
    yield pool
    pool.stop_all()


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def finished_full_calibration(client, text: str, timeout: float = 300, **body) -> dict:
    """``POST /calibrate`` ``mode=full`` of ``text`` (further body fields in ``body``, e.g. ``options``) through a
    test client, waited for; asserts it succeeded and returns the job."""
    r = client.post("/calibrate", json={"mode": "full", "text": text, **body})
    assert r.status_code in (200, 202), r.text

    def done():
        j = client.get(f"/jobs/{r.json()['id']}").json()
        return j if j["status"] in ("succeeded", "failed") else None

    job = wait_for(done, timeout, 0.3, "calibration job")
    assert job["status"] == "succeeded", job
    return job


def equal_length_documents(engine, n: int, tokens: int) -> list[str]:
    """``n`` distinct documents cut from the essays whose cached context (chat header + document, as calibrated and
    compressed) is exactly ``tokens`` tokens long: concurrent calls on them cannot differ by shape, only by data."""
    from kvcalib.calib.calibration.calibrate import context_ids
    from kvcalib.calib.data.documents import load_essays

    tok = engine.tokenizer
    head = int(engine.prompt("", "").context_ids.numel())
    docs: list[str] = []
    for essay in load_essays().values():
        ids = tok(essay, add_special_tokens=False).input_ids
        for start in range(0, len(ids) - tokens, 500):
            for m in range(tokens - head - 6, tokens - head + 6):
                doc = tok.decode(ids[start:start + m])
                if doc.strip() and context_ids(engine, doc)[0].numel() == tokens:
                    docs.append(doc)
                    break
            if len(docs) == n:
                return docs
    raise AssertionError(f"the essays gave only {len(docs)} documents of {tokens} context tokens")


# ---------------------------------------------------------------------------------------------------- API apps
@contextmanager
def shipped_predictors(folder):
    """The package's shipped predictors replaced by the model folders under ``folder`` (an empty folder: nothing
    ships) for the duration: tests of the fallback and of the shipped default do not depend on the package data."""
    from kvcalib.calib.predictors import bundled

    mp = pytest.MonkeyPatch()
    mp.setattr(bundled, "SHIPPED", Path(folder))
    bundled.clear_cache()
    try:
        yield Path(folder)
    finally:
        mp.undo()
        bundled.clear_cache()


def isolated_settings(data_dir, **overrides):
    """``Settings`` from the arguments alone: the environment's ``KVCALIB_*`` variables (all but the model cache
    dir) are hidden while they are built, and no ``.env`` file is read."""
    from kvcalib.settings import Settings

    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR"}
    try:
        return Settings(_env_file=None, data_dir=data_dir, **overrides)
    finally:
        os.environ.update(saved)


class RecordingDispatcher:
    """A job dispatcher that records the submitted run ids and executes nothing."""

    kind = "in-process"

    def __init__(self):
        self.submitted: list[int] = []

    def check(self):
        pass

    def submit(self, run_id):
        self.submitted.append(run_id)
        return f"recorded-{run_id}"

    def close(self, wait=False):
        pass


# ---------------------------------------------------------------------------------------------------- threads
def run_threads(fn, args: list[tuple]) -> list:
    """``fn(*a)`` for every ``a`` on its own plain thread, all released together; results in order, errors raised."""
    import threading

    barrier = threading.Barrier(len(args))
    results: list = [None] * len(args)
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = fn(*args[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    return results


# ---------------------------------------------------------------------------------------------------- scorers
def assert_feeds_allocator(capture, scorer: str, allocator: str) -> None:
    """The scorer's scores on ``capture`` are well formed and the allocator keeps exactly the budget from them,
    protected (+inf) entries included."""
    import torch

    from kvcalib.calib.budget import Budget, allocate, available_allocators
    from kvcalib.calib.scorers import get_scorer

    assert allocator in available_allocators()
    s = get_scorer(scorer).score(capture)
    n_layers, hkv, n, _ = capture.keys.shape
    assert s.shape == (n_layers, hkv, n) and not torch.isnan(s).any()
    b = Budget(ratio=0.5)
    keep = allocate(s, b, allocator)
    assert int(keep.sum()) == n_layers * hkv * b.per_head(n)
    assert bool(keep[torch.isposinf(s)].all())  # protected entries kept
