"""Profile store plumbing: settings, Alembic migrations (SQLite and PostgreSQL), idempotent repository writes,
input validation, the safetensors export format and the client's cache. No model is run here."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from kvcalib.service import ServiceInputError, TooLargeError, parse_jsonl, validate_text
from kvcalib.service import repository as repo
from kvcalib.service.db import Database, SchemaError, check_schema, current_revision, head_revision, upgrade
from tests.support import clean_pg, pg_url  # noqa: F401  (fixtures)


def fake_result(n_layers=4, n_heads=2, r=0.5, n=200):
    per_head = int(n * (1 - r))
    return SimpleNamespace(ratios=[0.3, 0.6, 0.9], fidelity=[0.99, 0.96, 0.7], kl=[0.01, 0.05, 0.4], r_star=r,
                           ratio=r, controller=None,
                           context_tokens=n, monotone=True, layer_budgets=[per_head * n_heads] * n_layers,
                           head_budgets=[[per_head] * n_heads] * n_layers,
                           features={"nll": torch.tensor(2.5), "nan": float("nan")}, seconds=1.5)


def seeded_run(db, text="some document", params_hash="p" * 64):
    from kvcalib.calib.data.documents import content_hash

    with db.session() as s:
        model = repo.get_or_create_model(s, name="smollm2-135m", revision="rev1")
        doc = repo.get_or_create_document(s, text=text, content_hash=content_hash(text), source="test", token_count=3)
        run, created = repo.get_or_create_run(s, document=doc, model=model, params={"tolerance": 0.95},
                                              params_hash=params_hash, method="compactor", allocator="uniform",
                                              tolerance=0.95)
        return run.id, created


# ---------------------------------------------------------------------------------------------------- settings
def test_settings_defaults_are_embedded(tmp_path, monkeypatch):
    from kvcalib.settings import Settings

    for k in list(__import__("os").environ):
        if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR":
            monkeypatch.delenv(k)
    s = Settings(data_dir=tmp_path)
    assert s.embedded and s.is_sqlite and s.migrate_on_start
    assert s.db_url == f"sqlite:///{(tmp_path / 'kvcalib.db').resolve()}"
    monkeypatch.setenv("KVCALIB_DATABASE_URL", "postgresql+psycopg://x@h/db")
    monkeypatch.setenv("KVCALIB_BROKER_URL", "redis://h:6379/0")
    monkeypatch.setenv("KVCALIB_API_TOKEN", "secret")
    s = Settings()
    assert not s.embedded and not s.migrate_on_start and s.backend_url == "redis://h:6379/0"
    assert s.token == "secret" and "secret" not in repr(s)
    monkeypatch.setenv("KVCALIB_BROKER_URL", "")
    assert Settings().embedded


# ---------------------------------------------------------------------------------------------------- migrations
def test_sqlite_migrations_and_schema_check(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    db = Database(url)
    with pytest.raises(SchemaError, match="kvcalib db upgrade"):
        check_schema(db)
    assert upgrade(url) == head_revision()
    assert check_schema(db) == head_revision()
    from alembic import command

    from kvcalib.service.db import alembic_config

    command.downgrade(alembic_config(url), "base")
    assert current_revision(db.engine) is None
    db.dispose()


@pytest.mark.service
def test_postgres_migrations_match_models(pg_url):  # noqa: F811
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from kvcalib.service.orm import Base

    db = Database(pg_url)
    assert check_schema(db) == head_revision()
    with db.engine.connect() as conn:
        mc = MigrationContext.configure(conn, opts={
            "compare_type": True, "include_name": lambda n, t, p: t != "table" or n in Base.metadata.tables})
        assert compare_metadata(mc, Base.metadata) == []
        tables = set(conn.exec_driver_sql("select tablename from pg_tables where schemaname='public'").scalars())
    assert "kvcalib_alembic_version" in tables and "alembic_version" not in tables  # Optuna's name stays free
    db.dispose()


# ---------------------------------------------------------------------------------------------------- idempotency
def test_documents_runs_and_profiles_are_written_once(db):
    run_id, created = seeded_run(db)
    again, created2 = seeded_run(db)
    assert created and not created2 and again == run_id
    with db.session() as s:
        run = repo.get_run(s, run_id=run_id)
        p1, w1 = repo.save_result(s, run=run, result=fake_result(), token_budget=100)
    with db.session() as s:
        run = repo.get_run(s, run_id=run_id)
        p2, w2 = repo.save_result(s, run=run, result=fake_result(r=0.7), token_budget=60)  # a redelivered job
    assert w1 and not w2 and p1.id == p2.id
    with db.session() as s:
        assert repo.count_profiles(s) == 1
        assert [c.ratio for c in repo.curve_points(s, run_id=run_id)] == [0.3, 0.6, 0.9]
        p = repo.get_profile(s, profile_id=p1.id)
        assert p.r_star == 0.5 and p.features["nll"] == 2.5 and p.features["nan"] is None
        h = p.document.content_hash
        view = repo.find_budget(s, content_hash=h, model_name="smollm2-135m", tolerance=0.95)
        assert view.source == "profile" and view.profile_id == p1.id
        assert view.ratio == 0.5 and view.head_budgets == [[100, 100]] * 4
        assert repo.find_budget(s, content_hash=h, model_name="smollm2-135m", tolerance=0.9) is None
        assert repo.profile_tolerances(s, content_hash=h, model_name="smollm2-135m") == [0.95]


def test_concurrent_result_writers_store_one_profile(db):
    """Two deliveries of one job finishing at the same time: one profile, one set of curve points, no error."""
    run_id, _ = seeded_run(db, "concurrent document")
    barrier = threading.Barrier(4)
    outcomes, errors = [], []

    def write():
        try:
            with db.session() as s:
                run = repo.get_run(s, run_id=run_id)
                barrier.wait(5)
                outcomes.append(repo.save_result(s, run=run, result=fake_result(), token_budget=100)[1])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with db.session() as s:
        assert repo.count_profiles(s) == 1
        assert len(repo.curve_points(s, run_id=run_id)) == 3


def test_batches_and_counts(db):
    ids = [seeded_run(db, f"doc {i}", params_hash="q" * 64)[0] for i in range(3)]
    with db.session() as s:
        b = repo.create_batch(s, run_ids=ids + ids[:1], params={"model": "m"})  # a document twice in one batch
    with db.session() as s:
        rows = repo.batch_rows(s, batch_id=b.id)
        assert [r[1] for r in rows] == ids + ids[:1]
        assert repo.run_counts(s)["queued"] == 3


# ---------------------------------------------------------------------------------------------------- validation
def test_delete_document_removes_everything_derived_from_it(db):
    """DELETE /documents/{id} at the repository level: the document (its text), its runs with their curve points
    and batch items, its profiles — and nothing of another document."""
    gone, _ = seeded_run(db, "document to delete")
    kept, _ = seeded_run(db, "document to keep")
    gone2, _ = seeded_run(db, "document to delete", params_hash="q" * 64)  # a second run of the same document
    for run_id in (gone, kept):
        with db.session() as s:
            repo.save_result(s, run=repo.get_run(s, run_id=run_id), result=fake_result(), token_budget=100)
    with db.session() as s:
        repo.create_batch(s, run_ids=[gone, kept, gone2], params={})
        doc_id = repo.get_run(s, run_id=gone).document_id
        kept_doc = repo.get_run(s, run_id=kept).document_id
        assert repo.unfinished_runs_of_document(s, document_id=doc_id) == sorted([gone, gone2])
        counts = repo.delete_document(s, document_id=doc_id)
    assert counts == {"batch_items": 2, "curve_points": 3, "profiles": 1, "runs": 2, "documents": 1, "predictions": 0}
    with db.session() as s:
        assert repo.get_document(s, document_id=doc_id) is None
        assert repo.get_run(s, run_id=gone) is None and repo.get_run(s, run_id=gone2) is None
        assert repo.curve_points(s, run_id=gone) == [] and repo.profile_for_run(s, run_id=gone) is None
        assert repo.count_profiles(s) == 1 and repo.get_document(s, document_id=kept_doc).text == "document to keep"
        assert [r[1] for r in repo.batch_rows(s, batch_id=1)] == [kept]
        assert repo.delete_document(s, document_id=doc_id)["documents"] == 0


def test_forget_texts_keeps_the_text_of_unfinished_runs(db):
    """Hash-only retention: a text goes once no queued/running run needs it (the hash and size stay)."""
    from kvcalib.service.orm import RunStatus

    done, _ = seeded_run(db, "finished document")
    pending, _ = seeded_run(db, "pending document")
    with db.session() as s:
        repo.set_run(s, run_id=done, status=RunStatus.succeeded.value)
    with db.session() as s:
        assert repo.forget_texts(s) == 1
    with db.session() as s:
        assert repo.get_run(s, run_id=done).document.text == ""
        assert repo.get_run(s, run_id=done).document.n_bytes == len(b"finished document")
        assert repo.get_run(s, run_id=pending).document.text == "pending document"
        repo.set_run(s, run_id=pending, status=RunStatus.failed.value)
    with db.session() as s:
        pending_doc = repo.get_run(s, run_id=pending).document_id
        assert repo.forget_texts(s, document_id=pending_doc) == 1 and repo.forget_texts(s) == 0


def test_validate_text_limits():
    assert validate_text("héllo", 100) == "héllo".encode()
    with pytest.raises(TooLargeError):
        validate_text("x" * 101, 100)
    for bad in ("", "   ", "a\x00b", "\ud800"):
        with pytest.raises(ServiceInputError):
            validate_text(bad, 100)


def test_parse_jsonl():
    docs = parse_jsonl('{"text": "a", "id": 7}\n\n"b"\n{"document_id": 3}\n', 10)
    assert [(d.text, d.source, d.document_id) for d in docs] == [("a", "7", None), ("b", None, None),
                                                                 (None, None, 3)]
    for bad, msg in (('{"text": 1}', "line 1"), ("[1]", "line 1"), ('"a"\n{oops', "line 2"), ("", "no documents")):
        with pytest.raises(ServiceInputError, match=msg):
            parse_jsonl(bad, 10)
    with pytest.raises(TooLargeError):
        parse_jsonl('"a"\n"b"\n"c"', 2)


# ---------------------------------------------------------------------------------------------------- export
def test_export_roundtrip_keeps_ragged_layout():
    from kvcalib.calib.cache.export import ExportFormatError, cache_to_safetensors, load_compressed
    from kvcalib.calib.cache.ragged import RaggedKVCache

    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(3, 2, 10, 4, generator=g), torch.randn(3, 2, 10, 4, generator=g)
    keep = torch.rand(3, 2, 10, generator=g) > 0.5
    keep[..., 0] = True
    cache = RaggedKVCache.from_mask(keys, values, keep)
    data = cache_to_safetensors(cache, torch.arange(10), {"model": "m", "ratio": 0.5})
    ckv = load_compressed(data)
    assert ckv.metadata["model"] == "m" and ckv.next_position == 10 and ckv.context_tokens == 10
    assert ckv.head_budgets == keep.sum(-1).tolist()
    for l in range(3):
        for h in range(2):
            pos = ckv.kept_positions(l, h)
            assert pos == keep[l, h].nonzero().flatten().tolist()
            assert torch.equal(ckv.layers[l].keys[h, :len(pos)], keys[l, h, pos])
    back = ckv.to_ragged_cache()
    assert torch.equal(back.kept_counts()[0], cache.kept_counts()[0])
    with pytest.raises(ExportFormatError):
        load_compressed(b"not a safetensors file")


# ---------------------------------------------------------------------------------------------------- client
def test_client_budget_cache_and_negative_ttl():
    import httpx

    from kvcalib.client import KvcalibClient, TTLCache

    calls = []
    known = "a" * 64

    def handler(request: httpx.Request):
        calls.append(request.url.path)
        if request.url.path == "/budget" and request.method == "GET":
            if request.url.params["document_hash"] == known:
                return httpx.Response(200, json={
                    "source": "profile", "document_hash": known, "model": "m", "method": "compactor",
                    "allocator": "uniform", "tolerance": 0.95, "ratio": 0.5, "token_budget": 10,
                    "context_tokens": 20, "layer_budgets": [20], "head_budgets": [[10, 10]], "extra": 1})
            return httpx.Response(404, json={"detail": "not calibrated"})
        if request.url.path == "/budget" and request.method == "POST":
            return httpx.Response(200, json={
                "source": "predicted", "document_hash": "b" * 64, "model": "m", "method": "compactor",
                "allocator": "uniform", "tolerance": 0.95, "ratio": 0.3, "token_budget": 14,
                "context_tokens": 20, "layer_budgets": [28], "head_budgets": [[14, 14]]})
        return httpx.Response(500)

    kv = KvcalibClient("http://kvcalib", transport=httpx.MockTransport(handler), negative_ttl=60)
    b = kv.budget(known)
    assert b.ratio == 0.5 and b.head_budgets == [[10, 10]]
    assert kv.budget(known) is b and calls.count("/budget") == 1  # cached
    assert kv.budget("c" * 64) is None and kv.budget("c" * 64) is None and calls.count("/budget") == 2
    p = kv.budget(text="new document", predict_missing=True)
    assert p.source == "predicted"
    t = TTLCache(maxsize=2, ttl=0.0)
    t.put(1, "x")
    assert t.get(1) is None  # expired
    t = TTLCache(maxsize=2, ttl=60)
    for i in range(3):
        t.put(i, i)
    assert t.get(0) is None and t.get(2) == 2 and len(t) == 2
