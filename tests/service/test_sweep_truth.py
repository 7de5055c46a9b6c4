"""Sweeps against the task truth (issue 15, item 6): the truth objective (mean recommended ratio up, realised answer
loss down), old stored specs resuming as reconstruction studies, truth-study promotion and the CLI.

Plumbing tests use a fake evaluator (no model); the real-model test runs SmolLM2-135M on two ~200–300-token essay
pieces with a 3-ratio grid and two needles per document, and recomputes every stored value independently (the truth
suite's record for r*, ``evaluate_truth`` with its own prefill for the answers lost at r*).
"""

from __future__ import annotations

import json
import os
import random
import zlib

import pytest
from typer.testing import CliRunner

from kvcalib import sweep as sw
from kvcalib.sweep import trial as sw_trial
from tests.service.test_sweep import fresh_settings, sqlite_url  # noqa: F401  (fixtures)
from tests.support import short_documents

QUESTIONS = (2, 0, 0, 0)  # two needles per document: enough to lose an answer, cheap to decode
GRID = (0.3, 0.6, 0.9)
SMALL = dict(ratios=GRID, questions=QUESTIONS, n_probes=2, probe_tokens=8, cue_tokens=6, tolerance=0.8,
             population_size=4)


def truth_spec(**kw) -> sw.SweepSpec:
    base = dict(method="snapkv", allocator="uniform", documents=["one doc", "another doc"], **SMALL)
    base.update(kw)
    return sw.SweepSpec(**base)


def fake_truth(engine, spec, mp, ap):
    """r* grows with the window, the answer loss with r*: a trade-off without a model."""
    x = mp.get("window", 32) / 64
    rng = random.Random(json.dumps(mp, sort_keys=True))
    r = [min(0.9, 0.1 + 0.8 * x + 0.02 * rng.random()) for _ in spec.documents]
    return sw.TruthMetrics(r_star=r, answer_loss=[0.12 * v * v for v in r], r_star_task=[0.5 for _ in r],
                           n_counted=[2 for _ in r], n_questions=[2 for _ in r])


# ---------------------------------------------------------------------------------------------------- spec
def test_truth_spec_defaults_names_and_validation():
    spec = sw.SweepSpec(documents=["d"])
    assert spec.objective == "truth" and spec.fidelity == sw.DEFAULT_FIDELITY == "salient"  # the library default
    assert sw.SweepSpec(documents=["d"], objective="reconstruction").fidelity == "reconstruction"
    assert spec.questions == (4, 4, 0, 2) and spec.question_seed == 0
    assert spec.objective_names == ("r_star_mean", "answer_loss") and sw.DIRECTIONS == ("maximize", "minimize")
    back = sw.SweepSpec.from_dict(json.loads(json.dumps(truth_spec(fidelity="kl").to_dict())))
    assert back == truth_spec(fidelity="kl") and back.questions == QUESTIONS
    assert sw.study_name("m", "snapkv", "adakv") == "kvcalib:m:snapkv:adakv"  # reconstruction: the old name
    assert sw.study_name("m", "snapkv", "adakv", "x", objective="truth", fidelity="kl") == \
        "kvcalib:m:snapkv:adakv:truth-kl:x"
    assert sw.spec_study_name(truth_spec()) == "kvcalib:smollm2-135m:snapkv:uniform:truth-salient"
    assert sw.spec_study_name(truth_spec(objective="reconstruction")) == "kvcalib:smollm2-135m:snapkv:uniform"
    with pytest.raises(sw.SweepError, match="unknown objective"):
        truth_spec(objective="answers")
    with pytest.raises(sw.SweepError, match="unknown fidelity"):
        truth_spec(fidelity="vibes")
    with pytest.raises(sw.SweepError, match="reconstruction fidelity"):
        truth_spec(objective="reconstruction", fidelity="kl")
    with pytest.raises(sw.SweepError, match="questions"):
        truth_spec(questions=(0, 0, 0, 0))
    with pytest.raises(sw.SweepError, match="four integers"):
        truth_spec(questions=(1, 2))
    # the question seed of a document: deterministic, from its text (not its place in the corpus)
    assert sw.question_seed(truth_spec(question_seed=3), "abc") == 3 + zlib.crc32(b"abc")
    d1, d2 = sw.truth_document(truth_spec(), "One sentence. Another one. A third."), \
        sw.truth_document(truth_spec(), "One sentence. Another one. A third.")
    assert d1 is d2 and len(d1.questions) == 2


