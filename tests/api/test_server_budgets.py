"""Budgets for servers through the API (issue 17, item 4 and the dtype of item 5), on the embedded service with the
real SmolLM2-135M and short documents (~300 tokens): a profile found by the hash of its exact context token ids is the
one found by its text; POST /budget with token ids predicts from a prefill of exactly those ids; bad ids are 422s;
the model shape is the model's config; kept positions decode to the head budgets (and, with ``per_layer``, are the
same in every head of a layer); a bf16 request runs and is recorded in bf16."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.support import (
    FAST_OPTIONS,
    finished_full_calibration,
    isolated_settings,
    shipped_predictors,
    short_documents,
)

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def docs(tokenizer):
    return short_documents(tokenizer, 6, min_tokens=250, max_tokens=350)


@pytest.fixture(scope="module")
def api(tmp_path_factory, engine):
    """The embedded service (SQLite, in-process jobs), nothing shipped: predictions are the fallback's."""
    from kvcalib.api.app import create_app

    s = isolated_settings(tmp_path_factory.mktemp("server-budgets"))
    with shipped_predictors(tmp_path_factory.mktemp("nothing-ships")):
        with TestClient(create_app(s)) as client:
            yield client


def calibrated(client, text: str, **extra) -> dict:
    """The job of a full calibration of ``text``, finished."""
    return finished_full_calibration(client, text, options=FAST_OPTIONS, **extra)


def decoded(budget: dict):
    from kvcalib.calib.integrations.servers import decode_kept_positions

    return decode_kept_positions(budget["kept_positions"])


def test_token_ids_find_the_profile_of_the_text(api, docs, engine):
    from kvcalib.calib.calibration.calibrate import context_ids
    from kvcalib.calib.data.documents import content_hash
    from kvcalib.calib.integrations.servers import token_ids_hash

    text = docs[0]
    job = calibrated(api, text)
    assert job["dtype"] == "fp32"
    ids, doc_start = context_ids(engine, text)  # kvcalib's prompt: chat header + document
    h = token_ids_hash(MODEL, ids)
    by_text = api.get("/budget", params={"document_hash": content_hash(text), "model": MODEL})
    assert by_text.status_code == 200, by_text.text
    by_text = by_text.json()
    assert by_text["source"] == "profile" and by_text["profile_id"] == job["result"]["profile_id"]
    assert by_text["ids_hash"] == h and by_text["dtype"] == "fp32" and by_text["kept_positions"] is None
    assert by_text["prompt_format"] == {"kind": "chat_template", "model": MODEL, "context_tokens": int(ids.numel()),
                                        "doc_start": doc_start, "ids_hash": h}
    by_ids = api.get("/budget", params={"ids_hash": h, "model": MODEL}).json()
    assert by_ids == by_text
    posted = api.post("/budget", json={"token_ids": ids.tolist(), "model": MODEL})  # a server's prefill ids
    assert posted.status_code == 200, posted.text
    assert posted.json() == by_text
    prof = api.get(f"/profiles/{by_text['profile_id']}").json()
    assert prof["ids_hash"] == h and prof["dtype"] == "fp32" and prof["head_budgets"] == by_ids["head_budgets"]

    cfg = engine.lm.model.config  # the model shape is the model's config, in the dtype the budget was measured in
    assert by_text["model_shape"] == {"layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
                                      "query_heads": cfg.num_attention_heads,
                                      "head_dim": cfg.hidden_size // cfg.num_attention_heads, "dtype": "fp32",
                                      "model_type": cfg.model_type}

    with_positions = api.get("/budget", params={"ids_hash": h, "model": MODEL, "include_positions": "true"}).json()
    keep = decoded(with_positions)
    assert keep.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads, ids.numel())
    assert keep.sum(-1).tolist() == with_positions["head_budgets"]
    assert with_positions["kept_positions"]["per_layer"] is False  # adakv: heads of a layer differ

    from kvcalib.client import KvcalibClient

    kv = KvcalibClient()
    kv.http.close()
    kv.http = api  # the torch-free client over the test app
    info = kv.token_ids_budget(ids.tolist(), model=MODEL, include_positions=True)
    assert info.profile_id == by_text["profile_id"] and info.kept_positions == with_positions["kept_positions"]
    assert info.prompt_format == by_text["prompt_format"] and info.model_shape["layers"] == cfg.num_hidden_layers

    miss = api.get("/budget", params={"ids_hash": token_ids_hash(MODEL, ids[1:]), "model": MODEL})
    assert miss.status_code == 404 and "token ids" in miss.json()["detail"]
    assert api.get("/budget", params={"ids_hash": h, "model": MODEL, "dtype": "bf16"}).status_code == 404


