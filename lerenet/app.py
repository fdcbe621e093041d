"""The ``lerenet`` Typer application object, shared by the command modules."""

import typer

app = typer.Typer(
    name="lerenet",
    help="Few-shot segmentation of surface defects (LERENet): data, training, evaluation, registry, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
