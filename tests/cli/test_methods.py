"""Every method × allocator is reachable from `kvcalib eval passkey` through the registries; bad names exit 2."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvcalib.calib.budget import available_allocators
from kvcalib.calib.scorers import available_methods
from kvcalib.cli import app

runner = CliRunner()


def test_eval_passkey_new_method_with_adakv(engine):
    res = runner.invoke(app, ["eval", "passkey", "--method", "obcache", "--allocator", "adakv", "--ratio", "0.5",
                              "--n", "1", "--context-tokens", "200", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert (out["method"], out["allocator"], out["n"]) == ("obcache", "adakv", 1)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert abs(out["examples"][0]["ratio"] - 0.5) < 0.01


@pytest.mark.parametrize("args,names", [
    (["--method", "bogus"], available_methods()),
    (["--allocator", "bogus"], available_allocators()),
])
def test_unknown_name_exits_2_listing_valid_choices(engine, args, names):
    res = runner.invoke(app, ["eval", "passkey", *args, "--n", "1", "--context-tokens", "200"],
                        env={"COLUMNS": "400"})
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "expected one of" in text and "bogus" in text
    for name in names:
        assert name in text


def test_methods_lists_new_methods_and_allocators():
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    for name in ("curdkv", "obcache", "lava", "lookahead", "adakv"):
        assert name in res.output
