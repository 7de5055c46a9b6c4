"""Optuna sweeps (kvcalib/sweep/, worker/sweep_tasks.py, `kvcalib sweep|dashboard`, promoted API defaults).

Plumbing tests use a fake evaluator (no model); the end-to-end tests run the real SmolLM2-135M calibration on three
~150–200-token documents with a 2-ratio grid, through a real `celery worker` subprocess (Redis + a fresh PostgreSQL
database), and serve the study with `kvcalib dashboard` over HTTP.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from kvcalib import sweep as sw
from kvcalib.calib import defaults as engine_defaults
from kvcalib.calib.scorers import SCORERS
from kvcalib.sweep import storage as sw_storage
from kvcalib.sweep import trial as sw_trial
from kvcalib.worker.sweep_tasks import run_with_broker
from tests.support import WorkerProcess, pg_url, redis_db, service_env, short_documents, wait_for  # noqa: F401

SWEEP_REDIS_DB = int(os.environ.get("KVCALIB_TEST_SWEEP_REDIS_DB", "12"))  # not the service tests' DB 13
# no hyperparameters worth sweeping: the parameter-free methods (keynorm, keydiff, tova, …); random's seed is not one
UNTUNABLE = {"random"} | {m for m, cls in SCORERS.items() if not cls.param_names()}


def fake_evaluate(engine, spec, mp, ap):
    """r* grows with the method's window/blend, the loss with r*: a trade-off without a model."""
    x = mp.get("window", 32) / 64 if "window" in mp else mp.get("blend", 0.3)
    rng = random.Random(json.dumps(mp, sort_keys=True))
    r = [min(0.95, 0.2 + 0.6 * x + 0.05 * rng.random()) for _ in spec.documents]
    return sw.TrialMetrics(r_star=r, holdout_fidelity=[spec.tolerance - 0.1 * v * v for v in r],
                           tolerance=spec.tolerance)


@pytest.fixture()
def sqlite_url(tmp_path):
    return f"sqlite:///{tmp_path / 'sweep.db'}"


@pytest.fixture()
def fresh_settings():
    """``get_settings()`` re-read from the environment during the test (and again after it)."""
    from kvcalib.settings import get_settings

    get_settings.cache_clear()
    yield get_settings
    get_settings.cache_clear()


def tiny_spec(**kw):
    """A reconstruction-objective spec (the fake evaluator's metrics; the truth objective: test_sweep_truth.py)."""
    base = dict(method="snapkv", allocator="uniform", documents=["one doc", "another doc"], population_size=4,
                objective="reconstruction")
    base.update(kw)
    return sw.SweepSpec(**base)


# ---------------------------------------------------------------------------------------------------- search spaces
def test_search_space_table_covers_methods_with_hyperparameters():
    for method, cls in SCORERS.items():
        if method in UNTUNABLE:
            with pytest.raises(sw.SweepError, match="no search space"):
                sw.search_space(method)
            continue
        space = sw.search_space(method, "uniform")
        assert space and set(space) <= set(cls.param_names()), method
        defaults = sw.default_params(method, "uniform")
        assert set(defaults) <= set(space)
        for name, value in defaults.items():
            assert space[name].contains(value)
    assert set(sw.search_space("compactor", "adakv")) == {"blend", "sketch_dim", "chunk", "alloc_alpha"}
    assert sw.search_space("compactor") == sw.search_space("compactor", engine_defaults.ALLOCATOR)  # the API's
    assert sw.split_params({"window": 8, "alloc_alpha": 0.1}) == ({"window": 8}, {"alpha": 0.1})
    with pytest.raises(sw.SweepError, match="unknown allocator"):
        sw.search_space("snapkv", "nope")
    with pytest.raises(sw.SweepError, match="unknown method"):
        sw.search_space("nope")


