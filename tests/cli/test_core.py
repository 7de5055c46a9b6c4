"""`kvcalib generate`, `kvcalib eval passkey`, `kvcalib methods`: real model, JSON output, clear errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcalib.cli import app

runner = CliRunner()


@pytest.fixture()
def context_file(tmp_path, engine):
    p = tmp_path / "ctx.txt"
    p.write_text("Notes from the meeting. The secret passcode for the red door is 48151. " * 3 +
                 "The weather was mild and the coffee was cold. " * 12, encoding="utf-8")
    return p


def test_generate_json_reports_answer_kept_tokens_bytes_and_timings(context_file):
    res = runner.invoke(app, ["generate", str(context_file), "What is the passcode for the red door?",
                              "--method", "compactor", "--ratio", "0.5", "--allocator", "uniform",
                              "--max-new-tokens", "16", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert "48151" in out["answer"]
    assert len(out["kept_tokens_per_layer"]) == 30
    n = out["context_tokens"]
    # ratio 0.5 keeps ceil(n/2) per head on 3 kv heads; the question and answer tokens are appended afterwards
    assert all(k == 3 * -(-n // 2) for k in out["kept_tokens_per_layer"])
    assert out["bytes_held"] == out["kept_bytes"] + out["padding_bytes"]
    assert set(out["timings"]) >= {"prefill_s", "score_s", "compress_s", "decode_s"}


@pytest.mark.parametrize("args,message", [
    (["generate", "/no/such/file.txt", "q"], "does not exist"),
    (["generate", "{ctx}", "q", "--ratio", "1.5"], "ratio"),
    (["generate", "{ctx}", "q", "--method", "bogus"], "expected one of"),
    (["generate", "{ctx}", "q", "--allocator", "bogus"], "expected one of"),
    (["generate", "{ctx}", "q", "--model", "bogus"], "unknown model"),
    (["generate", "{bin}", "q"], "utf-8"),
    (["eval", "passkey", "--n", "0"], "--n"),
])
def test_bad_input_is_a_clear_message_and_exit_2(args, message, context_file, tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    args = [a.format(ctx=context_file, bin=binary) for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert message.lower() in res.output.lower()
    assert "Traceback" not in res.output


def test_eval_passkey_json():
    res = runner.invoke(app, ["eval", "passkey", "--method", "snapkv", "--ratio", "0.25", "--n", "2",
                              "--context-tokens", "200", "--seed", "3", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 2 and len(out["examples"]) == 2
    assert out["accuracy"] == sum(e["correct"] for e in out["examples"]) / 2
    assert all(len(e["answer"]) == 5 for e in out["examples"])


def test_methods_lists_every_scorer():
    res = runner.invoke(app, ["methods"])
    assert res.exit_code == 0
    for name in ("compactor", "snapkv", "streaming", "keynorm", "random"):
        assert name in res.output
