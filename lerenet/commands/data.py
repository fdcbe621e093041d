"""Data commands: ``lerenet ingest``, ``lerenet validate``, ``lerenet split`` (DVC stages of the same names).

Each loads ``params.yaml`` once (``--params`` or ``$LERENET_PARAMS``), runs the step function
from ``pipeline/`` and exits non-zero with a message naming the file, row and rule on bad input
(status 1 for bad data, 2 for bad parameters).
"""

from __future__ import annotations

from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_DATA


def _data_override(data_dir: Path | None) -> dict | None:
    # the data folder given on the command line is relative to the working directory
    return {"data": {"dir": str(data_dir.resolve())}} if data_dir else None


@app.command("ingest", rich_help_panel=PANEL_DATA)
def ingest_cmd(
    source: Path = typer.Option(None, "--source", help="source folder in Surface Defects-4i layout "
                                "(<Class>/Images, <Class>/GT, optional <Class>/Nd); default data.source or $LERENET_SOURCE"),
    out: Path = typer.Option(None, "--out", help="data folder to write raw/ and manifest.parquet into; default data.dir"),
    params_file: Path = ParamsOption,
) -> None:
    """Copy the source into <data>/raw and write <data>/manifest.parquet (one row per image).

    Without --source, the accepted classes are ingested (``pipeline.classes``): every class of
    data.source plus the classes of data.incoming named in the fold table, as the Prefect flow does.

    Example:
      lerenet ingest --source ../shared/datasets/defects12 --out data/
    """
    from pipeline.classes import ClassTableError, accepted_classes, source_view
    from pipeline.images import INGEST_REPORT
    from pipeline.ingest import IngestError, check_source, ingest, load_ingest_report

    params = params_or_exit(params_file, _data_override(out))
    try:
        if source is not None:
            origin = str(source.resolve())
            manifest = ingest(params, source=source.resolve(), warn=False)
        else:
            check_source(params.data.source)  # clear error for a missing source
            classes = accepted_classes(params)
            extra = sorted(set(classes) - {p.name for p in params.data.source.iterdir()})
            origin = str(params.data.source) + (f" + {extra} from {params.data.incoming}" if extra else "")
            manifest = ingest(params, source=source_view(params, classes), warn=False)
    except (IngestError, ClassTableError) as exc:
        fail(str(exc))
        return
    n_err = int(manifest["error"].notna().sum())
    typer.echo(f"ingested {len(manifest)} images of {manifest['class_name'].nunique()} classes from "
               f"{origin} into {params.data.dir}" + (f" ({n_err} do not decode: `lerenet validate` lists them)" if n_err else ""))
    report, _ = load_ingest_report(params.data.dir)
    skipped = (report or {}).get("skipped", [])
    if skipped:
        fatal = sum(1 for s in skipped if s.get("rule"))
        typer.echo(f"warning: {len(skipped)} entries of the source are not used by ingest"
                   + (f" ({fatal} will fail validation)" if fatal else "") + "; each is named with what to do in "
                   f"{params.data.dir / INGEST_REPORT}:", err=True)
        for s in skipped:
            typer.echo(f"  {s['path']}: {s['reason']} -> {s['action']}", err=True)


@app.command("validate", rich_help_panel=PANEL_DATA)
def validate_cmd(
    data: Path = typer.Option(None, "--data", help="data folder written by ingest; default data.dir"),
    params_file: Path = ParamsOption,
) -> None:
    """Validate the manifest (Great Expectations suite + pixel checks); write validated.parquet on success.

    Example:
      lerenet validate --data data/
    """
    from pipeline.images import DataArtifactError
    from pipeline.validate import DataValidationError, validate

    params = params_or_exit(params_file, _data_override(data))
    try:
        report = validate(params)
    except (DataValidationError, DataArtifactError) as exc:
        fail(str(exc))
        return
    typer.echo(f"validation passed: {report['rows']} rows, {report['usable_rows']} usable, "
               f"{len(report['excluded'])} excluded (see {params.data.dir / 'validation/report.json'}; "
               f"Data Docs: {params.data.dir / report['docs']})")
    for item in report["excluded"]:
        typer.echo(f"  excluded {item['file']}: {item['reason']}")
    for item in report["skipped"]:
        typer.echo(f"  not used by ingest {item['path']}: {item['reason']} -> {item['action']}")
    for warning in report["warnings"]:
        typer.echo(f"  warning: {warning}")


@app.command("split", rich_help_panel=PANEL_DATA)
def split_cmd(
    data: Path = typer.Option(None, "--data", help="data folder holding validated.parquet; default data.dir"),
    params_file: Path = ParamsOption,
) -> None:
    """Write per-fold splits (train/val/test ids) and the saved test episodes (paper, standard; each K).

    Example:
      lerenet split --params params.yaml
    """
    from pipeline.images import DataArtifactError
    from pipeline.split import SplitError, split

    params = params_or_exit(params_file, _data_override(data))
    try:
        summary = split(params)
    except (SplitError, DataArtifactError) as exc:
        fail(str(exc))
        return
    for fold, s in summary["folds"].items():
        eps = ", ".join(f"{k}={v}" for k, v in s["episodes"].items())
        typer.echo(f"fold {fold}: train {s['train']}, val {s['val']}, test {s['test']} images; episodes {eps}")


@app.command("import-coco", rich_help_panel=PANEL_DATA)
def import_coco_cmd(
    annotations: Path = typer.Argument(..., metavar="ANNOTATIONS.json",
                                       help="COCO instance-segmentation JSON exported by CVAT or Label Studio"),
    images: Path = typer.Option(..., "--images", metavar="DIR", help="folder the JSON's file_name entries are relative to"),
    out: Path = typer.Option(..., "--out", metavar="ROOT",
                             help="root to write <ROOT>/<Class>/Images and GT into (e.g. data.incoming); "
                                  "existing class folders are never overwritten"),
    categories: str = typer.Option(None, "--categories", metavar="A,B", help="category names to import (default: all "
                                                                               "annotated categories)"),
) -> None:
    """Import a labelling tool's COCO export (polygons, RLE) into the Surface Defects-4i layout.

    Each category becomes a class folder <ROOT>/<name>/ with Images/<stem>.png|jpg and GT/<stem>.png
    (255 = the union of the category's instances). Nothing is written when any entry is wrong.

    Example:
      lerenet import-coco export/annotations/instances_default.json --images export/images \\
        --out incoming/ --categories Leather_Fold
    """
    from pipeline.coco import CocoError, import_coco

    wanted = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    try:
        result = import_coco(annotations, images, out, wanted)
    except CocoError as exc:
        fail(str(exc))
        return
    for name, counts in sorted(result.classes.items()):
        typer.echo(f"wrote {out / name}: {counts['images']} images, {counts['instances']} instances")
    for note in result.notes:
        typer.echo(f"note: {note}")
