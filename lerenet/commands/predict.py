"""``lerenet predict`` (masks for a folder of new images) and ``lerenet bench-predict`` (queries/s)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_BENCH, PANEL_INFERENCE
from pipeline.inference.limits import MAX_TRANSDUCTIVE_STEPS


def _device(name: str):
    from pipeline.device import configure_threads, resolve_device

    if name not in ("auto", "cpu", "cuda"):
        fail(f"--device must be auto, cpu or cuda, got {name!r}", 2)
    try:
        dev = resolve_device(name)
    except ValueError:
        fail("--device cuda but no CUDA device is visible; use --device auto or cpu", 2)
    configure_threads(dev)
    return dev


def _predictor(spec: str | None, params, device, architecture: str | None = None):
    from pipeline.inference.model_file import CheckpointError
    from pipeline.inference.resolve import ModelNotFoundError
    from pipeline.predict import load_predictor
    from pipeline.usecases.bench import untrained_predictor

    try:
        if architecture:
            return untrained_predictor(params, architecture, device)
        return load_predictor(params, spec, device)
    except (ModelNotFoundError, CheckpointError, ValueError) as exc:
        fail(str(exc))


def _class_supports(params, name: str):
    """``(pairs, mask threshold, {"name", "version", "fingerprint"})`` of a stored class; exits 1 (unknown
    or damaged class) or 2 (bad name) with the store's message."""
    from pipeline.classes_store import ClassStoreError, class_pairs
    from pipeline.config import check_class_name

    try:
        check_class_name(name)
    except ValueError as exc:
        fail(f"--class: {exc}", 2)
    try:
        pairs, info = class_pairs(params, name)
    except ClassStoreError as exc:  # unknown class, or files that do not match their sha256
        fail(str(exc), 1)
    return pairs, int(info.record["mask_threshold"]), {"name": info.name, "version": info.version,
                                                        "fingerprint": info.fingerprint}


TABLE_COLUMNS = ("image", "defect %", "components", "largest box (x, y, w, h)", "max score")
"""Column headers of the table ``lerenet predict`` prints (rows: :func:`pipeline.predict.image_table`)."""


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(*TABLE_COLUMNS, box=None, header_style="bold", pad_edge=False)
    for col in table.columns[1:]:
        col.justify = "right"
    for r in rows:
        box = ", ".join(str(v) for v in r["largest_box"]) if r["largest_box"] else "-"
        table.add_row(escape(r["image"]), f"{r['defect_percent']:.2f}", str(r["components"]), box,
                      f"{r['max_score']:.3f}")
    Console(soft_wrap=False).print(table)


