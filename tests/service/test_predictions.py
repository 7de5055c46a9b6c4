"""Predictors and stored predictions at the service level (no model is run): the ``predictions`` table written once
per key (SQLite and PostgreSQL), migration 0003 up and down, the order in which a request's predictor is chosen
(configured → registered → shipped → fallback, each only when it fits), and the validation of registered predictor
files."""

from __future__ import annotations

import json
import math

import pytest

from kvcalib.service import repository as repo
from kvcalib.service.db import Database, current_revision, head_revision, upgrade
from tests.support import clean_pg, isolated_settings, pg_url, shipped_predictors  # noqa: F401  (fixtures)

TRAINED = {"method": "compactor", "allocator": "adakv", "tolerance": 0.95}


def constant(ratio: float, **config):
    from kvcalib.calib.predictors import ConstantPredictor

    p = ConstantPredictor(ratio)
    p.training = {"config": dict(TRAINED, **config)}
    return p


def prediction(h="a" * 64, **over):
    values = dict(content_hash=h, model="smollm2-135m", model_revision="rev1", method="compactor",
                  allocator="adakv", tolerance=0.95, params_hash="p" * 64, ratio=0.4, token_budget=120,
                  context_tokens=200, predictor_version="constant-x", predictor_kind="constant",
                  features={"n_tokens": 200.0, "nan": float("nan")})
    values.update(over)
    return values


# ---------------------------------------------------------------------------------------------------- repository
def test_predictions_are_stored_once_and_listed_newest_first(db):
    with db.session() as s:
        assert repo.save_prediction(s, **prediction())
    with db.session() as s:  # the same prediction again (another request, another process): nothing written
        assert not repo.save_prediction(s, **prediction(ratio=0.9))
        assert repo.save_prediction(s, **prediction(tolerance=0.9))  # another τ is another prediction
        assert repo.save_prediction(s, **prediction(predictor_version="constant-y"))  # another predictor too
        assert repo.save_prediction(s, **prediction("b" * 64))
    with db.session() as s:
        rows = repo.list_predictions(s, content_hash="a" * 64, model="smollm2-135m")
        assert [r.predictor_version for r in rows][0] == "constant-y" and len(rows) == 3
        first = [r for r in rows if r.tolerance == 0.95 and r.predictor_version == "constant-x"]
        assert len(first) == 1 and first[0].ratio == 0.4 and first[0].features == {"n_tokens": 200.0, "nan": None}
        assert len(repo.list_predictions(s)) == 4 and len(repo.list_predictions(s, limit=2)) == 2
        assert repo.list_predictions(s, model="qwen2.5-coder-0.5b") == []


def test_deleting_a_document_deletes_the_predictions_of_its_hash(db):
    from kvcalib.calib.data.documents import content_hash

    text = "a stored document"
    with db.session() as s:
        doc = repo.get_or_create_document(s, text=text, content_hash=content_hash(text))
        repo.save_prediction(s, **prediction(content_hash(text)))
        repo.save_prediction(s, **prediction())  # another document's (never stored: POST /budget)
        doc_id = doc.id
    with db.session() as s:
        assert repo.delete_document(s, document_id=doc_id)["predictions"] == 1
    with db.session() as s:
        assert [r.content_hash for r in repo.list_predictions(s)] == ["a" * 64]


def test_predictor_rows_record_source_model_and_training_config(db):
    with db.session() as s:
        row, created = repo.add_predictor(s, version="v-any", metrics={"m": float("inf")}, artefact_path=None,
                                          kind="constant", artefact=b"{}", source="registered",
                                          training_config=TRAINED)
        assert created and row.metrics == {"m": None} and row.training_config == TRAINED
        assert not repo.add_predictor(s, version="v-any", metrics={}, artefact_path=None, source="shipped")[1]
        repo.add_predictor(s, version="v-qwen", metrics={}, artefact_path=None, source="registered",
                           model="qwen2.5-coder-0.5b")
        repo.add_predictor(s, version="v-shipped", metrics={}, artefact_path="/x", source="shipped",
                           model="smollm2-135m")
        repo.register_predictor(s, version="v-old", metrics={}, artefact_path="/y")  # before sources existed
    with db.session() as s:  # candidates of a request: registered or configured, bound to its model or to none
        assert [r.version for r in repo.predictor_candidates(s, model="smollm2-135m")] == ["v-old", "v-any"]
        assert [r.version for r in repo.predictor_candidates(s, model="qwen2.5-coder-0.5b")] == [
            "v-old", "v-qwen", "v-any"]
        rows = repo.list_predictors(s)
        assert [(r.version, r.source) for r in rows] == [("v-old", None), ("v-shipped", "shipped"),
                                                        ("v-qwen", "registered"), ("v-any", "registered")]


