"""Per-request device (issue 17, item 5) without running a model: the ``allowed_devices`` setting, the device checks
(pattern, devices this process has, devices the deployment allows), engine loaders given a device, the run's device
carried to ``execute_run``, and migration 0005 (``calibration_runs.device``) up and down on SQLite and PostgreSQL."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kvcalib.service import repository as repo
from kvcalib.service.db import Database, current_revision, head_revision, upgrade
from tests.support import clean_pg, isolated_settings, pg_url  # noqa: F401  (fixtures)

NO_CUDA = not torch.cuda.is_available()


# ---------------------------------------------------------------------------------------------------- settings
def test_allowed_devices_default_to_the_worker_device(tmp_path, monkeypatch):
    from pydantic import ValidationError

    assert isolated_settings(tmp_path).devices == ["cpu"]
    assert isolated_settings(tmp_path, worker_device="cuda").devices == ["cuda"]
    assert isolated_settings(tmp_path, allowed_devices=["cpu", "cuda:1"]).devices == ["cpu", "cuda:1"]
    from kvcalib.settings import Settings

    for raw, expected in (("cpu, cuda:0", ["cpu", "cuda:0"]), ('["cuda", "cpu"]', ["cuda", "cpu"]), ("", ["cpu"])):
        monkeypatch.setenv("KVCALIB_ALLOWED_DEVICES", raw)
        assert Settings(_env_file=None, data_dir=tmp_path).devices == expected
    monkeypatch.setenv("KVCALIB_ALLOWED_DEVICES", "cpu,tpu")
    with pytest.raises(ValidationError, match="unknown device 'tpu'"):
        Settings(_env_file=None, data_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------- checks
def test_device_checks(tmp_path):
    from kvcalib.service import ServiceInputError
    from kvcalib.service.validation import check_device

    s = isolated_settings(tmp_path)
    assert check_device("cpu", s) == "cpu"
    for bad in ("tpu", "CUDA", "cuda:", "cuda:x", "cpu:0", "", 3, None):
        with pytest.raises(ServiceInputError, match="unknown device"):
            check_device(bad, s)
    with pytest.raises(ServiceInputError, match=r"device 'cuda:1' is not allowed on this server: allowed devices "
                                                r"are \['cpu'\] \(KVCALIB_ALLOWED_DEVICES\)"):
        check_device("cuda:1", s, local=False)  # jobs on Celery workers: only the allow-list is checked here
    gpu_jobs = isolated_settings(tmp_path, allowed_devices=["cpu", "cuda"])
    assert check_device("cuda", gpu_jobs, local=False) == "cuda"
    with pytest.raises(ServiceInputError, match=r"allowed devices are \['cuda:0'\]"):
        check_device("cpu", isolated_settings(tmp_path, allowed_devices=["cuda:0"]), local=NO_CUDA)


@pytest.mark.skipif(not NO_CUDA, reason="a machine without CUDA")
def test_a_device_this_process_lacks_is_named(tmp_path):
    from kvcalib.service import ServiceInputError
    from kvcalib.service.runtime import device_problem
    from kvcalib.service.validation import check_device

    assert device_problem("cpu") is None
    assert "device 'cuda' does not exist on this server: torch finds no CUDA device" in device_problem("cuda")
    s = isolated_settings(tmp_path, allowed_devices=["cpu", "cuda"])
    with pytest.raises(ServiceInputError, match="device 'cuda:0' does not exist on this server"):
        check_device("cuda:0", s)


def test_params_carry_the_device_outside_the_parameters_hash(tmp_path):
    from kvcalib.service import ServiceInputError
    from kvcalib.service.inputs import params_hash
    from kvcalib.service.validation import RequestValidator

    v = RequestValidator(isolated_settings(tmp_path))  # embedded: jobs run here, the device must exist here
    default, cpu = v.params(), v.params(device="cpu")
    assert default.device is None and cpu.device == "cpu"  # None: the executing process's worker device
    assert params_hash(v.config(default), default.dtype) == params_hash(v.config(cpu), cpu.dtype)
    with pytest.raises(ServiceInputError, match="unknown device"):
        v.params(device="tpu")
    with pytest.raises(ServiceInputError, match="does not exist on this server" if NO_CUDA else "not allowed"):
        v.params(device="cuda")
    broker = RequestValidator(isolated_settings(tmp_path, broker_url="redis://localhost:1/0",
                                                allowed_devices=["cuda:0"]))
    assert broker.params(device="cuda:0").device == "cuda:0"  # the workers have it; this process need not
    if NO_CUDA:
        with pytest.raises(ServiceInputError, match="does not exist on this server"):
            broker.check_local_device(broker.params(device="cuda:0"))  # … but a synchronous request runs here


# ---------------------------------------------------------------------------------------------------- loaders
def _engine(dtype="fp32"):
    return SimpleNamespace(lm=SimpleNamespace(spec=SimpleNamespace(revision="r", dtype=dtype)))


def test_engine_loaders_take_a_device():
    from kvcalib.calib.errors import KvcalibError
    from kvcalib.service.runtime import dtype_aware, load_at

    calls = []

    def full(name, dtype=None, device=None):
        calls.append((name, dtype, device))
        return _engine(dtype or "fp32")

    assert dtype_aware(full) is full
    load_at(full, "smollm2-135m", "bf16", "cpu")
    load_at(full, "smollm2-135m", None)
    assert calls == [("smollm2-135m", "bf16", "cpu"), ("smollm2-135m", None, None)]

    two_args = []
    wrapped = dtype_aware(lambda name, dtype=None: two_args.append(dtype) or _engine())  # no device: not passed
    assert load_at(wrapped, "smollm2-135m", "fp32", "cpu").lm.spec.dtype == "fp32" and two_args == ["fp32"]
    one_arg = dtype_aware(lambda name: _engine())
    assert load_at(one_arg, "smollm2-135m", None, "cpu").lm.spec.revision == "r"
    if NO_CUDA:
        with pytest.raises(KvcalibError, match="does not exist on this server"):
            load_at(full, "smollm2-135m", None, "cuda:3")
        assert calls[-1][2] is None  # refused before loading anything


def _seed_run(db: Database, device: str | None) -> int:
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.data.documents import content_hash

    config = CalibrationConfig.from_dict({"ratios": [0.5], "n_probes": 1})
    text = f"a document for {device}"
    with db.session() as s:
        model = repo.get_or_create_model(s, name="smollm2-135m", revision="r")
        doc = repo.get_or_create_document(s, text=text, content_hash=content_hash(text))
        run, created = repo.get_or_create_run(s, document=doc, model=model, params=config.to_dict(),
                                              params_hash=config.params_hash(), method=config.method,
                                              allocator=config.allocator, tolerance=config.tolerance, device=device)
        assert created and run.device == device
        return run.id


def test_jobs_load_the_model_on_the_run_device(db):
    from kvcalib.calib.errors import KvcalibError
    from kvcalib.service.jobs import execute_run

    calls = []

    def loader(name, dtype=None, device=None):
        calls.append(device)
        raise KvcalibError("stop before calibrating")  # an input error: the run fails at once

    for device in ("cpu", None):
        out = execute_run(db, _seed_run(db, device), loader, max_attempts=1)
        assert out.status == "failed" and "stop before calibrating" in out.error
    assert calls == ["cpu", None]  # None: the worker's KVCALIB_WORKER_DEVICE
    if NO_CUDA:
        run_id = _seed_run(db, "cuda:1")
        out = execute_run(db, run_id, loader, max_attempts=4)
        assert out.status == "failed" and "device 'cuda:1' does not exist on this server" in out.error
        assert len(calls) == 2  # refused before loading; failed at once, not retried
        with db.session() as s:
            assert repo.get_run(s, run_id=run_id).attempts == 1


# ---------------------------------------------------------------------------------------------------- migration
def _columns(url: str, table: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        insp = sa.inspect(eng)
        return {c["name"] for c in insp.get_columns(table)} if insp.has_table(table) else set()
    finally:
        eng.dispose()


def _up_down(url: str) -> None:
    import sqlalchemy as sa
    from alembic import command

    from kvcalib.service.db import alembic_config

    command.upgrade(alembic_config(url), "0004")
    d = Database(url)
    assert current_revision(d.engine) == "0004" and "device" not in _columns(url, "calibration_runs")
    with d.engine.begin() as conn:  # a run written before 0005
        conn.execute(sa.text("INSERT INTO models (name, revision) VALUES ('smollm2-135m', 'rev1')"))
        conn.execute(sa.text("INSERT INTO documents (content_hash, n_bytes, text) VALUES (:h, 3, 'old')"),
                     {"h": "d" * 64})
        conn.execute(sa.text(
            "INSERT INTO calibration_runs (document_id, model_id, params_hash, params, method, allocator, tolerance, "
            "status, progress, attempts) VALUES (1, 1, :p, '{}', 'compactor', 'adakv', 0.95, 'queued', 0, 0)"),
            {"p": "p" * 64})
    assert upgrade(url) == head_revision() >= "0005"
    assert "device" in _columns(url, "calibration_runs")
    with d.session() as s:
        assert repo.get_run(s, run_id=1).device is None  # the old row: the worker's device
        repo.set_run(s, run_id=1, device="cuda:0")
    command.downgrade(alembic_config(url), "0004")
    assert current_revision(d.engine) == "0004" and "device" not in _columns(url, "calibration_runs")
    with d.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM calibration_runs")).scalar() == 1  # the row stays
    assert upgrade(url) == head_revision()
    with d.session() as s:
        assert repo.get_run(s, run_id=1).device is None
    command.downgrade(alembic_config(url), "base")
    assert current_revision(d.engine) is None
    d.dispose()


def test_migration_0005_upgrades_and_downgrades_on_sqlite(tmp_path):
    _up_down(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.service
def test_migration_0005_upgrades_and_downgrades_on_postgres():
    from tests.support import scratch_pg_database

    with scratch_pg_database("kvcalib_mig") as url:
        _up_down(url)
