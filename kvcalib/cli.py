"""The ``kvcalib`` command line. Commands live in ``kvcalib.commands.*``; each module registers its own."""

from __future__ import annotations

import typer

from kvcalib.commands import calibration, core, service, sweep

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Per-context calibration of KV-cache compression: score, allocate, compress, calibrate, serve.")

for module in (core, calibration, service, sweep):
    module.register(app)


if __name__ == "__main__":
    app()
