"""The ``kvcalib`` command line. Commands live in ``kvcalib.commands.*``; each module registers its own."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from kvcalib import __version__
from kvcalib.commands import calibration, core, service, sweep
from kvcalib.commands.common import KvcalibGroup

# Process-level switches belong to the application, not the engine: no hub access, no tokenizer fork warnings.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

app = typer.Typer(cls=KvcalibGroup, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-context calibration of KV-cache compression: score, allocate, compress, calibrate, serve.")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvcalib {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the installed version and exit.")] = False,
) -> None:
    """Per-context calibration of KV-cache compression: score, allocate, compress, calibrate, serve."""


for module in (core, calibration, service, sweep):
    module.register(app)


if __name__ == "__main__":
    app()
