"""Evaluation commands: ``lerenet evaluate`` (DVC stage ``evaluate`` / any folder) and ``lerenet report``.

* ``lerenet evaluate --fold F`` scores the fold's trained models on its saved episodes and writes
  ``metrics/fold<F>.json``, ``metrics/per_class/fold<F>.csv``, ``metrics/plots/per_class_fold<F>.csv``
  (and logs into MLflow).
* ``lerenet evaluate --data DIR --model URI_OR_CHECKPOINT --shots K`` scores one model on any
  Surface Defects-4i-layout folder, all classes novel, episodes drawn with ``--seed``; prints JSON.
* ``lerenet report`` aggregates ``metrics/fold*.json`` into ``docs/results_table.md``.

Exit status: 1 for missing artifacts / unusable data, 2 for bad parameters or options.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_TRAIN


@app.command("evaluate", rich_help_panel=PANEL_TRAIN)
def evaluate_cmd(
    fold: int = typer.Option(None, "--fold", help="fold to evaluate on its saved episodes (pipeline stage)"),
    models: str = typer.Option(None, "--models", help="comma-separated models for --fold (default: model.names)"),
    data: Path = typer.Option(None, "--data", help="any folder in Surface Defects-4i layout: all its classes are novel"),
    model: str = typer.Option(None, "--model", help="with --data: model.pt, MLflow URI (models:/NAME@champion, "
                              "runs:/ID/model) or 'prototype' (untrained prototype model)"),
    shots: int = typer.Option(1, "--shots", min=1, help="with --data: K supports per episode"),
    episodes: int = typer.Option(1000, "--episodes", min=1, help="with --data: number of episodes"),
    seed: int = typer.Option(0, "--seed", help="with --data: episode seed"),
    device: str = typer.Option("auto", "--device", help="with --data: auto | cpu | cuda"),
    references: int = typer.Option(None, "--references", min=0,
                                   help="with --data: defect-free reference images per material taken from the "
                                        "folder's Nd (default: as many as the model file's gate was calibrated "
                                        "with; 0: none)"),
    no_track: bool = typer.Option(False, "--no-track", help="with --fold: do not log into MLflow"),
    params_file: Path = ParamsOption,
) -> None:
    """Score models: --fold F (saved episodes, writes metrics/) or --data DIR --model M --shots K (prints JSON).

    Examples:
      lerenet evaluate --fold 0
      lerenet evaluate --data my_incoming/ --model models:/lerenet-defects@champion --shots 5 --episodes 200
    """
    from pipeline.evaluation.data import EvaluationError
    from pipeline.images import DataArtifactError
    from pipeline.inference.model_file import CheckpointError
    from pipeline.inference.resolve import ModelNotFoundError
    from pipeline.layout import Layout

    if (fold is None) == (data is None):
        fail("give exactly one of --fold F (pipeline) or --data DIR --model M (any folder)", 2)
        return
    if data is not None:
        if not model:
            fail("--data needs --model (a model.pt, an MLflow model URI, or 'prototype')", 2)
            return
        from pipeline.evaluation.folder import evaluate_folder

        try:
            params = params_or_exit(params_file) if params_file else None
            threshold = params.data.mask_threshold if params else 127
            size = params.train.image_size if params else None
            result = evaluate_folder(data.resolve(), model, shots, episodes, seed, threshold=threshold,
                                     device=device, image_size=size, references=references)
        except (EvaluationError, CheckpointError, ModelNotFoundError, ValueError) as exc:
            fail(str(exc))
            return
        typer.echo(json.dumps(result, indent=2))
        return
    import logging

    from pipeline.evaluate import evaluate

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = params_or_exit(params_file)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    try:
        result = evaluate(params, fold, names, track=not no_track)
    except (EvaluationError, CheckpointError, DataArtifactError, KeyError) as exc:
        fail(exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc))
        return
    layout = Layout.of(params)
    for name, m in result.models.items():
        cells = [f"k{k}/{protocol} mIoU {score.miou:.3f}" for k, by in m.scores.items() for protocol, score in by.items()]
        cells += [f"k{k} support gain {m.support_gain(k):+.3f}" for k in m.mismatched if m.support_gain(k) is not None]
        typer.echo(f"fold {fold} {name}: " + ", ".join(cells))
    typer.echo(f"wrote {layout.fold_metrics(fold)}, {layout.per_class(fold)}, {layout.per_class_plot(fold)}")


@app.command("report", rich_help_panel=PANEL_TRAIN)
def report_cmd(
    out: Path = typer.Option(None, "--out", help="markdown file to write (default docs/results_table.md)"),
    params_file: Path = ParamsOption,
) -> None:
    """Aggregate metrics/fold*.json into a markdown results table (models x K x protocol, per fold and mean).

    Example:
      lerenet report --out docs/results_table.md
    """
    from pipeline.report import ReportError, write_report

    params = params_or_exit(params_file)
    try:
        path = write_report(params, out.resolve() if out else None)
    except ReportError as exc:
        fail(str(exc))
        return
    typer.echo(f"wrote {path}")
