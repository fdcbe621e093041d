"""Serve the Prefect deployments: scheduled ``retrain_on_new_classes`` and on-demand ``training_pipeline``.

``python -m flows.deploy --params params.yaml`` (what ``lerenet serve`` starts as the service process
``prefect-serve``) registers both deployments with the Prefect server at ``$PREFECT_API_URL`` and
executes their runs until stopped (SIGTERM pauses the deployments and exits; stop it before the
server, ``../shared/STACK.md``).

* ``retrain_on_new_classes/retrain-on-new-classes``: cron ``params.retrain.cron`` read in the time zone
  ``params.retrain.timezone`` (default UTC; the Prefect UI shows both), ``concurrency_limit=1`` -- a run
  that comes due while one is running waits (never overlaps);
* ``training_pipeline/training-pipeline``: no schedule (trigger from the UI or
  ``prefect deployment run training_pipeline/training-pipeline``), ``concurrency_limit=1``.

:func:`start_serving` / :func:`stop_serving` (``lerenet serve [--stop]``): the Prefect server of the
team services (:mod:`pipeline.services`) plus this module as the service process ``prefect-serve``,
healthy once both deployments are registered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SERVE_NAME = "prefect-serve"
RETRAIN_DEPLOYMENT = "retrain-on-new-classes"
TRAINING_DEPLOYMENT = "training-pipeline"
DEPLOYMENT_NAMES = (f"retrain_on_new_classes/{RETRAIN_DEPLOYMENT}", f"training_pipeline/{TRAINING_DEPLOYMENT}")


def build_deployments(params_path: str | os.PathLike[str] | None = None) -> list[Any]:
    """The two ``RunnerDeployment`` objects (module docstring) for the params file ``params_path``."""
    from prefect.schedules import Cron

    from flows.retrain import params_file, retrain_on_new_classes
    from flows.training_pipeline import training_pipeline
    from pipeline.config import load_params

    path = params_file(params_path)
    params = load_params(path)
    common = {"parameters": {"params_path": str(path)}, "concurrency_limit": 1, "tags": ["lerenet"]}
    return [
        retrain_on_new_classes.to_deployment(
            name=RETRAIN_DEPLOYMENT, schedule=Cron(params.retrain.cron, timezone=params.retrain.timezone),
            description="Retrain when new defect classes arrive in data.source/data.incoming", **common),
        training_pipeline.to_deployment(
            name=TRAINING_DEPLOYMENT,
            description="Ingest -> validate -> split -> CV train/evaluate -> production model -> register -> promote",
            **common),
    ]


def deployments_registered(api_url: str) -> bool:
    """True when both deployments exist on the Prefect server (``POST /deployments/filter``)."""
    import urllib.request

    req = urllib.request.Request(f"{api_url}/deployments/filter", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 (loopback URL from params)
            names = {d.get("name") for d in json.loads(resp.read())}
    except (OSError, ValueError):
        return False
    return {n.split("/", 1)[1] for n in DEPLOYMENT_NAMES} <= names


@dataclass
class Serving:
    """What :func:`start_serving` started: the Prefect server status(es), the served process, its API URL,
    and the seconds until both deployments were registered."""

    servers: list[Any]
    served: Any
    api_url: str
    seconds: float


def start_serving(params: Any, params_path: str | os.PathLike[str] | None = None, *, timeout: float = 120) -> Serving:
    """Start the Prefect server (``pipeline.services.up(only=["prefect"])``) and this module as service
    process :data:`SERVE_NAME`, waiting up to ``timeout`` s for both deployments to register.

    Raises:
        pipeline.services.ServiceError: a port is taken, or a process fails / stays unhealthy.
    """
    from pipeline import services as svc

    servers = svc.up(params, ["prefect"])
    api = svc.prefect_api_url(params)
    path = Path(params_path).resolve() if params_path is not None else params.root / "params.yaml"
    t0 = time.monotonic()
    served = svc.start_process(params, SERVE_NAME, [sys.executable, "-m", "flows.deploy", "--params", str(path)],
                               env={"PREFECT_API_URL": api}, health=lambda: deployments_registered(api), url=api,
                               timeout=timeout, cwd=params.root)
    return Serving(servers, served, api, time.monotonic() - t0)


def stop_serving(params: Any) -> list[tuple[str, str]]:
    """Stop the served process first (else ``serve()`` hangs on "Pausing all deployments..."), then the
    Prefect server; returns ``[(name, result)]``."""
    from pipeline import services as svc

    return [(SERVE_NAME, svc.stop_process(params, SERVE_NAME)), *svc.down(params, ["prefect"])]


def main(argv: list[str] | None = None) -> None:
    """Entry point: build the deployments and ``prefect.serve`` them (blocks until SIGTERM/SIGINT)."""
    from prefect import serve

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=None, help="params.yaml (default project / $LERENET_PARAMS)")
    args = ap.parse_args(argv)
    serve(*build_deployments(args.params))


if __name__ == "__main__":  # pragma: no cover
    main()
