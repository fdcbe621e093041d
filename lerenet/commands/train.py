"""``lerenet features`` and ``lerenet train``: the feature cache and episodic training."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_TRAIN


def _fold(value: str) -> int | None:
    if value.lower() in ("all", "none", "production"):
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"--fold must be a fold number from params.yaml or 'all', got {value!r}", code=2)
    return None  # unreachable


@app.command("features", rich_help_panel=PANEL_TRAIN)
def features_cmd(params_file: Path | None = ParamsOption,
                 force: bool = typer.Option(False, "--force", help="rebuild even if an up-to-date store exists")) -> None:
    """Encode every validated image once with the frozen backbone (clean + augmented views) into data/features/.

    Example:
      lerenet features --force
    """
    from pipeline.features import FeatureStoreError, build_feature_store
    from pipeline.images import DataArtifactError

    params = params_or_exit(params_file)
    try:
        path = build_feature_store(params, force=force)
    except (FeatureStoreError, DataArtifactError) as exc:
        fail(str(exc))
    typer.echo(str(path))


@app.command("train", rich_help_panel=PANEL_TRAIN)
def train_cmd(fold: str = typer.Option(..., "--fold", help="fold number from params.yaml, or 'all' (production model on every class)"),
              model: str = typer.Option(..., "--model", help="lerenet | baseline | prototype"),
              params_file: Path | None = ParamsOption,
              no_track: bool = typer.Option(False, "--no-track", help="do not log to MLflow")) -> None:
    """Train one model on one fold's training classes; writes models/<fold>/<model>/model.pt (resumes from a checkpoint).

    Example:
      lerenet train --fold 0 --model lerenet --no-track
    """
    from pipeline.checkpoint import CheckpointError
    from pipeline.features import FeatureStoreError
    from pipeline.images import DataArtifactError
    from pipeline.lock import ProjectLocked, params_lock
    from pipeline.train import result_dict, train

    params = params_or_exit(params_file)
    f = _fold(fold)
    try:
        with params_lock(params, f"lerenet train --fold {fold} --model {model}"):
            result = train(params, f, model, track=not no_track)
    except ProjectLocked as exc:
        fail(str(exc), code=75)  # EX_TEMPFAIL: try again later
    except (ValueError, FeatureStoreError, DataArtifactError, CheckpointError) as exc:
        fail(str(exc))
    typer.echo(json.dumps(result_dict(result), indent=2))
