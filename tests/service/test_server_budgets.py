"""Budgets for servers at the store level (issue 17, items 4 and 5; no model is run): migration 0004 up and down on
SQLite and PostgreSQL, profiles written with the hash of their context token ids, dtype, model shape, prompt format
and kept positions and found by either hash (dtype filter, positions only when asked), the parameters hash of a
dtype, the engine loaders' dtype and the token-ids checks."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from kvcalib.service import repository as repo
from kvcalib.service.db import Database, current_revision, head_revision, upgrade
from tests.support import clean_pg, pg_url  # noqa: F401  (fixtures)

SHAPE = {"layers": 4, "kv_heads": 2, "query_heads": 6, "head_dim": 64, "dtype": "bf16", "model_type": "llama"}


def fake_result(n_layers=4, n_heads=2, r=0.5, n=200):
    per_head = int(n * (1 - r))
    return SimpleNamespace(ratios=[0.3, 0.6, 0.9], fidelity=[0.99, 0.96, 0.7], kl=[0.01, 0.05, 0.4], r_star=r,
                           ratio=r, controller=None,
                           context_tokens=n, monotone=True, layer_budgets=[per_head * n_heads] * n_layers,
                           head_budgets=[[per_head] * n_heads] * n_layers, features={"nll": 2.5}, seconds=1.5)


@dataclass(frozen=True)
class Layout:  # a repository.ServerFields
    ids_hash: str
    dtype: str
    model_shape: dict
    prompt_format: dict
    kept_positions: dict | None


def seed(db, text: str, *, params_hash: str, dtype: str | None, server: Layout | None, r: float = 0.5) -> int:
    from kvcalib.calib.data.documents import content_hash

    with db.session() as s:
        model = repo.get_or_create_model(s, name="smollm2-135m", revision="rev1")
        doc = repo.get_or_create_document(s, text=text, content_hash=content_hash(text))
        run, _ = repo.get_or_create_run(s, document=doc, model=model, params={"tolerance": 0.95},
                                        params_hash=params_hash, method="compactor", allocator="per_layer",
                                        tolerance=0.95, dtype=dtype)
        profile, _ = repo.save_result(s, run=run, result=fake_result(r=r), token_budget=100, server=server)
        return profile.id


def layout(ids_hash: str, dtype: str = "bf16", positions: bool = True) -> Layout:
    from kvcalib.calib.integrations.servers import encode_kept_positions

    keep = torch.zeros(4, 2, 200, dtype=torch.bool)
    keep[..., :100] = True
    return Layout(ids_hash=ids_hash, dtype=dtype, model_shape=dict(SHAPE, dtype=dtype),
                  prompt_format={"kind": "chat_template", "model": "smollm2-135m", "context_tokens": 200,
                                 "doc_start": 7, "ids_hash": ids_hash},
                  kept_positions=encode_kept_positions(keep, layers_only=True) if positions else None)


# ---------------------------------------------------------------------------------------------------- repository
def test_profiles_are_found_by_document_or_ids_hash_with_their_layout(db):
    from kvcalib.calib.data.documents import content_hash
    from kvcalib.calib.integrations.servers import decode_kept_positions

    old = seed(db, "an old profile", params_hash="o" * 64, dtype=None, server=None)  # as before migration 0004
    pid = seed(db, "a document", params_hash="p" * 64, dtype="bf16", server=layout("a" * 64))
    with db.engine.connect() as conn:
        by_text = repo.find_budget(conn, content_hash=content_hash("a document"), model_name="smollm2-135m",
                                   tolerance=0.95)
        by_ids = repo.find_budget(conn, ids_hash="a" * 64, model_name="smollm2-135m", tolerance=0.95,
                                  include_positions=True)
        assert by_text.profile_id == by_ids.profile_id == pid and by_text.kept_positions is None
        assert by_ids.ids_hash == "a" * 64 and by_ids.dtype == "bf16"
        assert by_ids.model_shape.dtype == "bf16" and by_ids.model_shape.layers == 4
        assert by_ids.prompt_format.kind == "chat_template" and by_ids.prompt_format.doc_start == 7
        keep = decode_kept_positions(by_ids.kept_positions)
        assert keep.sum(-1).tolist() == by_ids.head_budgets
        # the dtype filter: old rows count as fp32
        assert repo.find_budget(conn, ids_hash="a" * 64, model_name="smollm2-135m", tolerance=0.95,
                                dtype="fp32") is None
        assert repo.find_budget(conn, ids_hash="a" * 64, model_name="smollm2-135m", tolerance=0.95,
                                dtype="bf16").profile_id == pid
        legacy = repo.find_budget(conn, content_hash=content_hash("an old profile"), model_name="smollm2-135m",
                                  tolerance=0.95, dtype="fp32", include_positions=True)
        assert legacy.profile_id == old and legacy.ids_hash is None and legacy.model_shape is None
        assert legacy.dtype == "fp32" and legacy.kept_positions is None
        assert repo.find_budget(conn, ids_hash="b" * 64, model_name="smollm2-135m", tolerance=0.95) is None
        with pytest.raises(ValueError, match="exactly one"):
            repo.find_budget(conn, model_name="smollm2-135m", tolerance=0.95)
    with db.session() as s:  # a profile whose positions could not be computed stores SQL NULL
        seed(db, "no positions", params_hash="q" * 64, dtype="fp32", server=layout("c" * 64, "fp32", False))
        from sqlalchemy import select

        from kvcalib.service.orm import Profile

        assert s.scalar(select(Profile.id).where(Profile.kept_positions.is_(None),
                                                 Profile.ids_hash == "c" * 64)) is not None


def test_predictions_record_ids_hash_and_dtype(db):
    values = dict(content_hash="a" * 64, model="smollm2-135m", model_revision="rev1", method="compactor",
                  allocator="adakv", tolerance=0.95, params_hash="p" * 64, ratio=0.4, token_budget=120,
                  context_tokens=200, predictor_version="constant-x", predictor_kind="constant", features={})
    with db.session() as s:
        assert repo.save_prediction(s, **values, ids_hash="b" * 64, dtype="bf16")
    with db.session() as s:
        (row,) = repo.list_predictions(s, ids_hash="b" * 64)
        assert (row.ids_hash, row.dtype) == ("b" * 64, "bf16")
        assert repo.list_predictions(s, ids_hash="c" * 64) == []


def test_parameters_hash_of_a_dtype():
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.service.inputs import params_hash

    config = CalibrationConfig()
    assert params_hash(config, "fp32") == params_hash(config, None) == config.params_hash()  # rows keep their hash
    assert len({params_hash(config, d) for d in ("fp32", "bf16", "fp16")}) == 3


# ---------------------------------------------------------------------------------------------------- loaders, ids
def test_engine_loaders_take_a_dtype_and_refuse_another():
    from kvcalib.calib.errors import KvcalibError
    from kvcalib.service.runtime import dtype_aware, load_at

    fp32 = SimpleNamespace(lm=SimpleNamespace(spec=SimpleNamespace(revision="r", dtype="fp32")))
    one_arg = dtype_aware(lambda name: fp32)
    assert load_at(one_arg, "smollm2-135m", "fp32") is fp32 and load_at(one_arg, "smollm2-135m", None) is fp32
    with pytest.raises(KvcalibError, match="loaded in fp32 in this process, not bf16"):
        load_at(one_arg, "smollm2-135m", "bf16")
    calls = []

    def loader(name, dtype=None):
        calls.append((name, dtype))
        return SimpleNamespace(lm=SimpleNamespace(spec=SimpleNamespace(revision="r", dtype=dtype or "fp32")))

    loader = dtype_aware(loader)  # takes no device: adapted, given the dtype alone (test_devices.py)
    assert load_at(loader, "smollm2-135m", "bf16").lm.spec.dtype == "bf16"
    assert calls == [("smollm2-135m", "bf16")]


def test_token_ids_checks():
    from kvcalib.service import ServiceInputError, TooLargeError
    from kvcalib.service.runtime import ModelInfo
    from kvcalib.service.validation import check_dtype, check_token_ids

    info = ModelInfo(name="m", revision="r", max_positions=4096, tokenizer=None, config={"vocab_size": 100})
    assert check_token_ids([0, 5, 99], info, 10) == [0, 5, 99]
    for bad, message in (([], "empty"), ("1 2", "list of integers"), ([1, -1], "token id 1 is -1"),
                         ([100], "outside the vocabulary"), ([1.5], "must be integers"), ([True], "must be integers"),
                         (["7"], "must be integers")):
        with pytest.raises(ServiceInputError, match=message):
            check_token_ids(bad, info, 10)
    with pytest.raises(TooLargeError, match="over the limit of 10"):
        check_token_ids(list(range(11)), info, 10)
    assert check_dtype("bf16") == "bf16"
    with pytest.raises(ServiceInputError, match="expected one of"):
        check_dtype("int8")


# ---------------------------------------------------------------------------------------------------- migrations
def _columns(url: str, table: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        insp = sa.inspect(eng)
        return {c["name"] for c in insp.get_columns(table)} if insp.has_table(table) else set()
    finally:
        eng.dispose()


NEW_PROFILE_COLUMNS = {"ids_hash", "dtype", "model_shape", "prompt_format", "kept_positions"}


def _up_down(url: str) -> None:
    from alembic import command

    from kvcalib.service.db import alembic_config

    command.upgrade(alembic_config(url), "0003")
    d = Database(url)
    assert current_revision(d.engine) == "0003" and not NEW_PROFILE_COLUMNS & _columns(url, "profiles")
    with d.engine.begin() as conn:  # a profile written before 0004
        import sqlalchemy as sa

        conn.execute(sa.text("INSERT INTO models (name, revision) VALUES ('smollm2-135m', 'rev1')"))
        conn.execute(sa.text("INSERT INTO documents (content_hash, n_bytes, text) VALUES (:h, 3, 'old')"),
                     {"h": "d" * 64})
        conn.execute(sa.text(
            "INSERT INTO calibration_runs (document_id, model_id, params_hash, params, method, allocator, tolerance, "
            "status, progress, attempts) VALUES (1, 1, :p, '{}', 'compactor', 'adakv', 0.95, 'succeeded', 1, 1)"),
            {"p": "p" * 64})
        conn.execute(sa.text(
            "INSERT INTO profiles (run_id, document_id, model_id, method, allocator, tolerance, r_star, token_budget, "
            "context_tokens, monotone, layer_budgets, head_budgets, features) VALUES (1, 1, 1, 'compactor', 'adakv', "
            "0.95, 0.5, 1, 2, true, '[2]', '[[1, 1]]', '{}')"))
    assert upgrade(url) == head_revision() >= "0004"
    assert NEW_PROFILE_COLUMNS <= _columns(url, "profiles")
    assert {"ids_hash", "dtype"} <= _columns(url, "predictions") and "dtype" in _columns(url, "calibration_runs")
    with d.engine.connect() as conn:  # the old row: no hash, counted as fp32
        view = repo.find_budget(conn, content_hash="d" * 64, model_name="smollm2-135m", tolerance=0.95,
                                dtype="fp32")
        assert view.ids_hash is None and view.dtype == "fp32" and view.head_budgets == [[1, 1]]
    seed(d, "a new document", params_hash="n" * 64, dtype="bf16", server=layout("e" * 64))
    command.downgrade(alembic_config(url), "0003")
    assert current_revision(d.engine) == "0003" and not NEW_PROFILE_COLUMNS & _columns(url, "profiles")
    assert "dtype" not in _columns(url, "calibration_runs") and "ids_hash" not in _columns(url, "predictions")
    assert upgrade(url) == head_revision()
    with d.session() as s:
        assert repo.count_profiles(s) == 2  # the rows stay, their new columns empty
    command.downgrade(alembic_config(url), "base")
    assert current_revision(d.engine) is None
    d.dispose()


def test_migration_0004_upgrades_and_downgrades_on_sqlite(tmp_path):
    _up_down(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.service
def test_migration_0004_upgrades_and_downgrades_on_postgres():
    from tests.support import scratch_pg_database

    with scratch_pg_database("kvcalib_mig") as url:
        _up_down(url)
