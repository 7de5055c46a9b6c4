"""CLI commands of the sweep stage (filled in by its issue)."""

import typer


def register(app: typer.Typer) -> None:
    pass
