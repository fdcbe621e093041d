"""Defect classes: which exist in the sources, which the data version holds, and the fold table.

A *class* is a ``<root>/<Class>/Images`` folder in a Surface Defects-4i-layout source.
Two source roots are configured: ``data.source`` (the base benchmark, e.g. ``defects12``) and
``data.incoming`` (where new defect classes arrive). A class is *accepted* once it is named
in the fold table (``folds:`` in ``params.yaml``); the ingest step copies the accepted view:

* every class of ``data.source``, plus
* the classes of ``data.incoming`` that the fold table names.

So before the retrain flow accepts ``Leather_Fold`` the data version holds the 12 base classes,
and afterwards ``dvc repro`` and the Prefect flow both ingest the same 13 (the view is a folder
of symlinks, :func:`source_view`).

Fold extension rule (documented in ``docs/orchestration.md``): new classes are taken in
alphabetical order; each joins the fold whose test classes hold the fewest usable defect images
at that moment (lowest fold index on ties), and the count of that fold grows by the class's
images before the next class is placed. It keeps folds balanced in evaluation work and never
moves an existing class, so the saved episodes of the other folds stay byte-identical and the
promotion gate can compare on them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from pipeline.atomic import atomic_write, atomic_write_text, replace_dir
from pipeline.config import Params, check_class_name
from pipeline.layout import VIEW_MARKER

log = logging.getLogger(__name__)

VIEW_DIR = ".source_view"


class ClassTableError(ValueError):
    """A class cannot be placed or found; the message names the class, folder or file."""


def source_classes(root: Path | None) -> dict[str, Path]:
    """Class folders of one source root: ``{class_name: <root>/<Class>}``.

    A class folder is a non-hidden sub-folder holding ``Images/``. A missing or ``None`` root
    gives ``{}`` (an absent incoming folder simply means nothing arrived).
    """
    if root is None or not Path(root).is_dir():
        return {}
    return {p.name: p for p in sorted(Path(root).iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "Images").is_dir()}


def available_classes(params: Params) -> dict[str, Path]:
    """All classes in ``data.source`` and ``data.incoming``: ``{class_name: folder}``.

    Raises:
        ClassTableError: a class name exists in both roots (ambiguous: rename one folder).
    """
    base = source_classes(params.data.source)
    incoming = source_classes(params.data.incoming)
    both = sorted(set(base) & set(incoming))
    if both:
        raise ClassTableError(
            f"class(es) {both} exist in both data.source ({params.data.source}) and data.incoming "
            f"({params.data.incoming}); remove or rename the duplicate folder")
    return {**base, **incoming}


def accepted_classes(params: Params) -> dict[str, Path]:
    """The accepted source view: all ``data.source`` classes + incoming classes named in the folds.

    Every non-hidden folder of ``data.source`` is kept, even one without ``Images/``, so the ingest
    step still reports a malformed class folder instead of silently skipping it.
    """
    src = params.data.source
    base = {p.name: p for p in sorted(Path(src).iterdir()) if p.is_dir() and not p.name.startswith(".")} \
        if src is not None and Path(src).is_dir() else {}
    incoming = source_classes(params.data.incoming)
    named = set(params.all_classes)
    return {**base, **{c: p for c, p in incoming.items() if c in named}}


def data_version_classes(params: Params, data_dir: Path | None = None) -> set[str]:
    """Classes of the current data version (``<data>/manifest.parquet``); empty if not ingested yet."""
    manifest = Path(data_dir or params.data.dir) / "manifest.parquet"
    if not manifest.is_file():
        return set()
    return set(pd.read_parquet(manifest, columns=["class_name"])["class_name"].unique())


def new_classes(params: Params, data_dir: Path | None = None) -> list[str]:
    """Classes present in the source folders that the current data version does not hold as accepted.

    A class is *held* when it is both in the data version (``manifest.parquet``) and in the fold
    table. So a class left half-processed by an interrupted retrain (ingested but not yet placed
    in a fold, or placed but not ingested) counts as new again, and the retrain resumes it.

    Returns a sorted list; empty when nothing new arrived (the retrain flow then exits).
    """
    held = data_version_classes(params, data_dir) & set(params.all_classes)
    return sorted(set(available_classes(params)) - held)


def source_view(params: Params, classes: Mapping[str, Path] | None = None, data_dir: Path | None = None,
                view: Path | None = None) -> Path:
    """Build ``<data>/.source_view``: one symlink per class, the folder the ingest step reads.

    Args:
        classes: ``{class_name: class folder}``; default :func:`accepted_classes`.
        data_dir: data folder (default ``params.data.dir``).
        view: the view folder to (re)build instead of ``<data_dir>/.source_view``.

    Returns:
        The view folder (rebuilt in a temporary folder and swapped in atomically). It also holds
        ``.lerenet-view.json`` (``pipeline.images.VIEW_MARKER``): for each class the link target and
        the source root it lies in, so that ingest follows these links and no others.

    Raises:
        ClassTableError: a class folder does not exist.
    """
    classes = accepted_classes(params) if classes is None else classes
    view = Path(view) if view is not None else Path(data_dir or params.data.dir) / VIEW_DIR
    data_dir = view.parent
    data_dir.mkdir(parents=True, exist_ok=True)
    stage = data_dir / f"{view.name}.tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        links = {}
        for name, folder in sorted(classes.items()):
            if not Path(folder).is_dir():
                raise ClassTableError(f"class {name!r}: folder {folder} does not exist")
            target = Path(folder).resolve()
            os.symlink(target, stage / name, target_is_directory=True)
            # the root this class link may lead into: the folder that holds the class folder (a link
            # inside the class that leads out of that root is still refused by ingest)
            links[name] = {"target": str(target), "root": str(Path(os.path.abspath(folder)).parent.resolve())}
        # the configured roots this view draws from: ingest names what the view leaves out of them
        configured = {str(Path(r).resolve()) for r in (params.data.source, params.data.incoming)
                      if r is not None and Path(r).is_dir()}
        roots = sorted(configured) if configured & {v["root"] for v in links.values()} else []
        atomic_write_text(stage / VIEW_MARKER, json.dumps({"classes": links, "report_roots": roots}, indent=2) + "\n")
        replace_dir(stage, view)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return view


def count_class_images(folder: Path) -> int:
    """Defect images with a mask in one class folder (``Images/<stem>.*`` with ``GT/<stem>.png``)."""
    from pipeline.images import IMAGE_SUFFIXES

    folder = Path(folder)
    return sum(1 for p in (folder / "Images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
               and not p.name.startswith(".") and (folder / "GT" / f"{p.stem}.png").is_file())


def class_image_counts(params: Params, data_dir: Path | None = None) -> dict[str, int]:
    """Usable defect images per class of the current data version (``validated.parquet``); ``{}`` if none."""
    path = Path(data_dir or params.data.dir) / "validated.parquet"
    if not path.is_file():
        return {}
    rows = pd.read_parquet(path, columns=["class_name", "kind"])
    return rows[rows["kind"] == "defect"].groupby("class_name").size().astype(int).to_dict()


def extend_folds(folds: Mapping[int, Iterable[str]], image_counts: Mapping[str, int],
                 new: Iterable[str]) -> dict[int, list[str]]:
    """Place new classes into the fold table (rule in the module docstring).

    Args:
        folds: current table ``{fold: [test classes]}``.
        image_counts: usable defect images per class (the new classes and the existing ones).
        new: classes to add; each must not already be in the table.

    Returns:
        A new table; existing classes keep their fold and order, new ones are appended.

    Raises:
        ClassTableError: a new class is already in the table, has no image count, or its name is
            not a safe class name (``pipeline.config.check_class_name``: the folder must be renamed
            before it can enter ``params.yaml``).
    """
    out = {int(f): list(cs) for f, cs in folds.items()}
    if not out:
        raise ClassTableError("the fold table is empty; define folds: in params.yaml first")
    placed = {c: f for f, cs in out.items() for c in cs}
    load = {f: sum(int(image_counts.get(c, 0)) for c in cs) for f, cs in out.items()}
    for c in sorted(new):
        try:
            check_class_name(c)
        except ValueError as exc:
            raise ClassTableError(f"new class folder {c!r} cannot join the fold table: {exc}; rename the folder") from None
        if c in placed:
            raise ClassTableError(f"class {c!r} is already in fold {placed[c]} of the fold table")
        if c not in image_counts:
            raise ClassTableError(f"class {c!r} has no image count (is it in the ingested manifest?)")
        f = min(sorted(out), key=lambda k: load[k])
        out[f].append(c)
        placed[c] = f
        load[f] += int(image_counts[c])
    return out


def place_new_classes(params: Params, new: Iterable[str]) -> tuple[dict[int, list[str]], list[str], dict[str, str]]:
    """Plan a new data version for the ``new`` classes (:func:`new_classes`), in memory.

    Returns:
        ``(folds, placed, view)``: the fold table with the classes not yet in it placed by
        :func:`extend_folds` (image counts from their source folders), the classes so placed, and the
        ``{class: folder}`` source view to ingest (the accepted classes plus the new ones).

    Raises:
        ClassTableError: as :func:`extend_folds`.
    """
    new = list(new)
    available = available_classes(params)
    placed = [c for c in new if c not in params.all_classes]
    folds = {f: list(cs) for f, cs in params.folds.items()}
    if placed:
        counts = {**class_image_counts(params), **{c: count_class_images(available[c]) for c in placed}}
        folds = extend_folds(params.folds, counts, placed)
    view = {**{c: str(p) for c, p in accepted_classes(params).items()}, **{c: str(available[c]) for c in new}}
    return folds, placed, view


def write_folds(params_path: Path, folds: Mapping[int, list[str]]) -> None:
    """Replace ``folds:`` in a params YAML file, keeping its comments and layout (ruamel round-trip).

    Written atomically (:func:`pipeline.atomic.atomic_write`).

    Raises:
        ClassTableError: the file has no top-level ``folds:`` mapping.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedSeq

    params_path = Path(params_path)
    yaml = YAML()
    yaml.preserve_quotes = True
    doc = yaml.load(params_path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("folds"), dict):
        raise ClassTableError(f"{params_path}: no top-level 'folds:' mapping to extend")
    table = doc["folds"]
    for f, classes in folds.items():
        seq = CommentedSeq(classes)
        seq.fa.set_flow_style()
        table[int(f)] = seq
    def dump(tmp: Path) -> None:
        with tmp.open("w") as fh:
            yaml.dump(doc, fh)

    atomic_write(params_path, dump)
    log.info("wrote fold table %s to %s", dict(folds), params_path)
