"""Service CLI: `kvcalib db upgrade|current`, start-up refusal on an old schema, `kvcalib worker` without a broker,
and `kvcalib batch CORPUS` on the embedded default (in-process, real model) with progress until done."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from kvcalib.cli import app
from tests.support import FAST_OPTIONS, short_documents

runner = CliRunner()


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for k in list(os.environ):
        if k.startswith("KVCALIB_") and k != "KVCALIB_CACHE_DIR":
            monkeypatch.delenv(k)
    monkeypatch.setenv("KVCALIB_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # no stray .env
    from kvcalib.settings import get_settings

    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_db_upgrade_and_current(clean_env):
    r = runner.invoke(app, ["db", "current"])
    assert r.exit_code == 0 and json.loads(r.stdout)["at_head"] is False
    r = runner.invoke(app, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    out = json.loads(runner.invoke(app, ["db", "current"]).stdout)
    assert out["at_head"] and out["database"].endswith("kvcalib.db")


@pytest.mark.service
def test_serve_and_worker_refuse_an_old_schema(clean_env, monkeypatch):
    from tests.support import scratch_pg_database

    with scratch_pg_database("kvcalib_test_empty") as url:
        r = runner.invoke(app, ["serve", "--database-url", url, "--port", "1"])
        assert r.exit_code == 2 and "kvcalib db upgrade" in r.output
        monkeypatch.setenv("KVCALIB_DATABASE_URL", url)
        monkeypatch.setenv("KVCALIB_BROKER_URL", "redis://127.0.0.1:6390/0")
        r = runner.invoke(app, ["worker"])
        assert r.exit_code == 2 and "kvcalib db upgrade" in r.output


def test_worker_needs_a_broker(clean_env):
    r = runner.invoke(app, ["worker"])
    assert r.exit_code == 2 and "KVCALIB_BROKER_URL" in r.output


@pytest.mark.slow
def test_batch_command_embedded(clean_env, tokenizer):
    corpus = clean_env / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(short_documents(tokenizer, 1, 100, 150)[0], encoding="utf-8")
    (corpus / "bad.bin").write_bytes(b"\xff")  # not a .txt: ignored
    ratios = ",".join(map(str, FAST_OPTIONS["ratios"]))
    r = runner.invoke(app, ["batch", str(corpus), "--ratios", ratios, "--n-probes", "2", "--poll", "0.2", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["done"] and out["counts"]["succeeded"] == 1 and out["total"] == 1
    bad = clean_env / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n\xff\xfe\n')
    r = runner.invoke(app, ["batch", str(bad)])
    assert r.exit_code == 2 and "UTF-8" in r.output