def test_old_stored_spec_resumes_as_a_reconstruction_study(sqlite_url, monkeypatch):  # noqa: F811
    """A study created before objectives existed (no ``objective`` in its stored spec) loads as a reconstruction
    study: same metric names, same evaluation, same promotion threshold."""
    storage = sw.make_storage(sqlite_url)
    name = sw.study_name("smollm2-135m", "snapkv", "uniform", "old")
    spec = truth_spec(objective="reconstruction", ratios=(0.3, 0.6), questions=sw.DEFAULT_QUESTIONS)
    old = {k: v for k, v in spec.to_dict().items() if k not in ("objective", "fidelity", "questions",
                                                                "question_seed")}
    assert sw.SweepSpec.from_dict(old).objective == "reconstruction"
    study, _, _ = sw.open_study(spec, name, storage)
    storage.set_study_system_attr(study._study_id, sw.SPEC_ATTR, old)  # as an old version stored it
    again, stored, created = sw.open_study(None, name, storage, given={"method": "snapkv", "objective": None})
    assert not created and stored.objective == "reconstruction" and stored == spec
    assert again.metric_names == list(sw.OBJECTIVE_NAMES)
    with pytest.raises(sw.SweepError, match="different setup.*objective"):
        sw.open_study(None, name, storage, given={"objective": "truth"})

    calls = []

    def fake_reconstruction(engine, s, mp, ap):
        calls.append(s.objective)
        return sw.TrialMetrics(r_star=[0.5, 0.6], holdout_fidelity=[s.tolerance, s.tolerance - 0.1],
                               tolerance=s.tolerance)

    def no_truth(*_):
        raise AssertionError("a reconstruction study must not be evaluated on the truth")

    monkeypatch.setattr(sw_trial, "evaluate_params", fake_reconstruction)
    monkeypatch.setattr(sw_trial, "evaluate_truth_params", no_truth)
    out = sw.run_trial(name, storage=storage, load_engine=lambda m: None)
    assert out["status"] == "complete" and out["objective"] == "reconstruction" and calls == ["reconstruction"]
    rows = sw.trial_rows(sw.load_study(name, storage))
    assert rows[0]["fidelity_loss"] == rows[0]["loss"] == pytest.approx(0.05)
    assert sw.list_studies(storage)[0]["objective"] == "reconstruction"


def test_promoting_a_truth_study_sets_the_service_defaults(sqlite_url, tmp_path):  # noqa: F811
    storage = sw.make_storage(sqlite_url)
    spec = truth_spec()
    name = sw.spec_study_name(spec, "promo")
    study, _, created = sw.open_study(spec, name, storage)
    assert created and study.metric_names == ["r_star_mean", "answer_loss"]
    assert study.user_attrs["objective"] == "truth" and study.user_attrs["questions"] == list(QUESTIONS)
    with pytest.raises(sw.SweepError, match="different setup.*fidelity"):
        sw.open_study(None, name, storage, given={"fidelity": "kl"})
    with pytest.raises(sw.SweepError, match="different setup.*questions"):
        sw.open_study(None, name, storage, given={"questions": (4, 4, 0, 2)})
    assert sw.run_inprocess(name, 6, storage=storage, load_engine=lambda m: None, evaluate=fake_truth) == (6, 0)
    rows = sw.trial_rows(sw.load_study(name, storage), pareto_only=False)
    assert all(r["answer_loss"] == r["loss"] and r["r_star_task_mean"] == 0.5 for r in rows)

    data = tmp_path / "data"
    entry = sw.promote(name, storage=storage, data_dir=data)  # default threshold: 5 % of the answers
    ok = [r for r in rows if r["pareto"] and r["loss"] <= 0.05 + 1e-12]
    assert ok, rows
    best = max(ok, key=lambda r: r["r_star_mean"])
    assert entry["trial"] == best["trial"] and entry["max_loss"] == 0.05
    assert entry["objective"] == "truth" and entry["fidelity"] == "salient"
    assert set(entry["values"]) == {"r_star_mean", "answer_loss"}
    mp, ap = sw.split_params(best["params"])
    assert sw.promoted_params("snapkv", "smollm2-135m", data_dir=data) == mp
    # what the service's request validation applies when a request gives no parameters
    assert sw.with_promoted_params({}, "smollm2-135m", "snapkv", "uniform", data) == {"method_params": mp}
    strict = sw.promote(name, storage=storage, data_dir=data, max_loss=0.0)  # none qualifies: smallest loss
    assert strict["values"]["answer_loss"] == min(r["loss"] for r in rows if r["pareto"])