@app.command("predict", rich_help_panel=PANEL_INFERENCE)
def predict(
    query: list[Path] = typer.Option(..., "--query", "-q", help="query image file or folder (repeatable)"),
    reference: list[Path] = typer.Option(None, "--reference", "-r",
                                         help="defect-free image of the queries' surface, file or folder (repeatable); "
                                              "used by a model file whose presence gate was calibrated with "
                                              "references (train.presence_references), ignored otherwise"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (must not exist unless --overwrite)"),
    support: list[str] = typer.Option(None, "--support", "-s", help="support pair IMAGE:MASK (repeatable)"),
    support_dir: Path = typer.Option(None, "--support-dir",
                                     help="Surface-Defects-4i class folder (Images/ + GT/) to take supports from"),
    shots_limit: int = typer.Option(5, "--shots-limit", min=1,
                                    help="with --support-dir: use the first N images (file-name order)"),
    class_name: str = typer.Option(None, "--class", "-c",
                                   help="use the stored support set of this class (`lerenet classes add`) "
                                        "instead of --support / --support-dir"),
    model: str = typer.Option(None, "--model", "-m",
                              help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/PATH or a model.pt "
                                   "(default: the registry's champion, alias champion of mlflow.registered_model)"),
    threshold: float = typer.Option(0.5, "--threshold", help="defect where probability > threshold, in (0, 1)"),
    transductive_steps: int = typer.Option(None, "--transductive-steps", min=0, max=MAX_TRANSDUCTIVE_STEPS,
                                           help="test-time refinement steps of the hypercolumn probe on each query "
                                                "(0 = off; default: the model file's model.transductive_steps)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="queries decoded and run together"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out folder"),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="progress bar over the queries"),
    params_path: Path = ParamsOption,
) -> None:
    """Segment query images with a few annotated support images.

    Writes, per query, masks/<stem>.png (255 = defect, original size) and overlays/<stem>.png, plus
    summary.json for the batch, and prints a table: per image the defect area in %, the number of
    connected defect regions, the largest region's box (x, y, width, height in pixels of the image)
    and the highest defect probability. Supports are encoded once and reused for every query.
    Non-image files in a query folder are skipped with a warning. With --class NAME the supports are
    the class's stored set (checked against its sha256s). With --reference (defect-free images of the
    same surface) the presence gate scores each query relative to them, if the model file was
    calibrated with references; otherwise they are ignored with a warning.

    Example:
      lerenet predict --support-dir ../shared/datasets/defects12/Steel_In --shots-limit 5 \\
        --query new_images/ --out predictions/
    """
    from pipeline.inference.predictor import PredictInputError
    from pipeline.predict import image_table, predict_folder
    from pipeline.request_files import parse_support_pair, supports_from_class_dir

    params = params_or_exit(params_path)
    mask_threshold, stored = params.data.mask_threshold, None
    try:
        pairs = [parse_support_pair(s) for s in (support or [])]
        if support_dir is not None:
            pairs += supports_from_class_dir(support_dir, shots_limit)
        if class_name is not None:
            if pairs:
                raise PredictInputError(f"--class {class_name} and --support/--support-dir: give one of them")
            pairs, mask_threshold, stored = _class_supports(params, class_name)
        if not pairs:
            raise PredictInputError("no support given: pass --support IMAGE:MASK (repeatable), --support-dir DIR "
                                    "or --class NAME")
        if not 0.0 < threshold < 1.0:
            raise PredictInputError(f"--threshold must be a probability in (0, 1), got {threshold}")
        if out.exists() and not overwrite:
            raise PredictInputError(f"{out} exists; pass --overwrite or another --out")
    except PredictInputError as exc:
        fail(str(exc), 2)
    dev = _device(device)
    resolved = _predictor(model, params, dev)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda msg, *a, **k: typer.echo(f"warning: {msg}", err=True)  # type: ignore[assignment]
        try:
            with resolved.transductive(transductive_steps):
                summary = predict_folder(resolved, pairs, [str(q) for q in query], out, threshold=threshold,
                                         mask_threshold=mask_threshold, batch_size=batch_size,
                                         overwrite=overwrite, progress=progress, support_class=stored,
                                         references=[str(r) for r in reference or []])
        except PredictInputError as exc:
            fail(str(exc), 2)
    m = summary["model"]
    version = f" version {m['version']}" if m["version"] else ""
    _print_table(image_table(summary))
    cls = f", class {stored['name']} v{stored['version']}" if stored else ""
    refs = summary["references"]
    refs = f", {len(refs)} reference(s) {'used' if summary['references_used'] else 'ignored'}" if refs else ""
    typer.echo(f"{len(summary['images'])} mask(s) from {m['model']} ({m['uri']}{version}), "
               f"K={summary['shots']}{cls}{refs}, threshold {threshold}; skipped {len(summary['skipped'])}; "
               f"summary: {out / 'summary.json'}")


@app.command("bench-predict", rich_help_panel=PANEL_BENCH)
def bench_predict_cmd(
    model: str = typer.Option(None, "--model", "-m", help="model URI or model.pt (default: the registry champion)"),
    architecture: str = typer.Option(None, "--architecture",
                                     help="time an untrained lerenet|baseline|prototype instead of --model "
                                          "(same cost as a trained one)"),
    class_dir: Path = typer.Option(None, "--class-dir",
                                   help="class folder for supports and queries (default <data.source>/Steel_In, 200x200)"),
    queries: int = typer.Option(64, "--queries", min=1, help="number of query images"),
    shots: int = typer.Option(1, "--shots", min=1, help="K support images"),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    repeats: int = typer.Option(3, "--repeats", min=1, help="timed passes (best is reported)"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    json_out: Path = typer.Option(None, "--json", help="also write the figures to this JSON file"),
    params_path: Path = ParamsOption,
) -> None:
    """Queries per second with supports encoded once (cached) vs re-encoded per query; prints the figures.

    Example:
      lerenet bench-predict --architecture lerenet --queries 32 --shots 5 --device cpu
    """
    from pipeline.atomic import atomic_write_text
    from pipeline.inference.predictor import PredictInputError
    from pipeline.usecases.bench import bench_inference

    params = params_or_exit(params_path)
    dev = _device(device)
    predictor = _predictor(model, params, dev, architecture)
    try:
        res = bench_inference(params, predictor, class_dir, queries=queries, shots=shots,
                                       batch_size=batch_size, repeats=repeats)
    except (ValueError, PredictInputError) as exc:
        fail(str(exc))
        return
    typer.echo(f"{predictor.meta.get('model')} ({predictor.source.uri}) K={shots} S={predictor.image_size} "
               f"device={res['device']} threads={res['threads']} batch={batch_size} queries={queries}")
    typer.echo(f"  supports cached:     {res['cached_qps']:8.2f} queries/s")
    typer.echo(f"  supports not cached: {res['uncached_qps']:8.2f} queries/s")
    typer.echo(f"  speed-up:            {res['speedup']:8.2f}x")
    if json_out:
        atomic_write_text(Path(json_out), json.dumps(res, indent=2) + "\n")
