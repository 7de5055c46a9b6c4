"""Shared CLI plumbing: clear messages and exit code 2 for bad input, JSON output, progress bars."""

from __future__ import annotations

import functools
import json
import sys

import typer
from rich.console import Console

from kvcalib.calib.errors import KvcalibError

console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def friendly_errors(fn):
    """Turn the library's input errors into one-line messages with a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KvcalibError, FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(str(exc))

    return wrapper


def load_engine(model: str, device: str = "cpu"):
    """The engine of ``model`` with the weights cache of the settings (``KVCALIB_CACHE_DIR``)."""
    from kvcalib.calib.pipeline import Engine
    from kvcalib.settings import get_settings

    return Engine.load(model, device=device, cache_dir=get_settings().cache_dir)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