def test_spec_validation_and_round_trip():
    spec = tiny_spec(ratios=(0.6, 0.3, 0.3))
    assert spec.ratios == (0.3, 0.6)
    assert sw.SweepSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    d = sw.SweepSpec(documents=["d"])  # a sweep tunes what the API serves (calib.defaults)
    assert (d.model, d.method, d.allocator, d.tolerance, d.ratios) == (
        engine_defaults.MODEL, engine_defaults.METHOD, engine_defaults.ALLOCATOR, engine_defaults.TOLERANCE,
        engine_defaults.RATIOS)
    with pytest.raises(sw.SweepError, match="no documents"):
        tiny_spec(documents=[])
    with pytest.raises(sw.SweepError, match="ratios"):
        tiny_spec(ratios=(0.0, 0.5))
    with pytest.raises(sw.SweepError, match="no search space"):
        tiny_spec(method="keynorm")
    assert sw.study_name("m", "snapkv", "adakv") == "kvcalib:m:snapkv:adakv"
    assert sw.study_name("m", "snapkv", "adakv", "x") == "kvcalib:m:snapkv:adakv:x"


def test_load_corpus_formats(tmp_path, tokenizer):
    from kvcalib.calib.errors import KvcalibError

    jl = tmp_path / "c.jsonl"
    jl.write_text('{"id": "a", "text": "first"}\n\n{"text": "second"}\n')
    assert sw.load_corpus(jl) == ["first", "second"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    with pytest.raises(KvcalibError, match="text"):
        sw.load_corpus(bad)
    docs = sw.load_corpus(None, tokenizer=tokenizer, min_tokens=100, max_tokens=200, max_docs=5)
    assert len(docs) == 5 and len(set(docs)) == 5
    assert all(100 <= len(tokenizer(d, add_special_tokens=False).input_ids) <= 200 for d in docs)
    one = tmp_path / "one.txt"
    one.write_text("a single text file\n")
    assert sw.load_corpus(one) == ["a single text file\n"]
    with pytest.raises(KvcalibError, match="does not exist"):
        sw.load_corpus(tmp_path / "missing.jsonl")
    with pytest.raises(sw.SweepError, match="no document"):
        sw.load_corpus(jl, tokenizer=tokenizer, min_tokens=100, max_tokens=200)


# ---------------------------------------------------------------------------------------------------- studies
def test_inprocess_sweep_resume_pareto_and_promotion(sqlite_url, tmp_path):
    storage = sw.make_storage(sqlite_url)
    name = sw.study_name("smollm2-135m", "snapkv", "adakv", "unit")
    spec = tiny_spec(allocator="adakv")
    study, _, created = sw.open_study(spec, name, storage)
    assert created
    assert sw.run_inprocess(name, 5, storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate) == (5, 0)
    study = sw.load_study(name, storage)
    first_id = study._study_id
    baseline = study.trials[0]
    assert baseline.user_attrs["baseline"] and baseline.params == sw.default_params("snapkv", "adakv")
    assert study.metric_names == list(sw.OBJECTIVE_NAMES)
    assert study.user_attrs["n_documents"] == 2

    # resume: same study, more trials; a conflicting setup is refused
    given = {"method": "snapkv", "ratios": list(reversed(spec.ratios)), "tolerance": None}
    again, stored, created = sw.open_study(None, name, storage, given=given)
    assert not created and again._study_id == first_id and stored == spec
    with pytest.raises(sw.SweepError, match="different setup.*tolerance"):
        sw.open_study(None, name, storage, given={"tolerance": 0.9})
    with pytest.raises(sw.SweepError, match="corpus"):
        sw.open_study(None, name, storage, given={"documents": ["other"]})
    sw.run_inprocess(name, 2, storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)
    assert len(sw.load_study(name, storage).trials) == 7

    rows = sw.trial_rows(sw.load_study(name, storage))
    assert rows and all(r["pareto"] for r in rows)
    assert [r["r_star_mean"] for r in rows] == sorted((r["r_star_mean"] for r in rows), reverse=True)

    data = tmp_path / "data"
    entry = sw.promote(name, storage=storage, data_dir=data, max_loss=1.0)  # every trial qualifies: largest r*
    assert entry["trial"] == rows[0]["trial"] and entry["study"] == name
    assert entry["allocator_params"].keys() == {"alpha"}
    assert sw.promoted_params("snapkv", "smollm2-135m", data_dir=data) == {
        k: v for k, v in rows[0]["params"].items() if not k.startswith("alloc_")}
    assert sw.promoted_params("compactor", "smollm2-135m", data_dir=data) == {}
    strict = sw.promote(name, storage=storage, data_dir=data, max_loss=0.0)  # none qualifies: smallest loss
    assert strict["values"]["fidelity_loss"] == min(r["fidelity_loss"] for r in rows)
    chosen = sw.promote(name, trial=0, storage=storage, data_dir=data)
    assert chosen["trial"] == 0 and sw.load_study(name, storage).user_attrs["promoted"]["trial"] == 0
    with pytest.raises(sw.SweepError, match="no trial 99"):
        sw.promote(name, trial=99, storage=storage, data_dir=data)


def test_failed_evaluation_fails_the_trial_and_token_is_idempotent(sqlite_url):
    storage = sw.make_storage(sqlite_url)
    name = sw.study_name("smollm2-135m", "snapkv", "uniform", "fail")
    sw.open_study(tiny_spec(), name, storage)

    def boom(*_):
        raise RuntimeError("no luck")

    out = sw.run_trial(name, "tok-1", storage=storage, load_engine=lambda m: None, evaluate=boom)
    assert out["status"] == "failed" and "no luck" in out["error"]
    again = sw.run_trial(name, "tok-1", storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)
    assert again["duplicate"] and again["trial"] == out["trial"]  # redelivered message: no second trial
    t = sw.load_study(name, storage).trials[out["trial"]]
    assert t.state.name == "FAIL" and "no luck" in t.user_attrs["error"]


def test_heartbeat_settings_come_from_the_service_settings(fresh_settings, monkeypatch):
    from kvcalib.settings import Settings

    assert sw.heartbeat_settings(Settings(_env_file=None)) == (10, 60)
    assert sw.heartbeat_settings(Settings(sweep_heartbeat=30, _env_file=None)) == (30, 90)
    with pytest.raises(sw.SweepError, match="KVCALIB_SWEEP_GRACE"):
        sw.heartbeat_settings(Settings(sweep_heartbeat=30, sweep_grace=20, _env_file=None))
    monkeypatch.setenv("KVCALIB_SWEEP_HEARTBEAT", "3")
    monkeypatch.setenv("KVCALIB_SWEEP_GRACE", "7")
    monkeypatch.setenv("KVCALIB_SWEEP_CAPTURE_CACHE_MB", "2")
    fresh_settings.cache_clear()
    assert sw.heartbeat_settings() == (3, 7)  # the same environment variables as before, through Settings
    assert sw.CAPTURES.max_bytes == 2 * 2**20


def test_stale_trial_of_a_dead_worker_is_retried_with_the_same_parameters(sqlite_url, monkeypatch, fresh_settings):
    monkeypatch.setenv("KVCALIB_SWEEP_HEARTBEAT", "1")
    monkeypatch.setenv("KVCALIB_SWEEP_GRACE", "2")
    fresh_settings.cache_clear()
    storage = sw.make_storage(sqlite_url)
    assert storage.get_heartbeat_interval() == 1
    name = sw.study_name("smollm2-135m", "snapkv", "uniform", "stale")
    spec = tiny_spec()
    sw.open_study(spec, name, storage)
    sw.run_inprocess(name, 1, storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)

    # a worker asks a trial, sends one heartbeat and dies
    study = sw.load_study(name, storage, token="dead")
    with pytest.warns(UserWarning):
        dead = study.ask()
    storage.set_trial_system_attr(dead._trial_id, sw.TOKEN_ATTR, "dead")
    params = {n: d.suggest(dead, n) for n, d in sw.search_space("snapkv", "uniform").items()}
    storage.record_heartbeat(dead._trial_id)
    time.sleep(3.2)

    out = sw.run_trial(name, "next", storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)
    trials = sw.load_study(name, storage).trials
    assert trials[dead.number].state.name == "FAIL"
    retry = trials[out["trial"]]
    assert retry.state.name == "COMPLETE" and retry.params == params
    assert retry.system_attrs["failed_trial"] == dead.number


def test_optuna_tables_stay_out_of_alembic(sqlite_url):
    """Optuna's tables share the service database; the project's migrations neither see nor touch them."""
    import sqlalchemy as sa
    from alembic import command

    from kvcalib.service.db import Database, alembic_config, check_schema, upgrade

    upgrade(sqlite_url)
    storage = sw.make_storage(sqlite_url)
    sw.open_study(tiny_spec(), "kvcalib:alembic-check", storage)
    names = set(sa.inspect(sa.create_engine(sqlite_url)).get_table_names())
    assert {"studies", "trials", "alembic_version", "kvcalib_alembic_version", "calibration_runs"} <= names
    db = Database(sqlite_url)
    try:
        check_schema(db)  # still at head
    finally:
        db.dispose()
    command.check(alembic_config(sqlite_url))  # autogenerate finds no difference (Optuna's tables are ignored)


def test_cli_in_process_run_show_list_promote_and_errors(sqlite_url, tmp_path, monkeypatch, fresh_settings):
    from kvcalib.cli import app
    from kvcalib.settings import get_settings

    for k in [k for k in os.environ if k.startswith("KVCALIB_")]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVCALIB_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("KVCALIB_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    monkeypatch.setattr(sw_trial, "evaluate_params", fake_evaluate)  # the module that runs the trial
    monkeypatch.setattr(sw_trial, "_default_engine", lambda model: None)
    corpus = tmp_path / "essays"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(f"Line {i} of a short essay about sweeping." for i in range(60)))
    runner = CliRunner()
    base = ["sweep", "run", "-m", "compactor", "--corpus", str(corpus), "--doc-tokens", "40:120", "--suffix", "cli",
            "--in-process", "--objective", "reconstruction"]
    res = runner.invoke(app, base + ["--trials", "3"])
    assert res.exit_code == 0, res.output
    assert "3 trial(s) completed" in res.output and "Pareto front of kvcalib:smollm2-135m:compactor:adakv:cli" in \
        res.output  # the service's default allocator
    res = runner.invoke(app, ["sweep", "run", "-m", "compactor", "--suffix", "cli", "--trials", "1", "--in-process",
                              "--tolerance", "0.9", "--objective", "reconstruction"])
    said = " ".join(res.output.split())  # the console wraps long messages
    assert res.exit_code == 2 and "different setup" in said and "tolerance" in said
    res = runner.invoke(app, ["sweep", "run", "-m", "compactor", "--suffix", "cli", "--trials", "1", "--in-process",
                              "--json", "--objective", "reconstruction"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert not out["created"] and out["n_trials_total"] == 4 and out["mode"] == "in-process"

    res = runner.invoke(app, ["sweep", "list", "--json"])
    assert [s["study"] for s in json.loads(res.stdout)] == ["kvcalib:smollm2-135m:compactor:adakv:cli"]
    res = runner.invoke(app, ["sweep", "show", "-m", "compactor", "--suffix", "cli", "--all", "--objective",
                              "reconstruction"])
    assert res.exit_code == 0 and "(defaults)" in res.output and "blend=" in res.output
    res = runner.invoke(app, ["sweep", "promote", "kvcalib:smollm2-135m:compactor:adakv:cli", "--trial", "0"])
    assert res.exit_code == 0 and "promoted trial 0" in res.output
    mp, ap = sw.split_params(sw.default_params("compactor", "adakv"))
    assert sw.promoted_params("compactor") == mp and sw.promoted_allocator_params("compactor", "adakv") == ap
    assert sw.promoted_allocator_params("compactor", "lava") == {}  # swept for another allocator

    res = runner.invoke(app, ["sweep", "run", "-m", "keynorm", "--trials", "1", "--in-process"])
    assert res.exit_code == 2 and "no search space" in res.output
    res = runner.invoke(app, ["sweep", "show", "kvcalib:nope"])
    assert res.exit_code == 2 and "no study named" in res.output
    res = runner.invoke(app, ["sweep", "run", "--trials", "1", "--broker"])
    assert res.exit_code == 2 and "KVCALIB_BROKER_URL" in res.output


# ---------------------------------------------------------------------------------------------------- real model
TINY = dict(ratios=(0.3, 0.6), n_probes=2, holdout_probes=1, probe_tokens=8, cue_tokens=6)


@pytest.fixture(scope="module")
def tiny_docs(tokenizer):
    return short_documents(tokenizer, 3, 150, 200)


@pytest.mark.slow
def test_evaluate_params_real_calibration_and_capture_cache(engine, tiny_docs, request):
    import torch

    spec = tiny_spec(documents=tiny_docs[:1], allocator="adakv", **TINY)
    sw.CAPTURES.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep workers run (a shared CPU): much faster than an oversubscribed pool
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    from kvcalib.calib.budget import ALLOCATORS

    before = set(ALLOCATORS)
    cfg = sw.calibration_config(spec, {"window": 16}, {"alpha": 0.2})
    assert cfg.allocator == "adakv" and cfg.allocator_params == {"alpha": 0.2}  # passed as calibration parameters
    m1 = sw.evaluate_params(engine, spec, {"window": 16}, {"alpha": 0.2})
    assert set(ALLOCATORS) == before  # no allocator is registered on the side
    misses = sw.CAPTURES.misses
    m2 = sw.evaluate_params(engine, spec, {"window": 16}, {"alpha": 0.2})
    assert sw.CAPTURES.misses == misses and sw.CAPTURES.hits >= 1  # second trial: no prefill
    assert m1.values() == m2.values()  # a cached capture is not altered by scoring/calibrating
    assert 0.0 <= m1.r_star_mean <= 0.6 and 0.0 <= m1.fidelity_loss <= spec.tolerance
    assert len(m1.holdout_fidelity) == 1 and 0.0 <= m1.violation_rate <= 1.0


@pytest.mark.slow
def test_promoted_trial_is_what_the_api_calibrates_with(sqlite_url, tmp_path, engine, tiny_docs, monkeypatch,
                                                          fresh_settings):
    """A promoted (model, method) entry supplies the API's method_params and allocator_params when a request gives
    none; the profile's budgets are those of the promoted parameters (naive reference: score, then AdaKV)."""
    from fastapi.testclient import TestClient

    from kvcalib.api.app import create_app
    from kvcalib.calib.budget import Budget, adakv
    from kvcalib.calib.calibration.calibrate import context_ids
    from kvcalib.settings import Settings

    storage = sw.make_storage(sqlite_url)
    name = sw.study_name("smollm2-135m", "compactor", "adakv", "api")
    sw.open_study(tiny_spec(method="compactor", allocator="adakv"), name, storage)
    sw.run_inprocess(name, 3, storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)
    data = tmp_path / "data"
    entry = sw.promote(name, trial=2, storage=storage, data_dir=data)  # not the baseline (trial 0: the defaults)
    mp, ap = entry["method_params"], entry["allocator_params"]
    assert (mp, ap) != sw.split_params(sw.default_params("compactor", "adakv")) and set(ap) == {"alpha"}

    for k in [k for k in os.environ if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR"]:
        monkeypatch.delenv(k)
    app = create_app(Settings(data_dir=data, _env_file=None), load_engine=lambda _: engine)
    text = tiny_docs[0]
    options = {"ratios": [0.3, 0.6], "n_probes": 2}
    with TestClient(app) as client:
        def run(extra: dict) -> dict:
            r = client.post("/calibrate", json={"mode": "full", "text": text, "tolerance": 0.5,
                                                "options": {**options, **extra}})
            assert r.status_code in (200, 202), r.text
            job_id = r.json()["id"]

            def finished():
                j = client.get(f"/jobs/{job_id}").json()
                return j if j["status"] in ("succeeded", "failed") else None

            return wait_for(finished, 180, 0.3, f"job {job_id}")

        job = run({})
        assert job["status"] == "succeeded", job
        assert job["method"] == "compactor" and job["allocator"] == "adakv"  # the service defaults
        assert job["params"]["method_params"] == mp and job["params"]["allocator_params"] == ap
        prof = client.get(f"/profiles/{job['result']['profile_id']}").json()
        own = run({"method_params": {}})  # a request's own parameters win over the promoted ones
        assert own["params"]["method_params"] == {} and own["params_hash"] != job["params_hash"]

    ids, _ = context_ids(engine, text)
    cap = engine.capture(ids)
    scores = engine.scorer("compactor", **mp).score(cap, engine.score_context(Budget(ratio=0.6)))  # (L, Hkv, N)
    r = prof["r_star"]
    assert 0.0 < r < 1.0
    keep = adakv(scores, Budget(ratio=r).per_head(scores.shape[-1]), alpha=ap["alpha"])  # (L, Hkv, N)
    assert prof["head_budgets"] == keep.sum(-1).tolist()


# ---------------------------------------------------------------------------------------------------- Celery + CLI
@pytest.fixture(scope="module")
def sweep_redis():
    with redis_db(SWEEP_REDIS_DB) as url:
        yield url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.service
def test_sweep_through_celery_worker_resume_show_and_promote(pg_url, sweep_redis, tiny_docs, tmp_path,
                                                                       monkeypatch, fresh_settings):
    from kvcalib.cli import app

    queue = f"kvcalib-sweep-test-{secrets.token_hex(3)}"
    env = service_env(pg_url, sweep_redis, queue, KVCALIB_DATA_DIR=tmp_path / "data", KVCALIB_SWEEP_HEARTBEAT=1,
                      KVCALIB_SWEEP_GRACE=6, OMP_NUM_THREADS=1, MKL_NUM_THREADS=1)  # 1 thread: robust when the
    # CPU is shared (an oversubscribed OpenMP pool slows a trial down many times)
    for k in [k for k in os.environ if k.startswith("KVCALIB_")]:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        if k.startswith("KVCALIB_"):
            monkeypatch.setenv(k, v)
    from kvcalib.settings import get_settings

    get_settings.cache_clear()
    monkeypatch.setattr(sw_storage, "_STORAGES", {})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in tiny_docs))
    worker = WorkerProcess(env, tmp_path / "worker.log", "sweep")
    try:
        worker.wait_ready(120)
        runner = CliRunner()
        args = ["sweep", "run", "--method", "snapkv", "--allocator", "adakv", "--corpus", str(corpus),
                "--doc-tokens", "100:300", "--ratios", "0.3,0.6", "--probes", "2", "--holdout-probes", "1",
                "--probe-tokens", "8", "--cue-tokens", "6", "--suffix", "ci", "--population", "4", "--broker",
                "--timeout", "170", "--json", "--objective", "reconstruction"]
        res = runner.invoke(app, args + ["--trials", "8"])
        assert res.exit_code == 0, res.output + worker.output()[-3000:]
        first = json.loads(res.stdout)
        assert first["created"] and first["completed"] == 8 and first["mode"] == "celery"
        assert first["n_trials_total"] == 8 and first["pareto"]
        name = first["study"]
        assert name == "kvcalib:smollm2-135m:snapkv:adakv:ci"
        assert "sweep_trial" in worker.output() or "Task kvcalib.sweep_trial" in worker.output()

        # resume: same study (same id), the trial count grows; no corpus needed. Meanwhile the worker is killed
        # (SIGKILL) in the middle of a trial: its heartbeat goes stale, the trial is failed and re-run with the same
        # parameters on a fresh worker.
        storage = sw.make_storage(pg_url)
        box = {}
        driver = threading.Thread(target=lambda: box.update(rep=sw.run_sweep(name, 2, broker=True, storage=storage,
                                                                             timeout=400,
                                                                             broker_runner=run_with_broker)))
        driver.start()
        running = wait_for(lambda: [t for t in sw.load_study(name, storage).trials if t.state.name == "RUNNING"],
                           60, 0.2, "a running trial")
        time.sleep(0.5)
        worker.kill()
        worker.stop()
        worker = WorkerProcess(env, tmp_path / "worker2.log", "sweep2")
        worker.wait_ready(120)
        driver.join(420)  # bounds for a loaded CI machine (the sweep times out at 400 s)
        assert not driver.is_alive()
        rep = box["rep"]
        assert not rep.created and rep.study_id == first["study_id"]
        assert rep.completed == 2 and rep.failed == 1, worker.output()[-3000:]

        study = sw.load_study(name, storage)
        trials = study.trials
        assert len(trials) == 11 and rep.n_trials_total == 11
        killed = trials[running[0].number]
        assert killed.state.name == "FAIL"
        retried = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
        assert len(retried) == 1 and retried[0].state.name == "COMPLETE" and retried[0].params == killed.params
        assert sum(t.state.name == "COMPLETE" for t in trials) == 10
        workers = {t.user_attrs.get("worker") for t in trials if t.state.name == "COMPLETE"}
        assert len(workers) == 2 and not any(w.endswith(f":{os.getpid()}") for w in workers)  # both workers ran

        res = runner.invoke(app, ["sweep", "show", name, "--json"])
        assert res.exit_code == 0, res.output
        shown = json.loads(res.stdout)
        assert shown["n_trials"] == 11 and shown["pareto"]

        res = runner.invoke(app, ["sweep", "promote", name, "--max-loss", "0.05", "--json"])
        assert res.exit_code == 0, res.output
        entry = json.loads(res.stdout)
        assert sw.promoted_params("snapkv", "smollm2-135m") == entry["method_params"]
        assert (tmp_path / "data" / sw.PROMOTED_FILE).is_file()
    finally:
        worker.stop()


def test_dashboard_serves_the_study_over_http(sqlite_url, tmp_path):
    storage = sw.make_storage(sqlite_url)
    name = sw.study_name("smollm2-135m", "snapkv", "adakv", "dash")
    study, _, _ = sw.open_study(tiny_spec(allocator="adakv"), name, storage)
    sw.run_inprocess(name, 3, storage=storage, load_engine=lambda m: None, evaluate=fake_evaluate)
    port = _free_port()
    env = service_env(sqlite_url, None, "unused", KVCALIB_DATA_DIR=tmp_path / "data")
    dash = subprocess.Popen([sys.executable, "-m", "kvcalib.cli", "dashboard", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def get(path):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
                    return json.loads(r.read())
            except OSError:
                assert dash.poll() is None, dash.stdout.read().decode(errors="replace")
                return None

        got = wait_for(lambda: get("/api/studies"), 60, 0.5, "the dashboard")
        found = [s for s in got["study_summaries"] if s["study_name"] == name]
        assert found and found[0]["study_id"] == study._study_id
        detail = get(f"/api/studies/{study._study_id}")
        assert len(detail["trials"]) == 3 and detail["best_trials"]  # the Pareto front
        assert detail["objective_names"] == list(sw.OBJECTIVE_NAMES)
        assert {"key": "method", "value": "snapkv"} in detail["user_attrs"]
    finally:
        dash.terminate()
        dash.wait(10)