def test_post_token_ids_predicts_from_exactly_those_ids(api, docs, engine):
    from kvcalib.calib.budget import Budget, allocate
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, context_ids, featurize
    from kvcalib.calib.integrations.servers import TokenIdsEngine, token_ids_hash

    raw = engine.tokenizer(docs[1], add_special_tokens=False).input_ids  # a server's own layout: no chat header
    r = api.post("/budget", json={"token_ids": raw, "model": MODEL, "include_positions": True})
    assert r.status_code == 200, r.text
    b = r.json()
    h = token_ids_hash(MODEL, raw)
    assert b["source"] == "predicted" and b["document_hash"] is None and b["ids_hash"] == h
    assert b["prompt_format"] == {"kind": "token_ids", "model": MODEL, "context_tokens": len(raw), "doc_start": 0,
                                  "ids_hash": h}
    assert b["context_tokens"] == len(raw) and b["model_shape"]["dtype"] == "fp32"
    eng = TokenIdsEngine(engine, raw)  # the same prefill here: the budgets of the predicted ratio
    _, cap, scores = featurize(eng, eng.document_text(), CalibrationConfig())
    assert cap.input_ids.tolist() == raw
    keep = allocate(scores, Budget(ratio=b["ratio"]), "adakv")
    assert b["head_budgets"] == keep.sum(-1).tolist()
    assert decoded(b).equal(keep)
    stored = api.get("/predictions", params={"document_hash": h}).json()["predictions"]
    assert len(stored) == 1 and stored[0]["ids_hash"] == h and stored[0]["dtype"] == "fp32"

    # kvcalib's prompt of a text sent as ids: the text's prediction, budgets and all
    ids, doc_start = context_ids(engine, docs[2])
    by_ids = api.post("/budget", json={"token_ids": ids.tolist(), "model": MODEL}).json()
    by_text = api.post("/budget", json={"text": docs[2], "model": MODEL}).json()
    assert by_ids["source"] == by_text["source"] == "predicted"
    assert by_ids["prompt_format"]["doc_start"] == by_text["prompt_format"]["doc_start"] == doc_start
    assert by_ids["ids_hash"] == by_text["ids_hash"] == token_ids_hash(MODEL, ids)
    assert by_ids["head_budgets"] == by_text["head_budgets"] and by_ids["ratio"] == by_text["ratio"]
    assert by_text["prompt_format"]["kind"] == "chat_template" and by_ids["prompt_format"]["kind"] == "token_ids"


