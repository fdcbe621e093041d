"""Entry point of the ``lerenet`` console script.

Importing this module registers every command module found in
:mod:`lerenet.commands` on the shared Typer app.
"""

import importlib
import pkgutil

from lerenet import commands
from lerenet.app import app

for _mod in pkgutil.iter_modules(commands.__path__):
    importlib.import_module(f"{commands.__name__}.{_mod.name}")

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
