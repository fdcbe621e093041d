"""``lerenet classes add|list|show|remove``: defect classes by name (``pipeline/classes_store.py``)."""

from __future__ import annotations

from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_INFERENCE, App

classes_app = App(help="Defect classes by name: store 1-5 annotated images of a defect once, then "
                       "`lerenet predict --class NAME` and REST requests with a `class` column use them.\n\n"
                       "Example:\n  lerenet classes add Steel_In --from-dir ../shared/datasets/defects12/Steel_In",
                  no_args_is_help=True)
app.add_typer(classes_app, name="classes", rich_help_panel=PANEL_INFERENCE)


def _fail_store(exc: Exception) -> None:
    fail(str(exc), 1 if getattr(exc, "missing", False) else 2)


@classes_app.command("add")
def add_cmd(
    name: str = typer.Argument(..., help="class name: ASCII letters, digits, _ - . + (e.g. Steel_Scratch)"),
    support: list[str] = typer.Option(None, "--support", "-s", help="support pair IMAGE:MASK (repeatable, 1 to 5)"),
    from_dir: Path = typer.Option(None, "--from-dir", help="Surface-Defects-4i class folder (Images/ + GT/): "
                                  "its first 5 images by file name"),
    replace: bool = typer.Option(False, "--replace", help="replace an existing class (a new version)"),
    params_path: Path = ParamsOption,
) -> None:
    """Store the support set of a defect class (images, masks and class.json with who, when and the
    sha256 of each file) in the class store (params classes.dir); also uploaded to S3 when an S3
    endpoint is configured. Nothing is written if any pair is bad.

    Example:
      lerenet classes add Steel_Scratch --support shots/a.png:shots/a_mask.png --support shots/b.png:shots/b_mask.png
    """
    from pipeline.classes_store import ClassStoreError, add_class, support_pairs
    from pipeline.storage import StorageError

    params = params_or_exit(params_path)
    try:
        info = add_class(params, name, support_pairs(support or [], from_dir), replace=replace)
    except ClassStoreError as exc:
        _fail_store(exc)
        return
    except StorageError as exc:
        fail(f"{exc}; the class was not stored")
        return
    typer.echo(f"class {info.name} version {info.version}: {info.shots} shot(s), fingerprint {info.fingerprint}, "
               f"by {info.created_by} at {info.created} -> {info.folder}")
    for uri in info.uploaded:
        typer.echo(f"  uploaded {uri}")


@classes_app.command("list")
def list_cmd(params_path: Path = ParamsOption) -> None:
    """List the stored classes: name, version, shots, who added it and when.

    Example:
      lerenet classes list
    """
    from pipeline.classes_store import list_classes, store_dir

    params = params_or_exit(params_path)
    rows = list_classes(params)
    if not rows:
        typer.echo(f"no class in {store_dir(params)}; add one with `lerenet classes add NAME --support IMAGE:MASK`")
        return
    typer.echo(f"{'class':<24}{'version':>8}{'shots':>6}  {'fingerprint':<17}{'added by':<14}created")
    for c in rows:
        if c.problem:
            typer.echo(f"{c.name:<24}{'-':>8}{'-':>6}  damaged: {c.problem}")
            continue
        typer.echo(f"{c.name:<24}{c.version:>8}{c.shots:>6}  {c.fingerprint:<17}{c.created_by:<14}{c.created}")
    typer.echo(f"{len(rows)} class(es) in {store_dir(params)}")


@classes_app.command("show")
def show_cmd(name: str = typer.Argument(..., help="class name"), params_path: Path = ParamsOption) -> None:
    """Show a class's record and check every file against its sha256 (exit status 1 if one differs).

    Example:
      lerenet classes show Steel_Scratch
    """
    from pipeline.classes_store import ClassStoreError, show_class

    params = params_or_exit(params_path)
    try:
        info = show_class(params, name)
    except ClassStoreError as exc:
        _fail_store(exc)
        return
    typer.echo(f"class {info.name} version {info.version}: {info.shots} shot(s), mask threshold "
               f"{info.record.get('mask_threshold')}, by {info.created_by} at {info.created}")
    typer.echo(f"  folder {info.folder}, fingerprint {info.fingerprint}")
    for s in info.record["supports"]:
        typer.echo(f"  {s['image']} ({s['width']}x{s['height']}, defect {100 * s['defect_fraction']:.2f} %) "
                   f"sha256 {s['image_sha256'][:16]}…  {s['mask']} sha256 {s['mask_sha256'][:16]}…")
    if info.problem:
        fail(info.problem)
    typer.echo("  files match their sha256")


@classes_app.command("remove")
def remove_cmd(name: str = typer.Argument(..., help="class name"), params_path: Path = ParamsOption) -> None:
    """Remove a class from the store (and its S3 latest.json pointer; versioned S3 objects stay).

    Example:
      lerenet classes remove Steel_Scratch
    """
    from pipeline.classes_store import ClassStoreError, remove_class
    from pipeline.storage import StorageError

    params = params_or_exit(params_path)
    try:
        info = remove_class(params, name)
    except ClassStoreError as exc:
        _fail_store(exc)
        return
    except StorageError as exc:
        fail(f"class {name} was removed locally, but its S3 pointer was not deleted: {exc}")
        return
    typer.echo(f"removed class {info.name} (version {info.version}) from {info.folder.parent}")
