"""How ``lerenet --help`` looks: command panels in pipeline order, conventional metavars, reflowed text.

* **Panels** (:data:`PANELS`): each command names its panel (``rich_help_panel=``); the group lists
  the commands panel by panel in this order (stable, so a panel keeps its commands' registration order).
* **Metavars** (:func:`conventional_metavar`): ``PATH`` / ``FILE`` / ``DIR``, ``INT``, ``FLOAT``,
  ``TEXT``, instead of Typer's ``<path>``, ``<int range>``, ``<list[str]>``; a flag (``--quick``,
  ``--progress/--no-progress``, ``--help``) shows no value at all, not ``<bool>``. A metavar set on the
  option itself wins.
* **Text** (:func:`reflow`): the docstrings are wrapped at the source's width; a prose paragraph is
  joined into one line so the terminal wraps it, while a paragraph with indented lines (``Example:``
  and its commands) keeps its line breaks.

:class:`App` is a ``typer.Typer`` whose commands and groups use :class:`Command` / :class:`Group`.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, get_args, get_origin

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

PANEL_DATA = "Data"
PANEL_TRAIN = "Train and evaluate"
PANEL_REGISTRY = "Registry"
PANEL_INFERENCE = "Inference"
PANEL_SERVICES = "Services and orchestration"
PANEL_BENCH = "Benchmarks"
PANELS: tuple[str, ...] = (PANEL_DATA, PANEL_TRAIN, PANEL_REGISTRY, PANEL_INFERENCE, PANEL_SERVICES, PANEL_BENCH)
"""Help panels in pipeline order: data -> train/evaluate -> registry -> inference -> services -> benchmarks."""

_TYPE_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "TEXT", bool: "BOOLEAN", Path: "PATH"}
_PATH_METAVARS = {"file": "FILE", "dir": "DIR"}


def conventional_metavar(param: Any) -> str | None:
    """The metavar ``param`` is shown with: ``""`` for a flag, ``PATH``/``FILE``/``DIR`` for a path,
    ``INT``/``FLOAT``/``TEXT``/``BOOLEAN`` by type (a repeatable option by its element type); ``None``
    (Typer's own display) for choices and other types."""
    if getattr(param, "is_flag", False):
        return ""
    desc = getattr(param, "type_descriptor", None)
    if desc is None or desc.is_choice:
        return None
    if desc.is_path:
        return _PATH_METAVARS.get(desc.path_type, "PATH")
    annotation = desc.annotation
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    return _TYPE_METAVARS.get(annotation)


def reflow(text: str | None) -> str | None:
    """Join the lines of each prose paragraph of a help text into one; a paragraph with indented lines
    (``Example:`` and its commands) keeps one line per line, unindented (Typer dedents such lines in
    some positions and not in others, so they are shown the same everywhere).

    >>> reflow("Score a model\\non a folder.\\n\\nExample:\\n  lerenet evaluate --data DIR")
    'Score a model on a folder.\\n\\nExample:\\nlerenet evaluate --data DIR'
    """
    if not text:
        return text
    out = []
    for para in inspect.cleandoc(text).split("\n\n"):
        lines = para.split("\n")
        keep_lines = any(line[:1].isspace() for line in lines[1:])
        out.append(("\n" if keep_lines else " ").join(line.strip() for line in lines))
    return "\n\n".join(out)


def _with_metavars(params: list[Any]) -> list[Any]:
    for p in params:
        if isinstance(p, TyperArgument):
            # an argument's metavar is its name (``VERSION``); only the type column changes
            label = conventional_metavar(p)
            if label is not None:
                p.display_type_rich = lambda ctx, _label=label: _label
        elif p.metavar is None:
            p.metavar = conventional_metavar(p)
    return params


class Command(TyperCommand):
    """A Typer command with reflowed help text and conventional metavars (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        """The parameters (``--help`` included) with :func:`conventional_metavar` applied."""
        return _with_metavars(super().get_params(ctx))


class Group(TyperGroup):
    """A Typer group that lists its commands panel by panel in :data:`PANELS` order."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["help"] = reflow(kwargs.get("help"))
        super().__init__(*args, **kwargs)

    def get_params(self, ctx: Any) -> list[Any]:
        """The group's own options (``--help``, ``--version``) with :func:`conventional_metavar` applied."""
        return _with_metavars(super().get_params(ctx))

    def list_commands(self, ctx: Any) -> list[str]:
        """Command names sorted by panel (:data:`PANELS`; unknown or no panel last), registration order within."""
        def rank(name: str) -> int:
            panel = getattr(self.commands[name], "rich_help_panel", None)
            return PANELS.index(panel) if panel in PANELS else len(PANELS)

        return sorted(super().list_commands(ctx), key=rank)


class App(typer.Typer):
    """``typer.Typer`` whose groups are :class:`Group` and whose commands are :class:`Command` by default."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", Group)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        """``typer.Typer.command`` with ``cls=Command`` unless given."""
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)