# ---------------------------------------------------------------------------------------------------- migrations
def _columns(url: str, table: str) -> set[str]:
    import sqlalchemy as sa

    eng = sa.create_engine(url)
    try:
        insp = sa.inspect(eng)
        return {c["name"] for c in insp.get_columns(table)} if insp.has_table(table) else set()
    finally:
        eng.dispose()


def _up_down(url: str) -> None:
    from alembic import command

    from kvcalib.service.db import alembic_config

    assert upgrade(url) == head_revision() >= "0003"
    assert {"source", "model", "training_config"} <= _columns(url, "predictors")
    d = Database(url)
    with d.session() as s:
        repo.save_prediction(s, **prediction())
        repo.register_predictor(s, version="v1", metrics={}, artefact_path=None, source="registered",
                                training_config=TRAINED)
    command.downgrade(alembic_config(url), "0002")
    assert current_revision(d.engine) == "0002" and _columns(url, "predictions") == set()
    assert "source" not in _columns(url, "predictors") and "artefact" in _columns(url, "predictors")
    assert upgrade(url) == head_revision()
    with d.session() as s:
        assert repo.list_predictions(s) == [] and repo.latest_predictor(s).version == "v1"  # the row stays
    command.downgrade(alembic_config(url), "base")
    assert current_revision(d.engine) is None
    d.dispose()


