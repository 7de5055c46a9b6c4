"""Every notebook in notebooks/ executes top to bottom (nbclient, small inputs) and writes its figures as PNGs.

``KVCALIB_NB_SMALL=1`` makes the notebooks use small inputs; ``KVCALIB_NB_FIGURES`` points their figures at a
temporary folder. The committed ``walkthrough.ipynb`` must be what ``notebooks/build.py`` generates.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NB_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TIMEOUT = int(os.environ.get("KVCALIB_NB_TIMEOUT", "600"))  # per cell


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", NB_DIR / "build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_walkthrough_is_generated_by_build_script():
    build = _build_module()
    committed = nbformat.read(NB_DIR / "walkthrough.ipynb", as_version=4)
    fresh = build.build()
    assert [c.source for c in committed.cells] == [c.source for c in fresh.cells], \
        "notebooks/walkthrough.ipynb is stale: run `python notebooks/build.py`"
    assert all(not c.get("outputs") for c in committed.cells if c.cell_type == "code"), "commit without outputs"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_writes_figures(path, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("KVCALIB_NB_SMALL", "1")
    monkeypatch.setenv("KVCALIB_NB_FIGURES", str(figures))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # robust on a shared CPU
    for k in ("KVCALIB_DATABASE_URL", "KVCALIB_BROKER_URL", "KVCALIB_NB_STUDY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("KVCALIB_DATA_DIR", str(tmp_path / "data"))
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError with the failing cell's traceback

    pngs = sorted(figures.glob("*.png"))
    assert pngs, f"{path.name} wrote no figure to {figures}"
    expected = getattr(_build_module(), "FIGURES", []) if path.stem == "walkthrough" else []
    missing = [name for name in expected if not (figures / name).is_file()]
    assert not missing, f"{path.name} did not write {missing}"
    for png in pngs:
        data = png.read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), f"{png.name} is not a non-empty PNG"
