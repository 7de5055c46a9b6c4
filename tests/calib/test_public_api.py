"""The engine's public API (``kvcalib.calib``): every exported name resolves to the object of its stage, and
importing the package is cheap — no torch, nothing of the service — until a name is used."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import kvcalib.calib as calib

HEAVY = ("torch", "transformers", "sqlalchemy", "fastapi", "celery", "optuna", "kvcalib.settings",
         "kvcalib.service")


@pytest.mark.parametrize("name", calib.__all__)
def test_every_exported_name_resolves(name):
    obj = getattr(calib, name)
    assert obj is not None
    if name in calib._EXPORTS:  # the same object as in its defining module
        module = importlib.import_module(f"kvcalib.calib.{calib._EXPORTS[name]}")
        assert obj is getattr(module, name)
    assert name in dir(calib)


def test_flow_names_are_exported_and_unknown_names_fail_clearly():
    for name in ("load_essays", "build_prompt", "load_model", "Capture", "prefill", "get_scorer",
                 "available_methods", "Budget", "allocate", "RaggedKVCache", "greedy_decode", "CalibrationConfig",
                 "calibrate", "predict", "load_predictor", "Engine"):
        assert name in calib.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        calib.no_such_name  # noqa: B018
    from kvcalib.calib import budget as submodule  # submodules still import through the lazy package

    assert submodule.Budget is calib.Budget
    assert calib.defaults.ALLOCATOR == calib.CalibrationConfig().allocator


def test_importing_the_package_loads_no_torch_and_nothing_of_the_service():
    code = ("import json, sys; import kvcalib.calib, kvcalib.calib.defaults; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []


def test_first_use_of_a_name_imports_only_its_stage():
    code = ("import json, sys; import kvcalib.calib as c; c.Budget(ratio=0.5); "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["torch"]  # the budget stage needs torch, never the service
