"""Packaging: the version (``kvcalib --version``), the license, and the migrations shipped as ``kvcalib.migrations``
(found through ``importlib.resources`` by ``kvcalib db upgrade``; ``alembic upgrade head`` from a checkout's root
through ``alembic.ini``). The wheel itself is built and run in a fresh venv by ``.ci/wheel_smoke.sh``."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib import metadata, resources
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_version_option_prints_the_installed_version():
    import kvcalib
    from kvcalib.cli import app

    version = metadata.version("kvcalib")
    assert version == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert kvcalib.__version__ == version
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"kvcalib {version}"
    assert CliRunner().invoke(app, ["--version", "methods"]).output.strip() == f"kvcalib {version}"  # eager


def test_every_package_of_the_tree_is_listed():
    """pyproject lists packages explicitly: a new folder with an ``__init__.py`` must be listed, or the wheel lacks
    it (a checkout's editable install would still find it)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                found.add(".".join((package, *rel)))
    assert found == set(tool["packages"])
    assert {"kvcalib.migrations", "kvcalib.migrations.versions", "kvcalib.calib.predictors"} <= found


def test_license_file_matches_the_declared_license():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert text.rstrip().endswith("limitations under the License.")


def test_migrations_are_a_package_resource():
    from kvcalib.service import db

    folder = Path(str(resources.files("kvcalib.migrations")))
    assert db.MIGRATIONS_DIR == folder
    assert (folder / "env.py").is_file() and (folder / "script.py.mako").is_file()
    assert db.head_revision() in {p.name.split("_")[0] for p in (folder / "versions").glob("[0-9]*.py")}
    assert db.alembic_config("sqlite://").get_main_option("script_location") == str(folder)


def test_alembic_cli_upgrades_from_the_checkout(tmp_path):
    """``alembic upgrade head`` in the repository root (alembic.ini) reaches the same head as ``kvcalib db upgrade``."""
    from kvcalib.service.db import Database, current_revision, head_revision

    url = f"sqlite:///{tmp_path / 'alembic.db'}"
    env = {**os.environ, "KVCALIB_DATABASE_URL": url}
    r = subprocess.run([sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    db = Database(url)
    try:
        assert current_revision(db.engine) == head_revision()
    finally:
        db.dispose()
