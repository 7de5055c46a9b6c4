"""The CLI as a user meets it (issue 17 item 8): stages on stderr (quiet under --json), unknown names refused before
any model load, non-UTF-8 files named in the error, JSON error objects under --json, `methods --json`, and the
demo's kept-tokens column (per-head mean and fraction)."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from kvcalib.cli import app

runner = CliRunner()


@pytest.fixture()
def files(tmp_path):
    ctx = tmp_path / "ctx.txt"
    ctx.write_text("Notes from the meeting. The secret passcode for the red door is 48151. " * 3 +
                   "The weather was mild and the coffee was cold. " * 12, encoding="utf-8")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("Café au lait, naïve résumé.\n".encode("latin-1"))
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("A perfectly fine document.\n" * 20, encoding="utf-8")
    (folder / "broken.txt").write_bytes(b"fine start \xff\xfe then garbage\n")
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_bytes(b'{"id": "a", "text": "ok"}\n{"id": "b", "text": "caf\xe9"}\n')
    return {"ctx": ctx, "bin": binary, "folder": folder, "jsonl": jsonl, "tmp": tmp_path}


def _args(args: list[str], files: dict) -> list[str]:
    return [a.format(**files) for a in args]


# ---------------------------------------------------------------------------------------------------- stages
def test_generate_shows_stages_on_stderr_and_is_quiet_under_json(engine, files):
    q = "What is the passcode for the red door?"
    res = runner.invoke(app, ["generate", str(files["ctx"]), q, "--ratio", "0.5", "--max-new-tokens", "16"])
    assert res.exit_code == 0, res.output
    stages = [line[2:] for line in res.stderr.splitlines() if line.startswith("✓ ")]
    expected = ["loading model smollm2-135m (", "prefill of ", "scoring with compactor (",
                "adakv budgets and compression (", "decoding (up to 16 tokens) ("]
    assert len(stages) == len(expected) and all(s.startswith(e) for s, e in zip(stages, expected)), res.stderr
    assert all(s.endswith(" s)") for s in stages)  # each finished stage with its duration
    assert "48151" in res.stdout and "✓" not in res.stdout  # the answer alone on stdout

    quiet = runner.invoke(app, ["generate", str(files["ctx"]), q, "--ratio", "0.5", "--max-new-tokens", "16",
                                "--json"])
    assert quiet.exit_code == 0, quiet.output
    assert "✓" not in quiet.stderr and "loading model" not in quiet.stderr
    assert json.loads(quiet.stdout)["answer"] == res.stdout.strip()  # stdout is pure JSON


# ---------------------------------------------------------------------------------------------------- names first
@pytest.mark.parametrize("args", [
    ["generate", "{ctx}", "q", "--method", "bogus"],
    ["generate", "{ctx}", "q", "--allocator", "bogus"],
    ["generate", "{ctx}", "q", "--decode-policy", "bogus"],
    ["eval", "passkey", "--method", "bogus", "--n", "1"],
    ["eval", "passkey", "--allocator", "bogus", "--n", "1"],
    ["demo", "--method", "bogus", "--no-serve"],
    ["budget", "{ctx}", "--method", "bogus"],
    ["budget", "{ctx}", "--allocator", "bogus"],
])
def test_unknown_names_are_refused_before_any_model_load(args, files, monkeypatch):
    from kvcalib.calib.lm import registry

    loaded: dict = {}
    monkeypatch.setattr(registry, "_LOADED", loaded)  # the process-wide cache of loaded models, emptied
    res = runner.invoke(app, _args(args, files))
    assert res.exit_code == 2, res.output
    assert "bogus" in res.stderr and "expected one of" in res.stderr and "Traceback" not in res.output
    assert loaded == {}  # nothing was loaded: the name was refused first


# ---------------------------------------------------------------------------------------------------- non-UTF-8
@pytest.mark.parametrize("args,named", [
    (["generate", "{bin}", "q"], "latin1.txt"),
    (["budget", "{bin}"], "latin1.txt"),
    (["calibrate", "{folder}", "--out", "{tmp}/labels.jsonl"], "broken.txt"),
    (["calibrate", "{jsonl}", "--out", "{tmp}/labels.jsonl"], "docs.jsonl"),
    (["fit", "{jsonl}", "--out", "{tmp}/predictors"], "docs.jsonl"),
])
def test_non_utf8_errors_name_the_file(args, named, files, monkeypatch):
    from kvcalib.calib.lm import registry

    monkeypatch.setattr(registry, "_LOADED", {})
    res = runner.invoke(app, _args(args, files))
    assert res.exit_code == 2, res.output
    message = " ".join(res.stderr.split())
    assert named in message and "UTF-8" in message and "Traceback" not in res.output
    assert res.stdout == ""


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("args,kind,text", [
    (["generate", "{tmp}/missing.txt", "q", "--json"], "FileNotFoundError", "missing.txt"),
    (["generate", "{bin}", "q", "--json"], "UnicodeDecodeError", "latin1.txt"),
    (["generate", "{ctx}", "q", "--method", "bogus", "--json"], "UnknownMethodError", "bogus"),
    (["generate", "{ctx}", "q", "--ratio", "abc", "--json"], "BadParameter", "--ratio"),
    (["generate", "{ctx}", "--json"], "MissingParameter", "question"),
    (["eval", "passkey", "--n", "0", "--json"], "InputError", "--n"),
    (["demo", "--ratios", "0.5,1.2", "--no-serve", "--json"], "InputError", "--ratios"),
    (["budget", "{ctx}", "--tolerance", "1.5", "--json"], "CalibrationError", "tolerance"),
    (["budget", "{ctx}", "--predictor", "{tmp}/nope", "--json"], "PredictorError", "does not exist"),
    (["methods", "--bogus", "--json"], "NoSuchOption", "--bogus"),
    (["no-such-command", "--json"], "UsageError", "no-such-command"),
])
def test_errors_under_json_are_json_objects_on_stdout(args, kind, text, files):
    res = runner.invoke(app, _args(args, files))
    assert res.exit_code == 2, res.output
    out = json.loads(res.stdout)  # stdout holds exactly one JSON object
    assert set(out) == {"error"} and set(out["error"]) == {"type", "message"}
    assert out["error"]["type"] == kind and text in out["error"]["message"]
    assert "Traceback" not in res.output


def test_errors_without_json_are_one_line_on_stderr(files):
    res = runner.invoke(app, ["generate", str(files["bin"]), "q"])  # a message longer than 80 columns
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(files["bin"]) in lines[0]


# ---------------------------------------------------------------------------------------------------- methods
def test_methods_json_lists_methods_allocators_and_policies():
    from kvcalib.calib.budget import available_allocators
    from kvcalib.calib.cache.policies import DECODE_POLICIES
    from kvcalib.calib.scorers import ALIASES, SCORERS

    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [m["name"] for m in out["methods"]] == sorted(SCORERS)
    for m in out["methods"]:
        assert m["params"] == json.loads(json.dumps(SCORERS[m["name"]]().params()))
        assert m["aliases"] == sorted(a for a, target in ALIASES.items() if target == m["name"])
    assert [a["name"] for a in out["allocators"]] == available_allocators()
    assert next(a for a in out["allocators"] if a["name"] == "adakv")["params"] == {"alpha": 0.2}
    assert out["decode_policies"] == sorted(DECODE_POLICIES)


# ---------------------------------------------------------------------------------------------------- demo
@pytest.mark.slow
def test_demo_reports_mean_kept_per_head_and_fraction(engine):
    res = runner.invoke(app, ["demo", "--no-serve", "--ratios", "0.6", "--json"])
    assert res.exit_code == 0, res.output
    assert "✓" not in res.stderr
    out = json.loads(res.stdout)
    n = out["context_tokens"]
    assert [r["ratio"] for r in out["rows"]] == [0.6]
    for r in out["rows"]:
        # the allocator keeps L·Hkv·⌈(1 − r)·N⌉ positions in total: the mean per head is ⌈(1 − r)·N⌉
        expected = max(1, math.ceil((1 - r["ratio"]) * n - 1e-9))
        assert r["kept_per_head"] == expected
        assert r["kept_fraction"] == round(expected / n, 4)
