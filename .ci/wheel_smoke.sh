#!/usr/bin/env bash
# Wheel smoke test: build kvcalib's wheel, install it (no deps) into a fresh venv that sees the system's packages
# (torch and the other dependencies come from there), and run `kvcalib db upgrade` + `kvcalib methods` from a
# directory outside the checkout. Fails when the wheel lacks a package, the migrations or the package data.
#
# The system site-packages may hold an editable install of this checkout too; the checks below insist that the
# kvcalib imported (and the migrations Alembic runs) are the wheel's, under the venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/kvcalib-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# 1. Build from a copy of the tracked and not-ignored files: no stale build/ folder of the checkout leaks deleted
#    modules into the wheel, and nothing is written into the checkout.
mkdir -p "$WORK/src" "$WORK/dist"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  cp -a "$ROOT/." "$WORK/src/" && rm -rf "$WORK/src/build" "$WORK/src"/*.egg-info
fi
# Build with the installed setuptools when it meets pyproject's build requirement (no index needed), else in pip's
# isolated build environment (fetches setuptools from the index).
ISOLATION=()
if "$PY" -c 'import sys, setuptools; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
  ISOLATION=(--no-build-isolation)
fi
"$PY" -m pip wheel -q --no-deps "${ISOLATION[@]}" -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/kvcalib-*.whl)"
echo "built $(basename "$WHEEL")"

# 2. The wheel's contents: every package of the tree, the package data, the license.
"$PY" - "$WHEEL" <<'EOF'
import sys
import zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
packages = ["", "commands", "service", "sweep", "calib", "calib/lm", "calib/data", "calib/scorers", "calib/cache",
            "calib/calibration", "calib/predictors", "kernels", "api", "worker", "migrations", "migrations/versions"]
missing = [p for p in packages if f"kvcalib/{p}/__init__.py".replace("//", "/") not in names]
need = ["kvcalib/migrations/env.py", "kvcalib/migrations/script.py.mako", "kvcalib/migrations/versions/0001_initial.py"]
missing += [n for n in need if n not in names]
if not any(n.startswith("kvcalib/calib/data/text/") and n.endswith(".txt") for n in names):
    missing.append("kvcalib/calib/data/text/*.txt")
for n in ("kvcalib/calib/predictors/shipped/smollm2-135m/manifest.json",
          "kvcalib/calib/predictors/shipped/smollm2-135m/risk.json",
          "kvcalib/calib/predictors/shipped/smollm2-135m/labels.jsonl"):
    if n not in names:  # the shipped predictors (a fresh install predicts with them) and their labels
        missing.append(n)
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    missing.append("*.dist-info/licenses/LICENSE")
if missing:
    sys.exit(f"wheel lacks: {missing}")
print(f"wheel holds {len(names)} files, all packages, migrations, bundled text, shipped predictors and LICENSE")
EOF

# 3. A fresh venv seeing the system's dependencies; the wheel installed into it without dependencies.
"$PY" -m venv --system-site-packages "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --no-deps --ignore-installed --disable-pip-version-check "$WHEEL"

# 4. Run from outside the checkout, with no user site or PYTHONPATH that could bring the checkout back.
mkdir -p "$WORK/run"
cd "$WORK/run"
export PYTHONNOUSERSITE=1 KVCALIB_DATABASE_URL="sqlite:///$WORK/run/smoke.db" KVCALIB_DATA_DIR="$WORK/run/data"
unset PYTHONPATH
"$VPY" -I - "$WORK/venv" <<'EOF'
import sys
from pathlib import Path

import kvcalib
import kvcalib.calib.data.documents as documents
import kvcalib.service.db as db

venv = Path(sys.argv[1]).resolve()
import kvcalib.calib.predictors.bundled as bundled

for what, path in [("kvcalib", kvcalib.__file__), ("migrations", db.MIGRATIONS_DIR),
                   ("bundled text", documents.PACKAGE_DATA), ("shipped predictors", bundled.SHIPPED)]:
    if venv not in Path(path).resolve().parents:
        sys.exit(f"{what} comes from {path}, not from the wheel in {venv}")
if "smollm2-135m" not in bundled.shipped_models() or bundled.default_predictor("smollm2-135m") is None:
    sys.exit(f"no shipped predictor for smollm2-135m under {bundled.SHIPPED}")
print(f"kvcalib {kvcalib.__version__} from {Path(kvcalib.__file__).parent}; migrations from {db.MIGRATIONS_DIR}")
EOF
"$WORK/venv/bin/kvcalib" --version
"$WORK/venv/bin/kvcalib" db upgrade
"$WORK/venv/bin/kvcalib" db current
"$WORK/venv/bin/kvcalib" methods
echo "wheel smoke test passed"
