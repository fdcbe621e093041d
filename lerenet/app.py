"""The ``lerenet`` Typer application object, shared by the command modules, and its ``--version`` option."""

from __future__ import annotations

import tomllib
from importlib import metadata
from pathlib import Path

import typer

from lerenet.help import App

DISTRIBUTION = "lerenet-mlops"

app = App(
    name="lerenet",
    help="Few-shot segmentation of surface defects (LERENet): data, training, evaluation, registry, serving. "
         "The commands are grouped in pipeline order; `lerenet COMMAND --help` shows each one's options.\n\n"
         "Example:\n  lerenet ingest && lerenet validate && lerenet split",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def package_version() -> str:
    """The installed version of the project (distribution :data:`DISTRIBUTION`); in a source checkout
    that is not installed, the ``version`` of its ``pyproject.toml``."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"lerenet {package_version()}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="print the version and exit")) -> None:
    """Options of ``lerenet`` itself (before the command): ``--version``."""
