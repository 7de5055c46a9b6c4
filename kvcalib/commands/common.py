"""Shared CLI plumbing: clear errors (a one-line message on stderr, or a JSON error object on stdout under
``--json``) with a non-zero exit, name validation before any model load, file reading, JSON output."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from kvcalib.calib.errors import KvcalibError

console = Console(stderr=True)
_JSON: ContextVar[bool] = ContextVar("kvcalib_cli_json", default=False)  # the command line holds --json


def _wants_json(args: list[str]) -> bool:
    for a in args:
        if a == "--":
            return False
        if a == "--json":
            return True
    return False


def json_mode() -> bool:
    """Whether the running command line asked for ``--json`` (errors are then JSON objects on stdout)."""
    return _JSON.get()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()


def report_error(kind: str, message: str) -> None:
    """``{"error": {"type": kind, "message": message}}`` on stdout under ``--json``, else one line on stderr."""
    if json_mode():
        emit_json({"error": {"type": kind, "message": message}})
    else:
        console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, highlight=False)


def fail(message: str, code: int = 2, kind: str = "InputError") -> NoReturn:
    """Report ``message`` (see ``report_error``) and exit with ``code`` (2: bad input, 3: a service is down)."""
    report_error(kind, message)
    raise typer.Exit(code)


def friendly_errors(fn):
    """Turn the library's input errors into one clear error with a non-zero exit, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (KvcalibError, FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(str(exc), kind=type(exc).__name__)

    return wrapper


class KvcalibGroup(TyperGroup):
    """The ``kvcalib`` command group: under ``--json`` every error — a usage error of the command line, a failing
    command, an unexpected exception (its traceback still goes to stderr) — is a JSON error object on stdout."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        _JSON.set(_wants_json(list(args)))
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not json_mode():
                raise
            usage = hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)
            if usage:  # click's ClickException: unknown option, bad value, missing argument, unknown command
                report_error(type(exc).__name__, exc.format_message())
                raise typer.Exit(exc.exit_code) from None
            traceback.print_exc(file=sys.stderr)  # a bug: still a JSON object on stdout, the traceback on stderr
            report_error(type(exc).__name__, str(exc) or type(exc).__name__)
            raise typer.Exit(1) from None


def check_names(method: str | None = None, allocator: str | None = None, decode_policy: str | None = None) -> None:
    """Refuse an unknown method, allocator or decode policy before anything loads (the registries are plain
    dictionaries; the model is not touched)."""
    if method is not None:
        from kvcalib.calib.scorers import canonical_method

        canonical_method(method)
    if allocator is not None:
        from kvcalib.calib.budget import check_allocator

        check_allocator(allocator)
    if decode_policy is not None:
        from kvcalib.calib.cache.policies import DECODE_POLICIES

        if decode_policy not in DECODE_POLICIES:
            fail(f"unknown decode policy {decode_policy!r}: expected one of {sorted(DECODE_POLICIES)}")


def read_text_file(path: Path, what: str = "file") -> str:
    """The UTF-8 text of ``path``; a missing file, a folder or invalid UTF-8 is an error naming the file."""
    if not path.exists():
        fail(f"{what} {str(path)!r} does not exist", kind="FileNotFoundError")
    if not path.is_file():
        fail(f"{what} {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{what} {str(path)!r} is not valid UTF-8 (invalid byte at offset {exc.start})",
             kind="UnicodeDecodeError")


DtypeOpt = Annotated[str, typer.Option("--dtype", help="Weights and KV-cache dtype: fp32, bf16 or fp16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="Device to run the model on: cpu, cuda or cuda:N.")]


def load_engine(model: str, device: str = "cpu", dtype: str = "fp32"):
    """The engine of ``model`` with the weights cache of the settings (``KVCALIB_CACHE_DIR``)."""
    from transformers.utils import logging as hf_logging

    from kvcalib.calib.pipeline import Engine
    from kvcalib.settings import get_settings

    hf_logging.disable_progress_bar()  # the CLI shows its own stages; stdout/stderr stay clean under --json
    return Engine.load(model, device=device, dtype=dtype, cache_dir=get_settings().cache_dir)