def test_bad_token_ids_and_lookups_are_422(api):
    from kvcalib.service.runtime import model_info

    service = api.app.state.service
    limit = service.validator.token_limit(model_info(MODEL))
    for body, message in (
        ({"token_ids": []}, "empty"),
        ({"token_ids": [1, -3]}, "token id 1 is -3"),
        ({"token_ids": [1, 49152]}, "outside the vocabulary"),
        ({"token_ids": [1, 2**40]}, "outside the vocabulary"),
        ({"token_ids": ["12"]}, None),
        ({"token_ids": [1.5]}, None),
        ({"token_ids": [True]}, None),
        ({"token_ids": "1 2 3"}, None),
        ({"token_ids": [1, 2], "text": "a document"}, "exactly one"),
        ({}, "exactly one"),
        ({"token_ids": [1, 2], "dtype": "int8"}, None),
    ):
        r = api.post("/budget", json={"model": MODEL, **body})
        assert r.status_code == 422, (body, r.text)
        if message:
            assert message in str(r.json()["detail"]), (body, r.json())
    r = api.post("/budget", json={"model": MODEL, "token_ids": [1] * (limit + 1)})
    assert r.status_code == 413 and "over the limit" in r.json()["detail"]
    for params, message in (({}, "exactly one"), ({"document_hash": "a" * 64, "ids_hash": "b" * 64}, "exactly one"),
                            ({"ids_hash": "xyz"}, None), ({"ids_hash": "a" * 64, "dtype": "fp8"}, None)):
        r = api.get("/budget", params={"model": MODEL, **params})
        assert r.status_code == 422, (params, r.text)
        if message:
            assert message in str(r.json()["detail"])


def test_per_layer_keeps_the_same_positions_in_every_head_of_a_layer(api, docs):
    from kvcalib.calib.data.documents import content_hash

    job = calibrated(api, docs[3], allocator="per_layer")
    stored = api.get("/budget", params={"document_hash": content_hash(docs[3]), "allocator": "per_layer",
                                        "include_positions": "true"}).json()
    predicted = api.post("/budget", json={"text": docs[4], "allocator": "per_layer",
                                          "include_positions": True}).json()
    assert stored["profile_id"] == job["result"]["profile_id"] and predicted["source"] == "predicted"
    for b in (stored, predicted):
        kept = b["kept_positions"]
        assert kept["per_layer"] is True and len(kept["ranges"]) == kept["layers"] == 30  # one range list per layer
        keep = decoded(b)
        assert bool((keep == keep[:, :1]).all())  # every head of a layer: the same positions
        assert keep.sum(-1).tolist() == b["head_budgets"]
        assert all(len(set(row)) == 1 for row in b["head_budgets"])


def test_dtype_bf16_is_run_and_recorded(api, docs):
    from kvcalib.calib.data.documents import content_hash

    text = docs[5]
    b = api.post("/budget", json={"text": text, "dtype": "bf16"})
    assert b.status_code == 200, b.text
    b = b.json()
    assert b["dtype"] == "bf16" and b["model_shape"]["dtype"] == "bf16" and b["source"] == "predicted"
    fp32 = api.post("/budget", json={"text": text}).json()
    assert fp32["dtype"] == "fp32" and fp32["ids_hash"] == b["ids_hash"]  # the same ids, another dtype
    rows = api.get("/predictions", params={"document_hash": content_hash(text)}).json()["predictions"]
    assert sorted(r["dtype"] for r in rows) == ["bf16", "fp32"] and len({r["params_hash"] for r in rows}) == 2
    from kvcalib.service.runtime import _ENGINES

    assert {key[2] for key in _ENGINES if key[0] == MODEL} >= {"fp32", "bf16"}  # one engine per (model, dtype)

    job = calibrated(api, text, dtype="bf16")  # a full calibration in bf16: its job, profile and budget say so
    assert job["dtype"] == "bf16"
    fp32_job = calibrated(api, text)  # fp32: another parameter set, another run
    assert fp32_job["id"] != job["id"] and fp32_job["params_hash"] != job["params_hash"]
    assert fp32_job["dtype"] == "fp32"
    stored = api.get("/budget", params={"document_hash": content_hash(text), "dtype": "bf16"}).json()
    assert stored["profile_id"] == job["result"]["profile_id"] and stored["model_shape"]["dtype"] == "bf16"
    assert api.get(f"/profiles/{stored['profile_id']}").json()["dtype"] == "bf16"
