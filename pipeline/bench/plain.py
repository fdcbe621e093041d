"""The training pipeline as plain Python: the step functions called in order, no orchestrator.

The baseline of the benchmark's pipeline-overhead case: the same steps, in the same order, as the
DVC stages (``dvc.yaml``) and the Prefect flow ``training_pipeline`` (``flows/training_pipeline.py``):
ingest -> validate -> split -> features -> train (fold x model) -> evaluate (fold) -> report ->
train_production -> register -> promote (+ decision record), one process, folds one after the
other, no caching or skipping. Run as::

    python -m pipeline.bench.plain --params params.yaml

and prints the wall seconds per step as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def run_pipeline(params_path: str | os.PathLike[str]) -> dict[str, float]:
    """Run every step once on ``params_path``; returns ``{step: wall seconds}``.

    The MLflow parent run is created after validation (as the flow does) and closed FINISHED, or
    FAILED if a step raises. Raises whatever the failing step raises.
    """
    from pipeline import tracking
    from pipeline.classes import source_view
    from pipeline.config import PRODUCTION_MODEL, load_params
    from pipeline.evaluate import evaluate
    from pipeline.features import build_feature_store
    from pipeline.ingest import ingest
    from pipeline.report import write_report
    from pipeline.split import split
    from pipeline.train import train
    from pipeline.usecases.register import gate, register_production
    from pipeline.validate import validate

    params = load_params(params_path)
    seconds: dict[str, float] = {}

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        seconds[name] = round(seconds.get(name, 0.0) + time.perf_counter() - t0, 3)
        return out

    timed("ingest", lambda: ingest(params, source=source_view(params), progress=False))
    timed("validate", validate, params)
    parent = tracking.parent_run_id(params)
    os.environ[tracking.PARENT_ENV] = parent
    status = "FAILED"
    try:
        timed("split", split, params)
        if params.model.freeze_backbone:
            timed("features", build_feature_store, params, progress=False)
        for fold in sorted(params.folds):
            for name in params.model.names:
                timed("train", train, params, fold, name, progress=False)
            timed("evaluate", evaluate, params, fold)
        timed("report", write_report, params)
        result = timed("train_production", train, params, None, PRODUCTION_MODEL, progress=False)
        version = timed("register", register_production, params, PRODUCTION_MODEL, Path(result.model_path))
        timed("promote", gate, params, version)
        status = "FINISHED"
    finally:
        os.environ.pop(tracking.PARENT_ENV, None)
        tracking.finish_parent(params, parent, status)
    return seconds


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Command-line entry: ``--params FILE``; prints ``{step: seconds}`` as JSON."""
    ap = argparse.ArgumentParser(description="Run the training pipeline's step functions in order (no orchestrator).")
    ap.add_argument("--params", default=None, help="params.yaml (default: project params.yaml / $LERENET_PARAMS)")
    args = ap.parse_args(argv)
    out = run_pipeline(args.params)
    print(json.dumps(out))
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
