"""Helpers shared by the command modules: params loading and error reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.config import ConfigError, Params, load_params

ParamsOption = typer.Option(None, "--params", help="params.yaml to use (default: project params.yaml or $LERENET_PARAMS)")


def params_or_exit(path: Path | None, overrides: dict[str, Any] | None = None) -> Params:
    """Load params, or print the validation error and exit with status 2."""
    try:
        return load_params(path, overrides=overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)
