"""Entry point of the ``lerenet`` console script.

Importing this module registers every command module found in :mod:`lerenet.commands` on the shared
Typer app: first those of :data:`PIPELINE_ORDER` (so ``--help`` lists each panel's commands in pipeline
order, :mod:`lerenet.help`), then any other module of the package.
"""

import importlib
import pkgutil

from lerenet import commands
from lerenet.app import app

PIPELINE_ORDER = ("data", "train", "evaluate", "flows", "predict", "classes", "services", "bench", "model_info")
"""Command modules in the order their commands are registered (within a panel, the order they are listed)."""

for _name in (*PIPELINE_ORDER, *sorted(m.name for m in pkgutil.iter_modules(commands.__path__))):
    importlib.import_module(f"{commands.__name__}.{_name}")

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
