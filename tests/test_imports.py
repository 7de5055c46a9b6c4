"""Import boundaries of the one-way architecture (issue 12), each checked in a fresh interpreter:

* the client (``kvcalib.client``) loads neither torch nor transformers: inference servers and scripts use it
  without the engine (``content_hash`` comes from the torch-free ``kvcalib.calib.data.hashing``);
* the engine (``kvcalib.calib``, every module of it) loads nothing of the service: no database, web, queue or sweep
  library, no ``kvcalib.settings``/``service``/``api``/``worker``/``sweep``; its package ``__init__``s are lazy;
* no module of the engine reads or sets environment variables (the application passes configuration in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

CALIB_DIR = Path(__file__).resolve().parents[1] / "calib"
HEAVY = ("torch", "transformers")
SERVICE = ("sqlalchemy", "alembic", "fastapi", "starlette", "celery", "kombu", "redis", "optuna", "pydantic_settings",
           "kvcalib.settings", "kvcalib.service", "kvcalib.api", "kvcalib.worker", "kvcalib.sweep",
           "kvcalib.commands", "kvcalib.cli", "kvcalib.client")


def loaded_after(code: str, tmp_path: Path) -> set[str]:
    """The names in ``sys.modules`` after running ``code`` in a fresh interpreter (outside the checkout's root)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def offenders(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def calib_modules() -> list[str]:
    """Every module of the engine, as installed (``calib/x/y.py`` → ``kvcalib.calib.x.y``)."""
    names = []
    for path in sorted(CALIB_DIR.rglob("*.py")):
        parts = path.relative_to(CALIB_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join(("kvcalib", "calib", *parts)))
    return names


def test_client_loads_no_torch_nor_transformers(tmp_path):
    mods = loaded_after("import kvcalib.client\nfrom kvcalib.client import KvcalibClient, content_hash", tmp_path)
    assert "kvcalib.client" in mods
    assert offenders(mods, HEAVY) == []


def test_client_content_hash_is_sha256_of_utf8():
    import hashlib

    from kvcalib.calib.data import documents
    from kvcalib.client import content_hash

    text = "Zürich — 東京\n"
    assert content_hash(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert documents.content_hash is content_hash  # the engine's existing callers get the same function


@pytest.mark.parametrize("module", ["kvcalib.calib", "kvcalib.calib.data", "kvcalib.calib.data.hashing"])
def test_engine_packages_import_lazily(module, tmp_path):
    """The engine's package ``__init__``s load no torch eagerly (public names resolve on first access)."""
    mods = loaded_after(f"import {module}", tmp_path)
    assert module in mods
    assert offenders(mods, HEAVY) == []
    assert offenders(mods, SERVICE) == []


def test_engine_loads_nothing_of_the_service(tmp_path):
    names = calib_modules()
    assert "kvcalib.calib.pipeline" in names and "kvcalib.calib.data.hashing" in names
    mods = loaded_after("import importlib\n" + "\n".join(f"importlib.import_module({n!r})" for n in names), tmp_path)
    assert set(names) <= mods
    assert offenders(mods, SERVICE) == []


ENV_ATTRS = {"environ", "environb", "getenv", "getenvb", "putenv", "unsetenv"}


def environment_uses(path: Path, root: Path) -> list[str]:
    """``os.environ``/``os.getenv``/… attribute uses and ``from os import environ``-style imports in one file."""
    name, uses = path.relative_to(root), []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ENV_ATTRS:
            uses.append(f"{name}:{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "posix", "nt"):
            uses += [f"{name}:{node.lineno}: from {node.module} import {a.name}" for a in node.names
                     if a.name in ENV_ATTRS]
    return uses


def test_environment_scan_finds_uses(tmp_path):
    """The scanner itself catches reads, writes and imports of the environment."""
    f = tmp_path / "m.py"
    f.write_text("import os\nfrom os import getenv\nx = os.environ.get('A')\nos.environ['B'] = '1'\ny = getenv('C')\n"
                 "os.putenv('D', '2')\n")
    found = sorted(u.split(": ", 1)[1] for u in environment_uses(f, tmp_path))
    assert found == [".environ", ".environ", ".putenv", "from os import getenv"]


def test_engine_reads_and_sets_no_environment_variables():
    uses = [u for path in sorted(CALIB_DIR.rglob("*.py")) for u in environment_uses(path, CALIB_DIR.parent)]
    assert uses == [], "the engine must take configuration as arguments, not from the environment:\n" + "\n".join(uses)


def test_no_package_level_import_cycle():
    """Dependencies point one way: the graph of kvcalib's packages (calib's subpackages and the service-side
    packages), built from every ``from kvcalib... import`` in the tree, function-level imports included, is acyclic.
    The top-level ``kvcalib/__init__.py`` (lazy re-exports) is left out."""
    import ast
    import collections
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tops = {"calib": "kvcalib.calib", "kvcalib": "kvcalib", "api": "kvcalib.api", "worker": "kvcalib.worker",
            "kernels": "kvcalib.kernels"}

    def package(mod: str) -> str:
        p = mod.split(".")
        if p[:2] == ["kvcalib", "calib"]:
            return "calib." + p[2] if len(p) > 2 else "calib"
        return p[1] if len(p) > 1 else "kvcalib"

    edges: dict[str, set[str]] = collections.defaultdict(set)
    for top, dotted in tops.items():
        for f in (root / top).rglob("*.py"):
            rel = f.relative_to(root / top).with_suffix("").parts
            mod = ".".join([dotted, *rel]).removesuffix(".__init__")
            if mod == "kvcalib":
                continue
            src = package(mod)
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvcalib"):
                    names = ([f"{node.module}.{a.name}" for a in node.names]
                             if node.module in ("kvcalib", "kvcalib.calib") else [node.module])
                    for name in names:
                        dst = package(name)
                        if dst not in (src, "calib"):  # the `calib` facade re-exports lazily
                            edges[src].add(dst)
    cycles = set()

    def walk(node: str, path: list[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt in path:
                cycles.add(" -> ".join(path[path.index(nxt):] + [nxt]))
            else:
                walk(nxt, path + [nxt])

    for start in list(edges):
        walk(start, [start])
    assert not cycles, sorted(cycles)
    assert "service" not in edges["calib.calibration"] and not any(d.startswith(("service", "api", "worker",
                                                                                  "sweep", "settings"))
                                                                     for s, ds in edges.items()
                                                                     if s.startswith("calib.") for d in ds)
