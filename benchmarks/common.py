"""Helpers shared by the benchmark scripts. The scripts put this folder on ``sys.path`` and import it as
``common``, so ``python benchmarks/<name>.py`` works from any directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TextIO


def write_report(report: dict, out: str | Path, *, indent: int = 2, stream: TextIO | None = None) -> Path:
    """Write ``report`` as indented JSON (with a final newline) to ``out``, creating its folder, and print
    ``wrote <out>`` on ``stream`` (default: stdout). Returns the path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=indent) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=stream)
    return out
