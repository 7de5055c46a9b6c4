"""`kvcalib budget FILE`: the engine's prediction for one document (real model) — ratio, per-layer and per-head
budgets — checked against the engine's own featurize + budgets_at and against the budget arithmetic
(⌈(1 − r)·N⌉ kept positions per head on average)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from kvcalib.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    from kvcalib.calib.data.documents import load_essays

    path = tmp_path_factory.mktemp("budget") / "essay.txt"
    path.write_text(next(iter(load_essays().values()))[:1200], encoding="utf-8")
    return path


def naive_per_head(ratio: float, n: int) -> int:
    return max(1, min(n, math.ceil((1.0 - ratio) * n - 1e-9)))


def test_budget_json_default_predictor_matches_the_engine(engine, document):
    from kvcalib.calib import defaults
    from kvcalib.calib.calibration.calibrate import CalibrationConfig, budgets_at, featurize

    res = runner.invoke(app, ["budget", str(document), "--json"])
    assert res.exit_code == 0, res.output
    assert "✓" not in res.stderr
    out = json.loads(res.stdout)
    assert (out["method"], out["allocator"], out["tolerance"]) == (defaults.METHOD, defaults.ALLOCATOR,
                                                                   defaults.TOLERANCE)
    n, r = out["context_tokens"], out["ratio"]
    if out["predictor_version"].startswith("fallback"):  # no shipped predictor: the documented r = 1 − τ
        assert r == pytest.approx(1 - defaults.TOLERANCE)
    assert 0.0 <= r < 1.0
    spec = engine.lm.spec
    assert len(out["layer_budgets"]) == spec.num_layers
    assert all(len(row) == spec.num_kv_heads for row in out["head_budgets"])
    assert out["layer_budgets"] == [sum(row) for row in out["head_budgets"]]
    assert out["token_budget"] == naive_per_head(r, n)
    assert sum(out["layer_budgets"]) == spec.num_layers * spec.num_kv_heads * out["token_budget"]
    config = CalibrationConfig()
    _, cap, scores = featurize(engine, document.read_text(encoding="utf-8"), config)
    assert cap.num_tokens == n
    assert (out["layer_budgets"], out["head_budgets"]) == budgets_at(scores, r, config.allocator)


def test_budget_with_a_predictor_prints_ratio_table_and_stages(engine, document, tmp_path):
    from kvcalib.calib.calibration.calibrate import context_ids
    from kvcalib.calib.predictors import ConstantPredictor

    pred = tmp_path / "constant.json"
    pred.write_text(json.dumps(ConstantPredictor(0.4).to_json()), encoding="utf-8")
    res = runner.invoke(app, ["budget", str(document), "--predictor", str(pred), "--allocator", "uniform",
                              "--method", "snapkv"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    stages = [line for line in res.stderr.splitlines() if line.startswith("✓ ")]
    assert [s.split()[1] for s in stages] == ["loading", "prefill", "scoring"], res.stderr
    n = context_ids(engine, document.read_text(encoding="utf-8"))[0].numel()  # the cached prompt part
    per_head = naive_per_head(0.4, n)
    assert f"ratio 0.400: keep {per_head} of {n} tokens per head" in res.stdout
    rows = [line for line in res.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == engine.lm.spec.num_layers
    kv = engine.lm.spec.num_kv_heads
    for i, row in enumerate(rows):  # uniform: every head of every layer keeps exactly ⌈(1 − r)·N⌉
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert cells[0] == str(i) and cells[1] == str(kv * per_head)
        assert cells[3].split() == [str(per_head)] * kv