def test_cli_truth_objective_fidelity_show_and_promote(sqlite_url, tmp_path, monkeypatch, fresh_settings):  # noqa: F811
    from kvcalib.cli import app
    from kvcalib.settings import get_settings

    for k in [k for k in os.environ if k.startswith("KVCALIB_")]:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVCALIB_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("KVCALIB_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    seen = []

    def fake(engine, spec, mp, ap):
        seen.append((spec.objective, spec.fidelity, spec.questions))
        return fake_truth(engine, spec, mp, ap)

    monkeypatch.setattr(sw_trial, "evaluate_truth_params", fake)
    monkeypatch.setattr(sw_trial, "_default_engine", lambda model: None)
    corpus = tmp_path / "essays"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(f"Line {i} of a short essay about sweeping." for i in range(60)))
    runner = CliRunner()
    base = ["sweep", "run", "-m", "snapkv", "-a", "uniform", "--corpus", str(corpus), "--doc-tokens", "40:120",
            "--suffix", "cli", "--in-process", "--fidelity", "kl", "--questions", "2,0,0,0"]
    res = runner.invoke(app, base + ["--trials", "3"])
    assert res.exit_code == 0, res.output
    name = "kvcalib:smollm2-135m:snapkv:uniform:truth-kl:cli"  # truth is the default objective of a new study
    said = " ".join(res.output.split())
    assert f"Pareto front of {name}" in said and "truth objective" in said
    assert "answer" in said and "r*_task" in said  # the table's truth columns (headers wrap in a narrow console)
    assert seen and all(s == ("truth", "kl", QUESTIONS) for s in seen)
    res = runner.invoke(app, ["sweep", "run", "-m", "snapkv", "-a", "uniform", "--suffix", "cli", "--fidelity", "kl",
                              "--trials", "1", "--in-process", "--json"])  # resume: the stored spec
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_trials_total"] == 4
    res = runner.invoke(app, ["sweep", "run", "--study", name, "--questions", "4,4,0,2", "--trials", "1",
                              "--in-process"])
    said = " ".join(res.output.split())
    assert res.exit_code == 2 and "different setup" in said and "questions" in said
    res = runner.invoke(app, ["sweep", "run", "-m", "snapkv", "--suffix", "x", "--holdout-probes", "2",
                              "--in-process"])
    assert res.exit_code == 2 and "reconstruction objective" in " ".join(res.output.split())
    res = runner.invoke(app, ["sweep", "run", "-m", "snapkv", "--objective", "answers", "--in-process"])
    assert res.exit_code == 2 and "--objective" in res.output

    res = runner.invoke(app, ["sweep", "show", "-m", "snapkv", "-a", "uniform", "--suffix", "cli", "--fidelity", "kl",
                              "--json"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["study"] == name and shown["spec"]["objective"] == "truth" and shown["pareto"]
    assert all("answer_loss" in r for r in shown["pareto"])
    res = runner.invoke(app, ["sweep", "promote", name])
    assert res.exit_code == 0, res.output
    assert "promoted trial" in res.output and "answer_loss" in res.output
    entry = sw.promoted_entry("snapkv", "smollm2-135m")
    assert entry["study"] == name and entry["objective"] == "truth" and entry["max_loss"] == 0.05
    assert sw.promoted_params("snapkv") == entry["method_params"]


# ---------------------------------------------------------------------------------------------------- real model
@pytest.fixture(scope="module")
def truth_docs(tokenizer):
    return short_documents(tokenizer, 2, 200, 300)


def recompute(engine, spec: sw.SweepSpec, text: str, params: dict) -> dict:
    """A document's recommended ratio and realised answer loss, recomputed without the sweep's code: the truth
    suite's record (one prefill, probes off the inserted items) gives r*(τ); ``evaluate_truth`` on the grid plus r*
    (its own prefill and scores) gives the answers lost at exactly r*."""
    from kvcalib.calib.calibration.calibrate import CalibrationConfig
    from kvcalib.calib.calibration.suite import fidelity_r_star, truth_record
    from kvcalib.calib.calibration.truth import TruthConfig, evaluate_truth
    from kvcalib.calib.data.questions import QuestionConfig, make_questions

    mp, ap = sw.split_params(params)
    doc = make_questions(text, spec.question_seed + zlib.crc32(text.encode("utf-8")), QuestionConfig(*QUESTIONS))
    cfg = CalibrationConfig(method=spec.method, method_params=mp, allocator=spec.allocator, allocator_params=ap,
                            ratios=spec.ratios, tolerance=spec.tolerance, n_probes=spec.n_probes,
                            probe_tokens=spec.probe_tokens, cue_tokens=spec.cue_tokens, seed=spec.seed)
    rec = truth_record(engine, doc, cfg, fidelities=(spec.fidelity,))
    r = fidelity_r_star(rec, spec.fidelity, spec.tolerance)
    if r == 0.0:
        return {"r_star": 0.0, "answer_loss": 0.0, "n_counted": rec["n_counted"]}
    grid = tuple(sorted(set(spec.ratios) | {r}))
    truth = evaluate_truth(engine, doc, TruthConfig(method=spec.method, method_params=mp, allocator=spec.allocator,
                                                    allocator_params=ap, ratios=grid))
    i = grid.index(r)
    counted = [o for o in truth.outcomes if o.counted]
    lost = sum(not o.survived[i] for o in counted) / len(counted) if counted else 0.0
    return {"r_star": r, "answer_loss": lost, "n_counted": truth.n_counted, "r_star_task": truth.r_star_task}


@pytest.mark.slow
def test_truth_trials_equal_an_independent_recomputation(engine, truth_docs, sqlite_url, tmp_path,  # noqa: F811
                                                        request):
    import time

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    storage = sw.make_storage(sqlite_url)
    spec = truth_spec(documents=truth_docs)
    name = sw.spec_study_name(spec, "real")
    sw.open_study(spec, name, storage)
    sw.CAPTURES.clear()
    t0 = time.perf_counter()
    assert sw.run_inprocess(name, 2, storage=storage, load_engine=lambda m: engine) == (2, 0)
    per_trial = (time.perf_counter() - t0) / 2
    study = sw.load_study(name, storage)
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert trials[0].user_attrs.get("baseline") and len(trials) == 2
    for t in trials:
        got = [recompute(engine, spec, text, t.params) for text in truth_docs]
        a = t.user_attrs
        assert a["r_star"] == pytest.approx([round(g["r_star"], 4) for g in got], abs=1e-4), t.params
        assert a["answer_loss"] == pytest.approx([round(g["answer_loss"], 4) for g in got], abs=1e-4)
        assert a["n_counted"] == [g["n_counted"] for g in got]
        assert t.values[0] == pytest.approx(sum(g["r_star"] for g in got) / 2, abs=1e-6)
        assert t.values[1] == pytest.approx(sum(g["answer_loss"] for g in got) / 2, abs=1e-6)
        tasks = [g.get("r_star_task", a["r_star_task"][i]) for i, g in enumerate(got)]
        assert a["r_star_task"] == pytest.approx(tasks, abs=1e-4)
        # unrounded on both sides: r* may be a grid point of its own truth run (r*_task = r* exactly), where the
        # 4-decimal rounding of the stored attribute would make a violation out of an equality
        assert a["violation_rate"] == sum(g["r_star"] > s + 1e-9 for g, s in zip(got, tasks)) / 2
        assert a["uncounted_documents"] == sum(g["n_counted"] == 0 for g in got)
        assert all(0.0 <= x <= max(GRID) for x in a["r_star"]) and all(0.0 <= x <= 1.0 for x in a["answer_loss"])
    print(f"\ntruth trial: {per_trial:.1f} s per trial ({len(truth_docs)} documents, grid {GRID}, "
          f"questions {QUESTIONS}); values {[t.values for t in trials]}")

    data = tmp_path / "data"
    entry = sw.promote(name, storage=storage, data_dir=data)
    assert entry["objective"] == "truth" and entry["trial"] in {t.number for t in trials}
    assert sw.promoted_params("snapkv", "smollm2-135m", data_dir=data) == entry["method_params"]