def test_migration_0003_upgrades_and_downgrades_on_sqlite(tmp_path):
    _up_down(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.service
def test_migration_0003_upgrades_and_downgrades_on_postgres():
    from tests.support import scratch_pg_database

    with scratch_pg_database("kvcalib_mig") as url:
        _up_down(url)


# ---------------------------------------------------------------------------------------------------- choice
@pytest.fixture()
def predictors(tmp_path):
    from kvcalib.service.predictions import Predictors

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(url)
    d = Database(url)
    with shipped_predictors(tmp_path / "shipped"):
        yield lambda **settings: Predictors(d, isolated_settings(tmp_path / "data", **settings))
    d.dispose()


def test_predictor_choice_order(predictors, tmp_path):
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.service.inputs import CalibrationParams
    from kvcalib.service.predictions import RequestKey

    key = RequestKey("compactor", "adakv", 0.95)
    p = predictors()
    first = p.select("smollm2-135m", key)
    assert first.source is None and first.predictor.version == "fallback-parametric-b0"  # nothing ships, nothing set

    shipped = constant(0.3)
    save_predictors(tmp_path / "shipped" / "smollm2-135m", {"risk": shipped, "other": constant(0.1)})
    c = p.select("smollm2-135m", key)
    assert c.source == "shipped" and c.predictor.version == shipped.version and c.name == "risk"
    assert c.artefact_path == str(tmp_path / "shipped" / "smollm2-135m")
    assert p.select("smollm2-135m", RequestKey("compactor", "adakv", 0.9)).source is None  # trained for τ = 0.95
    assert p.select("smollm2-135m", RequestKey("snapkv", "adakv", 0.95)).source is None
    assert p.select("qwen2.5-coder-0.5b", key).source is None  # shipped for the other model only

    served = p.for_request(key, CalibrationParams(model="smollm2-135m", method="compactor", allocator="adakv",
                                                  tolerance=0.95))
    assert served.version == shipped.version  # and recorded as shipped
    with p.db.session() as s:
        row = repo.latest_predictor(s)
        assert (row.version, row.source, row.model, row.artefact_path) == (
            shipped.version, "shipped", "smollm2-135m", c.artefact_path)
        assert row.training_config == TRAINED
        assert repo.predictor_candidates(s, model="smollm2-135m") == []  # a shipped row is not a registered one

    registered = constant(0.5)
    info, created = p.register(registered.to_json())
    assert created and info.source == "registered" and info.default and info.model is None
    assert p.register(registered.to_json())[1] is False  # idempotent
    assert p.select("smollm2-135m", key).predictor.version == registered.version  # newest registered wins
    assert p.select("qwen2.5-coder-0.5b", key).predictor.version == registered.version  # bound to no model
    bound = constant(0.6)
    assert p.register(bound.to_json(), model="qwen2.5-coder-0.5b")[0].model == "qwen2.5-coder-0.5b"
    assert p.select("qwen2.5-coder-0.5b", key).predictor.version == bound.version
    assert p.select("smollm2-135m", key).predictor.version == registered.version  # not for smollm2
    other_tau = constant(0.7, tolerance=0.9)
    p.register(other_tau.to_json())
    assert p.select("smollm2-135m", key).predictor.version == registered.version  # newest *fitting* one
    assert p.select("smollm2-135m", RequestKey("compactor", "adakv", 0.9)).predictor.version == other_tau.version

    listing = p.listing()
    sources = {i.version: (i.source, i.default) for i in listing.predictors}
    assert sources[shipped.version] == ("shipped", False) and sources[registered.version] == ("registered", True)
    assert sources[bound.version] == ("registered", True) and sources[other_tau.version] == ("registered", False)
    assert {i.name for i in listing.predictors if i.source == "shipped"} == {"risk", "other"}
    assert listing.defaults == {"smollm2-135m": registered.version, "qwen2.5-coder-0.5b": bound.version}

    configured = constant(0.2)
    save_predictors(tmp_path / "configured", {"mine": configured})
    p2 = predictors(predictor_path=tmp_path / "configured")
    c = p2.select("smollm2-135m", key)
    assert c.source == "configured" and c.predictor.version == configured.version and c.name == "mine"
    assert p2.select("smollm2-135m", RequestKey("compactor", "adakv", 0.9)).predictor.version == other_tau.version
    assert [i.source for i in p2.listing().predictors][0] == "configured"


def test_a_stored_predictor_that_no_longer_loads_is_skipped(predictors, tmp_path):
    from kvcalib.calib.predictors import save_predictors
    from kvcalib.service.predictions import RequestKey

    p = predictors()
    key = RequestKey("compactor", "adakv", 0.95)
    earlier = constant(0.5)
    save_predictors(tmp_path / "earlier", {"x": earlier})
    with p.db.session() as s:  # configured by an earlier deployment: served from its folder
        repo.register_predictor(s, version=earlier.version, metrics={}, artefact_path=str(tmp_path / "earlier"),
                                source="configured", training_config=TRAINED)
    assert p.select("smollm2-135m", key).predictor.version == earlier.version
    with p.db.session() as s:  # newer rows whose artefact is gone, or holds another predictor now
        repo.register_predictor(s, version="constant-moved", metrics={}, artefact_path=str(tmp_path / "nowhere"),
                                source="configured", training_config=TRAINED)
        repo.register_predictor(s, version="constant-refitted", metrics={}, artefact_path=str(tmp_path / "earlier"),
                                source="configured", training_config=TRAINED)
    c = p.select("smollm2-135m", key)
    assert c.source == "registered" and c.predictor.version == earlier.version  # both skipped


# ---------------------------------------------------------------------------------------------------- validation
def _tampered(**changes):
    d = constant(0.5).to_json()
    d.update(changes)
    return d


@pytest.mark.parametrize("document, reason", [
    ([], "JSON object"),
    ({}, "not a kvcalib predictor"),
    (_tampered(kind="nope"), "unknown predictor kind"),
    (_tampered(params={"ratio": 0.9}), "content hash"),
    (_tampered(params={}), "invalid constant predictor parameters"),
    (_tampered(params={"ratio": "x"}), "invalid constant predictor parameters"),
    (_tampered(params={"ratio": math.nan}), "invalid predictor"),
    (_tampered(params=[1, 2]), "no parameters"),
    (_tampered(format_version=99), "format version"),
    (_tampered(metrics=[1]), "`metrics` must be an object"),
    (_tampered(training=[1]), "`training` must be an object"),
    (_tampered(training={"config": "compactor"}), "`training.config` must be an object"),
    (_tampered(created="x" * 200), "predictor version"),
    (_tampered(created="a\u0000b"), "NUL"),
    ({"format": "kvcalib.predictor", "format_version": 1, "kind": "risk", "params": {"base": [1]},
      "content_hash": "0"}, "invalid predictor"),
    ({"format": "kvcalib.predictor", "format_version": 1, "kind": "parametric", "params": {"alpha": {}},
      "content_hash": "0"}, "invalid predictor"),
])
def test_malformed_predictor_files_are_input_errors(document, reason):
    from kvcalib.service.errors import ServiceInputError
    from kvcalib.service.predictions import parse_predictor

    with pytest.raises(ServiceInputError, match=reason):
        parse_predictor(json.loads(json.dumps(document)))


def test_registering_for_another_model_than_trained_is_refused(predictors):
    from kvcalib.calib.errors import KvcalibError

    p = predictors()
    pred = constant(0.5, model="smollm2-135m")
    with pytest.raises(KvcalibError, match="trained for model"):
        p.register(pred.to_json(), model="qwen2.5-coder-0.5b")
    with pytest.raises(KvcalibError, match="unknown model"):
        p.register(constant(0.5, model="gpt-9").to_json())
    assert p.register(pred.to_json())[0].model == "smollm2-135m"  # bound by its training configuration
