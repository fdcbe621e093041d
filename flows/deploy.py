"""Serve the Prefect deployments: scheduled ``retrain_on_new_classes`` and on-demand ``training_pipeline``.

``python -m flows.deploy --params params.yaml`` (what ``lerenet serve`` starts as the service process
``prefect-serve``) registers both deployments with the Prefect server at ``$PREFECT_API_URL`` and
executes their runs until stopped (SIGTERM pauses the deployments and exits; stop it before the
server, ``../shared/STACK.md``).

* ``retrain_on_new_classes/retrain-on-new-classes``: cron ``params.retrain.cron`` (UTC),
  ``concurrency_limit=1`` -- a run that comes due while one is running waits (never overlaps);
* ``training_pipeline/training-pipeline``: no schedule (trigger from the UI or
  ``prefect deployment run training_pipeline/training-pipeline``), ``concurrency_limit=1``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

RETRAIN_DEPLOYMENT = "retrain-on-new-classes"
TRAINING_DEPLOYMENT = "training-pipeline"
DEPLOYMENT_NAMES = (f"retrain_on_new_classes/{RETRAIN_DEPLOYMENT}", f"training_pipeline/{TRAINING_DEPLOYMENT}")


def build_deployments(params_path: str | os.PathLike[str] | None = None) -> list[Any]:
    """The two ``RunnerDeployment`` objects (module docstring) for the params file ``params_path``."""
    from flows.retrain import params_file, retrain_on_new_classes
    from flows.training_pipeline import training_pipeline
    from pipeline.config import load_params

    path = params_file(params_path)
    params = load_params(path)
    common = {"parameters": {"params_path": str(path)}, "concurrency_limit": 1, "tags": ["lerenet"]}
    return [
        retrain_on_new_classes.to_deployment(
            name=RETRAIN_DEPLOYMENT, cron=params.retrain.cron,
            description="Retrain when new defect classes arrive in data.source/data.incoming", **common),
        training_pipeline.to_deployment(
            name=TRAINING_DEPLOYMENT,
            description="Ingest -> validate -> split -> CV train/evaluate -> production model -> register -> promote",
            **common),
    ]


def main(argv: list[str] | None = None) -> None:
    """Entry point: build the deployments and ``prefect.serve`` them (blocks until SIGTERM/SIGINT)."""
    from prefect import serve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=None, help="params.yaml (default project / $LERENET_PARAMS)")
    args = ap.parse_args(argv)
    serve(*build_deployments(args.params))


if __name__ == "__main__":  # pragma: no cover
    main()
